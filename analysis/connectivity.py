"""Linear mode connectivity: interpolation curves and loss barriers (layer-wise: :mod:`analysis.layerwise`).

Along the segment ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B`` the loss of two solutions
may rise (a *barrier*) or stay flat (the models are *linearly mode connected*). The literature
defines the barrier in several ways; :meth:`InterpolationCurve.barrier` names them:

* ``"chord"`` (Entezari et al., ICLR 2022, arXiv:2110.06296), the default:
  ``B = sup_alpha [ L(theta(alpha)) - ((1 - alpha) L_A + alpha L_B) ]``;
* ``"mean_endpoint"`` (Frankle et al., ICML 2020, arXiv:1912.05671, on error; Ainsworth et al.,
  Git Re-Basin, ICLR 2023, arXiv:2209.04836, on loss): ``B = max_alpha L(theta(alpha)) - (L_A + L_B)/2``;
* ``"midpoint"``: ``B = L(theta(1/2)) - (L_A + L_B)/2``.

They differ when ``L_A != L_B``: on a convex quadratic the chord barrier is 0 while the
mean-endpoint barrier is ``|L_A - L_B| / 2``. Layer-wise barriers (Adilova et al., ICLR 2024,
arXiv:2307.06966) interpolate one group of layers at a time (:mod:`analysis.layerwise`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from weightspace.results import Result, records_time, to_jsonable
from weightspace import state as _eval
from weightspace.checks import check_data, check_module

log = logging.getLogger(__name__)

__all__ = ["interpolate", "InterpolationCurve", "Barrier"]

_KINDS = ("chord", "mean_endpoint", "midpoint")


def _fn_name(fn: Any) -> Optional[str]:
    return None if fn is None else getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))


def _metric_names(metrics) -> List[str]:
    return [n for n, _ in _eval.normalize_metrics(metrics)]


def _as_loss_like(values: np.ndarray, metric: str) -> Tuple[np.ndarray, str]:
    """Barriers are computed on a lower-is-better quantity: accuracy becomes error = 1 - accuracy."""
    if metric == "accuracy":
        return 1.0 - values, "error"
    return values, metric


@dataclass(frozen=True)
class Barrier(Result):
    """One barrier of an interpolation curve.

    Attributes
    ----------
    value : float — the barrier (see :meth:`InterpolationCurve.barrier` for each ``kind``).
    alpha : float — where it is reached (the argmax; ``0.5`` for ``"midpoint"``).
    relative : float — ``value / ((L_A + L_B) / 2)`` (NaN when that mean is 0).
    kind : str — ``"chord"``, ``"mean_endpoint"`` or ``"midpoint"``.
    metric : str — the quantity the barrier is computed on (``"error"`` for accuracy).
    split : str — the data split.
    endpoint_a, endpoint_b : float — the quantity at alpha = 0 and alpha = 1.
    """

    value: float
    alpha: float
    relative: float
    kind: str
    metric: str
    split: str
    endpoint_a: float
    endpoint_b: float



def _barrier(alphas: np.ndarray, v: np.ndarray, kind: str) -> Tuple[float, float, float, float]:
    """(value, argmax alpha, L_A, L_B) of the barrier ``kind`` for values ``v`` at ``alphas``."""
    i0 = np.flatnonzero(alphas == 0.0)
    i1 = np.flatnonzero(alphas == 1.0)
    if len(i0) == 0 or len(i1) == 0:
        raise ValueError("the curve lacks alpha = 0 or alpha = 1; barriers need both endpoints")
    la, lb = float(v[i0[0]]), float(v[i1[0]])
    inside = (alphas >= 0.0) & (alphas <= 1.0)
    a, w = alphas[inside], v[inside]
    if kind == "chord":
        d = w - ((1.0 - a) * la + a * lb)
    elif kind == "mean_endpoint":
        d = w - 0.5 * (la + lb)
    elif kind == "midpoint":
        im = np.flatnonzero(alphas == 0.5)
        if len(im) == 0:
            raise ValueError("the midpoint barrier needs alpha = 0.5 on the grid; use an odd number of alphas "
                             "or include 0.5")
        return float(v[im[0]] - 0.5 * (la + lb)), 0.5, la, lb
    else:
        raise ValueError(f"unknown barrier kind {kind!r}; use one of {_KINDS}")
    i = int(np.nanargmax(d)) if np.any(np.isfinite(d)) else 0
    return float(d[i]), float(a[i]), la, lb


@dataclass(frozen=True, eq=False)
class InterpolationCurve(Result):
    """Metrics along a path of weights, ``theta(alpha)``, on one or more data splits.

    Attributes
    ----------
    alphas : np.ndarray, shape (K,)
        Sorted path parameters (always containing 0 and 1).
    values : dict
        ``values[split][metric]`` is a float64 array of shape (K,): the metric at each alpha, an
        example-weighted mean over the split.
    settings : dict
        What was computed and how: metrics, loss function, BN recalibration, evaluation mode
        (``"vmap"``/``"loop"``), examples per split, device, path kind.
    """

    alphas: np.ndarray
    values: Mapping[str, Mapping[str, np.ndarray]]
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    @property
    def splits(self) -> List[str]:
        return list(self.values)

    @property
    def metrics(self) -> List[str]:
        return list(next(iter(self.values.values())))

    def _series(self, metric: str, split: Optional[str]) -> Tuple[np.ndarray, str, str]:
        split = self.splits[0] if split is None else split
        if split not in self.values:
            raise ValueError(f"split {split!r} not in this curve; available: {self.splits}")
        vals = self.values[split]
        if metric == "error" and "error" not in vals and "accuracy" in vals:
            return 1.0 - vals["accuracy"], "error", split
        if metric not in vals:
            raise ValueError(f"metric {metric!r} not in this curve; available: {list(vals)}")
        v, m = _as_loss_like(np.asarray(vals[metric], dtype=np.float64), metric)
        return v, m, split

    def barrier(self, metric: str = "loss", split: Optional[str] = None, kind: str = "chord") -> Barrier:
        """The loss (or error) barrier along the curve.

        With ``L(alpha)`` the metric at ``theta(alpha)`` and ``L_A = L(0)``, ``L_B = L(1)``:

        * ``kind="chord"`` (Entezari et al. 2022, the default):
          ``max over alphas in [0, 1] of L(alpha) - ((1 - alpha) L_A + alpha L_B)`` — the height above
          the chord; 0 on any convex path; never negative when 0 and 1 are on the grid.
        * ``kind="mean_endpoint"`` (Frankle et al. 2020; Git Re-Basin):
          ``max over alphas in [0, 1] of L(alpha) - (L_A + L_B) / 2``.
        * ``kind="midpoint"``: ``L(1/2) - (L_A + L_B) / 2`` (needs 0.5 on the grid).

        The supremum is taken over the evaluated grid. For ``metric="accuracy"`` (or ``"error"``)
        the barrier is computed on the error ``1 - accuracy``, so a positive barrier always means
        "worse in between"; user metrics are treated as lower-is-better. ``relative`` divides by
        ``(L_A + L_B) / 2``.
        """
        v, m, split = self._series(metric, split)
        val, a, la, lb = _barrier(np.asarray(self.alphas, dtype=np.float64), v, kind)
        mean = 0.5 * (la + lb)
        rel = val / mean if mean != 0 else float("nan")
        return Barrier(value=val, alpha=a, relative=float(rel), kind=kind, metric=m, split=split,
                       endpoint_a=la, endpoint_b=lb)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: alphas, values, settings and the chord / mean-endpoint / midpoint barriers."""
        alphas = np.asarray(self.alphas, dtype=np.float64)
        barriers: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for s in self.splits:
            barriers[s] = {}
            for m in self.metrics:
                kinds = {}
                for k in _KINDS:
                    try:
                        kinds[k] = self.barrier(m, s, k).to_dict()
                    except ValueError:
                        continue
                barriers[s][m] = kinds
        return {
            "alphas": alphas.tolist(),
            "values": {s: {m: np.asarray(v).tolist() for m, v in d.items()} for s, d in self.values.items()},
            "settings": to_jsonable(self.settings),
            "barriers": barriers,
        }


