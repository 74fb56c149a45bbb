"""Discover a model's permutation symmetries by following tensor *dimensions* through one forward run.

The model runs once on ``example_inputs`` under a :class:`torch.overrides.TorchFunctionMode`. Every
dimension of every tensor is a node in a union-find; each operation adds the constraints that make it
permutation-equivariant:

* ``linear(x, W, b)``: ``x[-1] ~ W[1]``, output ``[-1] = W[0] ~ b[0]``;
* elementwise ops (with broadcasting): corresponding non-broadcast dims are one node, so a residual
  addition joins the groups on both sides;
* ``matmul``/``einsum``/attention: contracted dims are joined, batch dims joined;
* ``reshape``/``view``/``flatten``: a merged dim gets the layout ``product(parts)``, a split dim is
  factorised (``(H*D) -> (H, D)`` gives heads and within-head dims);
* ``cat``/``split``/``chunk``: the layout ``concat(parts)``;
* normalisations, pooling, softmax, reductions: their own rules (see ``_RULES``).

Dimensions of the model's inputs and outputs, positional dimensions (conv spatial outputs, sliced or
indexed dims, ``arange``) and every dimension touched by an operation without a rule are *fixed*.
A class of joined dimensions that holds a parameter axis, has size > 1 and is not fixed is a
permutation group. Because unknown operations fix everything they touch, the discovered symmetries
are sound by construction (and :func:`weightspace.check_spec` verifies them numerically); what an
unknown operation costs is reported in ``spec.info["blocked_ops"]``.

The idea of deriving a spec from the model instead of writing it by hand answers the complaints
about hand-written specs of Git Re-Basin (Ainsworth et al. 2023) and ZipIt! (Stoica et al. 2024).
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from weightspace._spec import Axis, PermutationSpec

log = logging.getLogger(__name__)

__all__ = ["trace_dims", "TraceError", "DimTrace"]


class TraceError(RuntimeError):
    """The model could not be run or followed on the example inputs."""


class _Unsupported(Exception):
    """Raised inside a rule: fall back to fixing every dimension the operation touches."""


# ---------------------------------------------------------------------------------------------
# union-find over dimension nodes, with structured layouts (product / concat) on classes
# ---------------------------------------------------------------------------------------------
class _UF:
    def __init__(self) -> None:
        self.parent: List[int] = []
        self.size: List[int] = []
        self.fixed: List[bool] = []
        self.layout: Dict[int, Tuple[str, List[int]]] = {}

    def new(self, size: int, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append(bool(fixed))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def fix(self, a: int) -> None:
        r = self.find(a)
        if self.fixed[r]:
            return
        self.fixed[r] = True
        lay = self.layout.get(r)
        if lay is not None:
            for c in lay[1]:
                self.fix(c)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            # equal-size joins only; a size conflict means the rule misread the op: be conservative
            self.fix(ra)
            self.fix(rb)
            return ra
        la, lb = self.layout.pop(ra, None), self.layout.pop(rb, None)
        self.parent[rb] = ra
        fixed = self.fixed[ra] or self.fixed[rb]
        self.fixed[ra] = False
        if la is not None and lb is not None:
            self.layout[ra] = la
            self._unify(la, lb, ra)
        elif la is not None or lb is not None:
            self.layout[ra] = la if la is not None else lb
        if fixed:
            self.fix(ra)
        return ra

    def _unify(self, la, lb, root: int) -> None:
        (ka, ca), (kb, cb) = la, lb
        sa, sb = [self.size[c] for c in ca], [self.size[c] for c in cb]
        if ka == kb and sa == sb:
            for x, y in zip(ca, cb):
                self.union(x, y)
            return
        if ka == kb:
            refined = _common_refinement(sa, sb, additive=(ka == "concat"))
            if refined is not None:
                # both structures hold on a common refinement (a subgroup of each): e.g. GroupNorm's
                # (4 groups x 2) and a grouped conv's (2 groups x 4) meet at 2 x 2 x 2
                parts = [self.new(s) for s in refined]
                self.layout[root] = (ka, parts)
                for children, sizes in ((ca, sa), (cb, sb)):
                    j = 0
                    for c, s in zip(children, sizes):
                        acc, start = (0 if ka == "concat" else 1), j
                        while acc != s:
                            acc = acc + refined[j] if ka == "concat" else acc * refined[j]
                            j += 1
                        self.set_layout(c, ka, parts[start:j])
                return
        # two incompatible structures on one axis: nothing inside can move
        for c in ca + cb:
            self.fix(c)
        self.fix(root)

    def set_layout(self, a: int, kind: str, children: List[int]) -> None:
        """Declare that class ``a`` is ``kind`` (product/concat) of ``children`` (size-1/0 parts dropped)."""
        children = [c for c in children if self.size[c] != (1 if kind == "product" else 0)]
        if len(children) == 1:
            self.union(a, children[0])
            return
        if not children:
            return
        r = self.find(a)
        if r in self.layout:
            self._unify(self.layout[r], (kind, children), r)
        else:
            self.layout[r] = (kind, children)
            if self.fixed[r]:
                for c in children:
                    self.fix(c)


# ---------------------------------------------------------------------------------------------
# op names
# ---------------------------------------------------------------------------------------------
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
_REDUCE_ARG = set("argmax argmin".split())
_NEUTRAL_LIKE = set("zeros_like ones_like empty_like full_like".split())
_NEUTRAL_NEW = set("zeros ones empty full new_zeros new_ones new_empty new_full".split())
_RESHAPE = set("view reshape flatten unflatten view_as reshape_as squeeze unsqueeze ravel".split())
_POOL = re.compile(r"^(adaptive_)?(max|avg|lp)_pool([123])d(_with_indices)?$|^(fractional_max_pool[23]d)$")
_IGNORE = set("size dim numel shape prop:shape prop:dtype prop:device prop:is_cuda prop:requires_grad prop:grad_fn __len__ len item tolist prop:ndim ndimension nelement element_size is_floating_point is_contiguous data_ptr stride storage_offset get_device is_complex prop:is_leaf prop:layout prop:names register_hook backward".split())


# ---------------------------------------------------------------------------------------------
# the mode
# ---------------------------------------------------------------------------------------------
class DimTrace(TorchFunctionMode):
    """Follows dimensions through a forward run (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.uf = _UF()
        self.nodes: Dict[int, List[int]] = {}
        self._keep: List[Any] = []  # keeps traced tensors alive so that their ids stay unique
        self.blocked: Counter = Counter()
        self.blocked_where: Dict[str, str] = {}
        self.visited: set = set()  # ids of parameter/buffer tensors a rule has consumed
        self.param_ids: set = set()
        self.module_stack: List[str] = []
        self.records: List[Tuple[str, str, List[int]]] = []  # (op, module, ids of params used)
        self.module_outputs: List[Tuple[str, List[int]]] = []  # (module name, dim nodes of its output)

    # -- node helpers ---------------------------------------------------------------------------
    def register(self, t: torch.Tensor, fixed: bool) -> List[int]:
        ns = [self.uf.new(s, fixed) for s in t.shape]
        self.nodes[id(t)] = ns
        self._keep.append(t)
        return ns

    def of(self, t: Any) -> List[int]:
        if not torch.is_tensor(t):
            return []
        ns = self.nodes.get(id(t))
        if ns is None or len(ns) != t.dim():
            ns = self.register(t, fixed=True)  # a tensor of unknown origin: nothing in it may move
        return ns

    def set_out(self, t: Any, ns: List[int]) -> None:
        if not torch.is_tensor(t):
            raise _Unsupported("output is not a tensor")
        if len(ns) != t.dim() or any(self.uf.size[n] != s for n, s in zip(ns, t.shape)):
            raise _Unsupported(f"rule produced {len(ns)} dims for an output of shape {tuple(t.shape)}")
        self.nodes[id(t)] = list(ns)
        self._keep.append(t)

    def fresh(self, size: int, fixed: bool) -> int:
        return self.uf.new(size, fixed)

    def union(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def _touch(self, *ts: Any) -> None:
        for t in ts:
            if torch.is_tensor(t) and id(t) in self.param_ids:
                self.visited.add(id(t))

    # -- dispatch -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _IGNORE:
            return out
        tensors_in = [a for a in _flatten((args, kwargs)) if torch.is_tensor(a)]
        tensors_out = [o for o in _flatten(out) if torch.is_tensor(o)]
        if not tensors_out and not any(id(t) in self.param_ids for t in tensors_in):
            return out
        params = [id(t) for t in tensors_in if id(t) in self.param_ids]
        if params:
            self.records.append((name, self.module_stack[-1] if self.module_stack else "", params))
        try:
            rule = _RULES.get(name)
            if rule is None:
                if name in _UNARY:
                    rule = _unary
                elif name in _BINARY:
                    rule = _elementwise
                elif name in _REDUCE:
                    rule = _reduce
                elif _POOL.match(name):
                    rule = _pool
                elif name in _RESHAPE:
                    rule = _reshape
                elif name in _NEUTRAL_LIKE or name in _NEUTRAL_NEW:
                    rule = _neutral
                else:
                    raise _Unsupported(f"no rule for {name!r}")
            rule(self, name, args, kwargs, out)
            self._touch(*tensors_in)
        except _Unsupported as exc:
            self._fallback(name, tensors_in, tensors_out, str(exc))
        return out

    def _fallback(self, name: str, tin: List[torch.Tensor], tout: List[torch.Tensor], why: str) -> None:
        lost = False
        for t in tin:
            for n in self.of(t):
                r = self.uf.find(n)
                if not self.uf.fixed[r] and self.uf.size[r] > 1:
                    lost = True
                self.uf.fix(n)
        for t in tout:
            if id(t) not in self.nodes or len(self.nodes[id(t)]) != t.dim():
                self.register(t, fixed=True)
            else:
                for n in self.nodes[id(t)]:
                    self.uf.fix(n)
        if lost:
            where = self.module_stack[-1] if self.module_stack else "<top level>"
            self.blocked[name] += 1
            self.blocked_where.setdefault(name, f"{where} ({why})")
            log.debug("operation %s in %s fixed the dims it touched: %s", name, where, why)


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


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
def _broadcast(tr: DimTrace, tensors: Sequence[torch.Tensor], out_shape: Sequence[int]) -> List[int]:
    nd = len(out_shape)
    out = []
    for j in range(nd):
        size = out_shape[j]
        members = []
        for t in tensors:
            k = t.dim() - nd + j
            if k >= 0 and t.shape[k] == size and size != 1:
                members.append(tr.of(t)[k])
            elif k >= 0 and t.shape[k] != 1 and t.shape[k] != size:
                raise _Unsupported("shapes do not broadcast")
        if members:
            for m in members[1:]:
                tr.union(members[0], m)
            out.append(members[0])
        else:
            out.append(tr.fresh(size, False))  # broadcast of a constant dim: neutral
    return out


def _unary(tr, name, args, kwargs, out):
    x = next((a for a in _flatten(args) if torch.is_tensor(a)), None)
    if x is None or not torch.is_tensor(out) or tuple(out.shape) != tuple(x.shape):
        raise _Unsupported("unary op changed the shape")
    tr.set_out(out, tr.of(x))


def _elementwise(tr, name, args, kwargs, out):
    tensors = [a for a in _flatten((args, kwargs)) if torch.is_tensor(a)]
    if not torch.is_tensor(out):
        raise _Unsupported("non-tensor output")
    tr.set_out(out, _broadcast(tr, tensors, out.shape))


def _neutral(tr, name, args, kwargs, out):
    if not torch.is_tensor(out):
        raise _Unsupported("non-tensor output")
    if name == "full" or name == "full_like" or name == "new_full":
        fill = _arg(args, kwargs, 2 if name == "full_like" else 1, "fill_value")
        if torch.is_tensor(fill) and fill.dim() > 0:
            raise _Unsupported("tensor fill value")
    tr.set_out(out, [tr.fresh(s, False) for s in out.shape])


def _dims_arg(dim, ndim):
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted({_norm_dim(int(d), ndim) for d in dim}) if len(dim) else list(range(ndim))
    return [_norm_dim(int(dim), ndim)]


def _reduce(tr, name, args, kwargs, out):
    x = args[0]
    if name in ("norm", "vector_norm"):
        dim, keep = _arg(args, kwargs, 2, "dim"), _arg(args, kwargs, 3, "keepdim", False)
    elif name in ("var", "std"):
        dim = _arg(args, kwargs, 1, "dim")
        keep = kwargs.get("keepdim", args[3] if len(args) > 3 and isinstance(args[2], bool) else False)
        if isinstance(dim, bool):
            dim = None
    else:
        dim, keep = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False)
    if name in ("sum", "mean", "prod", "nansum", "nanmean") and torch.is_tensor(dim):
        raise _Unsupported("tensor dim")
    xs = tr.of(x)
    red = _dims_arg(dim, x.dim())
    res = []
    for i, n in enumerate(xs):
        if i in red:
            if keep:
                res.append(tr.fresh(1, False))
        else:
            res.append(n)
    outs = [o for o in _flatten(out) if torch.is_tensor(o)]
    for o in outs:
        tr.set_out(o, res)


def _argreduce(tr, name, args, kwargs, out):
    x = args[0]
    dim, keep = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False)
    xs = tr.of(x)
    red = _dims_arg(dim, x.dim())
    res = []
    for i, n in enumerate(xs):
        if i in red:
            tr.uf.fix(n)  # indices are positions along the reduced dim
            if keep:
                res.append(tr.fresh(1, True))
        else:
            res.append(n)
    tr.set_out(out, res)


