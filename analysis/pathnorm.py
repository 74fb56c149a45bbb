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
* The user's model is only read: the graph is traced with ``torch.fx`` and evaluated by a small
  interpreter on ``|.|^q``-transformed float64 copies of the parameters, in a log-scaled
  representation (value = tensor * exp(scale)), so that networks whose path-norm overflows float32
  (or even float64) still get an exact ``log_value``.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from weightspace._utils import iter_batches

log = logging.getLogger(__name__)

__all__ = ["path_norm", "path_norm_bound", "PathNorm", "PathNormBound", "UnsupportedOperationError"]


class UnsupportedOperationError(ValueError):
    """The traced network contains an operation for which the ReLU-DAG path-norm is not defined."""


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
# log-scaled tensors: true value = t * exp(s), t >= 0
# ----------------------------------------------------------------------------------------------
class _S:
    __slots__ = ("t", "s")

    def __init__(self, t: torch.Tensor, s: float = 0.0):
        self.t, self.s = t, s

    def renorm(self) -> "_S":
        m = float(self.t.max()) if self.t.numel() else 0.0
        if m > 0.0 and math.isfinite(m):
            return _S(self.t / m, self.s + math.log(m))
        return self


def _affine(x: _S, fn, bias: Optional[torch.Tensor]) -> _S:
    """Return ``fn(x_true) + bias`` (``fn`` linear, nonnegative) in scaled form, without overflow."""
    c = max(x.s, 0.0)
    out = fn(x.t * math.exp(x.s - c)) if x.s - c > -745 else fn(torch.zeros_like(x.t))
    if bias is not None:
        out = out + bias * math.exp(-c)
    return _S(out, c).renorm()


def _common(vals: Sequence[_S]) -> Tuple[list, float]:
    c = max(v.s for v in vals)
    return [v.t * math.exp(v.s - c) for v in vals], c


def _pw(t: torch.Tensor, q: float) -> torch.Tensor:
    return t.detach().to(torch.float64).abs().pow(q)


_PARAM_FREE_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten)
_SUPPORTED_MODULES = "Linear, Conv1d, Conv2d, BatchNorm1d/2d (eval stats), ReLU, Identity, Dropout, Flatten, " \
    "MaxPool1d/2d, AdaptiveMaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d/2d"
_STRUCTURAL_METHODS = {"view", "reshape", "flatten", "contiguous", "unsqueeze", "squeeze", "permute",
                       "transpose", "size", "dim", "relu", "relu_", "add", "add_", "mean"}


def _unsupported(what: str, where: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"path_norm: unsupported operation {what} at {where!r}. The path-norm is defined here for ReLU "
        f"DAG networks only (supported modules: {_SUPPORTED_MODULES}; functions: relu, add, cat, flatten, "
        f"view/reshape, mean, max/avg pooling, multiplication by a constant). GELU, tanh, sigmoid, "
        f"attention, LayerNorm and the like have no path-lifting; remove or replace them."
    )


def _sum_pool(t: torch.Tensor, kernel, stride, padding, ceil_mode: bool, dims: int) -> torch.Tensor:
    """Sum over each pooling window (zeros in the padding), same geometry as the pooling layer."""
    if dims == 1:
        k = kernel[0] if isinstance(kernel, (tuple, list)) else kernel
        s = k if stride is None or stride == [] or stride == () else (stride[0] if isinstance(stride, (tuple, list)) else stride)
        p = padding[0] if isinstance(padding, (tuple, list)) else padding
        out = F.avg_pool2d(t.unsqueeze(-2), (1, k), (1, s), (0, p), ceil_mode, True, 1)
        return out.squeeze(-2)
    stride = kernel if stride is None or stride == [] or stride == () else stride
    return F.avg_pool2d(t, kernel, stride, padding, ceil_mode, True, 1)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _max_pool(x: _S, kernel, stride, padding, dilation, ceil_mode, dims, where) -> _S:
    dil = _tuple(dilation, dims)
    if any(d != 1 for d in dil):
        if ceil_mode:
            raise _unsupported("max-pool with dilation > 1 and ceil_mode=True", where)
        c = x.t.shape[1]
        k = _tuple(kernel, dims)
        st = _tuple(kernel if stride in (None, [], ()) else stride, dims)
        w = torch.ones((c, 1) + k, dtype=x.t.dtype, device=x.t.device)
        conv = F.conv1d if dims == 1 else F.conv2d
        return _S(conv(x.t, w, None, st, _tuple(padding, dims), dil, c), x.s).renorm()
    return _S(_sum_pool(x.t, kernel, stride, padding, ceil_mode, dims), x.s).renorm()


