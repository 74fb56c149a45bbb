"""Dimension rules of layers: linear maps, matmul/einsum, convolutions, pooling, normalisations,
embeddings and attention (see :mod:`weightspace.symmetry._rules` for the conventions)."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import torch

from weightspace.tracing import POOL, Unsupported, arg, flatten_tensors, mha_args
from weightspace.symmetry._rules import _broadcast


def _linear(tr, name, args, kwargs, out):
    x, w = args[0], arg(args, kwargs, 1, "weight")
    b = arg(args, kwargs, 2, "bias")
    xs, ws = tr.of(x), tr.of(w)
    if w.dim() != 2:
        raise Unsupported("linear weight is not 2-D")
    tr.union(xs[-1], ws[1])
    if b is not None:
        tr.union(tr.of(b)[0], ws[0])
    tr.set_out(out, xs[:-1] + [ws[0]])


def _matmul_nodes(tr, a, b) -> List[int]:
    an, bn = tr.of(a), tr.of(b)
    if a.dim() == 0 or b.dim() == 0:
        raise Unsupported("0-d matmul")
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
            raise Unsupported("batch dims do not broadcast")
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
        raise Unsupported("einsum with sublist format")
    eq = eq.replace(" ", "")
    lhs, rhs = (eq.split("->") + [None])[:2]
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise Unsupported("einsum operand count")
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
            raise Unsupported("einsum rank")
        expanded.append(labels)
        for lab, n, s in zip(labels, tr.of(o), o.shape):
            letters[lab].append((n, s))
    rep: Dict[str, int] = {}
    for lab, members in letters.items():
        big = [n for n, s in members if s != 1]
        sizes = {s for _, s in members if s != 1}
        if len(sizes) > 1:
            raise Unsupported("einsum size mismatch")
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
    x, w = args[0], arg(args, kwargs, 1, "weight")
    b = arg(args, kwargs, 2, "bias")
    transposed = "transpose" in name
    groups = arg(args, kwargs, 6, "groups", 1)  # position 6 in conv*d and conv_transpose*d alike
    k = w.dim() - 2
    if x.dim() not in (k + 1, k + 2):
        raise Unsupported("conv input rank")
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
    m = POOL.match(name)
    k = int(m.group(3) or name[-2])
    x = args[0]
    xs = tr.of(x)
    lead = x.dim() - k
    res = xs[:lead]
    outs = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
    for o in outs:
        tr.set_out(o, res + [tr.fresh(s, True) for s in o.shape[lead:]])


def _interpolate(tr, name, args, kwargs, out):
    x = args[0]
    xs = tr.of(x)
    tr.set_out(out, xs[:2] + [tr.fresh(s, True) for s in out.shape[2:]])


def _pad(tr, name, args, kwargs, out):
    x, pad = args[0], arg(args, kwargs, 1, "pad")
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
    shape = arg(args, kwargs, 1, "normalized_shape")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
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
    for t in flatten_tensors((args[1:], kwargs)):
        if torch.is_tensor(t):
            if t.dim() != 1:
                raise Unsupported("batch norm statistic is not 1-D")
            tr.union(tr.of(t)[0], c)
    tr.set_out(out, xs)


def _group_norm(tr, name, args, kwargs, out):
    x, G = args[0], arg(args, kwargs, 1, "num_groups")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
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
    idx, w = args[0], arg(args, kwargs, 1, "weight")
    ws = tr.of(w)
    tr.uf.fix(ws[0])  # rows are addressed by token ids
    tr.set_out(out, tr.of(idx) + [ws[1]])


def _sdpa(tr, name, args, kwargs, out):
    q, k, v = args[0], args[1], args[2]
    mask = arg(args, kwargs, 3, "attn_mask")
    causal = arg(args, kwargs, 5, "is_causal", False)
    if q.dim() < 3 or q.shape[:-3] != k.shape[:-3] or k.shape[:-2] != v.shape[:-2]:
        raise Unsupported("mismatched batch dims")
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv and not (arg(args, kwargs, 7, "enable_gqa", False) and hq % hkv == 0):
        raise Unsupported("query and key head counts differ without enable_gqa")
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


def _mha(tr, name, args, kwargs, out):
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): heads x head_dim structure."""
    a = mha_args(args, kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    if a["static_k"] is not None or a["static_v"] is not None:
        raise Unsupported("static keys/values")
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
        for role, w, xd in (("q", a["q_proj_weight"], qd), ("k", a["k_proj_weight"], kd),
                            ("v", a["v_proj_weight"], vd)):
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
    tr._touch(*[t for t in flatten_tensors((args, kwargs)) if torch.is_tensor(t)])


_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _rnn(tr, name, args, kwargs, out):
    """``_VF.lstm/gru/rnn_*`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): per layer and direction, the rows of
    ``W_ih``, ``W_hh`` and the biases are ``gates`` blocks of the hidden units, ``W_hh``'s columns are the
    hidden units, and ``W_ih``'s columns are the layer's input. With one layer and one direction the
    hidden units form their own group; with several, the final states ``h_n``/``c_n`` stack every
    layer's units on one axis, so all layers share one hidden permutation (a subgroup of the symmetry)."""
    if len(args) < 9 or not isinstance(args[2], (list, tuple)):
        raise Unsupported("packed sequences")
    x, hx, weights, has_bias, num_layers, _, _, bidirectional, _ = args[:9]
    gates, D, per = _GATES[name], 2 if bidirectional else 1, 4 if has_bias else 2
    if len(weights) != num_layers * D * per:
        raise Unsupported("recurrent projections (proj_size)")
    H = weights[1].shape[1]
    shared = tr.fresh(H, False)
    hidden = [[shared if num_layers * D > 1 else tr.fresh(H, False) for _ in range(D)] for _ in range(num_layers)]
    layer_in = tr.of(x)[-1]
    for layer in range(num_layers):
        for d in range(D):
            w = weights[(layer * D + d) * per:(layer * D + d + 1) * per]
            rows = tr.fresh(gates * H, False)
            tr.uf.set_layout(rows, "concat", [hidden[layer][d]] * gates)
            w_ih, w_hh = tr.of(w[0]), tr.of(w[1])
            tr.union(w_ih[0], rows)
            tr.union(w_ih[1], layer_in)
            tr.union(w_hh[0], rows)
            tr.union(w_hh[1], hidden[layer][d])
            for b in w[2:]:
                tr.union(tr.of(b)[0], rows)
        layer_out = hidden[layer][0]
        if D == 2:
            layer_out = tr.fresh(2 * H, False)
            tr.uf.set_layout(layer_out, "concat", hidden[layer])
        layer_in = layer_out
    for h in ([hx] if torch.is_tensor(hx) else list(hx)):  # initial states: (layers * directions, batch, H)
        hs = tr.of(h)
        tr.union(hs[-1], hidden[0][0] if num_layers * D == 1 else shared)
    output, *states = [o for o in flatten_tensors(out) if torch.is_tensor(o)]
    tr.set_out(output, tr.of(x)[:-1] + [layer_in])
    for s in states:
        tr.set_out(s, [tr.fresh(n, True) for n in s.shape[:-1]] + [hidden[0][0] if num_layers * D == 1 else shared])