def _maxmin(tr, name, args, kwargs, out):
    other = _arg(args, kwargs, 1, "other")
    if torch.is_tensor(other):
        return _elementwise(tr, name, args, kwargs, out)
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:
        tr.set_out(out, [])
        return
    keep = _arg(args, kwargs, 2, "keepdim", False)
    x = args[0]
    xs = tr.of(x)
    d = _norm_dim(int(dim), x.dim())
    tr.uf.fix(xs[d])  # the indices output is positional along d
    res = [n for i, n in enumerate(xs) if i != d] if not keep else [n if i != d else tr.fresh(1, True) for i, n in enumerate(xs)]
    for o in _flatten(out):
        tr.set_out(o, res)


def _softmax(tr, name, args, kwargs, out):
    tr.set_out(out, tr.of(args[0]))


def _linear(tr, name, args, kwargs, out):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    xs, ws = tr.of(x), tr.of(w)
    if w.dim() != 2:
        raise _Unsupported("linear weight is not 2-D")
    tr.union(xs[-1], ws[1])
    if b is not None:
        tr.union(tr.of(b)[0], ws[0])
    tr.set_out(out, xs[:-1] + [ws[0]])


def _matmul_nodes(tr, a, b) -> List[int]:
    an, bn = tr.of(a), tr.of(b)
    if a.dim() == 0 or b.dim() == 0:
        raise _Unsupported("0-d matmul")
    if a.dim() == 1 and b.dim() == 1:
        tr.union(an[0], bn[0])
        return []
    if a.dim() == 1:
        tr.union(an[0], bn[-2])
        return _batch_union(tr, [], [], bn[:-2], b.shape[:-2]) + [bn[-1]]
    if b.dim() == 1:
        tr.union(an[-1], bn[0])
        return an[:-1]
    tr.union(an[-1], bn[-2])
    return _batch_union(tr, an[:-2], a.shape[:-2], bn[:-2], b.shape[:-2]) + [an[-2], bn[-1]]