def _avg_pool(x: _S, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, dims, q) -> _S:
    ones = torch.ones_like(x.t[:1])
    summed = _sum_pool(x.t, kernel, stride, padding, ceil_mode, dims)
    count = _sum_pool(ones, kernel, stride, padding, ceil_mode, dims)
    if dims == 1:
        avg1 = F.avg_pool2d(ones.unsqueeze(-2), (1, _tuple(kernel, 1)[0]),
                            (1, _tuple(kernel if stride in (None, [], ()) else stride, 1)[0]),
                            (0, _tuple(padding, 1)[0]), ceil_mode, count_include_pad).squeeze(-2)
    else:
        avg1 = F.avg_pool2d(ones, kernel, kernel if stride in (None, [], ()) else stride, padding, ceil_mode,
                            count_include_pad, divisor_override)
    # edge weight of window j is 1/divisor_j = avg(ones)_j / count_j
    w = torch.where(count > 0, avg1 / count.clamp_min(1e-300), torch.zeros_like(count))
    return _S(summed * w.pow(q), x.s).renorm()


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


def _adaptive(x: _S, out_size, dims, kind, q) -> _S:
    out_size = _tuple(out_size, dims)
    pool = F.adaptive_avg_pool1d if dims == 1 else F.adaptive_avg_pool2d
    avg = pool(x.t, out_size)
    n = _adaptive_sizes(x.t.shape, out_size, x.t.device)
    if kind == "max":  # max over the window -> sum over the window
        return _S(avg * n, x.s).renorm()
    return _S(avg * n.pow(1.0 - q), x.s).renorm()  # sum * (1/n)^q


def _bn_affine(m: nn.modules.batchnorm._BatchNorm, where: str):
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedOperationError(
            f"path_norm: BatchNorm {where!r} has track_running_stats=False, so in eval mode it normalises "
            f"with batch statistics and is not an affine map; the path-norm needs fixed running statistics."
        )
    var = m.running_var.detach().to(torch.float64)
    mu = m.running_mean.detach().to(torch.float64)
    a = 1.0 / torch.sqrt(var + m.eps)
    b = -a * mu
    if m.affine:
        g = m.weight.detach().to(torch.float64)
        a, b = g * a, m.bias.detach().to(torch.float64) + g * b  # b = beta - gamma*mu/sqrt(var+eps)
    return a, b


