"""The tracing harness shared by every function-mode pass of the toolkit.

A *pass* is a :class:`TracingMode` (a :class:`torch.overrides.TorchFunctionMode`) that sees each
torch-level call of one eager forward run once, with its Python arguments. The passes built on it are
symmetry discovery (:mod:`weightspace.symmetry`), neural computational graphs (:mod:`weightspace.graph`),
path-norms and BatchNorm folding (:mod:`analysis`), and dropout removal in :func:`weightspace.check_spec`.

What this module provides:

* :func:`op_name` gives a call its canonical name (``__iadd__`` -> ``add``, ``relu_`` -> ``relu``,
  ``Tensor.T`` -> ``prop:T``); :func:`op_category` sorts names into the categories ``"unary"``,
  ``"binary"``, ``"reduce"``, ``"pool"``, ``"reshape"`` and ``"neutral"`` (the sets ``UNARY``, ``BINARY``,
  ``REDUCE``, ``POOL``, ``RESHAPE``, ``NEUTRAL_LIKE``/``NEUTRAL_NEW``); ``IGNORE`` holds shape queries
  that no pass needs to see.
* :class:`TracingMode` writes the ``__torch_function__`` opening once (canonical name, shape queries
  passed through) and resolves a rule by exact name, then by category (:meth:`TracingMode.rule_for`).
* Argument parsing: :func:`arg`, :func:`norm_dim`, :func:`dims_arg`, :func:`permute_order`,
  :func:`expand_index`, :func:`mha_args`; :func:`flatten_tensors` walks nested outputs.
* :func:`traced_run` runs a model under a pass in eval mode without gradients, keeping the stack of
  executing module names and restoring every submodule's train/eval flag; :func:`tensor_keys` maps
  tensor ids to state-dict keys (tied weights share one tensor).

>>> import torch
>>> class Count(TracingMode):
...     def __init__(self):
...         super().__init__()
...         self.seen = []
...     def handle(self, name, func, args, kwargs):
...         self.seen.append((name, op_category(name)))
...         return func(*args, **kwargs)
>>> mode = Count()
>>> _ = traced_run(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), torch.ones(1, 3), mode, [])
>>> mode.seen
[('linear', None), ('relu', 'unary')]
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from weightspace.utils import call_model, module_mode


__all__ = [
    "TracingMode", "Unsupported", "traced_run", "tensor_keys", "op_name", "op_category",
    "flatten_tensors", "arg", "norm_dim", "dims_arg", "permute_order", "expand_index", "mha_args", "MHA_ARGS",
    "UNARY", "BINARY", "REDUCE", "POOL", "RESHAPE", "NEUTRAL_LIKE", "NEUTRAL_NEW", "IGNORE", "DUNDER_BASE",
]


class Unsupported(Exception):
    """Raised inside a rule that cannot read an operation; the pass then takes its conservative fallback
    (symmetry discovery fixes every dimension the operation touches)."""


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "prop:" + str(getattr(owner, "__name__", "?"))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("i", "r")) and name[1:] in DUNDER_BASE:
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


DUNDER_BASE = {"add", "sub", "mul", "truediv", "floordiv", "matmul", "pow", "and", "or", "xor", "mod", "div"}

UNARY = set(
    """relu relu6 gelu tanh sigmoid silu mish sin cos exp expm1 log log1p log2 abs neg negative sqrt rsqrt
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout leaky_relu elu selu celu
    softplus softsign hardtanh hardsigmoid hardswish logsigmoid erf erfc clamp clip clamp_min clamp_max
    float double half bfloat16 to type type_as contiguous clone detach requires_grad square reciprocal
    sign tanhshrink threshold nan_to_num prelu_scalar cpu cuda exp2 sinh cosh atan asin acos
    trunc round floor ceil frac softshrink hardshrink rrelu glu_unused prop:data prop:real pos positive
    sgn fix retain_grad""".split()
)
BINARY = set(
    """add sub subtract mul multiply div divide truediv floordiv true_divide floor_divide pow maximum
    minimum fmax fmin atan2 remainder fmod eq ne lt le gt ge and or xor logical_and logical_or
    logical_xor where masked_fill lerp addcmul addcdiv copysign hypot rsub bitwise_and bitwise_or
    xlogy mod""".split()
)
REDUCE = set("sum mean amax amin prod var std logsumexp all any nansum nanmean count_nonzero norm vector_norm".split())
NEUTRAL_LIKE = set("zeros_like ones_like empty_like full_like".split())
NEUTRAL_NEW = set("zeros ones empty full new_zeros new_ones new_empty new_full".split())
RESHAPE = set("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze ravel".split())
POOL = re.compile(r"^(adaptive_)?(max|avg|lp)_pool([123])d(_with_indices)?$|^(fractional_max_pool[23]d)$")
IGNORE = set("size dim numel shape prop:shape prop:dtype prop:device prop:is_cuda prop:requires_grad prop:grad_fn "
             "__len__ len item tolist prop:ndim ndimension nelement element_size is_floating_point is_contiguous "
             "data_ptr stride storage_offset get_device is_complex prop:is_leaf prop:layout prop:names register_hook "
             "backward".split())


def op_category(name: str) -> Optional[str]:
    """The category of a canonical op name: ``"unary"``, ``"binary"``, ``"reduce"``, ``"pool"``,
    ``"reshape"``, ``"neutral"`` (creates a fresh tensor: ``zeros_like``, ``new_ones``...) or ``None``.

    >>> [op_category(n) for n in ("relu", "add", "sum", "max_pool2d", "view", "zeros_like", "linear")]
    ['unary', 'binary', 'reduce', 'pool', 'reshape', 'neutral', None]
    """
    if name in UNARY:
        return "unary"
    if name in BINARY:
        return "binary"
    if name in REDUCE:
        return "reduce"
    if POOL.match(name):
        return "pool"
    if name in RESHAPE:
        return "reshape"
    if name in NEUTRAL_LIKE or name in NEUTRAL_NEW:
        return "neutral"
    return None


class TracingMode(TorchFunctionMode):
    """Base of every function-mode pass: the one ``__torch_function__`` opening and rule lookup.

    Each torch-level call reaches :meth:`handle` as ``(name, func, args, kwargs)`` with ``name`` the
    canonical :func:`op_name`; calls whose name is in :attr:`ignore` (shape and dtype queries) run
    untouched. A subclass overrides :meth:`handle` and returns the call's result (usually
    ``func(*args, **kwargs)``; a pass may substitute its own). Rules are looked up by
    :meth:`rule_for`: first :attr:`rules` (exact names), then :attr:`category_rules` keyed by
    :func:`op_category`; ``None`` means the pass has no rule and takes its own fallback.
    """

    rules: Mapping[str, Callable[..., Any]] = {}
    category_rules: Mapping[str, Callable[..., Any]] = {}
    ignore: frozenset = frozenset(IGNORE)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in self.ignore:
            return func(*args, **kwargs)
        return self.handle(name, func, args, kwargs)

    def handle(self, name: str, func: Callable[..., Any], args: tuple, kwargs: Dict[str, Any]) -> Any:
        """Run (or replace) one call; the default runs it unchanged."""
        return func(*args, **kwargs)

    def rule_for(self, name: str) -> Optional[Callable[..., Any]]:
        """The rule for ``name``: exact match in :attr:`rules`, else its category's rule, else ``None``."""
        rule = self.rules.get(name)
        if rule is None:
            category = op_category(name)
            if category is not None:
                rule = self.category_rules.get(category)
        return rule


