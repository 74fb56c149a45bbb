"""L^q path-norms of DAG ReLU networks and the path-norm generalization bound.

Gonon, Brisebarre, Riccietti & Gribonval, "A path-norm toolkit for modern networks: consequences,
promises and challenges", ICLR 2024, arXiv:2310.01225.

The path-lifting ``Phi(theta)`` of a DAG ReLU network has one coordinate per path of the network's
neuron graph: every path from an input neuron to an output neuron, **plus every path starting at a
hidden or output bias**. Its coordinate is the product of the weights along the path (times the bias
for bias paths). The L^q path-norm is

    ||Phi(theta)||_q = ( sum_p prod_{e in p} |theta_e|^q )^(1/q),    q >= 1.

Recipe (paper, Section 2 / Algorithm): replace every parameter by ``|.|^q``, replace max-pools by
sum-pools with the same geometry, feed an all-ones input and sum the outputs: the result is
``||Phi||_q^q`` (all pre-activations are >= 0, so the ReLUs act as the identity and skip connections add
their paths automatically).

What this implementation does differently from the published toolkit (REFERENCES.md section 4.7):

* BatchNorm (eval, running statistics) is an element-wise affine layer ``y = a x + b`` with
  ``a = gamma / sqrt(var + eps)`` and ``b = beta - a mu``; its edges get ``|a|^q`` and its bias
  ``|b|^q`` (the toolkit uses ``|beta| - |gamma||mu|/sqrt(var+eps)`` and ``|gamma|^q/sqrt(var^q+eps)``).
* Average pooling is a linear neuron with weight ``1/k`` on each of its ``k`` inputs, so each window
  sum is multiplied by ``(1/k)^q`` locally (equivalently forward ``* (1/k)^(q-1)``), before any root is
  taken; border windows with ``count_include_pad=False`` use their own divisor.
* No graph is traced and the user's model is only read: a float64 deep copy runs once, eagerly, in
  eval mode on an all-ones input under a :class:`torch.overrides.TorchFunctionMode` (like the
  toolkit's symmetry tracer ``weightspace._trace``) that applies the recipe to each torch call as it
  happens, so Python control flow on shapes and flags just runs (``torch.fx`` cannot trace it).
  Activations are kept in a log-scaled form (value = tensor * exp(scale)), rescaled after every
  linear layer, so that networks whose path-norm overflows float32 (or even float64) still get an
  exact ``log_value``.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from weightspace._ops import _DUNDER_BASE as _DUNDER
from weightspace._ops import _arg, _flatten, _op_name, traced_run
from weightspace._utils import iter_batches

log = logging.getLogger(__name__)

__all__ = ["path_norm", "path_norm_bound", "PathNorm", "PathNormBound", "UnsupportedOperationError"]


class UnsupportedOperationError(ValueError):
    """The network contains an operation for which the ReLU-DAG path-norm is not defined."""


@dataclass(frozen=True)
class PathNorm:
    """Result of :func:`path_norm`.

    Attributes
    ----------
    value : float
        ``||Phi(theta)||_q`` (``math.inf`` if it does not fit in a float64; ``log_value`` stays exact).
    log_value : float
        Natural log of ``value``.
    q : float
        The exponent.
    settings : Mapping
        What was done: dtype, number of max-pools replaced by sum-pools, BatchNorms folded,
        average-pools corrected, input shape used.
    """

    value: float
    log_value: float
    q: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def value_q(self) -> float:
        """``||Phi||_q^q`` (the sum of the outputs of the recipe)."""
        return _safe_exp(self.q * self.log_value)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["settings"] = dict(self.settings)
        d["value_q"] = self.value_q
        return d


@dataclass(frozen=True)
class PathNormBound:
    """Result of :func:`path_norm_bound` (see its docstring for every quantity)."""

    bound: float
    generalization_term: float
    empirical_risk: float
    constant_C: float
    first_part: float
    path_norm_l1: float
    lipschitz: float
    loss: str
    gamma: Optional[float]
    B: float
    n: int
    depth: int
    kernel_size: int
    n_pool_types: int
    d_in: int
    d_out: int
    theorem: str = "Gonon et al. 2024 (arXiv:2310.01225), Theorem 3.1"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["settings"] = dict(self.settings)
        return d


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf



# ----------------------------------------------------------------------------------------------
# pooling as linear neurons
# ----------------------------------------------------------------------------------------------
def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _stride(kernel, stride):
    return kernel if stride is None or stride == [] or stride == () else stride


def _sum_pool(t: torch.Tensor, kernel, stride, padding, ceil_mode: bool, dims: int) -> torch.Tensor:
    """Sum over each pooling window (zeros in the padding), same geometry as the pooling layer."""
    stride = _stride(kernel, stride)
    if dims == 1:
        k, s, p = _tuple(kernel, 1)[0], _tuple(stride, 1)[0], _tuple(padding, 1)[0]
        return F.avg_pool2d(t.unsqueeze(-2), (1, k), (1, s), (0, p), ceil_mode, True, 1).squeeze(-2)
    return F.avg_pool2d(t, kernel, stride, padding, ceil_mode, True, 1)


def _max_pool(x: torch.Tensor, kernel, stride, padding, dilation, ceil_mode, dims, tr) -> torch.Tensor:
    """Max-pool -> sum-pool with the same geometry (padding and dilation included)."""
    dil = _tuple(dilation, dims)
    if any(d != 1 for d in dil):
        if ceil_mode:
            raise tr.unsupported("max-pool with dilation > 1 and ceil_mode=True")
        c = x.shape[1]
        k = _tuple(kernel, dims)
        w = torch.ones((c, 1) + k, dtype=x.dtype, device=x.device)
        conv = F.conv1d if dims == 1 else F.conv2d
        return conv(x, w, None, _tuple(_stride(kernel, stride), dims), _tuple(padding, dims), dil, c)
    return _sum_pool(x, kernel, stride, padding, ceil_mode, dims)


def _avg_pool(x: torch.Tensor, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, dims,
              q) -> torch.Tensor:
    """Average pool as a linear neuron per window: ``sum_window(x) * (1/divisor)^q``.

    The divisor of each window is read from the pooling op itself (pooling ones and dividing by the
    window's count), so ``count_include_pad=False`` borders and ``divisor_override`` are exact.
    """
    ones = torch.ones_like(x[:1])
    summed = _sum_pool(x, kernel, stride, padding, ceil_mode, dims)
    count = _sum_pool(ones, kernel, stride, padding, ceil_mode, dims)
    stride = _stride(kernel, stride)
    if dims == 1:
        avg1 = F.avg_pool2d(ones.unsqueeze(-2), (1, _tuple(kernel, 1)[0]), (1, _tuple(stride, 1)[0]),
                            (0, _tuple(padding, 1)[0]), ceil_mode, count_include_pad).squeeze(-2)
    else:
        avg1 = F.avg_pool2d(ones, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    # edge weight of window j is 1/divisor_j = avg(ones)_j / count_j
    w = torch.where(count > 0, avg1 / count.clamp_min(1e-300), torch.zeros_like(count))
    return summed * w.pow(q)


def _adaptive_sizes(in_shape, out_size, device) -> torch.Tensor:
    """Number of inputs of each adaptive-pool window (product over the pooled dims)."""
    dims = len(out_size)
    total = None
    for d in range(dims):
        L, o = in_shape[-dims + d], out_size[d]
        o = L if o is None else o
        sizes = torch.tensor([math.ceil((i + 1) * L / o) - (i * L) // o for i in range(o)],
                             dtype=torch.float64, device=device)
        shape = [1] * dims
        shape[d] = o
        sizes = sizes.reshape(shape)
        total = sizes if total is None else total * sizes
    return total


def _adaptive(x: torch.Tensor, out_size, dims, kind, q) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pools (windows of uneven sizes ``n_j``): max -> window sum; avg -> sum * (1/n_j)^q."""
    out_size = _tuple(out_size, dims)
    pool = F.adaptive_avg_pool1d if dims == 1 else F.adaptive_avg_pool2d
    avg = pool(x, out_size)
    n = _adaptive_sizes(x.shape, out_size, x.device)
    if kind == "max":
        return avg * n, n
    return avg * n.pow(1.0 - q), n


# ----------------------------------------------------------------------------------------------
# the recipe as a TorchFunctionMode: activations are stored as (t, s) with true value t * exp(s)
# ----------------------------------------------------------------------------------------------
_SUPPORTED = (
    "linear / conv{1,2,3}d / conv_transpose (any stride, padding, dilation, groups), x @ W, einsum with "
    "one activation, BatchNorm in eval with running statistics, relu, identity, dropout, max/avg pools "
    "(fixed and adaptive, 1d/2d), mean/sum/amax over non-batch dims, view/reshape/flatten/permute/"
    "transpose/indexing, cat/stack, residual add/sub, multiplication by constants or parameters"
)
_IGNORE = {"size", "dim", "numel", "shape", "len", "ndimension", "nelement", "element_size", "is_floating_point",
           "is_complex", "is_contiguous", "data_ptr", "stride", "storage_offset", "get_device", "register_hook",
           "retain_grad", "repr", "format", "str", "prop:shape", "prop:dtype", "prop:device", "prop:is_cuda",
           "prop:requires_grad", "prop:grad_fn", "prop:ndim", "prop:is_leaf", "prop:layout", "prop:names",
           "prop:is_nested", "prop:is_sparse", "prop:is_quantized", "prop:is_meta", "prop:grad"}
_IDENTITY = {"relu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "feature_dropout", "neg", "negative", "pos", "positive", "clamp", "clamp_min", "clip"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda", "prop:data", "detach",
          "requires_grad_"}
_AS = {"view_as", "reshape_as", "expand_as", "type_as"}
_STRUCTURAL = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze",
               "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "prop:T", "prop:mT",
               "contiguous", "clone", "getitem", "expand", "expand_as", "repeat", "tile", "narrow", "select",
               "index_select", "gather", "take_along_dim", "split", "split_with_sizes", "chunk", "unbind",
               "tensor_split", "roll", "flip", "fliplr", "flipud", "pad", "unfold", "ravel", "repeat_interleave",
               "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"}
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
_NEW = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
        "new_empty", "new_full", "new_tensor"}
