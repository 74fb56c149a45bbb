"""Loss-landscape slices along random or PCA directions (Li et al., NeurIPS 2018).

A slice around a trained ``theta*`` is ``f(a) = L(theta* + a delta)`` (1-D) or
``f(a, b) = L(theta* + a delta + b eta)`` (2-D). Li, Xu, Taylor, Studer and Goldstein ("Visualizing
the Loss Landscape of Neural Nets", arXiv:1712.09913) draw Gaussian directions and *filter-normalise*
them so that slices of networks with different weight scales are comparable; they also plot
optimisation trajectories in the plane of the top-2 principal components of ``{theta_i - theta_final}``.

Differences from the published tools (Li et al. 2018, NeurIPS, arXiv:1712.09913), all deliberate:

* the grid always contains its exact centre ``(0, 0)`` for odd sizes and symmetric spans, where the
  value is the model's own loss (marcellodebernardi/loss-landscapes puts the centre off-grid and
  never evaluates alpha = 0);
* directions are zero-mean Gaussian (not U[0, 1]); 1-D tensors are normalised once; ``1e-10`` guards
  zero filters;
* the model is never mutated (functional evaluation), and grid points are evaluated in batches with
  :func:`torch.func.vmap`.
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

from weightspace.results import Result, records_time, to_jsonable
from weightspace import state as _eval
from analysis.connectivity import _fn_name, _metric_names
from weightspace.checks import check_data, check_model, check_module

log = logging.getLogger(__name__)

__all__ = ["landscape", "Landscape", "random_directions", "pca_directions", "PCADirections"]

Direction = Dict[str, torch.Tensor]
_NORMS = ("filter", "layer", "none")


def _param_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, p.detach()) for k, p in model.named_parameters() if p.is_floating_point())


def _normalise(d: torch.Tensor, w: torch.Tensor, norm: str, ignore: Optional[str]) -> torch.Tensor:
    if w.dim() <= 1:
        if ignore == "biasbn":
            return torch.zeros_like(w)
        return w.clone() if norm != "none" else d
    if norm == "filter":
        dims = tuple(range(1, w.dim()))
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        dn = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        return d * (wn / (dn + 1e-10))
    if norm == "layer":
        return d * (torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(d) + 1e-10))
    return d


def random_directions(model: nn.Module, n: int = 2, norm: str = "filter", ignore: Optional[str] = "biasbn",
                      seed: int = 0) -> List[Direction]:
    """``n`` seeded Gaussian directions over the floating parameters of ``model``.

    Each direction is a ``{parameter name: tensor}`` dict (same shapes, dtype and device as the
    parameters). Entries are N(0, 1) from a CPU ``torch.Generator`` seeded with ``seed`` (the same
    directions on every device), then normalised:

    * ``norm="filter"`` (Li et al. 2018): for every tensor with ``dim > 1`` and each slice ``i`` along
      dim 0 (a conv output channel, a Linear row), ``d_i <- d_i * |theta_i| / (|d_i| + 1e-10)``;
    * ``norm="layer"``: the same with the whole tensor as one slice;
    * ``norm="none"``: raw Gaussian.

    Tensors with ``dim <= 1`` (biases, BN weights) get a **zero** direction with ``ignore="biasbn"``
    (the paper's setting); with ``ignore=None`` they get ``d = theta`` under ``"filter"``/``"layer"``
    (moving along it scales the tensor by ``1 + a``, as in the paper's code) and stay Gaussian under
    ``"none"``. BatchNorm running statistics are buffers, not parameters: directions never move them.
    """
    model = check_model(model, where="analysis.random_directions")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    params = _param_dict(model)
    if not params:
        raise ValueError("the model has no floating-point parameters to draw directions for")
    gen = torch.Generator().manual_seed(int(seed))
    out: List[Direction] = []
    for _ in range(n):
        d: Direction = OrderedDict()
        for k, w in params.items():
            g = torch.randn(w.shape, generator=gen, dtype=w.dtype if w.dtype in (torch.float32, torch.float64)
                            else torch.float32).to(device=w.device, dtype=w.dtype)
            d[k] = _normalise(g, w, norm, ignore)
        out.append(d)
    return out


def _flat_items(state: Mapping, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).double().cpu() for k in keys])


@dataclass(frozen=True, eq=False)
class PCADirections(Result):
    """Top principal directions of a training trajectory (Li et al. 2018, Sec. 7).

    Attributes
    ----------
    directions : list of ``{key: tensor}`` — orthonormal (over all keys jointly) principal directions.
    coords : (T, n) array — least-squares coordinates of ``theta_i - center`` on the directions.
    explained_variance : (n,) array — variances of the centred differences along each direction.
    explained_variance_ratio : (n,) array — the same divided by the total variance.
    center : ``{key: tensor}`` — the reference point (default the last trajectory point).
    keys : tuple of str — the coordinates used.
    """

    directions: List[Direction]
    coords: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    center: Mapping[str, torch.Tensor]
    keys: Tuple[str, ...]


def _traj_states(trajectory, model: Optional[nn.Module]) -> Tuple[List[Dict[str, torch.Tensor]], List[str]]:
    if trajectory is None or len(trajectory) == 0:
        raise ValueError("trajectory is empty: pass a list of state dicts or modules (e.g. checkpoints per epoch)")
    states = []
    for i, s in enumerate(trajectory):
        if isinstance(s, nn.Module):
            states.append(dict(_param_dict(s)))
        elif isinstance(s, Mapping):
            states.append({k: v for k, v in s.items() if torch.is_tensor(v)})
        else:
            raise TypeError(f"trajectory[{i}] is a {type(s).__name__}; use state dicts or modules")
    if model is not None:
        keys = list(_param_dict(model))
    else:
        keys = [k for k, v in states[0].items() if v.is_floating_point()]
    for i, s in enumerate(states):
        for k in keys:
            if k not in s:
                raise ValueError(f"trajectory[{i}] lacks key {k!r}")
            if tuple(s[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"trajectory[{i}][{k!r}] has shape {tuple(s[k].shape)} but trajectory[0] has "
                                 f"{tuple(states[0][k].shape)}")
    return states, keys


def _lstsq_coords(diffs: torch.Tensor, D: torch.Tensor) -> np.ndarray:
    """Coordinates c minimising |D^T c - r| for each row r of ``diffs`` (T, P); D is (n, P)."""
    G = D @ D.T
    rhs = D @ diffs.T
    return torch.linalg.lstsq(G, rhs).solution.T.numpy()


def pca_directions(trajectory: Sequence[Union[Mapping, nn.Module]], n: int = 2, *, model: Optional[nn.Module] = None,
                   center: Optional[Union[Mapping, nn.Module]] = None) -> PCADirections:
    """Principal directions of ``{theta_i - theta_final}`` and the trajectory's coordinates on them.

    Let ``M`` be the (T, P) matrix of ``theta_i - center`` (``center`` = the last point by default),
    flattened over the floating parameters (``model``'s parameters if given, else every floating
    key of the first state — pass ``model`` to leave out BN running statistics). As in Li et al.'s
    code (scikit-learn PCA), the columns are centred before the SVD; the top ``n`` right singular
    vectors are the directions and ``explained_variance = s^2 / (T - 1)``. The coordinates are the
    least-squares solution of ``theta_i - center ~ sum_j c_ij d_j`` (for these orthonormal
    directions, simply the inner products).

    Returns
    -------
    PCADirections
    """
    states, keys = _traj_states(trajectory, model)
    T = len(states)
    if T < 2:
        raise ValueError("a trajectory needs at least 2 points for PCA")
    if center is None:
        cen = {k: states[-1][k] for k in keys}
    else:
        cs = dict(_param_dict(center)) if isinstance(center, nn.Module) else dict(center)
        cen = {k: cs[k] for k in keys}
    C = _flat_items(cen, keys)
    M = torch.stack([_flat_items(s, keys) - C for s in states])
    if not bool(torch.isfinite(M).all()):
        raise ValueError("the trajectory contains NaN or inf weights")
    n_max = min(T - 1, M.shape[1])
    if n > n_max:
        raise ValueError(f"n={n} principal directions asked but a trajectory of {T} points in {M.shape[1]} "
                         f"dimensions has at most {n_max}")
    Mc = M - M.mean(0, keepdim=True)
    _, S, Vh = torch.linalg.svd(Mc, full_matrices=False)
    var = (S ** 2) / max(T - 1, 1)
    total = float(var.sum())
    V = Vh[:n]
    # deterministic sign: the largest-magnitude entry of each direction is positive
    sgn = torch.sign(V.gather(1, V.abs().argmax(1, keepdim=True))).clamp(min=0) * 2 - 1
    V = V * sgn
    coords = _lstsq_coords(M, V)
    dirs: List[Direction] = []
    shapes = [(k, cen[k].shape, cen[k].numel(), cen[k].dtype, cen[k].device) for k in keys]
    for j in range(n):
        d, off = OrderedDict(), 0
        for k, shp, numel, dt, dev in shapes:
            d[k] = V[j, off:off + numel].reshape(shp).to(device=dev, dtype=dt)
            off += numel
        dirs.append(d)
    ev = var[:n].numpy()
    return PCADirections(directions=dirs, coords=coords, explained_variance=ev,
                         explained_variance_ratio=ev / total if total > 0 else np.zeros_like(ev),
                         center={k: v for k, v in cen.items()}, keys=tuple(keys))


@dataclass(frozen=True, eq=False)
class Landscape(Result):
    """A 1-D or 2-D slice of a loss landscape.

    Attributes
    ----------
    coords : tuple of arrays — ``(a,)`` or ``(a, b)``, the grid along each direction.
    values : ``{split: {metric: array}}`` of shape (Ga,) or (Ga, Gb); entry ``[i, j]`` is at
        ``theta* + a[i] delta + b[j] eta``.
    dims : 1 or 2.
    center : ``{split: {metric: float}}`` at ``(0, 0)`` when it is a grid node, else None.
    direction_norms : tuple of float — the Euclidean norm of each direction.
    directions : list of ``{key: tensor}`` — the directions used.
    trajectory : (T, dims) array or None — least-squares coordinates of a trajectory in the slice.
    explained_variance_ratio : array or None — for PCA directions.
    settings : dict — directions kind, normalisation, ``ignore``, seed, spans, grid, BN handling, mode.
    """

    coords: Tuple[np.ndarray, ...]
    values: Mapping[str, Mapping[str, np.ndarray]]
    dims: int
    center: Optional[Mapping[str, Mapping[str, float]]]
    direction_norms: Tuple[float, ...]
    directions: List[Direction]
    trajectory: Optional[np.ndarray] = None
    explained_variance_ratio: Optional[np.ndarray] = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (directions themselves left out; their norms kept)."""
        return to_jsonable({"coords": list(self.coords), "values": self.values, "dims": self.dims,
                          "center": self.center, "direction_norms": list(self.direction_norms),
                          "trajectory": self.trajectory, "explained_variance_ratio": self.explained_variance_ratio,
                          "settings": self.settings})


def _spans(span, dims: int) -> List[Tuple[float, float]]:
    s = np.asarray(span, dtype=np.float64)
    if s.shape == (2,):
        out = [(float(s[0]), float(s[1]))] * dims
    elif s.shape == (dims, 2):
        out = [(float(r[0]), float(r[1])) for r in s]
    else:
        raise ValueError(f"span must be (lo, hi) or {dims} pairs ((lo, hi), ...), got shape {s.shape}")
    for lo, hi in out:
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"span ({lo}, {hi}) must be finite with lo < hi")
    return out


def _grid_axis(g: int, lo: float, hi: float) -> np.ndarray:
    if g < 1:
        raise ValueError(f"grid sizes must be >= 1, got {g}")
    if g == 1:
        return np.array([0.5 * (lo + hi)])
    m = g - 1
    # ((m - i) lo + i hi) / m: exact endpoints, and an exact 0 at i = m/2 for symmetric spans
    return np.array([((m - i) * lo + i * hi) / m for i in range(g)])


def _check_directions(dirs: Sequence[Mapping], params: Mapping[str, torch.Tensor]) -> List[Direction]:
    out = []
    for j, d in enumerate(dirs):
        if not isinstance(d, Mapping):
            raise TypeError(f"directions[{j}] must be a {{parameter name: tensor}} dict")
        dd = OrderedDict()
        for k, v in d.items():
            if k not in params:
                raise ValueError(f"directions[{j}] has key {k!r}, which is not a floating parameter of the model")
            if tuple(v.shape) != tuple(params[k].shape):
                raise ValueError(f"directions[{j}][{k!r}] has shape {tuple(v.shape)} but the parameter has "
                                 f"{tuple(params[k].shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"directions[{j}][{k!r}] contains NaN or inf")
            dd[k] = v.detach().to(device=params[k].device, dtype=params[k].dtype)
        out.append(dd)
    return out


@records_time
def landscape(model: nn.Module, data: Any, *, directions: Union[str, Sequence[Mapping], PCADirections] = "filter",
              grid: Union[int, Tuple[int, int]] = 21, span=(-1.0, 1.0), dims: Optional[int] = None,
              metrics=("loss", "accuracy"), loss_fn: Optional[Callable] = None, seed: int = 0,
              ignore: Optional[str] = "biasbn", batch_points: int = 64, progress=None, device=None,
              trajectory: Optional[Sequence] = None, splits=None, recalibrate_bn: Union[bool, str] = False,
              bn_data: Any = None, bn_batches: Optional[int] = None, batched: Union[bool, str] = "auto") -> Landscape:
    """Evaluate a 1-D or 2-D slice ``f(a, b) = L(theta* + a delta + b eta)`` of the loss landscape.

    Parameters
    ----------
    model : nn.Module — ``theta*`` (never modified).
    data : one dataset or a dict of named splits.
    directions : ``"filter"``, ``"layer"`` or ``"none"`` (seeded Gaussian directions from
        :func:`random_directions` with that normalisation and ``ignore``), ``"pca"`` (needs
        ``trajectory``), a :class:`PCADirections`, or a list of ``{parameter name: tensor}`` dicts
        (missing parameters do not move).
    grid : points per axis (int or (Ga, Gb)). For an odd size and a symmetric span the centre
        ``(0, 0)`` is a grid node and its value is the model's own metric.
    span : ``(lo, hi)`` for every axis or ``((lo, hi), (lo, hi))``.
    dims : 1 or 2 (default: 2, or the number of directions given).
    seed : seeds the random directions.
    batch_points : grid points per vmap pass (memory ~ batch_points copies of the weights + activations).
    progress : optional callback ``progress(done, total)``; library code never prints.
    trajectory : list of state dicts / modules; its least-squares coordinates in the slice are stored.
    recalibrate_bn : default False, as Li et al. (the slice keeps ``theta*``'s BN statistics, which
        directions never move); True recomputes them at every grid point (slow: one pass per point).

    Returns
    -------
    Landscape
    """
    model = check_module(model, where="analysis.landscape")
    check_data(data, where="analysis.landscape")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = _param_dict(model)
    state = _eval.state_of(model)
    _eval.check_finite(state, "model")
    evr = None
    if isinstance(directions, str):
        if directions == "pca":
            if trajectory is None:
                raise ValueError("directions='pca' needs trajectory= (a list of checkpoints)")
            pca = pca_directions(trajectory, n=dims or 2, model=model)
            dirs, kind, evr = pca.directions, "pca", pca.explained_variance_ratio
        elif directions in _NORMS:
            dirs = random_directions(model, n=dims or 2, norm=directions, ignore=ignore, seed=seed)
            kind = f"random:{directions}"
        else:
            raise ValueError(f"directions={directions!r}: use 'filter', 'layer', 'none', 'pca' or a list of dicts")
    elif isinstance(directions, PCADirections):
        dirs, kind, evr = directions.directions, "pca", directions.explained_variance_ratio
    else:
        dirs, kind = list(directions), "given"
    dirs = _check_directions(dirs, params)
    if dims is None:
        dims = min(len(dirs), 2)
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if len(dirs) < dims:
        raise ValueError(f"dims={dims} needs {dims} directions, got {len(dirs)}")
    dirs = dirs[:dims]
    gs = [int(grid)] * dims if isinstance(grid, (int, np.integer)) else [int(g) for g in grid]
    if len(gs) != dims:
        raise ValueError(f"grid has {len(gs)} sizes for dims={dims}")
    spans = _spans(span, dims)
    axes = [_grid_axis(g, lo, hi) for g, (lo, hi) in zip(gs, spans)]
    mesh = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([m.ravel() for m in mesh], 1)
    coeffs = np.concatenate([np.ones((len(pts), 1)), pts], 1)
    split_map = _eval.normalize_splits(data, splits)
    rec = _eval.resolve_recalibration(recalibrate_bn, model)
    vals, info = _eval.evaluate_combinations(
        model, [state] + dirs, coeffs, split_map, metrics=metrics, loss_fn=loss_fn, recalibrate_bn=rec,
        bn_data=bn_data, bn_batches=bn_batches, batched=batched, batch_points=batch_points, device=device,
        progress=progress, return_info=True)
    shape = tuple(gs)
    values = {s: {m: a.reshape(shape) for m, a in d.items()} for s, d in vals.items()}
    zero_idx = [np.flatnonzero(ax == 0.0) for ax in axes]
    center = None
    if all(len(z) for z in zero_idx):
        idx = tuple(int(z[0]) for z in zero_idx)
        center = {s: {m: float(a[idx]) for m, a in d.items()} for s, d in values.items()}
    norms = tuple(math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values())) for d in dirs)
    traj = None
    if trajectory is not None:
        tstates, _ = _traj_states(trajectory, model)
        keys = list(params)
        C = _flat_items(params, keys)
        diffs = torch.stack([_flat_items(s, keys) - C for s in tstates])
        D = torch.stack([_flat_items({k: d.get(k, torch.zeros_like(params[k])) for k in keys}, keys) for d in dirs])
        traj = _lstsq_coords(diffs, D)
    settings = {"directions": kind, "norm": directions if isinstance(directions, str) else None,
                "ignore": ignore if kind.startswith("random") else None,
                "seed": seed if kind.startswith("random") else None, "dims": dims, "grid": gs,
                "span": [list(s) for s in spans], "metrics": _metric_names(metrics),
                "loss_fn": _fn_name(loss_fn) or "cross_entropy", "recalibrate_bn": info["recalibrate_bn"],
                "bn_batches": bn_batches, "mode": info["mode"], "examples": info["examples"], "device": info["device"],
                "batch_points": batch_points, "moves": "floating parameters only; buffers (BN stats) stay at theta*"}
    return Landscape(coords=tuple(axes), values=values, dims=dims, center=center, direction_norms=norms,
                     directions=[{k: v.detach().cpu() for k, v in d.items()} for d in dirs], trajectory=traj,
                     explained_variance_ratio=evr, settings=settings)