def flatten_tensors(x: Any) -> List[Any]:
    """The tensors inside nested lists, tuples, dicts and dataclasses, in order."""
    out: List[Any] = []
    stack = [x]
    while stack:
        v = stack.pop()
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif hasattr(v, "__dataclass_fields__"):
            stack.extend(reversed([getattr(v, f) for f in v.__dataclass_fields__]))
    return out


def arg(args, kwargs, i: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def norm_dim(d: int, ndim: int) -> int:
    if not -max(ndim, 1) <= d < max(ndim, 1):
        raise Unsupported(f"dim {d} out of range")
    return d % max(ndim, 1)


def dims_arg(dim, ndim):
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted({norm_dim(int(d), ndim) for d in dim}) if len(dim) else list(range(ndim))
    return [norm_dim(int(dim), ndim)]


def permute_order(name: str, args, kwargs, nd: int) -> List[int]:
    """Output axis j of a permute/transpose/t/mT/movedim is input axis ``order[j]``."""
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else arg(args, kwargs, 1,
                                                                                                   "dims")
        return [norm_dim(int(d), nd) for d in dims]
    order = list(range(nd))
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = norm_dim(int(arg(args, kwargs, 1, "dim0")), nd), norm_dim(int(arg(args, kwargs, 2, "dim1")), nd)
        order[a], order[b] = order[b], order[a]
        return order
    if name in ("t", "prop:T"):
        return order[::-1]
    if name in ("prop:mT", "adjoint", "prop:mH", "prop:H"):
        order[-1], order[-2] = order[-2], order[-1]
        return order
    if name in ("movedim", "moveaxis"):
        src, dst = arg(args, kwargs, 1, "source"), arg(args, kwargs, 2, "destination")
        src = [norm_dim(d, nd) for d in ([src] if isinstance(src, int) else src)]
        dst = [norm_dim(d, nd) for d in ([dst] if isinstance(dst, int) else dst)]
        res: List[Optional[int]] = [None] * nd
        for a, b in zip(src, dst):
            res[b] = a
        rest = iter(i for i in range(nd) if i not in src)
        return [r if r is not None else next(rest) for r in res]
    raise Unsupported(name)


def expand_index(idx: Any, ndim: int) -> Tuple[Any, ...]:
    """A basic index as one entry per input axis plus ``None`` insertions (no Ellipsis)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(torch.is_tensor(i) or isinstance(i, (list, bool)) for i in idx):
        raise Unsupported("advanced indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        return idx[:k] + (slice(None),) * (ndim - n_real) + idx[k + 1:]
    return idx + (slice(None),) * (ndim - n_real)


MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def mha_args(args, kwargs) -> Dict[str, Any]:
    """The arguments of ``F.multi_head_attention_forward`` by name."""
    return {n: arg(args, kwargs, i, n) for i, n in enumerate(MHA_ARGS)}


def tensor_keys(model: torch.nn.Module) -> Tuple[Dict[int, List[str]], Dict[str, torch.Tensor], set]:
    """``id(tensor) -> keys`` (tied weights share one tensor), ``key -> tensor``, and the persistent keys
    (those in ``model.state_dict()``; non-persistent buffers are traced but not saved)."""
    by_id: Dict[int, List[str]] = defaultdict(list)
    tensors: Dict[str, torch.Tensor] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for k, t in named:
        if t is None:
            continue
        by_id[id(t)].append(k)
        tensors[k] = t
    persistent = set(model.state_dict(keep_vars=True).keys())
    return by_id, tensors, persistent


def traced_run(model: torch.nn.Module, example_inputs: Any, mode: TorchFunctionMode, stack: List[str],
               on_output=None) -> Any:
    """Run ``model`` once in eval mode without gradients under ``mode``, keeping ``stack`` equal to the
    names of the modules being executed; every submodule's train/eval mode is restored afterwards."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in model.named_modules()}

    def pre(mod, inp):
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, inp, out):  # must return None: a forward hook's return value replaces the output
        if stack:
            stack.pop()
        if on_output is not None:
            on_output(names.get(id(mod), ""), out)

    h1, h2 = register_module_forward_pre_hook(pre), register_module_forward_hook(post)
    try:
        with module_mode(model), torch.no_grad(), mode:
            return call_model(model, example_inputs)
    finally:
        h1.remove()
        h2.remove()