def _batch_union(tr, an, ash, bn, bsh) -> List[int]:
    nd = max(len(an), len(bn))
    out = []
    for j in range(nd):
        ka, kb = len(an) - nd + j, len(bn) - nd + j
        sa = ash[ka] if ka >= 0 else 1
        sb = bsh[kb] if kb >= 0 else 1
        if sa == sb and sa != 1:
            tr.union(an[ka], bn[kb])
            out.append(an[ka])
        elif sa != 1 and sb == 1:
            out.append(an[ka])
        elif sb != 1 and sa == 1:
            out.append(bn[kb])
        elif sa == 1 and sb == 1:
            out.append(tr.fresh(1, False))
        else:
            raise _Unsupported("batch dims do not broadcast")
    return out


def _matmul(tr, name, args, kwargs, out):
    a, b = args[0], args[1]
    if name == "rmatmul":
        a, b = b, a
    tr.set_out(out, _matmul_nodes(tr, a, b))


def _addmm(tr, name, args, kwargs, out):  # addmm/baddbmm/addbmm/addmv: c + a @ b
    c, a, b = args[0], args[1], args[2]
    ns = _matmul_nodes(tr, a, b)
    if name == "addbmm":  # sums over the batch dim
        ns = ns[1:]
    tmp = torch.empty(out.shape, device="meta")
    tr.set_out(tmp, ns)
    tr.set_out(out, _broadcast(tr, [c, tmp], out.shape))