class _Interpreter:
    """Evaluate a traced graph on all-ones inputs with |theta|^q parameters (log-scaled)."""

    def __init__(self, gm: torch.fx.GraphModule, q: float, device: torch.device):
        self.gm, self.q, self.device = gm, q, device
        self.counts = {"maxpool_to_sumpool": 0, "batchnorm_folded": 0, "avgpool_corrected": 0,
                       "linear": 0, "conv": 0}

    def _lift(self, a):
        if isinstance(a, _S):
            return a.t
        if isinstance(a, (list, tuple)):
            return type(a)(self._lift(v) for v in a)
        return a

    def _scale_of(self, args) -> float:
        ss = [a.s for a in args if isinstance(a, _S)]
        return ss[0] if ss else 0.0

    def run(self, inputs: Sequence[torch.Tensor]):
        env: Dict[str, Any] = {}
        it = iter(inputs)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                try:
                    env[node.name] = _S(next(it))
                except StopIteration:
                    env[node.name] = node.args[0] if node.args else None
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "output":
                return args[0]
            where = node.target if isinstance(node.target, str) else f"{node.name} ({getattr(node.target, '__name__', node.target)})"
            if node.op == "call_module":
                env[node.name] = self.call_module(self.gm.get_submodule(node.target), args, kwargs, str(node.target))
            elif node.op == "call_function":
                env[node.name] = self.call_function(node.target, args, kwargs, where)
            elif node.op == "call_method":
                env[node.name] = self.call_method(node.target, args, kwargs, where)
            else:  # get_attr
                raise _unsupported(f"direct use of the attribute {node.target!r} (get_attr)", node.name)
        raise RuntimeError("traced graph has no output node")

    # -- modules ----------------------------------------------------------------------------
    def call_module(self, m: nn.Module, args, kwargs, where: str):
        q = self.q
        x = args[0]
        if not isinstance(x, _S):
            raise _unsupported(f"module {type(m).__name__} applied to a non-tensor value", where)
        if isinstance(m, nn.Linear):
            self.counts["linear"] += 1
            W = _pw(m.weight, q).to(self.device)
            b = None if m.bias is None else _pw(m.bias, q).to(self.device)
            return _affine(x, lambda t: F.linear(t, W), b)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.padding_mode != "zeros":
                raise _unsupported(f"{type(m).__name__} with padding_mode={m.padding_mode!r}", where)
            self.counts["conv"] += 1
            W = _pw(m.weight, q).to(self.device)
            b = None if m.bias is None else _pw(m.bias, q).to(self.device)
            conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            shape = (-1,) + (1,) * (x.t.dim() - 2)
            return _affine(x, lambda t: conv(t, W, None, m.stride, m.padding, m.dilation, m.groups),
                           None if b is None else b.reshape(shape))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.counts["batchnorm_folded"] += 1
            a, b = _bn_affine(m, where)
            shape = (-1,) + (1,) * (x.t.dim() - 2)
            A = a.abs().pow(q).to(self.device).reshape(shape)
            Bv = b.abs().pow(q).to(self.device).reshape(shape)
            return _affine(x, lambda t: t * A, Bv)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
            if m.return_indices:
                raise _unsupported("max-pool with return_indices=True", where)
            self.counts["maxpool_to_sumpool"] += 1
            dims = 1 if isinstance(m, nn.MaxPool1d) else 2
            return _max_pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, dims, where)
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            if m.return_indices:
                raise _unsupported("adaptive max-pool with return_indices=True", where)
            self.counts["maxpool_to_sumpool"] += 1
            return _adaptive(x, m.output_size, 1 if isinstance(m, nn.AdaptiveMaxPool1d) else 2, "max", q)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
            self.counts["avgpool_corrected"] += 1
            dims = 1 if isinstance(m, nn.AvgPool1d) else 2
            return _avg_pool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                             getattr(m, "divisor_override", None), dims, q)
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            self.counts["avgpool_corrected"] += 1
            return _adaptive(x, m.output_size, 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2, "avg", q)
        if isinstance(m, nn.Flatten):
            return _S(x.t.flatten(m.start_dim, m.end_dim), x.s)
        if isinstance(m, _PARAM_FREE_MODULES):
            return x  # ReLU / identity / dropout (eval) on nonnegative values
        raise _unsupported(f"module {type(m).__name__}", where)

    # -- functions ----------------------------------------------------------------------------
    def call_function(self, fn, args, kwargs, where):
        q = self.q
        name = getattr(fn, "__name__", str(fn))
        if fn in (operator.add, torch.add, operator.iadd):
            a, b = args[0], args[1]
            if isinstance(a, _S) and isinstance(b, _S) and not kwargs.get("alpha", 1) != 1:
                (ta, tb), c = _common([a, b])
                return _S(ta + tb, c)
            if not isinstance(a, _S) and not isinstance(b, _S):
                return fn(a, b)
            raise _unsupported("addition of a constant or alpha != 1 (a bias that is not a parameter)", where)
        if fn in (operator.mul, torch.mul, operator.truediv, torch.div):
            a, b = args[0], args[1]
            if isinstance(a, _S) and isinstance(b, (int, float)):
                c = float(b) if fn in (operator.mul, torch.mul) else 1.0 / float(b)
                return _S(a.t * abs(c) ** q, a.s) if c != 0 else _S(torch.zeros_like(a.t), 0.0)
            if isinstance(b, _S) and isinstance(a, (int, float)) and fn in (operator.mul, torch.mul):
                return _S(b.t * abs(float(a)) ** q, b.s)
            if not isinstance(a, _S) and not isinstance(b, _S):
                return fn(a, b)
            raise _unsupported(f"{name} between tensors (not a ReLU-network operation)", where)
        if fn in (F.relu, torch.relu, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                  torch.permute, torch.transpose, operator.getitem, F.dropout, torch.nn.functional.dropout2d):
            if fn in (F.relu, torch.relu, F.dropout, torch.nn.functional.dropout2d):
                return args[0]
            lifted = self._lift(args)
            out = fn(*lifted, **self._lift(kwargs))
            return _S(out, self._scale_of(args)) if torch.is_tensor(out) and any(isinstance(a, _S) for a in args) else out
        if fn is torch.cat:
            vals = list(args[0])
            ts, c = _common(vals)
            return _S(torch.cat(ts, *args[1:], **kwargs), c)
        if fn is torch.mean:
            return self._mean(args[0], args[1:], kwargs, where)
        if fn in (F.max_pool1d, F.max_pool2d):
            x = args[0]
            p = dict(zip(["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"], args[1:]))
            p.update(kwargs)
            if p.get("return_indices", False):
                raise _unsupported("max-pool with return_indices=True", where)
            self.counts["maxpool_to_sumpool"] += 1
            return _max_pool(x, p["kernel_size"], p.get("stride"), p.get("padding", 0), p.get("dilation", 1),
                             p.get("ceil_mode", False), 1 if fn is F.max_pool1d else 2, where)
        if fn in (F.avg_pool1d, F.avg_pool2d):
            x = args[0]
            p = dict(zip(["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"], args[1:]))
            p.update(kwargs)
            self.counts["avgpool_corrected"] += 1
            return _avg_pool(x, p["kernel_size"], p.get("stride"), p.get("padding", 0), p.get("ceil_mode", False),
                             p.get("count_include_pad", True), p.get("divisor_override"),
                             1 if fn is F.avg_pool1d else 2, q)
        if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d):
            x = args[0]
            out = args[1] if len(args) > 1 else kwargs["output_size"]
            dims = 1 if fn in (F.adaptive_avg_pool1d, F.adaptive_max_pool1d) else 2
            kind = "avg" if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d) else "max"
            self.counts["avgpool_corrected" if kind == "avg" else "maxpool_to_sumpool"] += 1
            return _adaptive(x, out, dims, kind, q)
        if fn is getattr:
            return getattr(self._lift(args[0]), args[1])
        raise _unsupported(f"function {name}", where)

    def _mean(self, x: _S, rest, kwargs, where):
        if not isinstance(x, _S):
            raise _unsupported("mean of a non-tensor", where)
        dims = rest[0] if rest else kwargs.get("dim", None)
        keep = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
        if dims is None:
            dims = tuple(range(x.t.dim()))  # includes batch: not a per-sample op
            raise _unsupported("mean over all dimensions (mixes samples of the batch)", where)
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        n = 1
        for d in dims:
            n *= x.t.shape[d]
        self.counts["avgpool_corrected"] += 1
        # mean = sum/n ; path-norm edge weight |1/n|^q -> sum * n^-q = mean * n^(1-q)
        return _S(x.t.mean(dim=dims, keepdim=keep) * float(n) ** (1.0 - self.q), x.s)

    def call_method(self, name, args, kwargs, where):
        if name not in _STRUCTURAL_METHODS:
            raise _unsupported(f"tensor method .{name}()", where)
        x = args[0]
        if name in ("relu", "relu_"):
            return x
        if name in ("add", "add_"):
            return self.call_function(operator.add, args, kwargs, where)
        if name == "mean":
            return self._mean(x, args[1:], kwargs, where)
        out = getattr(self._lift(x), name)(*self._lift(args[1:]), **self._lift(kwargs))
        return _S(out, x.s) if torch.is_tensor(out) and isinstance(x, _S) else out


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise TypeError(f"path_norm expects a torch.nn.Module, got {type(model).__name__}")
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - report why tracing failed
        raise UnsupportedOperationError(
            f"path_norm could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
            "The path-norm needs a traceable ReLU DAG without data-dependent control flow."
        ) from exc


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


