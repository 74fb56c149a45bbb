"""Functional evaluation of one architecture at many points of its weight space.

Weights are data: a *state* is a plain ``{name: tensor}`` dict holding every parameter and buffer
of a model (``named_parameters()`` + ``named_buffers()``), and a model is evaluated at any state with
:func:`torch.func.functional_call` on a private *skeleton* of the user's module (a copy whose own
tensors live on the ``meta`` device, so it costs no memory). The user's module is never touched: its
tensors, its ``training`` flags and its BatchNorm momenta stay bit-identical.

Public API (shared by ``merging`` and ``analysis``: connectivity, curves, landscapes)

* :func:`state_of`, :func:`as_state`, :func:`check_compatible`, :func:`check_finite` — states;
* :func:`combine` — one point ``sum_j c_j * bases[j]`` of a linear family of states;
* :func:`has_batchnorm`, :func:`recalibrate_bn` — BatchNorm statistics recomputed functionally;
* :func:`bn_affine`, :func:`batchnorm_pairs`, :func:`fold_batchnorm` — eval BatchNorm as an affine map
  and folded into the Linear/Conv before it (used by path-norms and norm-based measures);
* :func:`evaluate` — one state on one dataset -> ``{metric: float}``;
* :func:`evaluate_states`, :func:`evaluate_combinations` — many points, all splits, batched with
  :func:`torch.func.vmap` over stacked parameters where possible -> ``{split: {metric: (K,) array}}``;
* :func:`normalize_splits` — ``data`` or ``{"train": ..., "test": ...}`` -> ordered dict of splits.

Metrics. ``"loss"`` (cross-entropy by default, or ``loss_fn(outputs, targets)``), ``"accuracy"``
(argmax of the outputs against integer labels, or against the argmax of one-hot/probability targets),
``"error"`` (= 1 - accuracy), or user callables ``fn(outputs, targets)``. A callable (``loss_fn``
included) may return a scalar — read as the *mean* over the batch — or one value per example.
Every metric is accumulated as a **sum over examples** and divided by the number of examples at the
end, so a small last batch gets its true weight (averaging batch means is the bias of the
layer-wise LMC reference code of Adilova et al. 2024, ICLR, arXiv:2307.06966).
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from weightspace.checks import check_data, check_module
from weightspace.checks import check_finite as _check_finite
from weightspace.tracing import TracingMode, flatten_tensors, traced_run
from weightspace.utils import iter_batches, model_device, resolve_device

log = logging.getLogger(__name__)

State = Dict[str, torch.Tensor]
MetricSpec = Union[str, Callable, Tuple[str, Callable]]
Progress = Optional[Callable[[int, int], None]]

__all__ = [
    "state_of", "param_keys", "as_state", "check_compatible", "check_finite", "combine", "has_batchnorm",
    "batchnorm_keys", "recalibrate_bn", "evaluate", "evaluate_states", "evaluate_combinations",
    "normalize_splits", "normalize_metrics", "resolve_recalibration", "bn_affine", "batchnorm_pairs",
    "fold_batchnorm",
]

_BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------------------------------
# states
# --------------------------------------------------------------------------------------------------
def state_of(model: nn.Module) -> State:
    """Every parameter and buffer of ``model`` as a detached ``{name: tensor}`` dict (no copy).

    Names are those of ``named_parameters()`` then ``named_buffers()`` (tied parameters once).
    The tensors share storage with the model: never write into them; :func:`combine` and the
    evaluators only read.
    """
    out: State = OrderedDict()
    for k, p in model.named_parameters():
        out[k] = p.detach()
    for k, b in model.named_buffers():
        out[k] = b.detach()
    return out


def param_keys(model: nn.Module) -> List[str]:
    """Names of the floating-point parameters of ``model`` (the coordinates directions live in)."""
    return [k for k, p in model.named_parameters() if p.is_floating_point()]


def as_state(obj: Union[nn.Module, Mapping], reference: nn.Module, name: str = "state") -> State:
    """A full state for ``reference``'s architecture from a module or a (partial) state dict.

    A mapping must hold every parameter of ``reference`` with its shape; missing *buffers* (e.g.
    non-persistent ones, absent from ``state_dict()``) are taken from ``reference``. Unknown keys raise.
    """
    ref = state_of(reference)
    if isinstance(obj, nn.Module):
        st = state_of(obj)
    elif isinstance(obj, Mapping):
        st = OrderedDict((k, v.detach() if torch.is_tensor(v) else v) for k, v in obj.items())
    else:
        raise TypeError(f"{name} must be an nn.Module or a state dict, got {type(obj).__name__}")
    params = {k for k, _ in reference.named_parameters()}
    extra = [k for k in st if k not in ref]
    if extra:
        raise ValueError(f"{name} has keys the model does not have: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}; pass a state dict of the same architecture")
    missing = [k for k in ref if k not in st and k in params]
    if missing:
        raise ValueError(f"{name} lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''} of the model")
    out: State = OrderedDict()
    for k, r in ref.items():
        v = st.get(k, r)
        if not torch.is_tensor(v):
            raise TypeError(f"{name}[{k!r}] is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(r.shape):
            raise ValueError(f"{name}[{k!r}] has shape {tuple(v.shape)} but the model expects {tuple(r.shape)}")
        out[k] = v
    return out


def check_compatible(a: Mapping, b: Mapping, names: Tuple[str, str] = ("model_a", "model_b")) -> None:
    """Raise ``ValueError`` naming the first key, shape or dtype where two states differ."""
    ka, kb = list(a), list(b)
    only_a = [k for k in ka if k not in b]
    only_b = [k for k in kb if k not in a]
    if only_a or only_b:
        raise ValueError(f"{names[0]} and {names[1]} have different keys: only in {names[0]}: {only_a[:5]}, "
                         f"only in {names[1]}: {only_b[:5]}; both must share one architecture")
    for k in ka:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise ValueError(f"parameter {k!r}: {names[0]} has shape {tuple(a[k].shape)} but {names[1]} has "
                             f"{tuple(b[k].shape)}; both models must share one architecture")
        if a[k].dtype != b[k].dtype:
            raise ValueError(f"parameter {k!r}: {names[0]} has dtype {a[k].dtype} but {names[1]} has "
                             f"{b[k].dtype}; cast one model (e.g. .float()) first")


def check_finite(state: Mapping, name: str = "model") -> None:
    """Raise :class:`weightspace.checks.NonFiniteError` (a ``ValueError``) naming the first floating
    tensor of ``state`` holding NaN or inf (see :func:`weightspace.checks.check_finite`)."""
    _check_finite(state, name)


def combine(bases: Sequence[Mapping], coeffs: Sequence[float]) -> State:
    """One point of a linear family: ``theta = sum_j coeffs[j] * bases[j]``.

    ``bases[0]`` is a full state; the others may hold a subset of its keys (a missing key counts as
    zero). Only floating-point tensors found in at least two bases are combined; every other entry
    (integer buffers such as ``num_batches_tracked``, keys only in ``bases[0]``) is taken from
    ``bases[0]`` unchanged. Zero coefficients give exact results: ``combine((A, B), (0, 1)) == B``.
    """
    c = [float(x) for x in coeffs]
    if len(c) != len(bases):
        raise ValueError(f"{len(bases)} bases but {len(c)} coefficients")
    out: State = OrderedDict()
    for k, v0 in bases[0].items():
        idx = [j for j in range(len(bases)) if k in bases[j]]
        if not v0.is_floating_point() or len(idx) < 2:
            out[k] = v0
            continue
        acc = None
        for j in idx:
            term = bases[j][k] * c[j]
            acc = term if acc is None else acc + term
        out[k] = acc
    return out


# --------------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------------
def _bn_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` has a BatchNorm layer that tracks running statistics."""
    return len(_bn_modules(model)) > 0


