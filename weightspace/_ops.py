"""Operation names, argument parsing and the traced-run harness shared by every function-mode pass
(symmetry discovery, neural graphs, path-norms, BN folding).

A pass is a :class:`torch.overrides.TorchFunctionMode` that sees each torch-level call once with its
Python arguments; :func:`_op_name` gives the call a canonical name (``__iadd__`` -> ``add``,
``relu_`` -> ``relu``, ``Tensor.T`` -> ``prop:T``) and :func:`traced_run` runs a model under a pass in
eval mode without gradients while keeping the stack of executing module names.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from ._utils import module_mode


class _Unsupported(Exception):
    """Raised inside a rule: fall back to fixing every dimension the operation touches."""


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "prop:" + str(getattr(owner, "__name__", "?"))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("i", "r")) and name[1:] in _DUNDER_BASE:
            name = name[1:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


_DUNDER_BASE = {"add", "sub", "mul", "truediv", "floordiv", "matmul", "pow", "and", "or", "xor", "mod", "div"}

_UNARY = set(
    """relu relu6 gelu tanh sigmoid silu mish sin cos exp expm1 log log1p log2 abs neg negative sqrt rsqrt
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout leaky_relu elu selu celu
    softplus softsign hardtanh hardsigmoid hardswish logsigmoid erf erfc clamp clip clamp_min clamp_max
    float double half bfloat16 to type type_as contiguous clone detach requires_grad square reciprocal
    sign tanhshrink threshold nan_to_num prelu_scalar cpu cuda exp2 sinh cosh atan asin acos
    trunc round floor ceil frac softshrink hardshrink rrelu glu_unused prop:data prop:real pos positive
    sgn fix retain_grad""".split()
)
_BINARY = set(
    """add sub subtract mul multiply div divide truediv floordiv true_divide floor_divide pow maximum
    minimum fmax fmin atan2 remainder fmod eq ne lt le gt ge and or xor logical_and logical_or
    logical_xor where masked_fill lerp addcmul addcdiv copysign hypot rsub bitwise_and bitwise_or
    xlogy mod""".split()
)
_REDUCE = set("sum mean amax amin prod var std logsumexp all any nansum nanmean count_nonzero norm vector_norm".split())
_NEUTRAL_LIKE = set("zeros_like ones_like empty_like full_like".split())
_NEUTRAL_NEW = set("zeros ones empty full new_zeros new_ones new_empty new_full".split())
_RESHAPE = set("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze ravel".split())
_POOL = re.compile(r"^(adaptive_)?(max|avg|lp)_pool([123])d(_with_indices)?$|^(fractional_max_pool[23]d)$")
_IGNORE = set("size dim numel shape prop:shape prop:dtype prop:device prop:is_cuda prop:requires_grad prop:grad_fn __len__ len item tolist prop:ndim ndimension nelement element_size is_floating_point is_contiguous data_ptr stride storage_offset get_device is_complex prop:is_leaf prop:layout prop:names register_hook backward".split())


def _flatten(x: Any) -> List[Any]:
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


def _arg(args, kwargs, i: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _norm_dim(d: int, ndim: int) -> int:
    if not -max(ndim, 1) <= d < max(ndim, 1):
        raise _Unsupported(f"dim {d} out of range")
    return d % max(ndim, 1)


def _dims_arg(dim, ndim):
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted({_norm_dim(int(d), ndim) for d in dim}) if len(dim) else list(range(ndim))
    return [_norm_dim(int(dim), ndim)]


def _permute_order(name: str, args, kwargs, nd: int) -> List[int]:
    """Output axis j of a permute/transpose/t/mT/movedim is input axis ``order[j]``."""
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "dims")
        return [_norm_dim(int(d), nd) for d in dims]
    order = list(range(nd))
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = _norm_dim(int(_arg(args, kwargs, 1, "dim0")), nd), _norm_dim(int(_arg(args, kwargs, 2, "dim1")), nd)
        order[a], order[b] = order[b], order[a]
        return order
    if name in ("t", "prop:T"):
        return order[::-1]
    if name in ("prop:mT", "adjoint", "prop:mH", "prop:H"):
        order[-1], order[-2] = order[-2], order[-1]
        return order
    if name in ("movedim", "moveaxis"):
        src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
        src = [_norm_dim(d, nd) for d in ([src] if isinstance(src, int) else src)]
        dst = [_norm_dim(d, nd) for d in ([dst] if isinstance(dst, int) else dst)]
        res: List[Optional[int]] = [None] * nd
        for a, b in zip(src, dst):
            res[b] = a
        rest = iter(i for i in range(nd) if i not in src)
        return [r if r is not None else next(rest) for r in res]
    raise _Unsupported(name)


def _expand_index(idx: Any, ndim: int) -> Tuple[Any, ...]:
    """A basic index as one entry per input axis plus ``None`` insertions (no Ellipsis)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(torch.is_tensor(i) or isinstance(i, (list, bool)) for i in idx):
        raise _Unsupported("advanced indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        return idx[:k] + (slice(None),) * (ndim - n_real) + idx[k + 1:]
    return idx + (slice(None),) * (ndim - n_real)


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def _mha_args(args, kwargs) -> Dict[str, Any]:
    """The arguments of ``F.multi_head_attention_forward`` by name."""
    return {n: _arg(args, kwargs, i, n) for i, n in enumerate(_MHA_ARGS)}


def _call(model: torch.nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def traced_run(model: torch.nn.Module, example_inputs: Any, mode: TorchFunctionMode, stack: List[str], on_output=None) -> Any:
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
            return _call(model, example_inputs)
    finally:
        h1.remove()
        h2.remove()
