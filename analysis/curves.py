"""Mode-connecting curves and planes through three solutions (Garipov et al., NeurIPS 2018).

A curve ``phi(t)``, ``t in [0, 1]``, joins two solutions ``theta_A = phi(0)`` and
``theta_B = phi(1)`` through ``n = bends + 2`` control points ``w_0 = theta_A, w_1..w_bends,
w_{n-1} = theta_B``:

* Bezier: ``phi(t) = sum_k C(n-1, k) t^k (1 - t)^(n-1-k) w_k``;
* PolyChain: ``phi(t) = sum_k max(0, 1 - |t (n-1) - k|) w_k`` (a broken line through the points).

The interior points are trained to minimise ``E_{t ~ U[0,1]} L(phi(t))`` with ``t`` uniform in the
parameter (not in arc length), endpoints fixed (Garipov, Izmailov, Podoprikhin, Vetrov, Wilson,
"Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", arXiv:1802.10026).
:func:`plane` evaluates the 2-D affine plane through three weight vectors. See Garipov et al. 2018 (NeurIPS,
arXiv:1802.10026).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from weightspace.results import Result, records_time, to_jsonable
from weightspace import state as _eval
from analysis.connectivity import InterpolationCurve, _fn_name, _metric_names
from weightspace.checks import check_data, check_finite, check_module
from weightspace.utils import shuffled_batches

log = logging.getLogger(__name__)

__all__ = ["train_curve", "ModeCurve", "CurveEvaluation", "plane", "PlaneResult"]

_CURVES = ("bezier", "polychain")


def _basis(kind: str, num_points: int, t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    n = num_points
    k = np.arange(n, dtype=np.float64)
    if kind == "bezier":
        binom = np.array([math.comb(n - 1, int(j)) for j in range(n)], dtype=np.float64)
        tt = t[..., None]
        return binom * tt ** k * (1.0 - tt) ** (n - 1 - k)  # 0.0 ** 0 == 1: exact endpoints
    if kind == "polychain":
        return np.maximum(0.0, 1.0 - np.abs(t[..., None] * (n - 1) - k))
    raise ValueError(f"unknown curve kind {kind!r}; use one of {_CURVES}")


def _torch_basis(kind: str, n: int, t: torch.Tensor) -> torch.Tensor:
    k = torch.arange(n, dtype=t.dtype)
    if kind == "bezier":
        binom = torch.tensor([math.comb(n - 1, j) for j in range(n)], dtype=t.dtype)
        return binom * t ** k * (1 - t) ** (n - 1 - k)
    return torch.clamp(1 - torch.abs(t * (n - 1) - k), min=0)


@dataclass(frozen=True, eq=False)
class CurveEvaluation(InterpolationCurve):
    """An :class:`InterpolationCurve` along a mode-connecting curve (``alphas`` are the ``t`` values).

    Extra attribute ``arc_length`` (shape (T,)): the cumulative Euclidean length of the polyline
    ``phi(t_0), ..., phi(t_i)`` over the parameters. :meth:`stats` gives Garipov et al.'s summaries.
    """

    arc_length: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def stats(self, metric: str = "loss", split: Optional[str] = None) -> Dict[str, float]:
        """``min``, ``max``, ``mean`` (uniform in t), ``arc_mean`` and ``length`` of a metric along the curve.

        ``arc_mean = sum_i (v_i + v_{i+1})/2 * dl_i / sum_i dl_i`` with ``dl_i`` the parameter distance
        between consecutive evaluated points; ``length = sum_i dl_i``. Values are the raw metric
        (``"error"`` is accepted for ``1 - accuracy``).
        """
        split = self.splits[0] if split is None else split
        if split not in self.values:
            raise ValueError(f"split {split!r} not evaluated; available: {self.splits}")
        vals = self.values[split]
        if metric == "error" and "error" not in vals and "accuracy" in vals:
            v = 1.0 - vals["accuracy"]
        elif metric in vals:
            v = np.asarray(vals[metric], dtype=np.float64)
        else:
            raise ValueError(f"metric {metric!r} not evaluated; available: {list(vals)}")
        dl = np.diff(np.asarray(self.arc_length, dtype=np.float64))
        length = float(dl.sum())
        arc_mean = float(np.sum(0.5 * (v[1:] + v[:-1]) * dl) / length) if length > 0 else float(v.mean())
        return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "arc_mean": arc_mean,
                "length": length}

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["arc_length"] = np.asarray(self.arc_length).tolist()
        d["stats"] = {s: {m: self.stats(m, s) for m in self.metrics} for s in self.splits}
        return d


@dataclass(frozen=True, eq=False)
class ModeCurve(Result):
    """A parametric curve in weight space between two models (Garipov et al. 2018).

    Attributes
    ----------
    model : nn.Module — the architecture used to evaluate points (never modified).
    kind : ``"bezier"`` or ``"polychain"``.
    control_points : tuple of state dicts, ``bends + 2`` of them; the first and last are the endpoints
        exactly. Floating tensors are curve coordinates; integer buffers come from the first.
    history : tuple of float — mean training loss (without weight decay) per epoch.
    settings : dict — training settings.
    """

    _skip_in_dict = ("model", "control_points")  # a module and full state dicts: not JSON

    model: nn.Module
    kind: str
    control_points: Tuple[Mapping[str, torch.Tensor], ...]
    history: Tuple[float, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in _CURVES:
            raise ValueError(f"unknown curve kind {self.kind!r}; use one of {_CURVES}")
        if len(self.control_points) < 2:
            raise ValueError("a curve needs at least 2 control points (its endpoints)")

    @property
    def num_points(self) -> int:
        """Number of control points, ``bends + 2``."""
        return len(self.control_points)

    @staticmethod
    def basis(kind: str, num_points: int, t: Union[float, Sequence[float], np.ndarray]) -> np.ndarray:
        """Coefficients ``c_k(t)`` of the control points: shape (num_points,) or (len(t), num_points).

        Bezier: ``C(n-1, k) t^k (1-t)^(n-1-k)``; PolyChain: ``max(0, 1 - |t (n-1) - k|)``.
        E.g. ``basis("bezier", 3, 0.3) == (0.49, 0.42, 0.09)``.
        """
        if num_points < 2:
            raise ValueError("num_points must be >= 2")
        return _basis(kind, int(num_points), np.asarray(t, dtype=np.float64))

    def point(self, t: float) -> Dict[str, torch.Tensor]:
        """The state ``phi(t)``; ``point(0)`` and ``point(1)`` are the endpoints bit for bit."""
        t = float(t)
        if t == 0.0:
            return {k: v.clone() for k, v in self.control_points[0].items()}
        if t == 1.0:
            return {k: v.clone() for k, v in self.control_points[-1].items()}
        return _eval.combine(self.control_points, self.basis(self.kind, self.num_points, t))

    def evaluate(self, data: Any, points: Union[int, Sequence[float]] = 61, *, splits=None,
                 metrics=("loss", "accuracy"), loss_fn: Optional[Callable] = None,
                 recalibrate_bn: Union[bool, str] = "auto", bn_data: Any = None, bn_batches: Optional[int] = None,
                 batched: Union[bool, str] = "auto", batch_points: int = 64, device=None,
                 progress=None) -> CurveEvaluation:
        """Metrics at ``points`` values of t (an int: evenly spaced in [0, 1]; 61 as in the paper).

        BatchNorm statistics are recomputed at **every** t, endpoints included, when
        ``recalibrate_bn`` is on (``"auto"``: when the model has BN). The loss is the data loss
        only (no weight-decay term; Garipov et al.'s "nll"). Returns a :class:`CurveEvaluation`.
        """
        if isinstance(points, (int, np.integer)):
            if points < 2:
                raise ValueError("points must be >= 2")
            ts = np.array([i / (points - 1) for i in range(points)])
        else:
            ts = np.unique(np.asarray(list(points), dtype=np.float64))
            if ts.size == 0 or ts.min() < 0 or ts.max() > 1:
                raise ValueError("curve points must lie in [0, 1]")
        coeffs = self.basis(self.kind, self.num_points, ts)
        split_map = _eval.normalize_splits(data, splits)
        rec = _eval.resolve_recalibration(recalibrate_bn, self.model)
        values, info = _eval.evaluate_combinations(
            self.model, list(self.control_points), coeffs, split_map, metrics=metrics, loss_fn=loss_fn,
            recalibrate_bn=rec, bn_data=bn_data, bn_batches=bn_batches, batched=batched,
            batch_points=batch_points, device=device, progress=progress, return_info=True)
        # arc length from the Gram matrix of D_j = w_j - w_0 (partition of unity removes w_0)
        keys = [k for k, _ in self.model.named_parameters()]
        w0 = self.control_points[0]
        D = [{k: (w[k].double() - w0[k].double()) for k in keys} for w in self.control_points]
        n = self.num_points
        Gm = np.array([[sum(float((D[i][k] * D[j][k]).sum()) for k in keys) for j in range(n)] for i in range(n)])
        dc = np.diff(coeffs, axis=0)
        dl = np.sqrt(np.maximum(np.einsum("ti,ij,tj->t", dc, Gm, dc), 0.0))
        arc = np.concatenate([[0.0], np.cumsum(dl)])
        settings = {"path": f"curve:{self.kind}", "bends": n - 2, "metrics": _metric_names(metrics),
                    "loss_fn": _fn_name(loss_fn) or "cross_entropy", "recalibrate_bn": info["recalibrate_bn"],
                    "bn_batches": bn_batches, "mode": info["mode"], "examples": info["examples"],
                    "device": info["device"], "t": "uniform in the curve parameter"}
        return CurveEvaluation(alphas=ts, values=values, settings=settings, arc_length=arc)


@records_time
def train_curve(model_a: nn.Module, model_b: nn.Module, data: Any, kind: str = "bezier", bends: int = 1,
                epochs: int = 20, lr: float = 0.01, weight_decay: float = 0.0, seed: int = 0, device=None, *,
                loss_fn: Optional[Callable] = None, optimizer: str = "sgd", momentum: float = 0.9,
                batch_size: Optional[int] = None, progress=None) -> ModeCurve:
    """Train a Bezier or PolyChain curve between two models (Garipov et al. 2018, arXiv:1802.10026).

    The ``bends`` interior control points start evenly spaced on the segment (so the initial curve
    *is* the segment) and are trained, endpoints fixed, to minimise
    ``E_{t ~ U[0,1]} [ L(phi(t)) + wd/2 ||phi(t)||^2 ]`` with one ``t`` drawn per mini-batch
    (uniform in the parameter, as the paper; weight decay on the sampled point). The network runs
    in train mode through :func:`torch.func.functional_call` on a private copy (BN uses batch
    statistics); the user's models are not modified.

    Parameters
    ----------
    model_a, model_b : nn.Module — the endpoints (same architecture).
    data : (X, Y) pair (mini-batches of ``batch_size`` drawn with ``seed``; one full batch if None)
        or an iterable of batches.
    kind : ``"bezier"`` or ``"polychain"``.
    bends : int >= 1 — interior control points (``bends=1``: 3 control points, the paper's default).
    epochs, lr, weight_decay, momentum : optimisation settings; ``optimizer`` is ``"sgd"`` or ``"adam"``.
    seed : seeds ``t`` sampling, batch order and dropout.
    loss_fn : ``(outputs, targets) -> scalar mean or per-example values``; default cross-entropy.
    progress : optional callback ``progress(epoch_done, epochs)``.

    Returns
    -------
    ModeCurve
    """
    check_module(model_a, "model_a", where="analysis.train_curve")
    check_module(model_b, "model_b", where="analysis.train_curve", allow_state=True)
    check_finite(model_a, "model_a", where="analysis.train_curve")
    check_finite(model_b, "model_b", where="analysis.train_curve")
    check_data(data, where="analysis.train_curve")
    if kind not in _CURVES:
        raise ValueError(f"unknown curve kind {kind!r}; use one of {_CURVES}")
    if not isinstance(bends, (int, np.integer)) or bends < 1:
        raise ValueError(f"bends must be an int >= 1, got {bends!r}")
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    from analysis.connectivity import _endpoints
    sa, sb = _endpoints(model_a, model_b)
    ev = _eval._Evaluator(model_a, metrics=("loss",), loss_fn=loss_fn, device=device)
    dev = ev.device
    sa, sb = ev._to(sa), ev._to(sb)
    n = bends + 2
    train_keys = [k for k, p in model_a.named_parameters() if p.is_floating_point()]
    interior: List[Dict[str, torch.Tensor]] = []
    for j in range(1, n - 1):
        s = j / (n - 1)
        w = OrderedDict()
        for k, v in sa.items():
            if v.is_floating_point():
                w[k] = (sa[k] * (1.0 - s) + sb[k] * s).clone()
                if k in train_keys:
                    w[k].requires_grad_(True)
            else:
                w[k] = v.clone()
        interior.append(w)
    params = [w[k] for w in interior for k in train_keys]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    gen = torch.Generator().manual_seed(int(seed))
    skel = ev.skel
    skel.train()
    scratch = {k: v.clone() for k, v in sa.items() if k not in train_keys}  # BN writes its stats here
    history: List[float] = []
    data = _eval._reiterable(data)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))
        for ep in range(epochs):
            tot, cnt = 0.0, 0
            for x, y in shuffled_batches(data, batch_size, gen, dev):
                _eval._check_inputs(x)
                t = torch.rand((), generator=gen, dtype=torch.float64)
                c = _torch_basis(kind, n, t)
                phi = {}
                for k in train_keys:
                    pts = [sa[k]] + [w[k] for w in interior] + [sb[k]]
                    acc = pts[0] * float(c[0])
                    for j in range(1, n):
                        acc = acc + pts[j] * float(c[j])
                    phi[k] = acc
                out = _eval._logits(functional_call(skel, {**scratch, **phi}, (x,)))
                if loss_fn is None:
                    loss = nn.functional.cross_entropy(out, _eval._class_targets(out, y, "cross-entropy"))
                else:
                    lv = torch.as_tensor(loss_fn(out, y))
                    loss = lv if lv.dim() == 0 else lv.mean()
                obj = loss
                if weight_decay:
                    obj = obj + 0.5 * weight_decay * sum((p ** 2).sum() for p in phi.values())
                if not torch.isfinite(obj):
                    raise ValueError(f"the curve loss became {float(obj)} at epoch {ep}; lower lr")
                opt.zero_grad(set_to_none=True)
                obj.backward()
                opt.step()
                bs = _eval._batch_size(x)
                tot += float(loss.detach()) * bs
                cnt += bs
            history.append(tot / max(cnt, 1))
            if progress is not None:
                progress(ep + 1, epochs)
    skel.eval()
    cps = [OrderedDict((k, v.detach().clone()) for k, v in sa.items())]
    cps += [OrderedDict((k, v.detach().clone()) for k, v in w.items()) for w in interior]
    cps += [OrderedDict((k, v.detach().clone()) for k, v in sb.items())]
    settings = {"kind": kind, "bends": bends, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                "optimizer": optimizer, "momentum": momentum if optimizer == "sgd" else None,
                "batch_size": batch_size, "seed": seed, "device": str(dev),
                "loss_fn": _fn_name(loss_fn) or "cross_entropy",
                "objective": "E_{t~U[0,1]} L(phi(t)) + wd/2 ||phi(t)||^2, one t per mini-batch"}
    return ModeCurve(model=model_a, kind=kind, control_points=tuple(cps), history=tuple(history), settings=settings)


# --------------------------------------------------------------------------------------------------
# planes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PlaneResult(Result):
    """Metrics on a grid of the plane through three weight vectors (Garipov et al. 2018, Fig. 1).

    Points are ``w0 + x u + y v`` with orthonormal ``u = (w2 - w0)/|w2 - w0|`` and ``v`` (``w1 - w0``
    Gram-Schmidt'ed against ``u``, normalised); ``x`` and ``y`` are distances in parameter space.

    Attributes
    ----------
    x : (Gx,) array, y : (Gy,) array — grid coordinates.
    values : ``{split: {metric: (Gx, Gy) array}}``, entry ``[i, j]`` at ``(x[i], y[j])``.
    coordinates : ``{"w0": (0, 0), "w1": (<w1 - w0, u>, dy), "w2": (dx, 0)}``.
    model_values : ``{"w0"|"w1"|"w2": {split: {metric: float}}}`` — at the in-plane points.
    dx, dy : float — ``|w2 - w0|`` and the norm of the orthogonal part of ``w1 - w0``.
    settings : dict
    """

    x: np.ndarray
    y: np.ndarray
    values: Mapping[str, Mapping[str, np.ndarray]]
    coordinates: Mapping[str, Tuple[float, float]]
    model_values: Mapping[str, Mapping[str, Mapping[str, float]]]
    dx: float
    dy: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    def to_dict(self) -> Dict[str, Any]:
        return to_jsonable({"x": self.x, "y": self.y, "values": self.values, "coordinates": self.coordinates,
                          "model_values": self.model_values, "dx": self.dx, "dy": self.dy,
                          "settings": self.settings})


def _axis(grid: int, lo: float, hi: float) -> np.ndarray:
    if grid < 2:
        raise ValueError(f"grid must be >= 2 per axis, got {grid}")
    m = grid - 1
    return np.array([((m - i) * lo + i * hi) / m for i in range(grid)])


@records_time
def plane(w0, w1, w2, data: Any, grid: Union[int, Tuple[int, int]] = 21,
          margin: Union[float, Tuple[float, float]] = 0.2, *, model: Optional[nn.Module] = None, splits=None,
          metrics=("loss", "accuracy"), loss_fn: Optional[Callable] = None, recalibrate_bn: Union[bool, str] = "auto",
          bn_data: Any = None, bn_batches: Optional[int] = None, batched: Union[bool, str] = "auto",
          batch_points: int = 64, device=None, progress=None) -> PlaneResult:
    """Evaluate the plane through ``w0``, ``w1``, ``w2`` (Garipov et al. 2018, arXiv:1802.10026).

    ``u = (w2 - w0) / dx`` with ``dx = |w2 - w0|``; ``v = (w1 - w0) - <w1 - w0, u> u``, ``dy = |v|``,
    ``v <- v / dy``. The grid is ``x = a dx``, ``y = b dy`` for ``a, b`` evenly spaced in
    ``[-margin, 1 + margin]`` (``margin`` may be ``(left, right)``). Vectors span the floating
    **parameters**; buffers come from ``w0`` and BatchNorm statistics are recomputed at every grid
    point when ``recalibrate_bn`` is on (``"auto"``: if the model has BN).

    Parameters
    ----------
    w0, w1, w2 : nn.Module or state dict (give ``model=`` if none is a module).
    data : one dataset or a dict of named splits.
    grid : int or (Gx, Gy).

    Returns
    -------
    PlaneResult — the three models sit at ``(0, 0)``, ``(<w1 - w0, u>, dy)`` and ``(dx, 0)``.

    Raises
    ------
    ValueError — if ``w2 == w0`` (dx = 0) or ``w1`` lies on the line through ``w0`` and ``w2`` (dy = 0).
    """
    for _w, _nm in ((w0, "w0"), (w1, "w1"), (w2, "w2")):
        check_module(_w, _nm, where="analysis.plane", allow_state=True)
    if model is not None:
        check_module(model, where="analysis.plane")
    check_data(data, where="analysis.plane")
    ref = model if model is not None else next((w for w in (w0, w1, w2) if isinstance(w, nn.Module)), None)
    if ref is None:
        raise TypeError("w0, w1, w2 are all state dicts: pass model= (an nn.Module of that architecture)")
    s0, s1, s2 = (_eval.as_state(w, ref, nm) for w, nm in ((w0, "w0"), (w1, "w1"), (w2, "w2")))
    _eval.check_compatible(s0, s1, ("w0", "w1"))
    _eval.check_compatible(s0, s2, ("w0", "w2"))
    for s, nm in ((s0, "w0"), (s1, "w1"), (s2, "w2")):
        _eval.check_finite(s, nm)
    keys = [k for k, p in ref.named_parameters() if p.is_floating_point()]
    d2 = {k: s2[k].double() - s0[k].double() for k in keys}
    d1 = {k: s1[k].double() - s0[k].double() for k in keys}
    dx = math.sqrt(sum(float((t ** 2).sum()) for t in d2.values()))
    if dx == 0.0:
        raise ValueError("w2 equals w0 on every parameter (dx = 0): the plane is undefined; pass three distinct models")
    u = {k: t / dx for k, t in d2.items()}
    x1 = sum(float((d1[k] * u[k]).sum()) for k in keys)
    v = {k: d1[k] - x1 * u[k] for k in keys}
    dy = math.sqrt(sum(float((t ** 2).sum()) for t in v.values()))
    n1 = math.sqrt(sum(float((t ** 2).sum()) for t in d1.values()))
    if dy <= 1e-12 * max(dx, n1):
        raise ValueError(f"w1 lies on the line through w0 and w2 (dy = {dy:.3g}): the plane is degenerate; "
                         "pick a w1 off that line (e.g. a curve's bend or a third model)")
    v = {k: t / dy for k, t in v.items()}
    dtypes = {k: s0[k].dtype for k in keys}
    u_t = {k: t.to(dtypes[k]) for k, t in u.items()}
    v_t = {k: t.to(dtypes[k]) for k, t in v.items()}
    gx, gy = (grid, grid) if isinstance(grid, (int, np.integer)) else tuple(grid)
    ml, mr = (margin, margin) if isinstance(margin, (int, float)) else tuple(margin)
    ax, ay = _axis(int(gx), -ml, 1 + mr), _axis(int(gy), -ml, 1 + mr)
    xs, ys = ax * dx, ay * dy
    XX, YY = np.meshgrid(xs, ys, indexing="ij")
    pts = np.stack([XX.ravel(), YY.ravel()], 1)
    coords = {"w0": (0.0, 0.0), "w1": (x1, dy), "w2": (dx, 0.0)}
    extra = np.array([coords["w0"], coords["w1"], coords["w2"]])
    allp = np.concatenate([pts, extra], 0)
    coeffs = np.concatenate([np.ones((len(allp), 1)), allp], 1)
    split_map = _eval.normalize_splits(data, splits)
    rec = _eval.resolve_recalibration(recalibrate_bn, ref)
    vals, info = _eval.evaluate_combinations(
        ref, [s0, u_t, v_t], coeffs, split_map, metrics=metrics, loss_fn=loss_fn, recalibrate_bn=rec,
        bn_data=bn_data, bn_batches=bn_batches, batched=batched, batch_points=batch_points, device=device,
        progress=progress, return_info=True)
    G = len(pts)
    values = {s: {m: a[:G].reshape(len(xs), len(ys)) for m, a in d.items()} for s, d in vals.items()}
    model_values = {nm: {s: {m: float(a[G + i]) for m, a in d.items()} for s, d in vals.items()}
                    for i, nm in enumerate(("w0", "w1", "w2"))}
    settings = {"grid": (int(gx), int(gy)), "margin": (ml, mr), "metrics": _metric_names(metrics),
                "loss_fn": _fn_name(loss_fn) or "cross_entropy", "recalibrate_bn": info["recalibrate_bn"],
                "bn_batches": bn_batches, "mode": info["mode"], "examples": info["examples"], "device": info["device"],
                "spans": "floating parameters; buffers from w0"}
    return PlaneResult(x=xs, y=ys, values=values, coordinates=coords, model_values=model_values, dx=dx, dy=dy,
                       settings=settings)
