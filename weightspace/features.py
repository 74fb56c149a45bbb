"""Activation capture and streaming activation statistics.

Merging (activation matching, Ainsworth et al. 2023, arXiv:2209.04836; ZipIt!, Stoica et al.
2024, arXiv:2305.03053; REPAIR, Jordan et al. 2023, arXiv:2211.08403) and analysis (neural
collapse, the information plane) need activations at named points of a model. A *point* is a
module name from ``model.named_modules()`` (``""`` is the whole model); ``at="output"`` captures
the module's output with a forward hook, ``at="input"`` its first positional input with a
forward pre-hook. A tuple output (e.g. ``nn.MultiheadAttention``) contributes its first tensor.

Feature axis. Statistics treat one axis as features (C) and every other axis as samples: the
activation is moved to ``(..., C)`` and reshaped to ``(N * spatial, C)``. ``feature_dim="auto"``
picks dim 1 for outputs of conv / batch-norm / group-norm / instance-norm / pooling modules and
for any 4-D tensor, and the last dim otherwise (Linear, LayerNorm, tokens).

Streaming. :func:`activation_stats` and :func:`cross_stats` never hold all activations: per
batch they compute the batch mean and centred scatter in float64 and merge them into the running
totals with the pairwise update of Chan, Golub & LeVeque (1979)::

    n = n_a + n_b,   delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + outer(delta, delta) * n_a * n_b / n,      cov = M2 / (n - ddof).

Models are run in eval mode under ``torch.no_grad()``; all hooks are removed and every
submodule's train/eval mode restored in ``finally``, so the model is left exactly as it was.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from weightspace.checks import NonFiniteError, check_data, check_model, check_module
from weightspace.results import Result
from weightspace.tracing import flatten_tensors
from weightspace.utils import call_model, iter_batches, model_device, module_mode, resolve_device

log = logging.getLogger(__name__)

__all__ = ["capture", "capture_labelled", "call_order", "activation_stats", "cross_stats", "FeatureStats", "CrossStats",
           "resolve_points",
           "StreamingMoments", "group_points"]

Points = Union[str, Sequence[str]]
FeatureDim = Union[str, int, Mapping[str, Union[str, int]]]

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                  nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                  nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FeatureStats(Result):
    """Streaming statistics of one point's features (all float64, on the CPU).

    ``count`` rows (samples times spatial positions) of ``C`` features; ``mean`` (C,);
    ``cov`` (C, C) with ``ddof`` (0: population, the E[x x^T] - mu mu^T of activation matching;
    1: unbiased, as ``np.cov``), or None when ``covariance=False``; ``var`` and ``std`` (C,).
    """

    name: str
    count: int
    mean: torch.Tensor
    cov: Optional[torch.Tensor]
    var: torch.Tensor
    std: torch.Tensor
    feature_dim: int
    at: str
    ddof: int

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x x^T] (C, C) = cov * (n - ddof) / n + mean mean^T."""
        if self.cov is None:
            raise ValueError(f"point {self.name!r}: covariance was not collected; use covariance=True")
        return self.cov * ((self.count - self.ddof) / self.count) + torch.outer(self.mean, self.mean)

    def corr(self, eps: float = 1e-8) -> torch.Tensor:
        """Pearson correlation cov / (std std^T + eps), (C, C)."""
        if self.cov is None:
            raise ValueError(f"point {self.name!r}: covariance was not collected; use covariance=True")
        return self.cov / (torch.outer(self.std, self.std) + eps)


@dataclass(frozen=True)
class CrossStats(Result):
    """Joint statistics of a point of model A (C_a features) and one of model B (C_b), float64.

    ``cov_ab`` (C_a, C_b) is the cross-covariance; ``corr = cov_ab / (std_a std_b^T + eps)`` is the
    Pearson correlation used by activation matching and REPAIR (dead units give 0, not NaN).
    ``second_moment_ab`` = E[x_a x_b^T] is what Git Re-Basin's activation matching maximises.
    """

    name_a: str
    name_b: str
    count: int
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    cov_a: torch.Tensor
    cov_b: torch.Tensor
    cov_ab: torch.Tensor
    std_a: torch.Tensor
    std_b: torch.Tensor
    corr: torch.Tensor
    eps: float
    ddof: int
    feature_dim_a: int
    feature_dim_b: int
    at: str

    @property
    def second_moment_ab(self) -> torch.Tensor:
        """E[x_a x_b^T] (C_a, C_b)."""
        return self.cov_ab * ((self.count - self.ddof) / self.count) + torch.outer(self.mean_a, self.mean_b)