def batchnorm_keys(model: nn.Module) -> List[str]:
    """State keys of the running statistics (mean, var, ``num_batches_tracked``) of every BatchNorm."""
    keys = []
    for n, _ in _bn_modules(model):
        p = f"{n}." if n else ""
        keys += [p + "running_mean", p + "running_var", p + "num_batches_tracked"]
    return keys


def resolve_recalibration(recalibrate_bn: Union[bool, str, None], model: nn.Module) -> bool:
    """``"auto"`` -> whether the model has BatchNorm; ``True/"reset"`` -> on; ``False/None/"none"`` -> off."""
    if recalibrate_bn in ("auto",):
        return has_batchnorm(model)
    if recalibrate_bn in (True, "reset"):
        return True
    if recalibrate_bn in (False, None, "none"):
        return False
    raise ValueError(f"recalibrate_bn must be 'auto', True/'reset' or False/'none', got {recalibrate_bn!r}")


def bn_affine(running_mean: torch.Tensor, running_var: torch.Tensor, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as the per-channel affine map ``y = a * x + b`` (float64, detached):
    ``a = gamma / sqrt(var + eps)``, ``b = beta - a * mu`` (``gamma = 1``, ``beta = 0`` without affine).

    >>> mu, var, gamma, beta = torch.full((3,), 0.5), torch.full((3,), 4.0), torch.full((3,), 2.0), torch.zeros(3)
    >>> a, b = bn_affine(mu, var, gamma, beta, eps=0.0)
    >>> a.tolist(), b.tolist()
    ([1.0, 1.0, 1.0], [-0.5, -0.5, -0.5])
    """
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    a = 1.0 / torch.sqrt(f(running_var) + eps)
    b = -a * f(running_mean)
    if weight is not None:
        a = f(weight) * a
        b = b * f(weight)
    if bias is not None:
        b = f(bias) + b
    return a, b


_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def batchnorm_pairs(model: nn.Module, example_inputs: Any = None) -> List[Tuple[str, str]]:
    """``(layer, bn)`` module names where an eval BatchNorm (with running statistics) normalises the
    output of a Linear/Conv{1,2,3}d and is that output's *only* consumer, so that folding is exact.

    With ``example_inputs`` the pairs come from one eager run under a :class:`weightspace.tracing.TracingMode`
    (any Python control flow works, functional calls included); without, from a ``torch.fx`` trace of
    the module graph. Raises :class:`RuntimeError` naming the cause when neither can follow the model.
    """
    modules = dict(model.named_modules())
    found: List[Tuple[str, str]] = []
    if example_inputs is not None:
        rec = _BNPairs()
        try:
            traced_run(model, example_inputs, rec, rec.stack)
        except Exception as exc:
            raise RuntimeError(f"the model did not run on the example inputs ({type(exc).__name__}: {exc})") from exc
        found = [(layer, bn) for tid, layer, bn in rec.pairs if rec.uses.get(tid, 0) == 1]
    else:
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as exc:
            raise RuntimeError(f"no example inputs to run the model on, and torch.fx could not trace it "
                               f"({type(exc).__name__}); pass example_inputs") from exc
        for node in gm.graph.nodes:
            src = node.args[0] if node.op == "call_module" and node.args else None
            if isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1:
                found.append((str(src.target), str(node.target)))
    return [(layer, bn) for layer, bn in found
            if isinstance(modules.get(layer), _FOLDABLE) and isinstance(modules.get(bn), _BN)
            and modules[bn].running_var is not None]


def fold_batchnorm(model: nn.Module, example_inputs: Any = None) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Weights and biases of every Linear/Conv with a BatchNorm folded in (float64; the model is not
    changed): ``W' = diag(a) W``, ``c' = a * c + b`` with ``(a, b)`` from :func:`bn_affine`, so that
    ``bn(layer(x)) == layer'(x)`` in eval mode. Keys are the layers' names; pairs from
    :func:`batchnorm_pairs` (see there for ``example_inputs``).

    >>> g = torch.Generator().manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    >>> m[1].running_var.copy_(torch.rand(3, generator=g) + 0.5).shape
    torch.Size([3])
    >>> W, c = fold_batchnorm(m)["0"]
    >>> x = torch.randn(5, 4, generator=g)
    >>> torch.allclose((x.double() @ W.T + c).float(), m(x), atol=1e-6)
    True
    """
    modules = dict(model.named_modules())
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, bn_name in batchnorm_pairs(model, example_inputs):
        layer, bn = modules[layer_name], modules[bn_name]
        a, b = bn_affine(bn.running_mean, bn.running_var, bn.weight if bn.affine else None,
                         bn.bias if bn.affine else None, bn.eps)
        W = layer.weight.detach().double()
        c = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(a)
        out[layer_name] = (a.reshape((-1,) + (1,) * (W.dim() - 1)) * W, a * c + b)
    return out


class _BNPairs(TracingMode):
    """Records, during one eager run, which Linear/Conv output each BatchNorm normalises and how
    often every tensor is consumed (a layer folds only when the BatchNorm is its sole consumer)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: List[str] = []
        self.producer: Dict[int, str] = {}
        self.uses: Dict[int, int] = {}
        self.pairs: List[Tuple[int, str, str]] = []  # (id of the normalised tensor, layer, bn)
        self._keep: List[torch.Tensor] = []

    def handle(self, name, func, args, kwargs):  # shape queries (IGNORE) never get here: not consumers
        out = func(*args, **kwargs)
        for t in flatten_tensors((args, kwargs, out)):
            self._keep.append(t)  # alive for the whole run, so no id is reused by a later tensor
        for t in flatten_tensors((args, kwargs)):
            self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        here = self.stack[-1] if self.stack else ""
        if name in ("linear", "conv1d", "conv2d", "conv3d") and torch.is_tensor(out):
            self.producer[id(out)] = here
        elif name == "batch_norm" and torch.is_tensor(args[0]) and id(args[0]) in self.producer:
            self.pairs.append((id(args[0]), self.producer[id(args[0])], here))
        return out


# --------------------------------------------------------------------------------------------------
# data and metrics
# --------------------------------------------------------------------------------------------------
def _reiterable(data: Any) -> Any:
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        if data[0].shape[0] != (data[1].shape[0] if torch.is_tensor(data[1]) else data[0].shape[0]):
            raise ValueError(f"data inputs have {data[0].shape[0]} rows but targets have {data[1].shape[0]}")
        return data
    if torch.is_tensor(data):
        raise TypeError("pass data as a pair (inputs, targets) or a DataLoader, not a bare tensor")
    try:
        if iter(data) is data:  # a one-shot iterator: keep its batches so it can be read many times
            log.debug("materialising a one-shot iterator of batches")
            return list(data)
    except TypeError:
        raise TypeError("data must be a pair (X, Y) or an iterable of (x, y) batches, "
                        f"got {type(data).__name__}") from None
    return data


def normalize_splits(data: Any, splits: Union[None, str, Sequence[str]] = None,
                     default_name: str = "data") -> "OrderedDict[str, Any]":
    """``data`` as an ordered ``{split name: dataset}``.

    A mapping is read as named splits (``splits`` may select and order some of them); anything else
    is one dataset named ``splits`` (a string) or ``default_name``.
    """
    if data is None:
        raise ValueError("data is None: pass a pair (X, Y), a DataLoader or a dict of named splits")
    if isinstance(data, Mapping):
        if len(data) == 0:
            raise ValueError("data is an empty dict: give at least one named split")
        names = list(data) if splits is None else ([splits] if isinstance(splits, str) else list(splits))
        for n in names:
            if n not in data:
                raise ValueError(f"split {n!r} is not in data; available splits: {list(data)}")
        return OrderedDict((str(n), _reiterable(data[n])) for n in names)
    if splits is not None and not isinstance(splits, str):
        raise ValueError("with a single dataset, splits may only be a name (str) for it")
    return OrderedDict([(splits or default_name, _reiterable(data))])


def normalize_metrics(metrics: Union[MetricSpec, Sequence[MetricSpec], Mapping]) -> List[Tuple[str, Any]]:
    """``[(name, spec)]`` where spec is ``"loss"``, ``"accuracy"``, ``"error"`` or a callable."""
    if isinstance(metrics, (str,)) or callable(metrics):
        metrics = [metrics]
    items = list(metrics.items()) if isinstance(metrics, Mapping) else list(metrics)
    out: List[Tuple[str, Any]] = []
    for m in items:
        if isinstance(m, str):
            if m not in ("loss", "accuracy", "error"):
                raise ValueError(f"unknown metric {m!r}; use 'loss', 'accuracy', 'error' or a callable "
                                 "fn(outputs, targets)")
            out.append((m, m))
        elif isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str) and callable(m[1]):
            out.append(m)
        elif callable(m):
            out.append((getattr(m, "__name__", "metric"), m))
        else:
            raise TypeError(f"metric {m!r} is neither a name nor a callable nor a (name, callable) pair")
    if not out:
        raise ValueError("metrics is empty: ask for at least one of 'loss', 'accuracy' or a callable")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"metric names repeat: {names}")
    return out


def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}; expected a tensor of outputs")


def _batch_size(x: Any) -> int:
    if torch.is_tensor(x):
        return int(x.shape[0])
    if isinstance(x, (list, tuple)) and x and torch.is_tensor(x[0]):
        return int(x[0].shape[0])
    if isinstance(x, Mapping):
        return _batch_size(next(iter(x.values())))
    raise TypeError(f"cannot read the batch size of inputs of type {type(x).__name__}")


def _check_inputs(x: Any) -> None:
    if torch.is_tensor(x) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("the data contains NaN or inf inputs; clean the data first")


def _summed(v: Any, n: int, what: str) -> torch.Tensor:
    v = torch.as_tensor(v)
    if v.dim() == 0:
        return v.double() * n
    if v.dim() == 1 and v.shape[0] == n:
        return v.double().sum()
    raise ValueError(f"{what} returned shape {tuple(v.shape)}; return a scalar (the batch mean) or one value "
                     f"per example (shape ({n},))")


def _class_targets(out: torch.Tensor, y: Any, what: str) -> torch.Tensor:
    if y is None:
        raise ValueError(f"{what} needs targets but the data yields bare inputs; pass (inputs, targets) batches")
    if not torch.is_tensor(y):
        raise TypeError(f"{what} needs tensor targets, got {type(y).__name__}")
    if y.is_floating_point():
        if tuple(y.shape) == tuple(out.shape) and y.dim() >= 2:
            return y.argmax(-1)
        raise TypeError(f"{what} needs integer class labels (or one-hot targets shaped like the outputs); got "
                        f"float targets of shape {tuple(y.shape)} — for regression pass metrics=('loss',) "
                        "and a loss_fn")
    c = out.shape[-1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels out of range: found labels in [{int(y.min())}, {int(y.max())}] but the model "
                         f"outputs {c} classes on its last axis")
    return y


def _metric_sums(out: torch.Tensor, y: Any, n: int, metrics, loss_fn) -> Dict[str, torch.Tensor]:
    """Per-point sums over the batch. ``out`` has a leading point axis: shape (K, n, ...)."""
    K = out.shape[0]
    sums: Dict[str, torch.Tensor] = {}
    need_acc = any(spec in ("accuracy", "error") for _, spec in metrics)
    if need_acc:
        yc = _class_targets(out[0], y, "accuracy")
        correct = (out.argmax(-1) == yc.unsqueeze(0)).reshape(K, -1).double().sum(1)
    for name, spec in metrics:
        if spec == "loss":
            if loss_fn is None:
                yc = _class_targets(out[0], y, "the default cross-entropy loss")
                if out.dim() == 3 and yc.dim() == 1:
                    v = nn.functional.cross_entropy(out.reshape(K * n, -1).float() if out.dtype == torch.half
                                                    else out.reshape(K * n, -1), yc.repeat(K), reduction="none")
                    sums[name] = v.reshape(K, n).double().sum(1)
                    continue
                fn = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
            else:
                fn = loss_fn
            sums[name] = torch.stack([_summed(fn(out[k], y), n, "loss_fn") for k in range(K)])
        elif spec == "accuracy":
            sums[name] = correct
        elif spec == "error":
            sums[name] = n - correct
        else:
            sums[name] = torch.stack([_summed(spec(out[k], y), n, f"metric {name!r}") for k in range(K)])
    return sums


# --------------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------------
def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are empty meta tensors (no memory)."""
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # pragma: no cover - exotic modules
        log.debug("meta skeleton failed (%s); falling back to a full deepcopy", exc)
        return copy.deepcopy(model)


class _Points:
    """K points of a linear family ``theta_k = sum_j coeffs[k, j] * bases[j]`` or an explicit list."""

    def __init__(self, bases=None, coeffs=None, states=None):
        if states is not None:
            self.states = list(states)
            if not self.states:
                raise ValueError("no points to evaluate")
            first = self.states[0]
            self.varying = [k for k, v in first.items() if v.is_floating_point()]
            self.const = {k: v for k, v in first.items() if k not in self.varying}
            self.K = len(self.states)
        else:
            self.states = None
            self.bases = list(bases)
            c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))
            if c.dim() != 2 or c.shape[1] != len(self.bases):
                raise ValueError(f"coeffs must have shape (K, {len(self.bases)}), got {tuple(c.shape)}")
            if c.shape[0] == 0:
                raise ValueError("no points to evaluate (coeffs has 0 rows)")
            self.coeffs = c
            self.K = c.shape[0]
            first = self.bases[0]
            self.idx = {k: [j for j in range(len(self.bases)) if k in self.bases[j]] for k in first}
            self.varying = [k for k, v in first.items() if v.is_floating_point() and len(self.idx[k]) >= 2]
            self.const = {k: v for k, v in first.items() if k not in self.varying}
            self._stacks: Dict[str, torch.Tensor] = {}

    def state(self, i: int) -> State:
        if self.states is not None:
            return dict(self.states[i])
        return combine(self.bases, self.coeffs[i].tolist())

    def stacked(self, lo: int, hi: int) -> State:
        """Varying keys stacked over points lo..hi-1: ``{key: (hi-lo, *shape)}``."""
        if self.states is not None:
            return {k: torch.stack([s[k] for s in self.states[lo:hi]]) for k in self.varying}
        out = {}
        for k in self.varying:
            if k not in self._stacks:
                self._stacks[k] = torch.stack([self.bases[j][k] for j in self.idx[k]])
            S = self._stacks[k]
            c = self.coeffs[lo:hi][:, self.idx[k]].to(dtype=S.dtype, device=S.device)
            out[k] = torch.tensordot(c, S, dims=1)
        return out


