"""Follow *feature layers* through one forward run to build a neural computational graph.

Where :mod:`weightspace._trace` follows every dimension to find symmetries, this pass follows the
feature axis of each activation (the last axis of a Linear's output, axis 1 of a conv map) and
records, for every parameter, where its entries go in the graph:

* ``linear``/``conv``/``embedding``: a new layer of nodes; the weight gives one edge per (input unit,
  output unit) pair whose feature vector is the kernel (``kh*kw`` entries for a conv, the ``H*W``
  block of a flattened feature map for a Linear after a flatten, 1 otherwise); the bias is a node
  feature of the output layer;
* normalisations: a new layer joined one-to-one to the normalised layer, with edge value ``gamma``
  and node features ``beta`` (and the running statistics);
* elementwise sums/products of two activations (residual connections, gates) and concatenations: a
  new layer with value-1 edges from each input layer;
* attention: separate query, key and value layers, one-to-one ``qk`` edges pairing each query unit
  with the key unit it is multiplied with, and ``attention`` edges from the query units of head ``h``
  to the output units of head ``h`` (so the number of heads is encoded), value-1 edges from the
  value layer to the output;
* a parameter added or multiplied elementwise (positional embeddings, layer scale, class token):
  node features of the layer it acts on.

The design follows the parameter graphs of Lim et al. (ICLR 2024, "Graph Metanetworks",
arXiv:2312.04501) and the neural graphs of Kofinas et al. (ICLR 2024, arXiv:2403.12143).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from weightspace._trace import (
    _BINARY,
    _IGNORE,
    _NEUTRAL_LIKE,
    _NEUTRAL_NEW,
    _POOL,
    _REDUCE,
    _RESHAPE,
    _UNARY,
    _arg,
    _dims_arg,
    _flatten,
    _expand_index,
    _mha_args,
    _norm_dim,
    _op_name,
    _permute_order,
    _Unsupported,
)

log = logging.getLogger(__name__)


class GraphError(RuntimeError):
    """The model uses an operation on its features that the neural graph cannot represent."""


_ACTIVATIONS = set("relu relu6 gelu tanh sigmoid silu mish sin cos leaky_relu elu selu celu softplus softsign hardtanh hardsigmoid hardswish logsigmoid".split())


@dataclass
class Layer:
    """A set of nodes: the units of one feature axis at one point of the forward pass."""

    size: int
    kind: str  # input | linear | conv | embedding | norm | sum | product | concat | split | query | key | value | attention
    name: str
    anchor: Optional[Tuple[str, int]] = None  # (param key, axis) whose spec layout permutes these nodes
    follows: Optional[int] = None  # layer id whose permutation these nodes share
    activation: str = ""
    offset: int = 0  # first global node id


@dataclass
class Feat:
    """Where a tensor's units live: ``layer`` indexed row-major by tensor ``dims``, each unit owning
    ``inner`` consecutive entries of the last of those dims (a flattened feature map)."""

    layer: int
    dims: Tuple[int, ...]
    inner: int = 1


@dataclass
class EdgeBlock:
    """Edges from ``src_layer`` to ``dst_layer``. ``src``/``dst`` index units within the layers; a
    complete bipartite block (``dense = (n_out, n_in, groups)``) leaves them implicit: edge
    ``o * n_in + i`` joins input ``i`` (offset by its group) to output ``o``."""

    src_layer: int
    dst_layer: int
    kind: str
    src: Optional[torch.Tensor]  # (E,) node index within the source layer
    dst: Optional[torch.Tensor]  # (E,) node index within the destination layer
    values: Optional[torch.Tensor] = None  # (E, k) or None for value-1 structural edges
    key: Optional[str] = None
    entries: Any = None  # values.reshape(-1)[t] == param.reshape(-1)[entries[t]] (a LongTensor or a slice)
    dense: Optional[Tuple[int, int, int]] = None

    @property
    def num(self) -> int:
        return self.dense[0] * self.dense[1] if self.dense else int(self.src.numel())

    def fill_index(self, out_src: torch.Tensor, out_dst: torch.Tensor, src_off: int, dst_off: int) -> None:
        """Write global source/target node ids into the (E,) views ``out_src``/``out_dst``."""
        if self.dense is None:
            out_src.copy_(self.src + src_off)
            out_dst.copy_(self.dst + dst_off)
            return
        n_out, n_in, groups = self.dense
        o = torch.arange(n_out).unsqueeze(1)
        src = torch.arange(n_in).unsqueeze(0) + src_off
        if groups > 1:  # grouped conv: input unit = group * (C_in / g) + i
            src = src + (o // (n_out // groups)) * n_in
        out_src.view(n_out, n_in).copy_(src.expand(n_out, n_in))
        out_dst.view(n_out, n_in).copy_((o + dst_off).expand(n_out, n_in))

    def endpoints(self) -> Tuple[torch.Tensor, torch.Tensor]:
        s, d = torch.empty(self.num, dtype=torch.long), torch.empty(self.num, dtype=torch.long)
        self.fill_index(s, d, 0, 0)
        return s, d


@dataclass
class NodeFeature:
    layer: int
    name: str
    values: torch.Tensor  # (layer size, k)
    key: Optional[str] = None
    entries: Optional[torch.Tensor] = None  # values.reshape(-1)[t] == param.reshape(-1)[entries[t]]


class GraphTrace(TorchFunctionMode):
    def __init__(self, keys_by_id: Dict[int, List[str]], tensors: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.keys_by_id = keys_by_id
        self.tensors = tensors
        self.layers: List[Layer] = []
        self.edges: List[EdgeBlock] = []
        self.node_feats: List[NodeFeature] = []
        self.feat: Dict[int, Feat] = {}
        self.scores: Dict[int, Tuple[int, int]] = {}  # attention scores tensor -> (query layer, key layer)
        self.pderived: Dict[int, Tuple[str, torch.Tensor]] = {}  # tensor -> (param key, param-shaped view)
        self.lost: Dict[int, str] = {}
        self.placed: set = set()
        self.unsupported: Dict[str, str] = {}
        self.module_stack: List[str] = []
        self._keep: List[Any] = []

    # -- helpers --------------------------------------------------------------------------------
    def key_of(self, t: Any) -> Optional[str]:
        if torch.is_tensor(t) and id(t) in self.keys_by_id:
            return self.keys_by_id[id(t)][0]
        return None

    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<top level>"

    def new_layer(self, size: int, kind: str, anchor=None, follows=None) -> int:
        self.layers.append(Layer(int(size), kind, self.where(), anchor, follows))
        return len(self.layers) - 1

    def set_feat(self, t: torch.Tensor, f: Optional[Feat], src: Any = None, op: str = "") -> None:
        self._keep.append(t)
        if f is None:
            self.feat.pop(id(t), None)
            if src is not None and (id(src) in self.feat or id(src) in self.lost):
                self.lost[id(t)] = self.lost.get(id(src), f"{op} in {self.where()}")
        else:
            self.feat[id(t)] = f

    def feat_in(self, x: torch.Tensor, dim: int, op: str) -> Feat:
        """The layer of ``x``'s feature axis ``dim``; model inputs get an input layer on first use."""
        f = self.feat.get(id(x))
        d = _norm_dim(dim, x.dim())
        if f is None:
            if id(x) in self.lost:
                raise GraphError(
                    f"{op} in {self.where()} consumes features that passed through {self.lost[id(x)]}, which the "
                    "neural graph cannot follow; supported: elementwise ops, reshapes, pooling, concatenation, "
                    "attention, normalisations"
                )
            f = Feat(self.new_layer(x.shape[d], "input"), (d,))
            self.feat[id(x)] = f
            self._keep.append(x)
        # units spread over several axes (heads x head_dim) must be the contiguous axes ending at d
        if f.dims != tuple(range(d - len(f.dims) + 1, d + 1)):
            raise GraphError(f"{op} in {self.where()} acts on an axis that is not the feature axis of its input")
        return f

    def add_edges(self, block: EdgeBlock) -> None:
        self.edges.append(block)
        if block.key:
            self.placed.add(block.key)

    def add_node_feature(self, nf: NodeFeature) -> None:
        self.node_feats.append(nf)
        if nf.key:
            self.placed.add(nf.key)

    def param_edges(self, key: str, w: torch.Tensor, src_l: int, dst_l: int, out_axis: int, in_axis: int, kind: str,
                    inner: int = 1, groups: int = 1, offset: int = 0) -> None:
        """Edges for a weight whose ``out_axis`` indexes ``dst_l`` and ``in_axis`` (in units of
        ``inner`` entries) indexes ``src_l``; the remaining axes and ``inner`` form the edge vector.
        ``offset`` is the position of ``w``'s first entry in the stored parameter (packed weights)."""
        perm = [out_axis, in_axis] + [a for a in range(w.dim()) if a not in (out_axis, in_axis)]
        n_out, n_in = w.shape[out_axis], w.shape[in_axis] // inner
        k = w.numel() // max(n_out * n_in, 1)
        if perm == list(range(w.dim())):  # storage order already is edge order
            entries: Any = slice(offset, offset + w.numel())
        else:
            entries = torch.arange(w.numel()).reshape(w.shape).permute(perm).reshape(-1) + offset
        vals = w.detach().permute(perm).reshape(n_out * n_in, k)  # a view: copied once into the graph
        self.add_edges(EdgeBlock(src_l, dst_l, kind, None, None, vals, key, entries, dense=(n_out, n_in, groups)))

    def node_feature(self, key: str, p: torch.Tensor, layer: int, axis: int, name: str, offset: int = 0) -> None:
        if p.shape[axis] != self.layers[layer].size:
            raise GraphError(f"parameter {key!r} axis {axis} has size {p.shape[axis]} but the layer it describes has {self.layers[layer].size} units")
        perm = [axis] + [a for a in range(p.dim()) if a != axis]
        n = p.shape[axis]
        vals = p.detach().permute(perm).reshape(n, -1).clone()
        if axis == 0:
            entries: Any = slice(offset, offset + p.numel())
        else:
            entries = torch.arange(p.numel()).reshape(p.shape).permute(perm).reshape(-1) + offset
        self.add_node_feature(NodeFeature(layer, name, vals, key, entries))

    def identity_edges(self, src: int, dst: int, kind: str) -> None:
        """Value-1 edges joining unit i of ``src`` to unit i of ``dst``."""
        ar = torch.arange(self.layers[dst].size)
        self.add_edges(EdgeBlock(src, dst, kind, ar, ar, None))

    def pass_derived(self, x: Any, out: Any) -> bool:
        """If ``x`` is a parameter seen through a view (``W.t()``, ``pos.unsqueeze(0)``), let ``out`` be
        one too; True when it was."""
        if id(x) not in self.pderived:
            return False
        self.pderived[id(out)] = self.pderived[id(x)]
        self._keep.append(out)
        return True

    # -- dispatch -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _IGNORE:
            return out
        tin = [a for a in _flatten((args, kwargs)) if torch.is_tensor(a)]
        if not any(id(t) in self.feat or id(t) in self.keys_by_id or id(t) in self.pderived or id(t) in self.lost or id(t) in self.scores for t in tin):
            return out
        handler = _HANDLERS.get(name)
        if handler is None:
            if name in _UNARY or name in ("softmax", "log_softmax", "normalize", "prop:data"):
                handler = _h_unary
            elif name in _BINARY or name in ("max", "min") and len(args) > 1 and torch.is_tensor(args[1]):
                handler = _h_binary
            elif name in _REDUCE:
                handler = _h_reduce
            elif _POOL.match(name) or name in ("interpolate", "upsample"):
                handler = _h_pool
            elif name in _RESHAPE:
                handler = _h_reshape
            elif name in _NEUTRAL_LIKE or name in _NEUTRAL_NEW:
                return out
        if handler is None:
            for t in tin:
                k = self.key_of(t)
                if k is not None and k not in self.placed:
                    self.unsupported.setdefault(k, f"{name} in {self.where()}")
            for o in _flatten(out):
                if torch.is_tensor(o):
                    self.set_feat(o, None, src=next((t for t in tin if id(t) in self.feat or id(t) in self.lost), None), op=name)
            return out
        handler(self, name, args, kwargs, out)
        return out