def _run_ones(model, example_inputs, q, device=None):
    gm = _trace(model)
    ex = _as_inputs(example_inputs)
    dev = torch.device(device) if device is not None else _model_device(model, ex)
    ones = [torch.ones((1,) + tuple(t.shape[1:]), dtype=torch.float64, device=dev) for t in ex]
    interp = _Interpreter(gm, float(q), dev)
    with torch.no_grad():
        out = interp.run(ones)
    leaves = []

    def collect(o):
        if isinstance(o, _S):
            leaves.append(o)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(out)
    if not leaves:
        raise UnsupportedOperationError("path_norm: the model's output does not depend on its input tensors")
    return leaves, interp, gm, ex


def path_norm(model: nn.Module, example_inputs, q: float = 1, *, device=None) -> PathNorm:
    """L^q path-norm ``||Phi(theta)||_q`` of a DAG ReLU network (Gonon et al., ICLR 2024).

    Parameters
    ----------
    model : nn.Module
        A network traceable by ``torch.fx`` built from Linear, Conv1d/2d (with biases, any stride,
        padding, dilation, groups), BatchNorm1d/2d with running statistics, ReLU, max-pool (fixed or
        adaptive), average-pool (fixed or adaptive, ``mean`` over spatial dims), flatten/reshape,
        concatenation, residual additions, dropout and identity. Anything else (GELU, tanh, sigmoid,
        attention, LayerNorm, ...) raises :class:`UnsupportedOperationError` naming the operation.
    example_inputs : Tensor or tuple of Tensors
        Inputs with a batch dimension; only their per-sample shapes are used.
    q : float
        Exponent, ``q >= 1`` (finite).
    device : optional
        Where to compute (default: the device of the model's parameters).

    Returns
    -------
    PathNorm
        ``value = ||Phi||_q``, ``log_value = log ||Phi||_q`` and the settings used.

    Notes
    -----
    ``||Phi||_q^q = sum_outputs N_{|theta|^q}(1)`` where ``N`` is the network with max-pools replaced by
    sum-pools, average pools weighted ``(1/k)^q`` per edge and BatchNorm folded to ``a x + b``
    (``a = gamma/sqrt(var+eps)``, ``b = beta - a mu``) with ``|a|^q, |b|^q``. Computed in float64 with
    per-layer rescaling (log domain), so it never overflows. The model is never modified (its dtype,
    parameters, buffers and train/eval mode are untouched).

    Examples
    --------
    >>> import torch, analysis
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> pn = analysis.path_norm(net, torch.zeros(1, 2), q=2)   # doctest: +SKIP
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 1:
        raise ValueError(f"q must be a finite number >= 1, got {q!r} (q = inf is not implemented)")
    leaves, interp, _, ex = _run_ones(model, example_inputs, q, device)
    logs = []
    for leaf in leaves:
        tot = float(leaf.t.sum())
        if tot > 0:
            logs.append(math.log(tot) + leaf.s)
    if logs:
        m = max(logs)
        log_q = m + math.log(sum(math.exp(v - m) for v in logs))
        log_value = log_q / q
    else:
        log_value = -math.inf
    settings = {"dtype": "float64", "input_shapes": [tuple(t.shape[1:]) for t in ex],
                "recipe": "|theta|^q, max->sum pool, avg-pool (1/k)^q per edge, BN a=gamma/sqrt(var+eps), b=beta-a*mu",
                **interp.counts}
    log.debug("path_norm q=%s: log value %.6g, %s", q, log_value, interp.counts)
    return PathNorm(value=_safe_exp(log_value), log_value=log_value, q=float(q), settings=settings)


# ----------------------------------------------------------------------------------------------
# generalization bound
# ----------------------------------------------------------------------------------------------
def _architecture(gm: torch.fx.GraphModule) -> Dict[str, int]:
    """Depth (longest chain of Linear/Conv layers), max max-pool kernel size, number of pool types."""
    depth: Dict[str, int] = {}
    K, pool_types = 1, set()
    for node in gm.graph.nodes:
        preds = [depth.get(a.name, 0) for a in node.all_input_nodes]
        d = max(preds, default=0)
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                d += 1
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                k = _tuple(m.kernel_size, 1 if isinstance(m, nn.MaxPool1d) else 2)
                K = max(K, math.prod(k))
                pool_types.add("max")
        elif node.op == "call_function" and node.target in (F.max_pool1d, F.max_pool2d):
            k = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
            K = max(K, math.prod(_tuple(k, 1 if node.target is F.max_pool1d else 2)))
            pool_types.add("max")
        depth[node.name] = d
    return {"depth": max(depth.values(), default=0), "K": K, "P": len(pool_types)}


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
    * ``D`` is the longest chain of Linear/Conv layers (the scripts' convention), ``r`` is the
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
    leaves, _, gm, ex = _run_ones(model, example_inputs, 1.0, device)
    arch = _architecture(gm)
    D = int(depth) if depth is not None else arch["depth"]
    K = int(kernel_size) if kernel_size is not None else arch["K"]
    P = int(n_pool_types) if n_pool_types is not None else arch["P"]
    d_in = sum(math.prod(t_.shape[1:]) for t_ in ex)
    d_out = sum(leaf.t.numel() for leaf in leaves)
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