class _Evaluator:
    """Holds the skeleton of one architecture and evaluates states on splits of data."""

    def __init__(self, model: nn.Module, *, metrics=("loss", "accuracy"), loss_fn=None, device=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.device = model_device(model) if device is None else resolve_device(device)
        self.metrics = normalize_metrics(metrics)
        self.loss_fn = loss_fn
        self.skel = _skeleton(model)
        self.skel.eval()
        self.bn = _bn_modules(self.skel)

    # -- single forward ------------------------------------------------------------------------
    def _to(self, state: Mapping) -> State:
        return {k: v.to(self.device) for k, v in state.items()}

    def forward(self, state: Mapping, x: Any) -> torch.Tensor:
        args = x if isinstance(x, tuple) else (x,)
        return _logits(functional_call(self.skel, dict(state), args))

    # -- BatchNorm -----------------------------------------------------------------------------
    def recalibrate(self, state: Mapping, data: Any, num_batches: Optional[int] = None) -> State:
        """BN running stats of ``state`` recomputed (cumulative average) from a train-mode pass."""
        if not self.bn:
            return dict(state)
        st = dict(state)
        fresh = {}
        for name, _m in self.bn:
            p = f"{name}." if name else ""
            ref = st[p + "running_mean"]
            fresh[p + "running_mean"] = torch.zeros_like(ref, device=self.device)
            fresh[p + "running_var"] = torch.ones_like(st[p + "running_var"], device=self.device)
            if p + "num_batches_tracked" in st:
                fresh[p + "num_batches_tracked"] = torch.zeros_like(st[p + "num_batches_tracked"], device=self.device)
        st.update(fresh)
        saved = [(m, m.momentum) for _, m in self.bn]
        try:
            for _, m in self.bn:
                m.momentum = None  # cumulative moving average, as swa_utils.update_bn
                m.train()           # only BN in train mode: dropout stays off (eval-time activations)
            with torch.no_grad():
                for i, (x, _) in enumerate(iter_batches(data, self.device)):
                    if num_batches is not None and i >= num_batches:
                        break
                    _check_inputs(x)
                    self.forward(st, x)  # BN writes its stats into the fresh tensors in place
        finally:
            for m, mom in saved:
                m.momentum = mom
                m.eval()
        return st

    # -- many points ---------------------------------------------------------------------------
    def _sums_for(self, stacked: Optional[State], const: State, single: Optional[State], data: Any):
        totals: Optional[Dict[str, torch.Tensor]] = None
        count = 0
        with torch.no_grad():
            for x, y in iter_batches(data, self.device):
                _check_inputs(x)
                n = _batch_size(x)
                if single is not None:
                    out = self.forward(single, x).unsqueeze(0)
                else:
                    fn = lambda var, xx: self.forward({**const, **var}, xx)  # noqa: E731
                    out = vmap(fn, in_dims=(0, None))(stacked, x)
                s = _metric_sums(out, y, n, self.metrics, self.loss_fn)
                totals = s if totals is None else {k: totals[k] + s[k] for k in s}
                count += n
        if count == 0:
            raise ValueError("data is empty: no example was evaluated")
        return {k: (v / count).cpu().numpy() for k, v in totals.items()}, count

    def run(self, points: _Points, splits: Mapping[str, Any], *, recalibrate: bool = False, bn_data: Any = None,
            bn_batches: Optional[int] = None, batched: Union[bool, str] = "auto", batch_points: int = 64,
            progress: Progress = None) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, Any]]:
        """Evaluate every point on every split. Returns ``(values, info)``.

        ``values[split][metric]`` is a float64 array of shape (K,); ``info`` records the mode used
        (``"vmap"`` or ``"loop"``) and the number of examples per split.
        """
        if batched not in ("auto", True, False):
            raise ValueError(f"batched must be 'auto', True or False, got {batched!r}")
        if recalibrate and not self.bn:
            recalibrate = False
        if recalibrate and batched is True:
            raise ValueError("batched=True cannot recompute BatchNorm statistics per point (each point needs its "
                             "own train-mode pass); use batched='auto' or recalibrate_bn=False")
        if recalibrate:
            bn_src = bn_data if bn_data is not None else next(iter(splits.values()))
            bn_src = _reiterable(bn_src)
        K = points.K
        batch_points = max(1, int(batch_points))
        use_vmap = (batched is True or batched == "auto") and not recalibrate and K > 1
        const = self._to(points.const)
        values = {s: {m: np.empty(K) for m, _ in self.metrics} for s in splits}
        counts: Dict[str, int] = {}
        done = 0
        if use_vmap:
            try:
                for lo in range(0, K, batch_points):
                    hi = min(K, lo + batch_points)
                    stacked = self._to(points.stacked(lo, hi))
                    for s, d in splits.items():
                        vals, counts[s] = self._sums_for(stacked, const, None, d)
                        for m in vals:
                            values[s][m][lo:hi] = vals[m]
                    done = hi
                    if progress is not None:
                        progress(done, K)
            except (ValueError, TypeError):
                raise
            except Exception as exc:
                if batched is True:
                    raise RuntimeError(f"vmap evaluation failed ({exc}); pass batched=False to evaluate "
                                       "point by point") from exc
                log.warning("vmap evaluation failed (%s: %s); falling back to a loop over points",
                            type(exc).__name__, exc)
                use_vmap = False
                done = 0
        if not use_vmap:
            for k in range(K):
                st = self._to(points.state(k))
                if recalibrate:
                    st = self.recalibrate(st, bn_src, bn_batches)
                for s, d in splits.items():
                    vals, counts[s] = self._sums_for(None, const, st, d)
                    for m in vals:
                        values[s][m][k] = vals[m][0]
                if progress is not None:
                    progress(k + 1, K)
        for s in values:
            for m, arr in values[s].items():
                if not np.all(np.isfinite(arr)):
                    log.warning("metric %r on split %r is not finite at %d of %d points", m, s,
                                int((~np.isfinite(arr)).sum()), K)
        info = {"mode": "vmap" if use_vmap else "loop", "examples": dict(counts), "points": K,
                "recalibrate_bn": bool(recalibrate), "bn_batches": bn_batches, "device": str(self.device)}
        return values, info