_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_MATMUL = {"matmul", "mm", "bmm", "einsum", "addmm"}
_POOLS = {"max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
          "adaptive_max_pool1d", "adaptive_max_pool2d"}


def _renorm(t: torch.Tensor, s: float) -> Tuple[torch.Tensor, float]:
    """Rescale so that ``max(t) = 1`` (values stay ``t * exp(s)``)."""
    m = float(t.max()) if t.numel() else 0.0
    if m > 0.0 and math.isfinite(m):
        return t / m, s + math.log(m)
    return t, s


class _Recipe(TorchFunctionMode):
    """Runs a float64 copy of the model on all-ones inputs and applies the path-norm recipe to every op.

    An *activation* is a tensor that depends on the model's inputs; the mode records for each one its
    log-scale ``s`` (true value ``t * exp(s)``, ``t >= 0``) and its depth (number of linear layers on the
    longest chain behind it). Every other tensor (parameters, buffers, constants, shape arithmetic) is
    computed normally. An op touching an activation must have a rule below, else
    :class:`UnsupportedOperationError` names it and the module it ran in.
    """

    def __init__(self, q: float, param_ids: set, modules: Dict[str, nn.Module]):
        super().__init__()
        self.q = q
        self.acts = WeakIdKeyDictionary()  # activation tensor -> (log scale, depth)
        self.param_ids = param_ids
        self.modules = modules  # name -> module, to name the module type in errors
        self.module_stack: list = []  # names of the modules being run (kept by weightspace's traced_run)
        self.counts = {"maxpool_to_sumpool": 0, "batchnorm_folded": 0, "avgpool_corrected": 0, "linear": 0,
                       "conv": 0, "matmul": 0, "non_parameter_weights": 0}
        self.max_depth, self.K, self.pool_types = 0, 1, set()

    # -- bookkeeping --------------------------------------------------------------------------
    def reg(self, t: torch.Tensor, s: float, depth: int) -> torch.Tensor:
        self.acts[t] = (float(s), int(depth))
        self.max_depth = max(self.max_depth, int(depth))
        return t

    def is_act(self, t: Any) -> bool:
        return torch.is_tensor(t) and t in self.acts

    def where(self) -> str:
        if not self.module_stack:
            return "<top level>"
        name = self.module_stack[-1]
        return f"{name or '<top level>'!r} ({type(self.modules.get(name)).__name__})"

    def unsupported(self, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"path_norm: unsupported operation {what} on activations in module {self.where()}. The path-norm "
            f"is defined here for ReLU DAG networks only (supported: {_SUPPORTED}). GELU, tanh, sigmoid, "
            f"softmax, attention, LayerNorm/GroupNorm, products of two activations and the like have no "
            f"path-lifting; remove or replace them (or compute the path-norm of a ReLU sub-network).")

    def pw(self, c: Any) -> Any:
        """``|c|^q`` of a constant (a parameter, buffer, derived tensor or Python number), float64."""
        if torch.is_tensor(c):
            return c.detach().to(torch.float64).abs().pow(self.q)
        return abs(float(c)) ** self.q

    def weight(self, W: Any, what: str) -> Optional[torch.Tensor]:
        if W is None:
            return None
        if self.is_act(W):
            raise self.unsupported(f"{what} whose weight depends on the input")
        if id(W) not in self.param_ids:
            self.counts["non_parameter_weights"] += 1
        return self.pw(W)

    def affine(self, x: torch.Tensor, fn, bias: Optional[torch.Tensor], depth_inc: int = 1) -> torch.Tensor:
        """Register ``fn(x_true) + bias`` (``fn`` linear with nonnegative coefficients) without overflow."""
        s, d = self.acts[x]
        c = max(s, 0.0) if bias is not None else s
        out = fn(x * math.exp(s - c)) if s - c > -745 else fn(torch.zeros_like(x))
        if bias is not None:
            out = out + bias * math.exp(-c)
        return self.reg(*_renorm(out, c), d + depth_inc)

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _IGNORE:
            return func(*args, **kwargs)
        acts = [t for t in _flatten((args, kwargs)) if self.is_act(t)]
        if not acts or name in _NEW:
            return func(*args, **kwargs)
        raw = getattr(func, "__name__", "")
        inplace = (raw.endswith("_") and not raw.startswith("_")) or (
            raw.startswith("__i") and raw[3:-2] in _DUNDER) or bool(kwargs.get("inplace", False))
        if name in _IDENTITY or name in _CASTS:
            out = self._identity(name, func, args, kwargs, inplace)
        elif name in _STRUCTURAL:
            out = self._structural(name, func, args, kwargs)
        elif name in ("add", "sub", "rsub"):
            out = self._add(name, raw, args, kwargs)
        elif name in ("mul", "multiply", "div", "divide", "true_divide", "truediv"):
            out = self._mul(name, raw, args, kwargs)
        elif name == "linear":
            out = self._linear(args, kwargs)
        elif name in _CONV:
            out = self._conv(name, func, args, kwargs)
        elif name in _MATMUL:
            out = self._matmul(name, raw, args, kwargs)
        elif name == "batch_norm":
            out = self._batch_norm(args, kwargs)
        elif name in _POOLS:
            out = self._pool(name, args, kwargs)
        elif name in ("mean", "sum", "amax"):
            out = self._reduce(name, args, kwargs)
        elif name in _CAT:
            out = self._cat(func, args, kwargs)
        elif name == "setitem":
            return self._setitem(args)
        else:
            raise self.unsupported(repr(name))
        if inplace and torch.is_tensor(args[0]) and out is not args[0]:
            return self._write_back(args[0], out)
        return out

    def _write_back(self, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """In-place op: store the result in ``target`` at ``target``'s scale (views share that scale)."""
        s_out, d = self.acts[out]
        if self.is_act(target):
            s_t = self.acts[target][0]
            target.copy_(out * math.exp(s_out - s_t))
            if not torch.isfinite(target).all():
                raise self.unsupported("an in-place update whose result overflows float64")
            return self.reg(target, s_t, d)
        target.copy_(out)
        return self.reg(target, s_out, d)

    # -- rules --------------------------------------------------------------------------------
    def _identity(self, name, func, args, kwargs, inplace):
        x = args[0]
        if not self.is_act(x):
            return func(*args, **kwargs)  # e.g. const.type_as(activation)
        if name in ("clamp", "clamp_min", "clip"):  # clamp(min=0) is a ReLU; anything else is not
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            if torch.is_tensor(lo) or lo != 0 or hi is not None:
                raise self.unsupported(f"{name!r} other than clamp(min=0)")
        if name == "type" and len(args) == 1 and not kwargs:
            return func(*args, **kwargs)
        if name in ("to", "type") and any(
                (isinstance(a, torch.dtype) and not a.is_floating_point) or (name == "type" and isinstance(a, str)
                 and not any(f in a for f in ("Float", "Double", "Half", "BFloat"))) for a in list(args[1:]) + list(kwargs.values())):
            raise self.unsupported(f"{name!r} to a non-floating type (the input is used as indices?)")
        if name in _CASTS or inplace:
            return x  # keep float64 and our device; values unchanged
        return self.reg(x.clone(), *self.acts[x])

    def _structural(self, name, func, args, kwargs):
        x = args[0]
        others = [t for t in _flatten((args[1:], kwargs)) if self.is_act(t)]
        if not self.is_act(x):
            if name in _AS:
                return func(*args, **kwargs)
            raise self.unsupported(f"{name!r} with an index or argument that depends on the input")
        if others and name not in _AS:
            raise self.unsupported(f"{name!r} with an index or argument that depends on the input")
        if name == "pad":
            mode, value = _arg(args, kwargs, 2, "mode", "constant"), _arg(args, kwargs, 3, "value", None)
            if mode == "constant" and value not in (None, 0, 0.0):
                raise self.unsupported(f"'pad' with the constant value {value} (a constant neuron, not a parameter)")
        out = func(*args, **kwargs)
        rec = self.acts[x]
        for t in _flatten(out):
            self.reg(t, *rec)
        return out

    def _add(self, name, raw, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        alpha = self.pw(_arg(args, kwargs, 2, "alpha", 1))
        wa, wb = (alpha, 1.0) if name == "rsub" else (1.0, alpha)  # signs drop out: |-1|^q = 1
        terms = [(a, wa), (b, wb)]
        scales = [self.acts[t][0] for t, _ in terms if self.is_act(t)]
        has_const = any(not self.is_act(t) for t, _ in terms)
        c = max(scales + ([0.0] if has_const else []))
        out = 0.0
        for t, w in terms:
            if self.is_act(t):
                out = out + t * (w * math.exp(self.acts[t][0] - c))
            else:  # a constant added to a neuron is a bias: |b|^q (parameters, buffers, numbers alike)
                out = out + self.pw(t) * (w * math.exp(-c))
        depth = max(self.acts[t][1] for t, _ in terms if self.is_act(t))
        if not torch.is_tensor(out):
            raise self.unsupported(f"{name!r} without a tensor result")
        return self.reg(*_renorm(out, c), depth)

    def _mul(self, name, raw, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if self.is_act(a) and self.is_act(b):
            raise self.unsupported(f"{name!r} of two activations (a product of neurons, e.g. gating or attention)")
        divide = name in ("div", "divide", "true_divide", "truediv")
        if divide and (raw in ("__rdiv__", "__rtruediv__") or self.is_act(b)):
            raise self.unsupported("division by an activation")
        if divide and kwargs.get("rounding_mode") is not None:
            raise self.unsupported(f"division with rounding_mode={kwargs['rounding_mode']!r}")
        x, c = (a, b) if self.is_act(a) else (b, a)
        w = self.pw(c)
        if divide:
            w = 1.0 / w
        s, d = self.acts[x]
        return self.reg(*_renorm(x * w, s), d)

    def _linear(self, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if not self.is_act(x):
            raise self.unsupported("'linear' whose weight depends on the input")
        W = self.weight(_arg(args, kwargs, 1, "weight"), "'linear'")
        b = self.weight(_arg(args, kwargs, 2, "bias"), "'linear'")
        self.counts["linear"] += 1
        return self.affine(x, lambda t: F.linear(t, W), b)

    def _conv(self, name, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if not self.is_act(x):
            raise self.unsupported(f"{name!r} whose weight depends on the input")
        W = self.weight(_arg(args, kwargs, 1, "weight"), repr(name))
        b = self.weight(_arg(args, kwargs, 2, "bias"), repr(name))
        rest = list(args[3:])
        kw = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        self.counts["conv"] += 1
        bias = None if b is None else b.reshape((-1,) + (1,) * (x.dim() - 2))
        return self.affine(x, lambda t: func(t, W, None, *rest, **kw), bias)

    def _matmul(self, name, raw, args, kwargs):
        if name == "einsum":
            eq = args[0]
            ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
            if sum(self.is_act(o) for o in ops) != 1:
                raise self.unsupported("'einsum' of several activations (not a linear layer)")
            x = next(o for o in ops if self.is_act(o))
            consts = [None if o is x else self.weight(o, "'einsum'") for o in ops]
            self.counts["matmul"] += 1
            return self.affine(x, lambda t: torch.einsum(eq, *[t if c is None else c for c in consts]), None)
        bias = None
        if name == "addmm":
            inp, a, b = args[0], args[1], args[2]
            if self.is_act(inp):
                raise self.unsupported("'addmm' with an input-dependent bias term")
            beta, alpha = self.pw(kwargs.get("beta", 1)), self.pw(kwargs.get("alpha", 1))
            bias = self.pw(inp) * beta
        else:
            a, b = (args[1], args[0]) if raw.startswith("__r") else (args[0], args[1])
            alpha = 1.0
        if self.is_act(a) and self.is_act(b):
            raise self.unsupported(f"{name!r} of two activations (e.g. attention scores)")
        self.counts["matmul"] += 1
        if self.is_act(a):
            Wb = self.weight(b, repr(name)) * alpha
            return self.affine(a, lambda t: torch.matmul(t, Wb), bias)
        Wa = self.weight(a, repr(name)) * alpha
        return self.affine(b, lambda t: torch.matmul(Wa, t), bias)

    def _batch_norm(self, args, kwargs):
        x = args[0] if args else kwargs["input"]
        mu, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
        gamma, beta = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        training, eps = _arg(args, kwargs, 5, "training", False), _arg(args, kwargs, 7, "eps", 1e-5)
        if training or mu is None or var is None:
            raise UnsupportedOperationError(
                f"path_norm: BatchNorm in module {self.where()} normalises with batch statistics "
                "(track_running_stats=False, or called with training=True), so it is not an affine map; the "
                "path-norm needs fixed running statistics (train with track_running_stats=True).")
        if not self.is_act(x) or any(self.is_act(t) for t in (mu, var, gamma, beta)):
            raise self.unsupported("'batch_norm' with input-dependent statistics or affine parameters")
        a, b = _bn_affine(mu, var, gamma, beta, eps)
        shape = (-1,) + (1,) * (x.dim() - 2)
        aq, bq = a.abs().pow(self.q).reshape(shape), b.abs().pow(self.q).reshape(shape)
        self.counts["batchnorm_folded"] += 1
        return self.affine(x, lambda t: t * aq, bq, depth_inc=0)

    def _pool(self, name, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if not self.is_act(x):
            raise self.unsupported(f"{name!r} on a constant")
        s, d = self.acts[x]
        dims = 1 if name.endswith("1d") else 2
        if name.startswith("adaptive"):
            out_size, kind = _arg(args, kwargs, 1, "output_size"), "max" if "max" in name else "avg"
            if kind == "max":
                if _arg(args, kwargs, 2, "return_indices", False):
                    raise self.unsupported("adaptive max-pool with return_indices=True")
                self.counts["maxpool_to_sumpool"] += 1
            else:
                self.counts["avgpool_corrected"] += 1
            t, n = _adaptive(x, out_size, dims, kind, self.q)
            if kind == "max":
                self.K, _ = max(self.K, int(n.max())), self.pool_types.add("max")
            return self.reg(*_renorm(t, s), d)
        kernel = _arg(args, kwargs, 1, "kernel_size")
        stride = _arg(args, kwargs, 2, "stride")
        padding = _arg(args, kwargs, 3, "padding", 0)
        if name.startswith("max"):
            dilation, ceil = _arg(args, kwargs, 4, "dilation", 1), _arg(args, kwargs, 5, "ceil_mode", False)
            if _arg(args, kwargs, 6, "return_indices", False):
                raise self.unsupported("max-pool with return_indices=True")
            self.counts["maxpool_to_sumpool"] += 1
            self.K = max(self.K, math.prod(_tuple(kernel, dims)))
            self.pool_types.add("max")
            t = _max_pool(x, kernel, stride, padding, dilation, ceil, dims, self)
        else:
            ceil, cip = _arg(args, kwargs, 4, "ceil_mode", False), _arg(args, kwargs, 5, "count_include_pad", True)
            div = _arg(args, kwargs, 6, "divisor_override") if dims == 2 else None
            self.counts["avgpool_corrected"] += 1
            t = _avg_pool(x, kernel, stride, padding, ceil, cip, div, dims, self.q)
        return self.reg(*_renorm(t, s), d)

    def _reduce(self, name, args, kwargs):
        x = args[0] if args else kwargs["input"]
        dims = _arg(args, kwargs, 1, "dim")
        keep = _arg(args, kwargs, 2, "keepdim", False)
        if not self.is_act(x):
            raise self.unsupported(f"{name!r} on a constant")
        if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
            raise self.unsupported(f"{name!r} over all dimensions (mixes the samples of a batch)")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        n = math.prod(x.shape[dd] for dd in dims)
        s, d = self.acts[x]
        t = x.sum(dim=dims, keepdim=keep)
        if name == "mean":  # edges 1/n: sum * (1/n)^q
            self.counts["avgpool_corrected"] += 1
            t = t * float(n) ** (-self.q)
        elif name == "amax":  # a max-pool neuron over the reduced dims: max -> sum
            self.counts["maxpool_to_sumpool"] += 1
            self.K, _ = max(self.K, int(n)), self.pool_types.add("max")
        return self.reg(*_renorm(t, s), d)

    def _cat(self, func, args, kwargs):
        seq = list(args[0] if args else kwargs["tensors"])
        acts = [t for t in seq if self.is_act(t)]
        has_const = len(acts) < len(seq)
        c = max([self.acts[t][0] for t in acts] + ([0.0] if has_const else []))
        parts = [t * math.exp(self.acts[t][0] - c) if self.is_act(t) else self.pw(t) * math.exp(-c) for t in seq]
        rest = {k: v for k, v in kwargs.items() if k != "tensors"}
        out = func(parts, *args[1:], **rest)
        return self.reg(*_renorm(out, c), max(self.acts[t][1] for t in acts))

    def _setitem(self, args):
        target, idx, value = args
        if any(self.is_act(t) for t in _flatten(idx)):
            raise self.unsupported("'setitem' with an input-dependent index")
        if self.is_act(target):
            s, d = self.acts[target]
            if self.is_act(value):
                sv, dv = self.acts[value]
                target[idx] = value * math.exp(sv - s)
                d = max(d, dv)
            else:
                target[idx] = self.pw(value) * math.exp(-s)
            self.reg(target, s, d)
            return None
        if not bool((target == 0).all()):
            raise self.unsupported("'setitem' of activations into a nonzero constant tensor")
        target[idx] = value
        self.reg(target, *self.acts[value])
        return None


def _bn_affine(mu, var, gamma, beta, eps: float):
    """Eval BatchNorm as ``a x + b``: ``a = gamma / sqrt(var + eps)``, ``b = beta - a mu`` (float64)."""
    f = lambda t: t.detach().to(torch.float64)  # noqa: E731
    a = 1.0 / torch.sqrt(f(var) + eps)
    b = -a * f(mu)
    if gamma is not None:
        a = f(gamma) * a
        b = b * f(gamma)
    if beta is not None:
        b = f(beta) + b
    return a, b


# ----------------------------------------------------------------------------------------------
# running the recipe
# ----------------------------------------------------------------------------------------------
def _as_inputs(example_inputs) -> Tuple[torch.Tensor, ...]:
    if torch.is_tensor(example_inputs):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not all(torch.is_tensor(t) for t in example_inputs):
        raise TypeError("example_inputs must be a tensor (batch first) or a tuple of tensors")
    for t in example_inputs:
        if t.dim() == 0:
            raise ValueError("example_inputs must have a batch dimension (shape (batch, ...))")
    return tuple(example_inputs)


def _model_device(model: nn.Module, example: Sequence[torch.Tensor]) -> torch.device:
    for p in model.parameters():
        return p.device
    return example[0].device


@dataclass
class _Run:
    leaves: list        # [(t, log scale)] of the distinct output activations
    recipe: _Recipe
    inputs: Tuple[torch.Tensor, ...]


def _float64_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"path_norm expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedOperationError(
            "path_norm: TorchScript modules run their operations in C++ where they cannot be followed; pass "
            "the eager model instead")
    # pre-filled memo: each parameter/buffer is copied once, straight to float64 on ``dev`` (never aliased)
    memo: Dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            dtype = torch.float64 if t.is_floating_point() else t.dtype
            new = t.detach().to(device=dev, dtype=dtype, copy=True)
            memo[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    try:
        net = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - say why
        raise TypeError(f"path_norm works on a float64 deep copy of the model, and copy.deepcopy failed "
                        f"({type(exc).__name__}: {exc}); make the model deep-copyable") from exc
    return net.eval()


def _run_ones(model: nn.Module, example_inputs, q: float, device=None) -> _Run:
    """Run a float64 eval copy of ``model`` on all-ones inputs (batch 1) under :class:`_Recipe`."""
    ex = _as_inputs(example_inputs)
    dev = torch.device(device) if device is not None else _model_device(model, ex)
    net = _float64_copy(model, dev)
    rec = _Recipe(float(q), {id(p) for p in net.parameters()}, dict(net.named_modules()))
    ones = [torch.ones((1,) + tuple(t.shape[1:]), dtype=torch.float64, device=dev) for t in ex]
    for t in ones:
        rec.reg(t, 0.0, 0)
    try:
        out = traced_run(net, ones, rec, rec.module_stack)
    except UnsupportedOperationError:
        raise
    except Exception as exc:  # noqa: BLE001 - report where the run failed
        raise UnsupportedOperationError(
            f"path_norm: running a float64 copy of {type(model).__name__} on all-ones inputs of shapes "
            f"{[tuple(t.shape) for t in ones]} failed in module {rec.where()}: {type(exc).__name__}: {exc}. "
            "Check example_inputs (only their per-sample shapes are used); the model must run in eval mode "
            "in float64 on a batch of one sample.") from exc
    leaves, seen = [], set()
    for t in _flatten(out):
        if rec.is_act(t) and id(t) not in seen:
            seen.add(id(t))
            leaves.append((t, rec.acts[t][0]))
    if not leaves:
        raise UnsupportedOperationError("path_norm: the model's output does not depend on its input tensors")
    return _Run(leaves, rec, ex)


def path_norm(model: nn.Module, example_inputs, q: float = 1, *, device=None) -> PathNorm:
    """L^q path-norm ``||Phi(theta)||_q`` of a DAG ReLU network (Gonon et al., ICLR 2024, arXiv:2310.01225).

    Parameters
    ----------
    model : nn.Module
        Any module whose forward pass, run once in eval mode on one sample, is a DAG of: Linear /
        ``F.linear``, ``x @ W`` / ``einsum`` with one activation operand, Conv1d/2d/3d and transposed
        convs (any stride, padding, dilation, groups), BatchNorm with running statistics, ReLU
        (``relu``, ``relu_``, ``clamp(min=0)``), identity, dropout, max-pools (fixed or adaptive,
        1d/2d, ``amax`` over non-batch dims), average pools (fixed or adaptive, ``mean`` over non-batch
        dims), view/reshape/flatten/permute/indexing, ``cat``/``stack``, residual additions and
        subtractions, and multiplication by constants or parameters. Python control flow (on shapes,
        flags, loops) simply runs. Anything else applied to an activation (GELU, tanh, sigmoid,
        softmax, attention, LayerNorm, GroupNorm, a product of two activations, ...) raises
        :class:`UnsupportedOperationError` naming the operation and the module it ran in.
    example_inputs : Tensor or tuple of Tensors
        Inputs with a batch dimension; only their per-sample shapes are used.
    q : float
        Exponent, ``q >= 1`` (finite).
    device : optional
        Where to compute (default: the device of the model's parameters).

    Returns
    -------
    PathNorm
        ``value = ||Phi||_q``, ``log_value = log ||Phi||_q`` and the settings used (counts of the
        layers seen, BatchNorms folded, pools converted, depth).

    Notes
    -----
    ``||Phi||_q^q = sum_outputs N_{|theta|^q}(1)`` where ``N`` is the network with max-pools replaced by
    sum-pools, average pools weighted ``(1/k)^q`` per edge and BatchNorm folded to ``a x + b``
    (``a = gamma/sqrt(var+eps)``, ``b = beta - a mu``) with ``|a|^q, |b|^q``. The recipe is applied
    operation by operation while a float64 deep copy of the model runs on an all-ones input under a
    :class:`torch.overrides.TorchFunctionMode` (no ``torch.fx``): weights ``W`` of linear maps (whatever
    tensor is passed, parameter or derived, e.g. a weight-normed weight) are replaced by ``|W|^q``, and a
    constant added to a neuron (a bias parameter, a ``cls`` token concatenated to the tokens) counts as a
    bias ``|b|^q``. Activations are kept as ``t * exp(s)`` and rescaled after every linear layer, so the
    result never overflows (``log_value`` stays exact). The model itself is never modified (dtype,
    parameters, buffers and train/eval mode are untouched).

    Examples
    --------
    >>> import torch, analysis
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> pn = analysis.path_norm(net, torch.zeros(1, 2), q=2)   # doctest: +SKIP
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 1:
        raise ValueError(f"q must be a finite number >= 1, got {q!r} (q = inf is not implemented)")
    run = _run_ones(model, example_inputs, q, device)
    logs = []
    for t, s in run.leaves:
        tot = float(t.sum())
        if tot > 0:
            logs.append(math.log(tot) + s)
    if logs:
        m = max(logs)
        log_value = (m + math.log(sum(math.exp(v - m) for v in logs))) / q
    else:
        log_value = -math.inf
    rec = run.recipe
    settings = {"dtype": "float64", "input_shapes": [tuple(t.shape[1:]) for t in run.inputs],
                "recipe": "|theta|^q, max->sum pool, avg-pool (1/k)^q per edge, BN a=gamma/sqrt(var+eps), b=beta-a*mu",
                "tracer": "TorchFunctionMode (one eager float64 eval run)", "depth": rec.max_depth, **rec.counts}
    log.debug("path_norm q=%s: log value %.6g, %s", q, log_value, rec.counts)
    return PathNorm(value=_safe_exp(log_value), log_value=log_value, q=float(q), settings=settings)


# ----------------------------------------------------------------------------------------------
# generalization bound
# ----------------------------------------------------------------------------------------------
def path_norm_bound(model: nn.Module, example_inputs, data, *, loss: str = "margin",
                    gamma: Optional[float] = None, t: float = 0.1, n: Optional[int] = None,
                    B: Optional[float] = None, depth: Optional[int] = None, kernel_size: Optional[int] = None,
                    n_pool_types: Optional[int] = None, lipschitz: Optional[float] = None,
                    device=None) -> PathNormBound:
    """Path-norm generalization bound of Gonon et al. (ICLR 2024, arXiv:2310.01225), Theorem 3.1.

    Bound evaluated (expected generalization error over the draw of the ``n`` training samples)::

        E[test loss - train loss] <= 4 * C * B * L * r / sqrt(n)
        C = sqrt( D log((3 + 2P) K) + log( (3 + 2P)/(1 + P) * (d_in + 1) * d_out ) )

    with ``r = ||Phi(theta)||_1`` (L1 path-norm of the model, :func:`path_norm` with ``q=1``), ``D`` the
    depth, ``P`` the number of distinct types of *-max-pooling neurons (1 if the model has max-pools,
    else 0), ``K`` the largest max-pool kernel size (number of inputs of a max-pooling neuron; 1 if
    none), ``d_in``/``d_out`` the per-sample input/output sizes, ``B`` the largest L-infinity norm of the
    inputs and ``L`` the Lipschitz constant (w.r.t. the L2 norm of the logits) of the loss.

    Returned ``bound = empirical_risk + 4 C B L r / sqrt(n)``:

    * ``loss="margin"`` (default): ramp loss ``min(1, max(0, 1 - M/gamma))`` of the margin
      ``M = f_y - max_{c != y} f_c``; it upper-bounds the top-1 error, so ``bound`` bounds the expected
      top-1 test error. ``L = sqrt(2)/gamma``. If ``gamma`` is None it is the quantile of the training
      margins at level ``(1 - t) err_train + t`` (the authors' scripts' choice).
    * ``loss="cross_entropy"``: ``L = sqrt(2)`` (the gradient softmax - e_y has L2 norm <= sqrt(2)).

    What is confirmed and what is not (be careful when quoting this bound):

    * ``C``, the factor ``4 / sqrt(n)`` and the conventions for ``D, K, P, B, d_in, d_out`` were checked
      against the authors' own script that evaluates "the 1st part of the generalization bound given in
      Theorem 3.1" (agonon/pathnorm_toolkit, ``compute_1st_part_bound_resnets.py``: D = 18..152 for
      ResNets, P = 1, K = 9 for their 3x3 max-pool, B = max L-inf input norm). The full theorem text
      (exact loss assumption) could NOT be read here; the form ``first_part * L * r`` is from memory.
    * The Lipschitz constants ``sqrt(2)/gamma`` and ``sqrt(2)`` are derived here, not taken from the
      paper. ``B`` is replaced by ``max(1, B)``: with biases ``|f(x)| <= ||Phi||_1 max(1, ||x||_inf)``,
      which is the conservative choice (identical to the script when ``B >= 1``).
    * ``D`` is the longest chain of linear layers (Linear/Conv/matmul; BatchNorm is folded, not
      counted: the scripts' convention), ``K`` counts adaptive max-pool windows and ``amax`` too, ``r`` is the
      path-norm of the trained model although the theorem needs ``r`` fixed before seeing the data,
      and choosing ``gamma`` from the data also needs a union bound; neither correction is applied,
      as in the paper's experiments.

    Parameters
    ----------
    model : nn.Module
        A ReLU DAG network supported by :func:`path_norm`, returning (batch, classes) logits.
    data : (X, Y) or iterable of (x, y)
        The training samples (used for ``n``, ``B``, the margins and the empirical risk).
    example_inputs : Tensor or None
        Inputs with a batch dimension (their per-sample shape gives ``d_in``); None uses the first
        batch of ``data``.
    """
    if loss not in ("margin", "cross_entropy"):
        raise ValueError(f"loss must be 'margin' or 'cross_entropy', got {loss!r}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    if gamma is not None and not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    margins, ce, Bdata, count = [], [], 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in iter_batches(data, device):
                if y is None:
                    raise ValueError("path_norm_bound needs labelled data: pass (X, Y) or (x, y) batches")
                if example_inputs is None:
                    example_inputs = x[:1]
                if not torch.isfinite(x).all():
                    raise ValueError("data contains NaN or inf inputs")
                logits = model(x)
                if logits.dim() != 2:
                    raise ValueError(f"path_norm_bound needs (batch, classes) logits, got shape {tuple(logits.shape)}")
                y = y.long().reshape(-1)
                if (y < 0).any() or (y >= logits.shape[1]).any():
                    raise ValueError(f"labels out of range [0, {logits.shape[1]}): min {int(y.min())}, max {int(y.max())}")
                fy = logits.gather(1, y[:, None]).squeeze(1)
                other = logits.clone()
                other.scatter_(1, y[:, None], -math.inf)
                margins.append((fy - other.max(1).values).double().cpu())
                ce.append(F.cross_entropy(logits.double(), y, reduction="none").cpu())
                Bdata = max(Bdata, float(x.abs().max()))
                count += x.shape[0]
    finally:
        model.train(was_training)
    M = torch.cat(margins)
    n_eff = int(n) if n is not None else count
    B_eff = max(1.0, float(B) if B is not None else Bdata)
    run = _run_ones(model, example_inputs, 1.0, device)
    rec = run.recipe
    D = int(depth) if depth is not None else rec.max_depth
    K = int(kernel_size) if kernel_size is not None else rec.K
    P = int(n_pool_types) if n_pool_types is not None else len(rec.pool_types)
    d_in = sum(math.prod(t_.shape[1:]) for t_ in run.inputs)
    d_out = sum(t_.numel() for t_, _ in run.leaves)
    r = path_norm(model, example_inputs, q=1, device=device).value
    C = math.sqrt(D * math.log((3 + 2 * P) * K) + math.log((3 + 2 * P) / (1 + P) * (d_in + 1) * d_out))
    first = 4.0 * C * B_eff / math.sqrt(n_eff)
    err_train = float((M <= 0).double().mean())
    if loss == "margin":
        if gamma is None:
            level = (1 - t) * err_train + t
            gamma = float(torch.quantile(M, min(max(level, 0.0), 1.0)))
            if not gamma > 0:
                raise ValueError(f"the margin quantile at level {level:.3f} is {gamma:.4g} <= 0; pass gamma > 0 "
                                 "or a larger t")
        L = math.sqrt(2.0) / gamma if lipschitz is None else float(lipschitz)
        emp = float((1 - M / gamma).clamp(0, 1).mean())
    else:
        L = math.sqrt(2.0) if lipschitz is None else float(lipschitz)
        emp = float(torch.cat(ce).mean())
        gamma = None
    gen = first * L * r
    settings = {"t": t, "train_error": err_train, "B_data": Bdata, "B_used": B_eff,
                "depth_convention": "longest chain of Linear/Conv layers", "n_given": n is not None}
    return PathNormBound(bound=emp + gen, generalization_term=gen, empirical_risk=emp, constant_C=C,
                         first_part=first, path_norm_l1=r, lipschitz=L, loss=loss, gamma=gamma, B=B_eff,
                         n=n_eff, depth=D, kernel_size=K, n_pool_types=P, d_in=int(d_in), d_out=int(d_out),
                         settings=settings)