def _einsum(tr, name, args, kwargs, out):
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    if not isinstance(eq, str) or not all(torch.is_tensor(o) for o in ops):
        raise _Unsupported("einsum with sublist format")
    eq = eq.replace(" ", "")
    lhs, rhs = (eq.split("->") + [None])[:2]
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise _Unsupported("einsum operand count")
    letters: Dict[str, List[Tuple[int, int]]] = defaultdict(list)  # letter -> [(node, size)]
    ell_len = max((o.dim() - len(t.replace("...", "")) for t, o in zip(terms, ops) if "..." in t), default=0)
    expanded = []
    for t, o in zip(terms, ops):
        if "..." in t:
            k = o.dim() - len(t.replace("...", ""))
            pre, post = t.split("...")
            labels = list(pre) + [f"#{ell_len - k + i}" for i in range(k)] + list(post)
        else:
            labels = list(t)
        if len(labels) != o.dim():
            raise _Unsupported("einsum rank")
        expanded.append(labels)
        for lab, n, s in zip(labels, tr.of(o), o.shape):
            letters[lab].append((n, s))
    rep: Dict[str, int] = {}
    for lab, members in letters.items():
        big = [n for n, s in members if s != 1]
        sizes = {s for _, s in members if s != 1}
        if len(sizes) > 1:
            raise _Unsupported("einsum size mismatch")
        for n in big[1:]:
            tr.union(big[0], n)
        rep[lab] = big[0] if big else tr.fresh(1, False)
    if rhs is None:
        singles = sorted(l for l in letters if not l.startswith("#") and sum(lab.count(l) for lab in expanded) == 1)
        out_labels = [f"#{i}" for i in range(ell_len)] + singles
    else:
        pre, _, post = rhs.partition("...")
        out_labels = list(pre) + ([f"#{i}" for i in range(ell_len)] if "..." in rhs else []) + list(post)
    tr.set_out(out, [rep[l] for l in out_labels])