# --------------------------------------------------------------------------------------------------
# public wrappers
# --------------------------------------------------------------------------------------------------
def recalibrate_bn(model: nn.Module, data: Any, state: Optional[Mapping] = None, *, num_batches: Optional[int] = None,
                   device=None) -> State:
    """BatchNorm running statistics of ``state`` recomputed from ``data``; returns a new state.

    Every BatchNorm's statistics are reset (mean 0, var 1, ``num_batches_tracked`` 0) and re-estimated
    with a cumulative average (``momentum=None`` semantics, as ``torch.optim.swa_utils.update_bn``)
    over one no-grad pass in which only the BatchNorm layers are in train mode (dropout stays off, so
    the statistics are those of the eval-time activations; for models without dropout this is exactly
    ``update_bn``). Interpolated running statistics are not the statistics of the interpolated network,
    hence the reset (Jordan et al. 2023, REPAIR, ICLR, arXiv:2211.08403).

    Parameters
    ----------
    model : nn.Module — the architecture (never modified).
    data : (X, Y) pair or iterable of batches — use training data without augmentation.
    state : full state to recalibrate; default the model's own.
    num_batches : stop after this many batches (default: the whole pass).

    Returns
    -------
    dict — ``state`` with new BN buffers (other entries shared, not copied).
    """
    check_module(model, where="state.recalibrate_bn")
    check_data(data, where="state.recalibrate_bn")
    ev = _Evaluator(model, device=device)
    st = ev._to(state_of(model) if state is None else as_state(state, model))
    return ev.recalibrate(st, _reiterable(data), num_batches)