# ---------------------------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------------------------
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
    tensors = [a for a in _flatten((args, kwargs)) if torch.is_tensor(a)]
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
            raise GraphError(f"parameter {key!r} is combined with features in {g.where()} along an axis the graph cannot place")
        if key in g.placed:
            continue
        vpd = pd - (p.dim() - view.dim())
        if vpd < 0 or view.shape[vpd] != g.layers[res.layer].size:
            raise GraphError(f"parameter {key!r} is combined with features in {g.where()} through a reshape the graph cannot place")
        g.node_feature(key, view, res.layer, vpd, f"{'add' if name in ('add', 'sub') else 'scale'}:{key}")
    g.set_feat(out, res)


def _h_reduce(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    f = g.feat.get(id(x))
    outs = [o for o in _flatten(out) if torch.is_tensor(o)]
    if f is None:
        for o in outs:
            g.set_feat(o, None, src=x, op=name)
        return
    pos = 2 if name in ("norm", "vector_norm") else 1
    dim = _arg(args, kwargs, pos, "dim")
    keep = bool(_arg(args, kwargs, pos + 1, "keepdim", False)) if name not in ("var", "std") else bool(kwargs.get("keepdim", False))
    red = _dims_arg(dim, x.dim()) if not (name in ("var", "std") and isinstance(dim, bool)) else list(range(x.dim()))
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
    m = _POOL.match(name)
    spatial = int(m.group(3) or name[-2]) if m else x.dim() - 2
    keep = f if f is not None and max(f.dims) < x.dim() - spatial and f.inner == 1 else None
    for o in _flatten(out):
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
    order = _permute_order(name, args, kwargs, x.dim())
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
        idx = _expand_index(idx, x.dim())
    except _Unsupported:
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
    if key is None or id(x) not in g.feat or w.dim() != 2:
        return _h_matmul(g, "matmul", (x, w), {}, out) if key is None else g.set_feat(out, None, src=x, op=name)
    f = g.feat_in(x, -1, name)
    _anchor_by_consumer(g, f, key, 0)
    layer = g.new_layer(w.shape[1], "linear", anchor=(key, 1))
    g.param_edges(key, w, f.layer, layer, 1, 0, "linear", inner=f.inner)
    if g.key_of(c) is not None and c.dim() == 1:
        g.node_feature(g.key_of(c), c, layer, 0, "bias")
    g.set_feat(out, Feat(layer, (out.dim() - 1,)))


def _h_linear(g: GraphTrace, name, args, kwargs, out):
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
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
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    groups = _arg(args, kwargs, 6, "groups", 1)
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
    idx, w = args[0], _arg(args, kwargs, 1, "weight")
    key = g.key_of(w)
    vocab = g.new_layer(w.shape[0], "input")
    layer = g.new_layer(w.shape[1], "embedding", anchor=(key, 1))
    g.param_edges(key, w, vocab, layer, 1, 0, "embedding")
    g.set_feat(out, Feat(layer, (out.dim() - 1,)))


def _h_norm(g: GraphTrace, name, args, kwargs, out):
    x = args[0]
    if name in ("layer_norm", "rms_norm"):
        shape = _arg(args, kwargs, 1, "normalized_shape")
        if len(shape) != 1:
            raise GraphError(f"{name} over several axes in {g.where()} is not supported by NeuralGraph")
        f = g.feat_in(x, -1, name)
        w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        stats = {}
    elif name == "group_norm":
        f = g.feat_in(x, 1, name)
        w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        stats = {}
    else:  # batch_norm / instance_norm
        f = g.feat_in(x, 1 if x.dim() > 1 else 0, name)
        w, b = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
        stats = {"running_mean": _arg(args, kwargs, 1, "running_mean"), "running_var": _arg(args, kwargs, 2, "running_var")}
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


def _attention(g: GraphTrace, qf: Feat, kf: Feat, vf: Feat, heads: int, out_layer_size: int, kv_heads: Optional[int] = None) -> int:
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
    pa, pb = (g.key_of(a) or id(a) in g.pderived), (g.key_of(b) or id(b) in g.pderived)
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
    a = _mha_args(args, kwargs)
    if a["bias_k"] is not None or a["bias_v"] is not None:
        raise GraphError(f"nn.MultiheadAttention with add_bias_kv in {g.where()} is not supported by NeuralGraph")
    E, H = int(a["embed_dim_to_check"]), int(a["num_heads"])
    fin = [g.feat_in(a[r], -1, "multi_head_attention") for r in ("query", "key", "value")]
    layers = []
    for i, role in enumerate(("query", "key", "value")):
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
    ts = [t for t in _arg(args, kwargs, 0, "tensors") if torch.is_tensor(t) and t.numel() > 0]  # e.g. an empty KV cache
    dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), out.dim())
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
    pieces = [o for o in _flatten(out) if torch.is_tensor(o)]
    dim = _norm_dim(int(kwargs.get("dim", args[2] if len(args) > 2 else 0)), x.dim())
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