def _conv(tr, name, args, kwargs, out):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    b = _arg(args, kwargs, 2, "bias")
    transposed = "transpose" in name
    groups = _arg(args, kwargs, 6, "groups", 1)  # position 6 in conv*d and conv_transpose*d alike
    k = w.dim() - 2
    if x.dim() not in (k + 1, k + 2):
        raise _Unsupported("conv input rank")
    batched = x.dim() == k + 2
    xs, ws = tr.of(x), tr.of(w)
    cdim = 1 if batched else 0
    for n in ws[2:]:
        tr.uf.fix(n)  # kernel positions never move
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    if groups == 1:
        tr.union(xs[cdim], ws[in_axis])
        cout = ws[out_axis]
    else:
        g = tr.fresh(groups, False)
        inner_in = tr.fresh(x.shape[cdim] // groups, False)
        tr.uf.set_layout(xs[cdim], "product", [g, inner_in])
        if transposed:
            tr.uf.set_layout(ws[0], "product", [g, inner_in])
            cout = tr.fresh(out.shape[cdim], False)
            tr.uf.set_layout(cout, "product", [g, ws[1]])
        else:
            tr.union(ws[1], inner_in)
            inner_out = tr.fresh(w.shape[0] // groups, False)
            tr.uf.set_layout(ws[0], "product", [g, inner_out])
            cout = ws[0]
    if b is not None:
        tr.union(tr.of(b)[0], cout)
    res = ([xs[0]] if batched else []) + [cout] + [tr.fresh(s, True) for s in out.shape[cdim + 1 :]]
    tr.set_out(out, res)


def _pool(tr, name, args, kwargs, out):
    m = _POOL.match(name)
    k = int(m.group(3) or name[-2])
    x = args[0]
    xs = tr.of(x)
    lead = x.dim() - k
    res = xs[:lead]
    outs = [o for o in _flatten(out) if torch.is_tensor(o)]
    for o in outs:
        tr.set_out(o, res + [tr.fresh(s, True) for s in o.shape[lead:]])


def _interpolate(tr, name, args, kwargs, out):
    x = args[0]
    xs = tr.of(x)
    tr.set_out(out, xs[:2] + [tr.fresh(s, True) for s in out.shape[2:]])


def _pad(tr, name, args, kwargs, out):
    x, pad = args[0], _arg(args, kwargs, 1, "pad")
    xs = tr.of(x)
    npad = len(pad) // 2
    moved = [i for i in range(x.dim() - npad, x.dim()) if pad[2 * (x.dim() - 1 - i)] or pad[2 * (x.dim() - 1 - i) + 1]]
    res = []
    for i, n in enumerate(xs):
        if i in moved:
            tr.uf.fix(n)
            res.append(tr.fresh(out.shape[i], True))
        else:
            res.append(n)
    tr.set_out(out, res)


def _layer_norm(tr, name, args, kwargs, out):
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    xs = tr.of(x)
    k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    for t in (w, b):
        if t is not None:
            for a, n in zip(xs[-k:], tr.of(t)):
                tr.union(a, n)
    tr.set_out(out, xs)


def _batch_norm(tr, name, args, kwargs, out):
    x = args[0]
    xs = tr.of(x)
    c = xs[1] if x.dim() > 1 else xs[0]
    for t in _flatten((args[1:], kwargs)):
        if torch.is_tensor(t):
            if t.dim() != 1:
                raise _Unsupported("batch norm statistic is not 1-D")
            tr.union(tr.of(t)[0], c)
    tr.set_out(out, xs)


def _group_norm(tr, name, args, kwargs, out):
    x, G = args[0], _arg(args, kwargs, 1, "num_groups")
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    xs = tr.of(x)
    C = x.shape[1]
    g, inner = tr.fresh(G, False), tr.fresh(C // G, False)
    tr.uf.set_layout(xs[1], "product", [g, inner])  # groups move as blocks, channels within a group move together
    for t in (w, b):
        if t is not None:
            tr.union(tr.of(t)[0], xs[1])
    tr.set_out(out, xs)


def _normalize(tr, name, args, kwargs, out):
    tr.set_out(out, tr.of(args[0]))


def _embedding(tr, name, args, kwargs, out):
    idx, w = args[0], _arg(args, kwargs, 1, "weight")
    ws = tr.of(w)
    tr.uf.fix(ws[0])  # rows are addressed by token ids
    tr.set_out(out, tr.of(idx) + [ws[1]])


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


def _permute(tr, name, args, kwargs, out):
    xs = tr.of(args[0])
    tr.set_out(out, [xs[i] for i in _permute_order(name, args, kwargs, args[0].dim())])


def _reshape(tr, name, args, kwargs, out):
    x = args[0]
    if not torch.is_tensor(out):
        raise _Unsupported("non-tensor output")
    tr.set_out(out, _reshape_nodes(tr, tr.of(x), list(x.shape), list(out.shape)))


def _reshape_nodes(tr, xs: List[int], ish: List[int], osh: List[int]) -> List[int]:
    ins = [(n, s) for n, s in zip(xs, ish) if s != 1]
    out_pos = [i for i, s in enumerate(osh) if s != 1]
    res: List[Optional[int]] = [None] * len(osh)
    i = j = 0
    while i < len(ins) or j < len(out_pos):
        if i >= len(ins) or j >= len(out_pos):
            raise _Unsupported("reshape sizes do not align")
        gi, gj = [ins[i]], [out_pos[j]]
        pi, pj = ins[i][1], osh[out_pos[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(ins):
                    raise _Unsupported("reshape sizes do not align")
                gi.append(ins[i])
                pi *= ins[i][1]
                i += 1
            else:
                if j >= len(out_pos):
                    raise _Unsupported("reshape sizes do not align")
                gj.append(out_pos[j])
                pj *= osh[out_pos[j]]
                j += 1
        if len(gi) == 1 and len(gj) == 1:
            res[gj[0]] = gi[0][0]
        elif len(gj) == 1:
            f = tr.fresh(pj, False)
            tr.uf.set_layout(f, "product", [n for n, _ in gi])
            res[gj[0]] = f
        elif len(gi) == 1:
            parts = [tr.fresh(osh[p], False) for p in gj]
            tr.uf.set_layout(gi[0][0], "product", parts)
            for p, n in zip(gj, parts):
                res[p] = n
        else:  # many-to-many: no common structure is assumed
            for n, _ in gi:
                tr.uf.fix(n)
            for p in gj:
                res[p] = tr.fresh(osh[p], True)
    for k, s in enumerate(osh):
        if res[k] is None:
            res[k] = tr.fresh(1, False)
    return res  # type: ignore[return-value]


def _expand(tr, name, args, kwargs, out):
    x = args[0]
    xs = tr.of(x)
    nd = out.dim()
    res = []
    for j in range(nd):
        k = x.dim() - nd + j
        if k >= 0 and x.shape[k] == out.shape[j]:
            res.append(xs[k])
        else:
            res.append(tr.fresh(out.shape[j], False))  # copies of one value: neutral
    tr.set_out(out, res)


def _repeat(tr, name, args, kwargs, out):
    x = args[0]
    reps = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "repeats")
    reps = list(reps)
    xs = tr.of(x)
    nd = out.dim()
    if len(reps) < x.dim():
        reps = [1] * (x.dim() - len(reps)) + reps
    res = []
    for j in range(nd):
        k = x.dim() - nd + j
        r = reps[j]
        if k < 0:
            res.append(tr.fresh(out.shape[j], False))
        elif r == 1:
            res.append(xs[k])
        else:
            f = tr.fresh(out.shape[j], False)
            tr.uf.set_layout(f, "product", [tr.fresh(r, False), xs[k]])  # tiling: outer copies x inner
            res.append(f)
    tr.set_out(out, res)


def _repeat_interleave(tr, name, args, kwargs, out):
    x, r = args[0], _arg(args, kwargs, 1, "repeats")
    dim = _arg(args, kwargs, 2, "dim")
    if not isinstance(r, int) or dim is None:
        raise _Unsupported("repeat_interleave with tensor repeats or no dim")
    xs = tr.of(x)
    d = _norm_dim(dim, x.dim())
    f = tr.fresh(out.shape[d], False)
    tr.uf.set_layout(f, "product", [xs[d], tr.fresh(r, False)])
    tr.set_out(out, xs[:d] + [f] + xs[d + 1 :])


def _cat(tr, name, args, kwargs, out):
    ts = [t for t in _arg(args, kwargs, 0, "tensors") if torch.is_tensor(t)]
    dim = _arg(args, kwargs, 1, "dim", 0)
    ts = [t for t in ts if not (t.dim() == 1 and t.shape[0] == 0)]
    nd = out.dim()
    d = _norm_dim(int(dim), nd)
    res = []
    for j in range(nd):
        if j == d:
            f = tr.fresh(out.shape[d], False)
            tr.uf.set_layout(f, "concat", [tr.of(t)[d] for t in ts])
            res.append(f)
        else:
            ms = [tr.of(t)[j] for t in ts]
            for m in ms[1:]:
                tr.union(ms[0], m)
            res.append(ms[0])
    tr.set_out(out, res)


def _stack(tr, name, args, kwargs, out):
    ts = [t for t in _arg(args, kwargs, 0, "tensors") if torch.is_tensor(t)]
    dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), out.dim())
    base = []
    for j in range(ts[0].dim()):
        ms = [tr.of(t)[j] for t in ts]
        for m in ms[1:]:
            tr.union(ms[0], m)
        base.append(ms[0])
    tr.set_out(out, base[:dim] + [tr.fresh(len(ts), True)] + base[dim:])


def _split(tr, name, args, kwargs, out):
    x = args[0]
    pieces = [o for o in _flatten(out) if torch.is_tensor(o)]
    if name == "unbind":
        d = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), x.dim())
        xs = tr.of(x)
        tr.uf.fix(xs[d])
        for p in pieces:
            tr.set_out(p, xs[:d] + xs[d + 1 :])
        return
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    d = _norm_dim(int(dim), x.dim())
    xs = tr.of(x)
    if sum(p.shape[d] for p in pieces) != x.shape[d]:
        raise _Unsupported("split pieces do not cover the dim")
    parts = [tr.fresh(p.shape[d], False) for p in pieces]
    tr.uf.set_layout(xs[d], "concat", parts)
    for p, n in zip(pieces, parts):
        tr.set_out(p, xs[:d] + [n] + xs[d + 1 :])


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


