"""Follow *feature layers* through one forward run to build a neural computational graph.

Where :mod:`weightspace.symmetry._trace` follows every dimension to find symmetries, this pass follows the
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
from typing import Any, Dict, List, Optional, Tuple

import torch

from weightspace.graph._ir import EdgeBlock, Feat, GraphError, Layer, NodeFeature
from weightspace.graph._rules import _HANDLERS, _h_binary, _h_neutral, _h_pool, _h_reduce, _h_reshape, _h_unary
from weightspace.tracing import TracingMode, flatten_tensors, norm_dim

log = logging.getLogger(__name__)

__all__ = ["GraphTrace", "GraphError", "Layer", "Feat", "EdgeBlock", "NodeFeature"]


class GraphTrace(TracingMode):
    """Follows node layers through a forward run (see the module docstring)."""

    rules = {**_HANDLERS, **{n: _h_unary for n in ("softmax", "log_softmax", "normalize", "prop:data")},
             "interpolate": _h_pool, "upsample": _h_pool}
    category_rules = {"unary": _h_unary, "binary": _h_binary, "reduce": _h_reduce, "pool": _h_pool,
                      "reshape": _h_reshape, "neutral": _h_neutral}

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
        d = norm_dim(dim, x.dim())
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
            raise GraphError(f"parameter {key!r} axis {axis} has size {p.shape[axis]} but the layer it describes has "
                             f"{self.layers[layer].size} units")
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
    def handle(self, name, func, args, kwargs):
        out = func(*args, **kwargs)
        tin = [a for a in flatten_tensors((args, kwargs)) if torch.is_tensor(a)]
        tracked = (self.feat, self.keys_by_id, self.pderived, self.lost, self.scores)
        if not any(id(t) in d for t in tin for d in tracked):
            return out
        handler = self.rule_for(name)
        if handler is None and name in ("max", "min") and len(args) > 1 and torch.is_tensor(args[1]):
            handler = _h_binary  # elementwise max/min of two tensors
        if handler is None:
            for t in tin:
                k = self.key_of(t)
                if k is not None and k not in self.placed:
                    self.unsupported.setdefault(k, f"{name} in {self.where()}")
            for o in flatten_tensors(out):
                if torch.is_tensor(o):
                    self.set_feat(o, None, src=next((t for t in tin if id(t) in self.feat or id(t) in self.lost), None),
                                  op=name)
            return out
        handler(self, name, args, kwargs, out)
        return out