def evaluate(model: nn.Module, data: Any, state: Optional[Mapping] = None, *, metrics=("loss", "accuracy"),
             loss_fn: Optional[Callable] = None, device=None) -> Dict[str, float]:
    """Metrics of ``model`` at ``state`` (default: its own weights) on one dataset, in eval mode.

    Returns ``{metric: float}`` — example-weighted means (sums over batches / number of examples).
    """
    check_module(model, where="state.evaluate")
    check_data(data, where="state.evaluate")
    if isinstance(data, Mapping):
        raise TypeError("evaluate takes one dataset; use evaluate_states for a dict of splits")
    ev = _Evaluator(model, metrics=metrics, loss_fn=loss_fn, device=device)
    st = state_of(model) if state is None else as_state(state, model)
    vals, info = ev.run(_Points(states=[st]), normalize_splits(data), batched=False)
    return {m: float(v[0]) for m, v in next(iter(vals.values())).items()}


def evaluate_states(model: nn.Module, states: Sequence[Mapping], data: Any, *, splits=None,
                    metrics=("loss", "accuracy"), loss_fn=None, recalibrate_bn: Union[bool, str] = False,
                    bn_data=None, bn_batches=None, batched: Union[bool, str] = "auto", batch_points: int = 64,
                    device=None, progress: Progress = None, return_info: bool = False):
    """Metrics at an explicit list of K states -> ``{split: {metric: (K,) float64 array}}``.

    Points are evaluated ``batch_points`` at a time with :func:`torch.func.vmap` over stacked
    floating tensors when ``batched`` allows it and no BatchNorm recalibration is asked (each
    recalibrated point needs its own train-mode pass, so it runs in a loop). ``"auto"`` falls back
    to the loop, with a log warning, when the model cannot be vmapped. ``progress(done, total)`` is
    called after each group of points.
    """
    check_module(model, where="state.evaluate_states")
    check_data(data, where="state.evaluate_states")
    ev = _Evaluator(model, metrics=metrics, loss_fn=loss_fn, device=device)
    sts = [as_state(s, model, f"states[{i}]") for i, s in enumerate(states)]
    rec = resolve_recalibration(recalibrate_bn, model)
    vals, info = ev.run(_Points(states=sts), normalize_splits(data, splits), recalibrate=rec, bn_data=bn_data,
                        bn_batches=bn_batches, batched=batched, batch_points=batch_points, progress=progress)
    return (vals, info) if return_info else vals