def _getitem(tr, name, args, kwargs, out):
    x = args[0]
    idx = _expand_index(args[1], x.dim())
    xs = tr.of(x)
    res = []
    d = 0
    for i in idx:
        if i is None:
            res.append(tr.fresh(1, False))
        elif isinstance(i, int):
            tr.uf.fix(xs[d])  # a position along this dim is singled out
            d += 1
        elif isinstance(i, slice):
            if i.indices(x.shape[d]) == (0, x.shape[d], 1):
                res.append(xs[d])
            else:
                tr.uf.fix(xs[d])
                res.append(None)
            d += 1
        else:
            raise _Unsupported(f"index of type {type(i).__name__}")
    final = [r if r is not None else tr.fresh(out.shape[j], True) for j, r in enumerate(res)]
    tr.set_out(out, final)


def _positional(tr, name, args, kwargs, out):  # narrow / select: a position range singled out
    x = args[0]
    d = _norm_dim(int(_arg(args, kwargs, 1, "dim")), x.dim())
    xs = tr.of(x)
    tr.uf.fix(xs[d])
    if name == "select":
        tr.set_out(out, xs[:d] + xs[d + 1 :])
    else:
        tr.set_out(out, xs[:d] + [tr.fresh(out.shape[d], True)] + xs[d + 1 :])