# ----------------------------------------------------------------------------- streaming moments


class StreamingMoments:
    """Running count, mean and centred scatter (M2) of rows of a (n, C) matrix, in float64.

    ``update(x)`` merges a batch with Chan et al.'s pairwise formula; with ``full=False`` only the
    diagonal of M2 is kept (O(C) memory for very wide layers).
    """

    def __init__(self, full: bool = True, name: str = "features") -> None:
        self.full = full
        self.name = name
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        if not bool(torch.isfinite(x).all()):  # one NaN row would turn every mean/cov/corr entry it touches into NaN
            bad = (~torch.isfinite(x)).any(0).nonzero().flatten()[:5].tolist()
            raise NonFiniteError(f"{self.name}: the activations hold NaN or inf (first feature columns {bad}); "
                                 "check the inputs for NaN/inf and the model for overflow (e.g. run in float32)")
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc if self.full else (xc * xc).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if mb.shape != self.mean.shape:
            raise ValueError(f"feature count changed between batches: {self.mean.shape[0]} then {mb.shape[0]}")
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        corr = torch.outer(delta, delta) if self.full else delta * delta
        self.m2 = self.m2 + m2b + corr * (self.n * nb / n)
        self.n = n

    def finalize(self, ddof: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.n - ddof <= 0:
            raise ValueError(f"need more than {ddof} rows for ddof={ddof}, got {self.n}")
        return self.mean.cpu(), (self.m2 / (self.n - ddof)).cpu()


# ----------------------------------------------------------------------------- hooks


def group_points(spec: Any, which: str = "last") -> Dict[str, Tuple[str, int]]:
    """Where each permutation group of a traced spec can be observed: ``{group: (module, axis)}``.

    ``spec.activation_points()`` lists, in execution order, every module output that carries the
    group along one axis; ``which="first"`` takes the first (e.g. a Linear or conv output, before the
    normalisation: REPAIR's statistics) and ``"last"`` the last (e.g. after the activation: Git
    Re-Basin's activation matching). Use the result as ``points=[m for m, _ in pts.values()]`` and
    ``feature_dim={m: d for m, d in pts.values()}`` in :func:`activation_stats` / :func:`cross_stats`.
    """
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    out = {}
    for group, where in spec.activation_points().items():
        if where:
            out[group] = where[0] if which == "first" else where[-1]
    return out


def resolve_points(model: nn.Module, points: Points) -> Dict[str, nn.Module]:
    """Map point names to modules; an unknown name raises ``ValueError`` listing close matches."""
    if isinstance(points, str):
        points = [points]
    points = list(dict.fromkeys(points))
    if not points:
        raise ValueError("points is empty; name at least one module from model.named_modules()")
    modules = dict(model.named_modules())
    out = {}
    for p in points:
        if not isinstance(p, str):
            raise TypeError(f"points must be module names (str), got {p!r}")
        if p not in modules:
            close = difflib.get_close_matches(p, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else ""
            leaves = [n for n, m in modules.items() if n and not list(m.children())]
            raise ValueError(f"{type(model).__name__} has no module named {p!r}{hint}. "
                             f"Some valid names: {leaves[:12]}")
        out[p] = modules[p]
    return out


def _first_tensor(obj: Any, name: str) -> torch.Tensor:
    """The tensor an activation point stands for: the first tensor of the module's output in the
    order the tracer records it (``weightspace.tracing.flatten_tensors``), so tuples, dicts and
    Hugging Face ``ModelOutput`` s (``last_hidden_state`` first) resolve as in the spec."""
    if torch.is_tensor(obj):
        return obj
    first = next(iter(flatten_tensors(obj)), None)
    if first is not None:
        return first
    raise TypeError(f"point {name!r} produced a {type(obj).__name__} holding no tensor; pick another module")




def _on_device(model: nn.Module, device: Any) -> Tuple[nn.Module, torch.device]:
    """The model on ``device``: itself if already there, else a copy (the user's model never moves)."""
    home = model_device(model)
    if device is None:
        return model, home
    dev = resolve_device(device)
    same = dev.type == home.type and (dev.index is None or home.index is None or dev.index == home.index)
    if same:
        return model, home
    log.debug("copying %s to %s for feature capture", type(model).__name__, dev)
    return copy.deepcopy(model).to(dev), dev


@contextlib.contextmanager
def _hooked(model: nn.Module, modules: Dict[str, nn.Module], at: str, sink: Dict[str, torch.Tensor]) -> Iterator[None]:
    if at not in ("output", "input"):
        raise ValueError(f"at must be 'output' or 'input', got {at!r}")
    handles = []
    try:
        for name, mod in modules.items():
            if at == "output":
                handles.append(mod.register_forward_hook(
                    lambda _m, _i, out, name=name: sink.__setitem__(name, _first_tensor(out, name))))
            else:
                def pre(_m, args, name=name):
                    if not args:
                        raise TypeError(f"point {name!r} got no positional input; use at='output'")
                    sink[name] = _first_tensor(args[0], name)
                handles.append(mod.register_forward_pre_hook(pre))
        with module_mode(model):
            yield
    finally:
        for h in handles:
            h.remove()


def _feature_dim(spec: FeatureDim, name: str, module: nn.Module, t: torch.Tensor) -> int:
    fd = spec.get(name, "auto") if isinstance(spec, Mapping) else spec
    if fd == "auto":
        fd = 1 if (isinstance(module, _CHANNEL_FIRST) or t.dim() == 4) and t.dim() >= 2 else t.dim() - 1
    if not isinstance(fd, int):
        raise ValueError(f"feature_dim for {name!r} must be 'auto' or an int, got {fd!r}")
    if not -t.dim() <= fd < t.dim():
        raise ValueError(f"feature_dim {fd} is out of range for point {name!r} with shape {tuple(t.shape)}")
    return fd % t.dim()


def _rows(t: torch.Tensor, fd: int) -> torch.Tensor:
    """(..., C at fd, ...) -> (N * spatial, C)."""
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.movedim(fd, -1).reshape(-1, t.shape[fd])


def _batches(data: Any, device: torch.device, max_batches: Optional[int]) -> Iterator[Tuple[Any, Any]]:
    if max_batches is not None and int(max_batches) < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    for i, (x, y) in enumerate(iter_batches(data, device)):
        if max_batches is not None and i >= int(max_batches):
            break
        yield x, y


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def capture(model: nn.Module, data: Any, points: Points, *, at: str = "output", device: Any = None,
            max_batches: Optional[int] = None, return_targets: bool = False
            ) -> Union[Dict[str, torch.Tensor], Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]]:
    """Activations at ``points``, concatenated over batches along dim 0 (float32, CPU).

    Holds everything in memory: meant for small data (use :func:`activation_stats` otherwise).
    ``device`` defaults to the model's device (a model elsewhere is copied, never moved). With
    ``return_targets=True`` returns ``(activations, targets)`` with the batches' targets
    concatenated in the same order (None if the data has none).
    """
    model = check_module(model, where="features.capture")
    check_data(data, where="features.capture")
    modules = resolve_points(model, points)
    run_model, dev = _on_device(model, device)
    if run_model is not model:
        modules = resolve_points(run_model, list(modules))
    sink: Dict[str, torch.Tensor] = {}
    acc: Dict[str, List[torch.Tensor]] = {n: [] for n in modules}
    targets: List[torch.Tensor] = []
    with _hooked(run_model, modules, at, sink):
        for x, y in _batches(data, dev, max_batches):
            sink.clear()
            call_model(run_model, x)
            for n in modules:
                if n not in sink:
                    raise RuntimeError(f"point {n!r} was not reached by the forward pass")
                acc[n].append(sink[n].detach().to("cpu", torch.float32))
            if y is not None and torch.is_tensor(y):
                targets.append(y.detach().cpu())
    out = {n: torch.cat(v, 0) for n, v in acc.items()}
    if return_targets:
        return out, (torch.cat(targets, 0) if targets else None)
    return out


@torch.no_grad()
def activation_stats(model: nn.Module, data: Any, points: Points, *, at: str = "output",
                     feature_dim: FeatureDim = "auto", device: Any = None, max_batches: Optional[int] = None,
                     ddof: int = 0, covariance: bool = True) -> Dict[str, FeatureStats]:
    """Streaming mean / covariance / std (float64) of each point's features over ``data``.

    Each activation is reshaped to (N * spatial, C) (see the module docstring for
    ``feature_dim``) and merged batch by batch; memory is O(C^2) per point (O(C) with
    ``covariance=False``). ``ddof=0`` gives the population covariance, ``ddof=1`` matches ``np.cov``.
    """
    model = check_model(model, where="features.activation_stats")
    check_data(data, where="features.activation_stats")
    modules = resolve_points(model, points)
    run_model, dev = _on_device(model, device)
    if run_model is not model:
        modules = resolve_points(run_model, list(modules))
    sink: Dict[str, torch.Tensor] = {}
    moments = {n: StreamingMoments(full=covariance, name=f"activation_stats point {n!r}") for n in modules}
    fdims: Dict[str, int] = {}
    with _hooked(run_model, modules, at, sink):
        for x, _ in _batches(data, dev, max_batches):
            sink.clear()
            call_model(run_model, x)
            for n, mod in modules.items():
                if n not in sink:
                    raise RuntimeError(f"point {n!r} was not reached by the forward pass")
                t = sink[n]
                fd = fdims.setdefault(n, _feature_dim(feature_dim, n, mod, t))
                moments[n].update(_rows(t, fd))
    out = {}
    for n, mom in moments.items():
        mean, m = mom.finalize(int(ddof))
        var = torch.diagonal(m).clone() if covariance else m
        var = var.clamp_min(0)
        out[n] = FeatureStats(name=n, count=mom.n, mean=mean, cov=m if covariance else None, var=var,
                              std=var.sqrt(), feature_dim=fdims[n], at=at, ddof=int(ddof))
    return out


@torch.no_grad()
def cross_stats(model_a: nn.Module, model_b: nn.Module, data: Any, points_a: Points,
                points_b: Optional[Points] = None, *, at: str = "output", feature_dim: FeatureDim = "auto",
                device: Any = None, max_batches: Optional[int] = None, ddof: int = 0,
                eps: float = 1e-8) -> Dict[str, CrossStats]:
    """Joint statistics of paired points of two models, in one pass feeding both the same batches.

    ``points_b`` defaults to ``points_a`` (same architecture); otherwise the lists pair up by
    position. Keys of the result are the names in ``points_a``. For each pair the features are
    stacked as [x_a, x_b] (rows must agree: same N * spatial) and their joint covariance is
    streamed, giving ``cov_a``, ``cov_b`` and ``cov_ab``; then
    ``corr = cov_ab / (std_a std_b^T + eps)`` (REPAIR uses this with eps = 1e-4; dead units give 0).
    ``feature_dim`` may be a dict keyed by the names of model A's points (applied to both models).
    """
    model_a = check_model(model_a, "model_a", where="features.cross_stats")
    model_b = check_model(model_b, "model_b", where="features.cross_stats")
    check_data(data, where="features.cross_stats")
    names_a = list(resolve_points(model_a, points_a))
    names_b = names_a if points_b is None else list(resolve_points(model_b, points_b))
    if points_b is not None and len(names_b) != len(names_a):
        raise ValueError(f"points_a has {len(names_a)} names but points_b has {len(names_b)}; they pair by position")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    run_a, dev = _on_device(model_a, device)
    dev_b = model_device(model_b)
    run_b, _ = _on_device(model_b, dev if (dev_b.type != dev.type) else None)
    mods_a = resolve_points(run_a, names_a)
    mods_b = resolve_points(run_b, names_b)
    sink_a: Dict[str, torch.Tensor] = {}
    sink_b: Dict[str, torch.Tensor] = {}
    moments = {na: StreamingMoments(full=True, name=f"cross_stats point {na!r}") for na in names_a}
    dims: Dict[str, Tuple[int, int, int, int]] = {}
    with _hooked(run_a, mods_a, at, sink_a), _hooked(run_b, mods_b, at, sink_b):
        for x, _ in _batches(data, dev, max_batches):
            sink_a.clear()
            sink_b.clear()
            call_model(run_a, x)
            call_model(run_b, x)
            for na, nb in zip(names_a, names_b):
                if na not in sink_a or nb not in sink_b:
                    raise RuntimeError(f"point {na!r}/{nb!r} was not reached by the forward pass")
                ta, tb = sink_a[na], sink_b[nb]
                if na not in dims:
                    fa = _feature_dim(feature_dim, na, mods_a[na], ta)
                    fb = _feature_dim(feature_dim, na, mods_b[nb], tb)
                    dims[na] = (fa, fb, ta.shape[fa] if ta.dim() > 1 else 1, tb.shape[fb] if tb.dim() > 1 else 1)
                fa, fb, _, _ = dims[na]
                ra, rb = _rows(ta, fa), _rows(tb, fb)
                if ra.shape[0] != rb.shape[0]:
                    raise ValueError(f"points {na!r} (shape {tuple(ta.shape)}) and {nb!r} (shape {tuple(tb.shape)}) "
                                     f"give {ra.shape[0]} vs {rb.shape[0]} sample rows; pair points with the "
                                     "same batch and spatial size")
                moments[na].update(torch.cat([ra.to(torch.float64), rb.to(device=ra.device, dtype=torch.float64)], 1))
    out = {}
    for na, nb in zip(names_a, names_b):
        mean, cov = moments[na].finalize(int(ddof))
        ca = dims[na][2]
        std = torch.diagonal(cov).clamp_min(0).sqrt()
        std_a, std_b = std[:ca], std[ca:]
        cov_ab = cov[:ca, ca:].clone()
        corr = cov_ab / (torch.outer(std_a, std_b) + eps)
        out[na] = CrossStats(name_a=na, name_b=nb, count=moments[na].n, mean_a=mean[:ca].clone(),
                             mean_b=mean[ca:].clone(), cov_a=cov[:ca, :ca].clone(), cov_b=cov[ca:, ca:].clone(),
                             cov_ab=cov_ab, std_a=std_a.clone(), std_b=std_b.clone(), corr=corr, eps=float(eps),
                             ddof=int(ddof), feature_dim_a=dims[na][0], feature_dim_b=dims[na][1], at=at)
    return out


# ------------------------------------------------------------- labelled capture (analysis)
def call_order(model: nn.Module, data: Any, names: Sequence[str]) -> List[str]:
    """The named modules in the order they are called (repeats kept) in one eval-mode, no-grad
    forward over the first batch of ``data``; hooks removed and modes restored in ``finally``."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing} in {type(model).__name__}; some valid names: "
                         f"{[n for n in modules if n][:15]}")
    order: List[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda m, a, _n=n: order.append(_n)) for n in names]
    try:
        with module_mode(model), torch.no_grad():
            xb, _ = next(iter(iter_batches(data, model_device(model))))
            call_model(model, xb)
    finally:
        for hd in handles:
            hd.remove()
    return order


def capture_labelled(model: nn.Module, data: Any, points: Sequence[str], at: str = "output", *,
             need_inputs: bool = False) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Activations at ``points`` (flattened to ``(N, -1)``), the labels and optionally the inputs, all from
    *one* pass over ``data`` (so a shuffling DataLoader stays aligned), via the shared
    :func:`capture` (eval mode, no grad, hooks removed and modes restored).

    The inputs are captured as the output of an ``nn.Identity`` placed in front of the model in a
    throw-away ``nn.Sequential`` wrapper (the user's model is only referenced, never changed).
    A module called more than once per forward (a reused activation) raises: its activations would
    be ambiguous.
    """
    points = list(dict.fromkeys(points))
    order = call_order(model, data, points)
    bad = {n: order.count(n) for n in points if order.count(n) != 1}
    if bad:
        raise ValueError(f"modules {bad} are called that many times per forward (need exactly 1): a reused or "
                         "unused module has no single activation; give each use its own module or pick others")
    if need_inputs:
        wrapper = nn.Sequential(nn.Identity(), model)
        names = ["0"] + [f"1.{p}" if p else "1" for p in points]
        acts, y = capture(wrapper, data, names, at=at, return_targets=True)
        x = acts.pop("0")
        acts = {p: acts[n] for p, n in zip(points, names[1:])}
    else:
        acts, y = capture(model, data, points, at=at, return_targets=True)
        x = None
    if y is None:
        raise ValueError("data yielded inputs without labels; pass (X, Y) pairs or (x, y) batches")
    y = y.reshape(-1)
    feats = {k: v.reshape(v.shape[0], -1) for k, v in acts.items()}
    for k, v in feats.items():
        if v.shape[0] != y.shape[0]:
            raise ValueError(f"layer {k!r} gave {v.shape[0]} rows for {y.shape[0]} labels; pick a layer whose "
                             "activation has one row per sample")
    return feats, y, (x.reshape(x.shape[0], -1) if x is not None else None)
