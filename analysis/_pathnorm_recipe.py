"""The path-norm recipe of :mod:`analysis.pathnorm`, applied to each torch call as it happens.

A float64 eval copy of the model runs once on all-ones inputs under :class:`_Recipe`, a
:class:`torch.overrides.TorchFunctionMode` that replaces parameters by ``|.|^q``, max-pools by
sum-pools, folds BatchNorm into an element-wise affine map and corrects average pools, keeping
activations in log-scaled form (Gonon et al., ICLR 2024, arXiv:2310.01225; the deviations from the
published toolkit are listed in :mod:`analysis.pathnorm`'s docstring). :func:`_run_ones` is the entry
point; it returns the output leaves and the recipe's record of what it did.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from weightspace.tracing import DUNDER_BASE as _DUNDER
from weightspace.tracing import TracingMode, arg, flatten_tensors, traced_run
from analysis._pooling import _adaptive, _avg_pool, _max_pool, _tuple
from weightspace.state import bn_affine
from weightspace.utils import model_device
from weightspace.results import WeightspaceError


class UnsupportedOperationError(WeightspaceError, ValueError):
    """The network contains an operation for which the ReLU-DAG path-norm is not defined."""


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf



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


class _Recipe(TracingMode):
    """Runs a float64 copy of the model on all-ones inputs and applies the path-norm recipe to every op.

    An *activation* is a tensor that depends on the model's inputs; the mode records for each one its
    log-scale ``s`` (true value ``t * exp(s)``, ``t >= 0``) and its depth (number of linear layers on the
    longest chain behind it). Every other tensor (parameters, buffers, constants, shape arithmetic) is
    computed normally. An op touching an activation must have a rule below, else
    :class:`UnsupportedOperationError` names it and the module it ran in.
    """

    ignore = frozenset(_IGNORE)  # no ``item``/``tolist``: reading an activation's value is unsupported

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
    def handle(self, name, func, args, kwargs):
        acts = [t for t in flatten_tensors((args, kwargs)) if self.is_act(t)]
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
            lo, hi = arg(args, kwargs, 1, "min"), arg(args, kwargs, 2, "max")
            if torch.is_tensor(lo) or lo != 0 or hi is not None:
                raise self.unsupported(f"{name!r} other than clamp(min=0)")
        if name == "type" and len(args) == 1 and not kwargs:
            return func(*args, **kwargs)
        if name in ("to", "type") and any(
                (isinstance(a, torch.dtype) and not a.is_floating_point) or (name == "type" and isinstance(a, str)
                 and not any(f in a for f in ("Float", "Double", "Half", "BFloat")))
                for a in list(args[1:]) + list(kwargs.values())):
            raise self.unsupported(f"{name!r} to a non-floating type (the input is used as indices?)")
        if name in _CASTS or inplace:
            return x  # keep float64 and our device; values unchanged
        return self.reg(x.clone(), *self.acts[x])

    def _structural(self, name, func, args, kwargs):
        x = args[0]
        others = [t for t in flatten_tensors((args[1:], kwargs)) if self.is_act(t)]
        if not self.is_act(x):
            if name in _AS:
                return func(*args, **kwargs)
            raise self.unsupported(f"{name!r} with an index or argument that depends on the input")
        if others and name not in _AS:
            raise self.unsupported(f"{name!r} with an index or argument that depends on the input")
        if name == "pad":
            mode, value = arg(args, kwargs, 2, "mode", "constant"), arg(args, kwargs, 3, "value", None)
            if mode == "constant" and value not in (None, 0, 0.0):
                raise self.unsupported(f"'pad' with the constant value {value} (a constant neuron, not a parameter)")
        out = func(*args, **kwargs)
        rec = self.acts[x]
        for t in flatten_tensors(out):
            self.reg(t, *rec)
        return out

    def _add(self, name, raw, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        alpha = self.pw(arg(args, kwargs, 2, "alpha", 1))
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
        W = self.weight(arg(args, kwargs, 1, "weight"), "'linear'")
        b = self.weight(arg(args, kwargs, 2, "bias"), "'linear'")
        self.counts["linear"] += 1
        return self.affine(x, lambda t: F.linear(t, W), b)

    def _conv(self, name, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if not self.is_act(x):
            raise self.unsupported(f"{name!r} whose weight depends on the input")
        W = self.weight(arg(args, kwargs, 1, "weight"), repr(name))
        b = self.weight(arg(args, kwargs, 2, "bias"), repr(name))
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
        mu, var = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
        gamma, beta = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
        training, eps = arg(args, kwargs, 5, "training", False), arg(args, kwargs, 7, "eps", 1e-5)
        if training or mu is None or var is None:
            raise UnsupportedOperationError(
                f"path_norm: BatchNorm in module {self.where()} normalises with batch statistics "
                "(track_running_stats=False, or called with training=True), so it is not an affine map; the "
                "path-norm needs fixed running statistics (train with track_running_stats=True).")
        if not self.is_act(x) or any(self.is_act(t) for t in (mu, var, gamma, beta)):
            raise self.unsupported("'batch_norm' with input-dependent statistics or affine parameters")
        a, b = bn_affine(mu, var, gamma, beta, eps)
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
            out_size, kind = arg(args, kwargs, 1, "output_size"), "max" if "max" in name else "avg"
            if kind == "max":
                if arg(args, kwargs, 2, "return_indices", False):
                    raise self.unsupported("adaptive max-pool with return_indices=True")
                self.counts["maxpool_to_sumpool"] += 1
            else:
                self.counts["avgpool_corrected"] += 1
            t, n = _adaptive(x, out_size, dims, kind, self.q)
            if kind == "max":
                self.K, _ = max(self.K, int(n.max())), self.pool_types.add("max")
            return self.reg(*_renorm(t, s), d)
        kernel = arg(args, kwargs, 1, "kernel_size")
        stride = arg(args, kwargs, 2, "stride")
        padding = arg(args, kwargs, 3, "padding", 0)
        if name.startswith("max"):
            dilation, ceil = arg(args, kwargs, 4, "dilation", 1), arg(args, kwargs, 5, "ceil_mode", False)
            if arg(args, kwargs, 6, "return_indices", False):
                raise self.unsupported("max-pool with return_indices=True")
            self.counts["maxpool_to_sumpool"] += 1
            self.K = max(self.K, math.prod(_tuple(kernel, dims)))
            self.pool_types.add("max")
            t = _max_pool(x, kernel, stride, padding, dilation, ceil, dims, self)
        else:
            ceil, cip = arg(args, kwargs, 4, "ceil_mode", False), arg(args, kwargs, 5, "count_include_pad", True)
            div = arg(args, kwargs, 6, "divisor_override") if dims == 2 else None
            self.counts["avgpool_corrected"] += 1
            t = _avg_pool(x, kernel, stride, padding, ceil, cip, div, dims, self.q)
        return self.reg(*_renorm(t, s), d)

    def _reduce(self, name, args, kwargs):
        x = args[0] if args else kwargs["input"]
        dims = arg(args, kwargs, 1, "dim")
        keep = arg(args, kwargs, 2, "keepdim", False)
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
        if any(self.is_act(t) for t in flatten_tensors(idx)):
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
    dev = torch.device(device) if device is not None else model_device(model, default=ex[0].device)
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
    for t in flatten_tensors(out):
        if rec.is_act(t) and id(t) not in seen:
            seen.add(id(t))
            leaves.append((t, rec.acts[t][0]))
    if not leaves:
        raise UnsupportedOperationError("path_norm: the model's output does not depend on its input tensors")
    return _Run(leaves, rec, ex)