def _sdpa(tr, name, args, kwargs, out):
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, kwargs, 3, "attn_mask")
    causal = _arg(args, kwargs, 5, "is_causal", False)
    if q.dim() < 3 or q.shape[:-3] != k.shape[:-3] or k.shape[:-2] != v.shape[:-2]:
        raise _Unsupported("mismatched batch dims")
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv and not (_arg(args, kwargs, 7, "enable_gqa", False) and hq % hkv == 0):
        raise _Unsupported("query and key head counts differ without enable_gqa")
    qs, ks, vs = tr.of(q), tr.of(k), tr.of(v)
    for a, b, c in zip(qs[:-3], ks[:-3], vs[:-3]):
        tr.union(a, b)
        tr.union(a, c)
    tr.union(ks[-3], vs[-3])
    if hq == hkv:
        tr.union(qs[-3], ks[-3])
    else:  # grouped-query attention: query head h reads kv head h // (hq / hkv)
        tr.uf.set_layout(qs[-3], "product", [ks[-3], tr.fresh(hq // hkv, False)])
    tr.union(qs[-1], ks[-1])
    tr.union(ks[-2], vs[-2])
    if causal:
        tr.uf.fix(qs[-2])
        tr.uf.fix(ks[-2])
    if torch.is_tensor(mask):
        scores = torch.empty(q.shape[:-1] + k.shape[-2:-1], device="meta")
        tr.set_out(scores, qs[:-1] + [ks[-2]])
        _broadcast(tr, [scores, mask], scores.shape)
    tr.set_out(out, qs[:-1] + [vs[-1]])


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def _mha_args(args, kwargs) -> Dict[str, Any]:
    """The arguments of ``F.multi_head_attention_forward`` by name."""
    return {n: _arg(args, kwargs, i, n) for i, n in enumerate(_MHA_ARGS)}


def _mha(tr, name, args, kwargs, out):
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): heads x head_dim structure."""
    a = _mha_args(args, kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if a["static_k"] is not None or a["static_v"] is not None:
        raise _Unsupported("static keys/values")
    H, E = int(a["num_heads"]), int(a["embed_dim_to_check"])
    D = E // H
    heads, qk, vo = tr.fresh(H, False), tr.fresh(D, False), tr.fresh(D, False)
    qd, kd, vd = tr.of(q), tr.of(k), tr.of(v)
    proj = {}
    for role, sub in (("q", qk), ("k", qk), ("v", vo)):
        f = tr.fresh(E, False)
        tr.uf.set_layout(f, "product", [heads, sub])
        proj[role] = f
    if a["use_separate_proj_weight"]:
        for role, w, xd in (("q", a["q_proj_weight"], qd), ("k", a["k_proj_weight"], kd), ("v", a["v_proj_weight"], vd)):
            ws = tr.of(w)
            tr.union(ws[0], proj[role])
            tr.union(ws[1], xd[-1])
    else:
        ws = tr.of(a["in_proj_weight"])
        tr.uf.set_layout(ws[0], "concat", [proj["q"], proj["k"], proj["v"]])
        for xd in (qd, kd, vd):
            tr.union(ws[1], xd[-1])
    if a["in_proj_bias"] is not None:
        bs = tr.of(a["in_proj_bias"])
        tr.uf.set_layout(bs[0], "concat", [proj["q"], proj["k"], proj["v"]])
    for t, role in ((a["bias_k"], "k"), (a["bias_v"], "v")):
        if t is not None:
            tr.union(tr.of(t)[-1], proj[role])
    ow = tr.of(a["out_proj_weight"])
    tr.union(ow[1], proj["v"])
    if a["out_proj_bias"] is not None:
        tr.union(tr.of(a["out_proj_bias"])[0], ow[0])
    if a["is_causal"] or a["attn_mask"] is not None:
        tr.uf.fix(qd[0])
        tr.uf.fix(kd[0])
    attn, weights = out
    tr.set_out(attn, qd[:-1] + [ow[0]])
    if torch.is_tensor(weights):
        tr.set_out(weights, [tr.fresh(s, True) for s in weights.shape])
    tr._touch(*[t for t in _flatten((args, kwargs)) if torch.is_tensor(t)])


def _identity_like(tr, name, args, kwargs, out):
    tr.set_out(out, tr.of(args[0]))


_RULES = {
    "linear": _linear,
    "matmul": _matmul,
    "rmatmul": _matmul,
    "mm": _matmul,
    "bmm": _matmul,
    "mv": _matmul,
    "dot": _matmul,
    "addmm": _addmm,
    "baddbmm": _addmm,
    "addbmm": _addmm,
    "addmv": _addmm,
    "einsum": _einsum,
    "conv1d": _conv,
    "conv2d": _conv,
    "conv3d": _conv,
    "conv_transpose1d": _conv,
    "conv_transpose2d": _conv,
    "conv_transpose3d": _conv,
    "softmax": _softmax,
    "log_softmax": _softmax,
    "layer_norm": _layer_norm,
    "rms_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "instance_norm": _batch_norm,
    "group_norm": _group_norm,
    "normalize": _normalize,
    "embedding": _embedding,
    "permute": _permute,
    "transpose": _permute,
    "swapaxes": _permute,
    "swapdims": _permute,
    "t": _permute,
    "prop:T": _permute,
    "prop:mT": _permute,
    "movedim": _permute,
    "moveaxis": _permute,
    "expand": _expand,
    "expand_as": _expand,
    "broadcast_to": _expand,
    "repeat": _repeat,
    "tile": _repeat,
    "repeat_interleave": _repeat_interleave,
    "cat": _cat,
    "concat": _cat,
    "concatenate": _cat,
    "stack": _stack,
    "split": _split,
    "chunk": _split,
    "tensor_split": _split,
    "split_with_sizes": _split,
    "unbind": _split,
    "getitem": _getitem,
    "narrow": _positional,
    "select": _positional,
    "max": _maxmin,
    "min": _maxmin,
    "argmax": _argreduce,
    "argmin": _argreduce,
    "scaled_dot_product_attention": _sdpa,
    "multi_head_attention_forward": _mha,
    "interpolate": _interpolate,
    "upsample": _interpolate,
    "pad": _pad,
    "prop:data": _identity_like,
}


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _call(model: torch.nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _tensor_keys(model: torch.nn.Module) -> Tuple[Dict[int, List[str]], Dict[str, torch.Tensor], set]:
    """id(tensor) -> keys (tied weights share one tensor), key -> tensor, and persistent keys."""
    by_id: Dict[int, List[str]] = defaultdict(list)
    tensors: Dict[str, torch.Tensor] = {}
    for k, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is None:
            continue
        by_id[id(t)].append(k)
        tensors[k] = t
    persistent = set(model.state_dict(keep_vars=True).keys())
    return by_id, tensors, persistent


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

    modes = {m: m.training for m in model.modules()}
    h1, h2 = register_module_forward_pre_hook(pre), register_module_forward_hook(post)
    try:
        model.eval()
        with torch.no_grad(), mode:
            return _call(model, example_inputs)
    finally:
        h1.remove()
        h2.remove()
        for m, was_training in modes.items():
            m.train(was_training)


def trace_dims(model: torch.nn.Module, example_inputs: Any) -> Tuple[PermutationSpec, DimTrace, Dict[int, List[str]]]:
    """Run ``model`` once on ``example_inputs`` under :class:`DimTrace` and build its spec.

    Returns ``(spec, trace, keys_by_tensor_id)``. The model runs in eval mode (restored afterwards)
    and without gradients; its parameters and buffers are not modified.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            "TorchScript modules run their operations in C++ where they cannot be followed; trace the "
            "eager model instead, or write the spec by hand with PermutationSpec.from_axes_to_perm"
        )
    by_id, tensors, persistent = _tensor_keys(model)
    tr = DimTrace()
    for tid, keys in by_id.items():
        t = tensors[keys[0]]
        tr.register(t, fixed=not (t.is_floating_point() or t.is_complex()))  # integer buffers hold indices/counters
        tr.param_ids.add(tid)
    for t in _flatten(example_inputs):
        if torch.is_tensor(t):
            tr.register(t, fixed=True)

    def record(module: str, out: Any) -> None:
        first = next((t for t in _flatten(out) if torch.is_tensor(t)), None)
        if first is not None and id(first) in tr.nodes:
            tr.module_outputs.append((module, list(tr.nodes[id(first)])))

    try:
        out = traced_run(model, example_inputs, tr, tr.module_stack, on_output=record)
    except _Unsupported as exc:  # pragma: no cover - rules catch their own
        raise TraceError(str(exc)) from exc
    except Exception as exc:
        where = tr.module_stack[-1] if tr.module_stack else "<top level>"
        raise TraceError(
            f"running the model on the example inputs failed in module {where!r}: {type(exc).__name__}: {exc}. "
            "Check the example inputs' shapes and types (a tensor, a tuple of positional inputs, or a dict of "
            "keyword inputs); if the model cannot run eagerly here, write the spec by hand with "
            "PermutationSpec.from_axes_to_perm"
        ) from exc
    for t in _flatten(out):
        for n in tr.of(t):
            tr.uf.fix(n)
    for tid in tr.param_ids:
        if tid not in tr.visited:
            for n in tr.nodes[tid]:
                tr.uf.fix(n)
    spec = _build_spec(tr, by_id, tensors, persistent)
    return spec, tr, by_id


def _build_spec(tr: DimTrace, by_id, tensors, persistent) -> PermutationSpec:
    uf = tr.uf
    names: Dict[int, str] = {}
    used_names: set = set()

    def name_for(root: int, key: str, ax: int, path: Tuple[int, ...]) -> str:
        if root in names:
            return names[root]
        base = key.rsplit(".", 1)[0] if "." in key else key
        if ax != 0:
            base += f"@{ax}"
        if path:
            base += "#" + ".".join(map(str, path))
        cand, i = base, 2
        while cand in used_names:
            cand, i = f"{base}~{i}", i + 1
        used_names.add(cand)
        names[root] = cand
        return cand

    def resolve(node: int, key: str, ax: int, path: Tuple[int, ...]) -> Axis:
        r = uf.find(node)
        size = uf.size[r]
        lay = uf.layout.get(r)
        if lay is not None:
            kind, children = lay
            parts = tuple(resolve(c, key, ax, path + (i,)) for i, c in enumerate(children))
            if all(p.kind == "fixed" for p in parts):
                return Axis.fixed(size)
            merged: List[Axis] = []
            for p in parts:  # adjacent fixed parts read better as one: (c x ~4 x ~4) -> (c x ~16)
                if merged and p.kind == "fixed" and merged[-1].kind == "fixed":
                    n = merged[-1].size * p.size if kind == "product" else merged[-1].size + p.size
                    merged[-1] = Axis.fixed(n)
                else:
                    merged.append(p)
            return Axis(kind, size, parts=tuple(merged))
        if uf.fixed[r] or size <= 1:
            return Axis.fixed(size)
        return Axis.group(name_for(r, key, ax, path), size)

    groups: Dict[str, int] = {}
    axes: Dict[str, Tuple[Optional[Axis], ...]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    order = [k for k in tensors if k in persistent] + [k for k in tensors if k not in persistent]
    key_to_id = {k: tid for tid, ks in by_id.items() for k in ks}
    for key in order:
        t = tensors[key]
        ns = tr.nodes[key_to_id[key]]
        lays = []
        for ax, n in enumerate(ns):
            a = resolve(n, key, ax, ())
            lays.append(None if a.kind == "fixed" else a)
            if a.kind != "fixed":
                for g, _ in a.groups():
                    groups.setdefault(g, next(p.size for p in _leaves(a) if p.name == g))
        if key not in persistent and all(l is None for l in lays):
            continue
        axes[key] = tuple(lays)
        shapes[key] = tuple(t.shape)
    points: Dict[str, List[Tuple[str, int]]] = {}
    for module, ns in tr.module_outputs:  # where each group is an axis of a module's output
        for dim, n in enumerate(ns):
            g = names.get(uf.find(n))
            if g is not None and g in groups and (module, dim) not in points.setdefault(g, []):
                points[g].append((module, dim))
    info = {
        "source": "traced",
        "points": {g: tuple(v) for g, v in points.items()},
        "blocked_ops": tuple(sorted(tr.blocked.items())),
        "blocked_where": dict(tr.blocked_where),
        "non_persistent": tuple(k for k in axes if k not in persistent),
    }
    return PermutationSpec(groups=groups, axes=axes, shapes=shapes, info=info)


def _leaves(a: Axis):
    if a.kind == "group":
        yield a
    for p in a.parts:
        yield from _leaves(p)


def _common_refinement(a: List[int], b: List[int], additive: bool) -> Optional[List[int]]:
    """Sizes of the coarsest factor list that refines both ``a`` and ``b`` (None if there is none).

    For products the prefix products of both lists must form one divisibility chain; for
    concatenations the prefix sums simply merge.
    """
    def prefixes(xs):
        out, acc = [], 0 if additive else 1
        for x in xs:
            acc = acc + x if additive else acc * x
            out.append(acc)
        return out

    cuts = sorted(set(prefixes(a)) | set(prefixes(b)))
    sizes, prev = [], 0 if additive else 1
    for c in cuts:
        if additive:
            sizes.append(c - prev)
        else:
            if c % prev:
                return None
            sizes.append(c // prev)
        prev = c
    return sizes