def _alpha_grid(alphas: Union[int, Sequence[float]]) -> Tuple[np.ndarray, bool]:
    if isinstance(alphas, (int, np.integer)) and not isinstance(alphas, bool):
        if alphas < 2:
            raise ValueError(f"alphas={alphas}: ask for at least 2 points (the endpoints)")
        n = int(alphas)
        return np.array([((n - 1 - i) * 0.0 + i * 1.0) / (n - 1) for i in range(n)]), False
    a = np.asarray(list(alphas), dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("alphas must be an int or a non-empty 1-D sequence of floats")
    if not np.all(np.isfinite(a)):
        raise ValueError("alphas contain NaN or inf")
    added = not (np.any(a == 0.0) and np.any(a == 1.0))
    a = np.unique(np.concatenate([a, [0.0, 1.0]]))
    return a, added


def _endpoints(model_a: nn.Module, model_b: nn.Module):
    for nm, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{nm} must be an nn.Module, got {type(m).__name__}")
    sa, sb = _eval.state_of(model_a), _eval.state_of(model_b)
    _eval.check_compatible(sa, sb)
    _eval.check_finite(sa, "model_a")
    _eval.check_finite(sb, "model_b")
    return sa, sb


@records_time
def interpolate(model_a: nn.Module, model_b: nn.Module, data: Any, alphas: Union[int, Sequence[float]] = 11, *,
                splits: Union[None, str, Sequence[str]] = None, metrics=("loss", "accuracy"),
                loss_fn: Optional[Callable] = None, recalibrate_bn: Union[bool, str] = "auto", bn_data: Any = None,
                bn_batches: Optional[int] = None, batched: Union[bool, str] = "auto", batch_points: int = 64,
                device=None, progress=None) -> InterpolationCurve:
    """Evaluate the linear path between two models of one architecture.

    ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B`` over every floating parameter and buffer
    (integer buffers such as ``num_batches_tracked`` are taken from A). Neither model is modified;
    evaluation is in eval mode through :func:`torch.func.functional_call`.

    Parameters
    ----------
    model_a, model_b : nn.Module
        Same keys, shapes and dtypes (a mismatch raises naming the key and both shapes).
        ``model_a`` supplies the architecture.
    data : (X, Y) pair, iterable of (x, y) batches, or dict of named splits ``{"train": ..., "test": ...}``.
    alphas : int or sequence of float
        An int ``n`` gives ``n`` evenly spaced points in [0, 1] (odd ``n`` includes 1/2 exactly);
        a sequence is used as given (values outside [0, 1] extrapolate), with 0 and 1 added if absent.
    splits : names of the dict's splits to evaluate (default: all), or a name for a single dataset.
    metrics : names among ``"loss"``, ``"accuracy"``, ``"error"`` and/or callables ``fn(outputs, targets)``.
    loss_fn : callable ``(outputs, targets) -> scalar mean or per-example values``; default cross-entropy.
    recalibrate_bn : ``"auto"`` (on when the model has BatchNorm), True or False
        Recompute BatchNorm running statistics at **every** alpha, endpoints included (Jordan et al. 2023, REPAIR,
        arXiv:2211.08403),
        from ``bn_data`` or else the first split (use un-augmented training data).
    bn_batches : use only the first ``bn_batches`` batches for the BN pass.
    batched : ``"auto"``, True or False
        Evaluate up to ``batch_points`` alphas in one :func:`torch.func.vmap` pass over stacked
        weights; points that need BN recalibration are evaluated one by one.
    device : ``None`` (the model's device), ``"auto"``, ``"cpu"``, ``"cuda"``...
    progress : optional callback ``progress(done, total)``.

    Returns
    -------
    InterpolationCurve — ``curve.values[split][metric]`` of shape (len(alphas),), ``curve.barrier(...)``.

    Examples
    --------
    >>> curve = analysis.interpolate(model_a, model_b, (X, Y), alphas=11)   # doctest: +SKIP
    >>> curve.barrier("loss", kind="chord").value                          # doctest: +SKIP
    """
    check_module(model_a, "model_a", where="analysis.interpolate")
    check_module(model_b, "model_b", where="analysis.interpolate", allow_state=True)
    check_data(data, where="analysis.interpolate")
    sa, sb = _endpoints(model_a, model_b)
    grid, added = _alpha_grid(alphas)
    coeffs = np.stack([1.0 - grid, grid], axis=1)
    # exact endpoints: (1 - 0) * A + 0 * B == A and 0 * A + 1 * B == B bit for bit
    split_map = _eval.normalize_splits(data, splits)
    rec = _eval.resolve_recalibration(recalibrate_bn, model_a)
    values, info = _eval.evaluate_combinations(
        model_a, [sa, sb], coeffs, split_map, metrics=metrics, loss_fn=loss_fn, recalibrate_bn=rec,
        bn_data=bn_data, bn_batches=bn_batches, batched=batched, batch_points=batch_points, device=device,
        progress=progress, return_info=True)
    settings = {
        "path": "linear", "alphas_added_endpoints": added, "metrics": _metric_names(metrics),
        "loss_fn": _fn_name(loss_fn) or "cross_entropy", "recalibrate_bn": info["recalibrate_bn"],
        "bn_source": ("bn_data" if bn_data is not None else f"split:{next(iter(split_map))}")
        if info["recalibrate_bn"] else None,
        "bn_batches": bn_batches, "mode": info["mode"], "examples": info["examples"],
        "device": info["device"],
        "interpolated": "float parameters and buffers; integer buffers from model_a",
    }
    return InterpolationCurve(alphas=grid, values=values, settings=settings)
