"""Graph handlers: how each operation moves, creates or joins layers of nodes (see
:mod:`weightspace.graph._trace`)."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from weightspace.graph._ir import _ACTIVATIONS, EdgeBlock, Feat, GraphError
from weightspace.tracing import (POOL, Unsupported, arg, dims_arg, expand_index, flatten_tensors, mha_args, norm_dim,
                                 permute_order)

# A handler's first argument is the running GraphTrace (weightspace.graph._trace); it is not imported
# here, even for annotations, so that the trace imports its handlers and never the other way round.
GraphTrace = Any


def _h_unary(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    if not torch.is_tensor(out):
        return
    if id(x) in g.scores:
        g.scores[id(out)] = g.scores[id(x)]
        g._keep.append(out)
    f = g.feat.get(id(x))
    if f is not None and out.shape == x.shape:
        if name in _ACTIVATIONS and not g.layers[f.layer].activation:
            g.layers[f.layer].activation = name
        g.set_feat(out, f)
    elif not (out.shape == x.shape and g.pass_derived(x, out)):
        g.set_feat(out, None, src=x, op=name)


def _align(x: torch.Tensor, out: torch.Tensor, dims: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(d + out.dim() - x.dim() for d in dims)


def _h_binary(g: GraphTrace, name, args, kwargs, out):
    tensors = [a for a in flatten_tensors((args, kwargs)) if torch.is_tensor(a)]
    feats = [(t, g.feat[id(t)]) for t in tensors if id(t) in g.feat]
    params = [t for t in tensors if g.key_of(t) is not None or id(t) in g.pderived]
    if not torch.is_tensor(out):
        return
    if not feats:
        sc = next((g.scores[id(t)] for t in tensors if id(t) in g.scores), None)
        if sc is not None:  # scaled or masked attention scores
            g.scores[id(out)] = sc
            g._keep.append(out)
            return
        g.set_feat(out, None, src=next((t for t in tensors if id(t) in g.lost), None), op=name)
        return
    t0, f0 = feats[0]
    dims0 = _align(t0, out, f0.dims)
    layers = []
    for t, f in feats:
        if _align(t, out, f.dims) != dims0 or f.inner != f0.inner or g.layers[f.layer].size != g.layers[f0.layer].size:
            raise GraphError(f"{name} in {g.where()} combines features laid out differently")
        if f.layer not in layers:
            layers.append(f.layer)
    if len(layers) == 1:
        res = Feat(layers[0], dims0, f0.inner)
    else:
        kind = "sum" if name in ("add", "sub", "subtract") else "product"
        new = g.new_layer(g.layers[layers[0]].size, kind, follows=layers[0])
        for l in layers:
            g.identity_edges(l, new, "residual" if kind == "sum" else "gate")
        res = Feat(new, dims0, f0.inner)
    for p in params:
        key, view = (g.key_of(p), p) if g.key_of(p) is not None else g.pderived[id(p)]
        # the parameter's axis aligned with the feature axis becomes a node feature of that layer
        pd = dims0[-1] - (out.dim() - p.dim())
        if pd < 0 or p.shape[pd] != g.layers[res.layer].size or len(dims0) != 1 or f0.inner != 1:
            raise GraphError(f"parameter {key!r} is combined with features in {g.where()} along an axis the graph "
                             "cannot place")
        if key in g.placed:
            continue
        vpd = pd - (p.dim() - view.dim())
        if vpd < 0 or view.shape[vpd] != g.layers[res.layer].size:
            raise GraphError(f"parameter {key!r} is combined with features in {g.where()} through a reshape the graph "
                             "cannot place")
        g.node_feature(key, view, res.layer, vpd, f"{'add' if name in ('add', 'sub') else 'scale'}:{key}")
    g.set_feat(out, res)


def _h_reduce(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    f = g.feat.get(id(x))
    outs = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
    if f is None:
        for o in outs:
            g.set_feat(o, None, src=x, op=name)
        return
    pos = 2 if name in ("norm", "vector_norm") else 1
    dim = arg(args, kwargs, pos, "dim")
    if name in ("var", "std"):
        keep = bool(kwargs.get("keepdim", False))
    else:
        keep = bool(arg(args, kwargs, pos + 1, "keepdim", False))
    red = dims_arg(dim, x.dim()) if not (name in ("var", "std") and isinstance(dim, bool)) else list(range(x.dim()))
    if any(d in red for d in f.dims):
        for o in outs:
            g.set_feat(o, None, src=x, op=name)
        return
    shift = lambda d: d if keep else d - sum(1 for r in red if r < d)
    for o in outs:
        g.set_feat(o, Feat(f.layer, tuple(shift(d) for d in f.dims), f.inner))


def _h_pool(g: GraphTrace, name, args, kwargs, out):
    """Pooling and resizing act on the trailing spatial axes; units on the leading axes survive."""
    x = args[0]
    f = g.feat.get(id(x))
    m = POOL.match(name)
    spatial = int(m.group(3) or name[-2]) if m else x.dim() - 2
    keep = f if f is not None and max(f.dims) < x.dim() - spatial and f.inner == 1 else None
    for o in flatten_tensors(out):
        if torch.is_tensor(o):
            g.set_feat(o, keep, src=x, op=name)


def _h_reshape(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    if g.pass_derived(x, out):
        return
    f = g.feat.get(id(x))
    if f is None or not torch.is_tensor(out):
        if torch.is_tensor(out):
            g.set_feat(out, None, src=x, op=name)
        return
    if tuple(out.shape) == tuple(x.shape):
        g.set_feat(out, f)
        return
    g.set_feat(out, _reshape_feat(f, list(x.shape), list(out.shape), g.layers[f.layer].size), src=x, op=name)


def _reshape_feat(f: Feat, ish: List[int], osh: List[int], n: int) -> Optional[Feat]:
    """Where the units of ``f`` land after a reshape (row-major), or None if they get mixed.

    In flat-index terms each unit owns a contiguous block of ``inner * T`` entries inside every
    outer index, ``T`` being the product of the axes after the feature axes. The output's feature
    axes are the shortest run whose product is ``n * inner'`` with ``inner'`` dividing ``inner * T``.
    """
    lo, hi = min(f.dims), max(f.dims)
    if tuple(range(lo, hi + 1)) != f.dims:
        return None
    outer = 1
    for s in ish[:lo]:
        outer *= s
    trailing = 1
    for s in ish[hi + 1:]:
        trailing *= s
    block = f.inner * trailing
    acc, j = 1, 0
    while j < len(osh) and acc < outer:
        acc *= osh[j]
        j += 1
    while j < len(osh) and osh[j] == 1 and acc == outer:
        j += 1
    if acc != outer:
        return None
    p, k = 1, j
    while k < len(osh):
        p *= osh[k]
        if p % n == 0 and block % (p // n) == 0:
            return Feat(f.layer, tuple(range(j, k + 1)), p // n)
        k += 1
    return None


def _h_permute(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    if g.pass_derived(x, out):
        return
    f = g.feat.get(id(x))
    if f is None:
        g.set_feat(out, None, src=x, op=name)
        return
    order = permute_order(name, args, kwargs, x.dim())
    new = tuple(order.index(d) for d in f.dims)
    g.set_feat(out, Feat(f.layer, new, f.inner))


def _h_getitem(g: GraphTrace, name, args, kwargs, out):
    x, idx = args[0], args[1]
    f = g.feat.get(id(x))
    if f is None or not torch.is_tensor(out):
        if torch.is_tensor(out):
            g.set_feat(out, None, src=x, op=name)
        return
    try:
        idx = expand_index(idx, x.dim())
    except Unsupported:
        g.set_feat(out, None, src=x, op=name)
        return
    mapping, d, j = {}, 0, 0
    for i in idx:
        if i is None:
            j += 1
        elif isinstance(i, int):
            d += 1
        else:
            if d in f.dims and i.indices(x.shape[d]) != (0, x.shape[d], 1):
                g.set_feat(out, None, src=x, op=name)
                return
            mapping[d] = j
            d += 1
            j += 1
    if not all(d in mapping for d in f.dims):
        g.set_feat(out, None, src=x, op=name)
        return
    g.set_feat(out, Feat(f.layer, tuple(mapping[d] for d in f.dims), f.inner))


def _h_expand(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    key = g.key_of(x)
    if key is not None or id(x) in g.pderived:
        g.pderived[id(out)] = (key, x) if key is not None else g.pderived[id(x)]
        g._keep.append(out)
        return
    f = g.feat.get(id(x))
    if f is not None:
        g.set_feat(out, Feat(f.layer, _align(x, out, f.dims), f.inner))
    else:
        g.set_feat(out, None, src=x, op=name)


def _anchor_by_consumer(g: GraphTrace, f: Feat, key: str, axis: int) -> None:
    """A layer with no permutation of its own (grouped-query attention output) moves like the input
    axis of the weight that consumes it."""
    layer = g.layers[f.layer]
    if layer.anchor is None and layer.follows is None and layer.kind == "attention" and f.inner == 1:
        layer.anchor = (key, axis)


def _h_addmm(g: GraphTrace, name, args, kwargs, out):
    """``addmm(bias, x, W)`` with a (in, out) weight: the Conv1D layer of GPT-2 style models."""
    c, x, w = args[0], args[1], args[2]
    key = g.key_of(w)
    if key is None:  # a product of activations (or of computed weights): as matmul
        return _h_matmul(g, "matmul", (x, w), {}, out)
    if id(x) not in g.feat or w.dim() != 2:
        return g.set_feat(out, None, src=x, op=name)
    f = g.feat_in(x, -1, name)
    _anchor_by_consumer(g, f, key, 0)
    layer = g.new_layer(w.shape[1], "linear", anchor=(key, 1))
    g.param_edges(key, w, f.layer, layer, 1, 0, "linear", inner=f.inner)
    if g.key_of(c) is not None and c.dim() == 1:
        g.node_feature(g.key_of(c), c, layer, 0, "bias")
    g.set_feat(out, Feat(layer, (out.dim() - 1,)))


def _h_linear(g: GraphTrace, name, args, kwargs, out):
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    key = g.key_of(w)
    if key is None:
        raise GraphError(f"linear in {g.where()} uses a weight computed from parameters; not supported")
    f = g.feat_in(x, -1, "linear")
    _anchor_by_consumer(g, f, key, 1)
    layer = g.new_layer(w.shape[0], "linear", anchor=(key, 0))
    g.param_edges(key, w, f.layer, layer, 0, 1, "linear", inner=f.inner)
    if b is not None:
        g.node_feature(g.key_of(b), b, layer, 0, "bias")
    g.set_feat(out, Feat(layer, (out.dim() - 1,)))


def _h_conv(g: GraphTrace, name, args, kwargs, out):
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    groups = arg(args, kwargs, 6, "groups", 1)
    key = g.key_of(w)
    batched = x.dim() == w.dim()
    cdim = 1 if batched else 0
    f = g.feat_in(x, cdim, name)
    transposed = "transpose" in name
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    n_out = out.shape[cdim]
    layer = g.new_layer(n_out, "conv", anchor=(key, out_axis) if groups == 1 else None, follows=None)
    if groups != 1 and transposed:
        raise GraphError(f"grouped transposed convolution in {g.where()} is not supported by NeuralGraph")
    g.param_edges(key, w, f.layer, layer, out_axis, in_axis, "conv", groups=groups)
    if groups != 1:
        g.layers[layer].anchor = (key, 0)
    if b is not None:
        g.node_feature(g.key_of(b), b, layer, 0, "bias")
    g.set_feat(out, Feat(layer, (cdim,)))


def _h_embedding(g: GraphTrace, name, args, kwargs, out):
    w = arg(args, kwargs, 1, "weight")
    key = g.key_of(w)
    vocab = g.new_layer(w.shape[0], "input")
    layer = g.new_layer(w.shape[1], "embedding", anchor=(key, 1))
    g.param_edges(key, w, vocab, layer, 1, 0, "embedding")
    g.set_feat(out, Feat(layer, (out.dim() - 1,)))


def _h_norm(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    if name in ("layer_norm", "rms_norm"):
        shape = arg(args, kwargs, 1, "normalized_shape")
        if len(shape) != 1:
            raise GraphError(f"{name} over several axes in {g.where()} is not supported by NeuralGraph")
        f = g.feat_in(x, -1, name)
        w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
        stats = {}
    elif name == "group_norm":
        f = g.feat_in(x, 1, name)
        w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
        stats = {}
    else:  # batch_norm / instance_norm
        f = g.feat_in(x, 1 if x.dim() > 1 else 0, name)
        w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
        stats = {"running_mean": arg(args, kwargs, 1, "running_mean"),
                 "running_var": arg(args, kwargs, 2, "running_var")}
    if f.inner != 1:
        raise GraphError(f"{name} in {g.where()} normalises a flattened feature map; not supported")
    size = g.layers[f.layer].size
    layer = g.new_layer(size, "norm", follows=f.layer)
    ar = torch.arange(size)
    if w is not None:
        key = g.key_of(w)
        g.add_edges(EdgeBlock(f.layer, layer, "norm", ar, ar, w.detach().reshape(size, 1).clone(), key, slice(0, size)))
    else:
        g.identity_edges(f.layer, layer, "norm")
    if b is not None:
        g.node_feature(g.key_of(b), b, layer, 0, "bias")
    for sname, t in stats.items():
        if t is not None and g.key_of(t) is not None:
            g.node_feature(g.key_of(t), t, layer, 0, sname)
    g.set_feat(out, Feat(layer, f.dims))


def _attention(g: GraphTrace, qf: Feat, kf: Feat, vf: Feat, heads: int, out_layer_size: int,
               kv_heads: Optional[int] = None) -> int:
    """Pair each query unit with the key unit it multiplies, join each query head's units to that
    head's output units, and copy the value units to the output (grouped-query attention: query head
    ``h`` reads key/value head ``h // (heads / kv_heads)``)."""
    kv_heads = heads if kv_heads is None else kv_heads
    group = heads // kv_heads
    lq, lv = g.layers[qf.layer], g.layers[vf.layer]
    dq, dv = lq.size // heads, lv.size // kv_heads
    hq = torch.arange(heads).repeat_interleave(dq)
    q_units = torch.arange(lq.size)
    g.add_edges(EdgeBlock(qf.layer, kf.layer, "qk", q_units, (hq // group) * dq + q_units % dq, None))
    # the output's units move with the value units when there is one query head per kv head; with
    # groups they are anchored by the layer that consumes them (see _h_linear)
    att = g.new_layer(out_layer_size, "attention", follows=vf.layer if group == 1 else None)
    out_units = torch.arange(out_layer_size)
    g.add_edges(EdgeBlock(vf.layer, att, "value", (out_units // dv // group) * dv + out_units % dv, out_units, None))
    h = torch.arange(heads).repeat_interleave(dq * dv)
    i = torch.arange(dq).repeat_interleave(dv).repeat(heads)
    j = torch.arange(dv).repeat(dq * heads)
    g.add_edges(EdgeBlock(qf.layer, att, "attention", h * dq + i, h * dv + j, None))
    return att


def _h_matmul(g: GraphTrace, name, args, kwargs, out):
    a, b = args[0], args[1]
    if name == "rmatmul":
        a, b = b, a
    fa, fb = g.feat.get(id(a)), g.feat.get(id(b))
    pb = g.key_of(b) is not None or id(b) in g.pderived
    if fa is not None and fb is not None and len(fa.dims) == 2 and len(fb.dims) == 2:
        # scores = q @ k^T: heads are a batch axis, head dims contracted
        if fa.dims[1] == a.dim() - 1 and fb.dims[1] == b.dim() - 2 and fa.dims[0] < a.dim() - 2:
            g.scores[id(out)] = (fa.layer, fb.layer)
            g._keep.append(out)
            return
    if id(a) in g.scores and fb is not None and len(fb.dims) == 2 and fb.dims[1] == b.dim() - 1:
        lq, lk = g.scores[id(a)]
        heads = b.shape[fb.dims[0]]
        g.layers[lq].kind, g.layers[lk].kind, g.layers[fb.layer].kind = "query", "key", "value"
        att = _attention(g, Feat(lq, ()), Feat(lk, ()), fb, heads, g.layers[fb.layer].size)
        g.set_feat(out, Feat(att, fb.dims))
        return
    if fa is not None and pb and b.dim() == 2 and fa.dims == (a.dim() - 1,):
        key, view = (g.key_of(b), b) if g.key_of(b) else g.pderived[id(b)]
        # x @ W^T with W (out, in): the view is the transposed parameter
        if view.dim() == 2 and view.shape == (b.shape[1], b.shape[0]):
            layer = g.new_layer(view.shape[0], "linear", anchor=(key, 0))
            g.param_edges(key, view, fa.layer, layer, 0, 1, "linear", inner=fa.inner)
            g.set_feat(out, Feat(layer, (out.dim() - 1,)))
            return
    g.set_feat(out, None, src=a if fa is not None else b, op=name)


def _h_sdpa(g: GraphTrace, name, args, kwargs, out):
    q, k, v = args[0], args[1], args[2]
    fq, fk, fv = (g.feat.get(id(t)) for t in (q, k, v))
    if None in (fq, fk, fv) or any(len(f.dims) != 2 for f in (fq, fk, fv)):
        raise GraphError(f"scaled_dot_product_attention in {g.where()} on inputs whose head layout is unknown")
    heads, kv_heads = q.shape[fq.dims[0]], k.shape[fk.dims[0]]
    g.layers[fq.layer].kind, g.layers[fk.layer].kind, g.layers[fv.layer].kind = "query", "key", "value"
    att = _attention(g, fq, fk, fv, heads, heads * (g.layers[fv.layer].size // kv_heads), kv_heads)
    g.set_feat(out, Feat(att, fq.dims[:1] + fv.dims[1:]))


def _h_mha(g: GraphTrace, name, args, kwargs, out):
    a = mha_args(args, kwargs)
    if a["bias_k"] is not None or a["bias_v"] is not None:
        raise GraphError(f"nn.MultiheadAttention with add_bias_kv in {g.where()} is not supported by NeuralGraph")
    E, H = int(a["embed_dim_to_check"]), int(a["num_heads"])
    fin = [g.feat_in(a[r], -1, "multi_head_attention") for r in ("query", "key", "value")]
    layers = []
    for role in ("query", "key", "value"):
        layers.append(g.new_layer(E, role, anchor=None))
    if a["use_separate_proj_weight"]:
        for w, f, l in zip((a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]), fin, layers):
            g.layers[l].anchor = (g.key_of(w), 0)
            g.param_edges(g.key_of(w), w, f.layer, l, 0, 1, "linear")
    else:  # packed (3E, d) in_proj: three edge blocks of one parameter
        w = a["in_proj_weight"]
        key = g.key_of(w)
        for r, (f, l) in enumerate(zip(fin, layers)):
            g.layers[l].anchor = (key, 0, r)
            g.param_edges(key, w[r * E:(r + 1) * E], f.layer, l, 0, 1, "linear", offset=r * E * w.shape[1])
    if a["in_proj_bias"] is not None:
        b = a["in_proj_bias"]
        for r, l in enumerate(layers):
            g.node_feature(g.key_of(b), b[r * E:(r + 1) * E], l, 0, "bias", offset=r * E)
    att = _attention(g, Feat(layers[0], ()), Feat(layers[1], ()), Feat(layers[2], ()), H, E)
    ow = a["out_proj_weight"]
    okey = g.key_of(ow)
    out_layer = g.new_layer(ow.shape[0], "linear", anchor=(okey, 0))
    g.param_edges(okey, ow, att, out_layer, 0, 1, "linear")
    if a["out_proj_bias"] is not None:
        g.node_feature(g.key_of(a["out_proj_bias"]), a["out_proj_bias"], out_layer, 0, "bias")
    attn_out = out[0] if isinstance(out, (tuple, list)) else out
    g.set_feat(attn_out, Feat(out_layer, (attn_out.dim() - 1,)))


def _h_cat(g: GraphTrace, name, args, kwargs, out):
    ts = [t for t in arg(args, kwargs, 0, "tensors") if torch.is_tensor(t) and t.numel() > 0]  # e.g. an empty KV cache
    dim = norm_dim(int(arg(args, kwargs, 1, "dim", 0)), out.dim())
    feats = [g.feat.get(id(t)) for t in ts]
    if all(f is not None and f.dims == (dim,) and f.inner == 1 for f in feats):
        new = g.new_layer(out.shape[dim], "concat")
        off = 0
        for f in feats:
            n = g.layers[f.layer].size
            ar = torch.arange(n)
            g.add_edges(EdgeBlock(f.layer, new, "concat", ar, ar + off, None))
            off += n
        g.set_feat(out, Feat(new, (dim,)))
        return
    with_feat = [(t, f) for t, f in zip(ts, feats) if f is not None]
    if with_feat and all(dim not in f.dims for _, f in with_feat) and len({f.layer for _, f in with_feat}) == 1:
        t0, f0 = with_feat[0]
        for t, f in zip(ts, feats):
            if f is None:  # a parameter concatenated along a positional axis (class token)
                key, view = (g.key_of(t), t) if g.key_of(t) else g.pderived.get(id(t), (None, None))
                if key is None:
                    raise GraphError(f"cat in {g.where()} mixes features with a tensor of unknown origin")
                if key not in g.placed:
                    g.node_feature(key, view, f0.layer, view.dim() - 1, f"cat:{key}")
        g.set_feat(out, Feat(f0.layer, f0.dims, f0.inner))
        return
    g.set_feat(out, None, src=next((t for t in ts if id(t) in g.feat), None), op=name)


def _h_split(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    f = g.feat.get(id(x))
    pieces = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
    dim = norm_dim(int(kwargs.get("dim", args[2] if len(args) > 2 else 0)), x.dim())
    if f is None:
        for p in pieces:
            g.set_feat(p, None, src=x, op=name)
        return
    if dim not in f.dims:
        for p in pieces:
            g.set_feat(p, Feat(f.layer, f.dims, f.inner))
        return
    if f.dims != (dim,) or f.inner != 1:
        raise GraphError(f"{name} in {g.where()} splits a structured feature axis")
    off = 0
    for p in pieces:
        n = p.shape[dim]
        new = g.new_layer(n, "split", follows=f.layer)
        ar = torch.arange(n)
        g.add_edges(EdgeBlock(f.layer, new, "split", ar + off, ar, None))
        g.set_feat(p, Feat(new, (dim,)))
        off += n


def _h_neutral(g: GraphTrace, name, args, kwargs, out):
    """``zeros_like``, ``new_ones``...: a fresh tensor that carries no node layer."""


_HANDLERS = {
    "linear": _h_linear,
    "conv1d": _h_conv, "conv2d": _h_conv, "conv3d": _h_conv,
    "conv_transpose1d": _h_conv, "conv_transpose2d": _h_conv, "conv_transpose3d": _h_conv,
    "embedding": _h_embedding,
    "layer_norm": _h_norm, "rms_norm": _h_norm, "batch_norm": _h_norm, "instance_norm": _h_norm, "group_norm": _h_norm,
    "matmul": _h_matmul, "rmatmul": _h_matmul, "bmm": _h_matmul, "addmm": _h_addmm,
    "scaled_dot_product_attention": _h_sdpa,
    "multi_head_attention_forward": _h_mha,
    "cat": _h_cat, "concat": _h_cat, "concatenate": _h_cat,
    "split": _h_split, "chunk": _h_split, "tensor_split": _h_split, "split_with_sizes": _h_split,
    "permute": _h_permute, "transpose": _h_permute, "swapaxes": _h_permute, "swapdims": _h_permute,
    "t": _h_permute, "prop:T": _h_permute, "prop:mT": _h_permute,
    "getitem": _h_getitem,
    "expand": _h_expand, "expand_as": _h_expand, "broadcast_to": _h_expand,
    "contiguous": _h_unary, "clone": _h_unary, "to": _h_unary, "float": _h_unary, "type_as": _h_unary,
}