def evaluate_combinations(model: nn.Module, bases: Sequence[Mapping], coeffs, data: Any, *, splits=None,
                          metrics=("loss", "accuracy"), loss_fn=None, recalibrate_bn: Union[bool, str] = False,
                          bn_data=None, bn_batches=None, batched: Union[bool, str] = "auto", batch_points: int = 64,
                          device=None, progress: Progress = None, return_info: bool = False):
    """Metrics at the K points ``theta_k = sum_j coeffs[k, j] * bases[j]`` (see :func:`combine`).

    ``bases[0]`` is a full state of ``model`` (a module or a mapping); later bases may hold a subset of
    the keys (directions over parameters only, say). ``coeffs`` has shape (K, len(bases)). Points are
    formed chunk by chunk, so memory is ``len(bases) + batch_points`` copies of the weights.
    Returns ``{split: {metric: (K,) float64 array}}`` (and an info dict if ``return_info``).
    """
    ev = _Evaluator(model, metrics=metrics, loss_fn=loss_fn, device=device)
    if not bases:
        raise ValueError("bases is empty")
    b0 = as_state(bases[0], model, "bases[0]")
    rest = []
    for j, b in enumerate(bases[1:], 1):
        b = state_of(b) if isinstance(b, nn.Module) else dict(b)
        for k, v in b.items():
            if k not in b0:
                raise ValueError(f"bases[{j}] has key {k!r} that the model does not have")
            if tuple(v.shape) != tuple(b0[k].shape):
                raise ValueError(f"bases[{j}][{k!r}] has shape {tuple(v.shape)} but the model has {tuple(b0[k].shape)}")
        rest.append(b)
    bases_dev = [ev._to(b) for b in [b0] + rest]
    rec = resolve_recalibration(recalibrate_bn, model)
    vals, info = ev.run(_Points(bases=bases_dev, coeffs=coeffs), normalize_splits(data, splits), recalibrate=rec,
                        bn_data=bn_data, bn_batches=bn_batches, batched=batched, batch_points=batch_points,
                        progress=progress)
    return (vals, info) if return_info else vals
