"""Dimension rules of elementwise, reduction and shape operations (layers: :mod:`weightspace.symmetry._rules_layers`).

For each operation, which dimensions of its inputs and outputs must move together.

A rule ``rule(tr, name, args, kwargs, out)`` reads the input tensors' dimension nodes from the trace
``tr`` (:class:`weightspace.symmetry._trace.DimTrace`), joins the ones the operation couples, marks positional
ones fixed, and registers the output's nodes. A rule that cannot read an operation raises
``Unsupported``, and the trace then fixes everything the operation touches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from weightspace.tracing import (
    Unsupported,
    arg,
    dims_arg,
    expand_index,
    flatten_tensors,
    norm_dim,
    permute_order,
)


def _broadcast(tr, tensors: Sequence[torch.Tensor], out_shape: Sequence[int]) -> List[int]:
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
                raise Unsupported("shapes do not broadcast")
        if members:
            for m in members[1:]:
                tr.union(members[0], m)
            out.append(members[0])
        else:
            out.append(tr.fresh(size, False))  # broadcast of a constant dim: neutral
    return out


def _unary(tr, name, args, kwargs, out):
    x = next((a for a in flatten_tensors(args) if torch.is_tensor(a)), None)
    if x is None or not torch.is_tensor(out) or tuple(out.shape) != tuple(x.shape):
        raise Unsupported("unary op changed the shape")
    tr.set_out(out, tr.of(x))


def _elementwise(tr, name, args, kwargs, out):
    tensors = [a for a in flatten_tensors((args, kwargs)) if torch.is_tensor(a)]
    if not torch.is_tensor(out):
        raise Unsupported("non-tensor output")
    tr.set_out(out, _broadcast(tr, tensors, out.shape))


def _neutral(tr, name, args, kwargs, out):
    if not torch.is_tensor(out):
        raise Unsupported("non-tensor output")
    if name == "full" or name == "full_like" or name == "new_full":
        fill = arg(args, kwargs, 2 if name == "full_like" else 1, "fill_value")
        if torch.is_tensor(fill) and fill.dim() > 0:
            raise Unsupported("tensor fill value")
    tr.set_out(out, [tr.fresh(s, False) for s in out.shape])


def _reduce(tr, name, args, kwargs, out):
    x = args[0]
    if name in ("norm", "vector_norm"):
        dim, keep = arg(args, kwargs, 2, "dim"), arg(args, kwargs, 3, "keepdim", False)
    elif name in ("var", "std"):
        dim = arg(args, kwargs, 1, "dim")
        keep = kwargs.get("keepdim", args[3] if len(args) > 3 and isinstance(args[2], bool) else False)
        if isinstance(dim, bool):
            dim = None
    else:
        dim, keep = arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "keepdim", False)
    if name in ("sum", "mean", "prod", "nansum", "nanmean") and torch.is_tensor(dim):
        raise Unsupported("tensor dim")
    xs = tr.of(x)
    red = dims_arg(dim, x.dim())
    res = []
    for i, n in enumerate(xs):
        if i in red:
            if keep:
                res.append(tr.fresh(1, False))
        else:
            res.append(n)
    outs = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
    for o in outs:
        tr.set_out(o, res)


def _argreduce(tr, name, args, kwargs, out):
    x = args[0]
    dim, keep = arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "keepdim", False)
    xs = tr.of(x)
    red = dims_arg(dim, x.dim())
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
    other = arg(args, kwargs, 1, "other")
    if torch.is_tensor(other):
        return _elementwise(tr, name, args, kwargs, out)
    dim = arg(args, kwargs, 1, "dim")
    if dim is None:
        tr.set_out(out, [])
        return
    keep = arg(args, kwargs, 2, "keepdim", False)
    x = args[0]
    xs = tr.of(x)
    d = norm_dim(int(dim), x.dim())
    tr.uf.fix(xs[d])  # the indices output is positional along d
    if keep:
        res = [n if i != d else tr.fresh(1, True) for i, n in enumerate(xs)]
    else:
        res = [n for i, n in enumerate(xs) if i != d]
    for o in flatten_tensors(out):
        tr.set_out(o, res)


def _softmax(tr, name, args, kwargs, out):
    tr.set_out(out, tr.of(args[0]))


def _permute(tr, name, args, kwargs, out):
    xs = tr.of(args[0])
    tr.set_out(out, [xs[i] for i in permute_order(name, args, kwargs, args[0].dim())])


def _reshape(tr, name, args, kwargs, out):
    x = args[0]
    if not torch.is_tensor(out):
        raise Unsupported("non-tensor output")
    tr.set_out(out, _reshape_nodes(tr, tr.of(x), list(x.shape), list(out.shape)))


def _reshape_nodes(tr, xs: List[int], ish: List[int], osh: List[int]) -> List[int]:
    ins = [(n, s) for n, s in zip(xs, ish) if s != 1]
    out_pos = [i for i, s in enumerate(osh) if s != 1]
    res: List[Optional[int]] = [None] * len(osh)
    i = j = 0
    while i < len(ins) or j < len(out_pos):
        if i >= len(ins) or j >= len(out_pos):
            raise Unsupported("reshape sizes do not align")
        gi, gj = [ins[i]], [out_pos[j]]
        pi, pj = ins[i][1], osh[out_pos[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(ins):
                    raise Unsupported("reshape sizes do not align")
                gi.append(ins[i])
                pi *= ins[i][1]
                i += 1
            else:
                if j >= len(out_pos):
                    raise Unsupported("reshape sizes do not align")
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
    for k, _s in enumerate(osh):
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
    reps = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else arg(args, kwargs, 1,
                                                                                               "repeats")
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
    x, r = args[0], arg(args, kwargs, 1, "repeats")
    dim = arg(args, kwargs, 2, "dim")
    if not isinstance(r, int) or dim is None:
        raise Unsupported("repeat_interleave with tensor repeats or no dim")
    xs = tr.of(x)
    d = norm_dim(dim, x.dim())
    f = tr.fresh(out.shape[d], False)
    tr.uf.set_layout(f, "product", [xs[d], tr.fresh(r, False)])
    tr.set_out(out, xs[:d] + [f] + xs[d + 1 :])


def _cat(tr, name, args, kwargs, out):
    ts = [t for t in arg(args, kwargs, 0, "tensors") if torch.is_tensor(t)]
    dim = arg(args, kwargs, 1, "dim", 0)
    ts = [t for t in ts if not (t.dim() == 1 and t.shape[0] == 0)]
    nd = out.dim()
    d = norm_dim(int(dim), nd)
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
    ts = [t for t in arg(args, kwargs, 0, "tensors") if torch.is_tensor(t)]
    dim = norm_dim(int(arg(args, kwargs, 1, "dim", 0)), out.dim())
    base = []
    for j in range(ts[0].dim()):
        ms = [tr.of(t)[j] for t in ts]
        for m in ms[1:]:
            tr.union(ms[0], m)
        base.append(ms[0])
    tr.set_out(out, base[:dim] + [tr.fresh(len(ts), True)] + base[dim:])


def _split(tr, name, args, kwargs, out):
    x = args[0]
    pieces = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
    if name == "unbind":
        d = norm_dim(int(arg(args, kwargs, 1, "dim", 0)), x.dim())
        xs = tr.of(x)
        tr.uf.fix(xs[d])
        for p in pieces:
            tr.set_out(p, xs[:d] + xs[d + 1 :])
        return
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    d = norm_dim(int(dim), x.dim())
    xs = tr.of(x)
    if sum(p.shape[d] for p in pieces) != x.shape[d]:
        raise Unsupported("split pieces do not cover the dim")
    parts = [tr.fresh(p.shape[d], False) for p in pieces]
    tr.uf.set_layout(xs[d], "concat", parts)
    for p, n in zip(pieces, parts):
        tr.set_out(p, xs[:d] + [n] + xs[d + 1 :])


def _getitem(tr, name, args, kwargs, out):
    x = args[0]
    idx = expand_index(args[1], x.dim())
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
            raise Unsupported(f"index of type {type(i).__name__}")
    final = [r if r is not None else tr.fresh(out.shape[j], True) for j, r in enumerate(res)]
    tr.set_out(out, final)


def _positional(tr, name, args, kwargs, out):  # narrow / select: a position range singled out
    x = args[0]
    d = norm_dim(int(arg(args, kwargs, 1, "dim")), x.dim())
    xs = tr.of(x)
    tr.uf.fix(xs[d])
    if name == "select":
        tr.set_out(out, xs[:d] + xs[d + 1 :])
    else:
        tr.set_out(out, xs[:d] + [tr.fresh(out.shape[d], True)] + xs[d + 1 :])


def _identity_like(tr, name, args, kwargs, out):
    tr.set_out(out, tr.of(args[0]))
