"""Neural computational graphs: neurons are nodes, parameters are edges.

``NeuralGraph.from_model(model, example_inputs)`` follows one forward run (see
:mod:`weightspace.graph._trace`) and builds a directed graph in which

* every unit of every layer is a node -- input units, hidden units and output units -- with a node
  type, a layer index and its position in the layer;
* a weight is one edge per (input unit, output unit) pair, whose feature vector is the kernel
  (``kh*kw`` entries for a conv, the ``H*W`` block of a flattened map for a Linear after a flatten,
  one entry otherwise); biases and normalisation shifts and statistics are node features;
* residual additions, concatenations and normalisations add layers joined by value-1 (or ``gamma``)
  edges, and attention adds query/key/value layers with ``qk`` and per-head ``attention`` edges.

Every parameter entry is stored exactly once, so ``to_state_dict`` inverts the construction exactly,
and permuting the model only relabels nodes (``node_permutation`` gives the relabelling).
Graph conventions follow Lim et al. (ICLR 2024, arXiv:2312.04501) and Kofinas et al. (ICLR 2024,
arXiv:2403.12143).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from weightspace.checks import check_inputs, check_module
from weightspace.graph._ir import EdgeBlock, GraphError, Layer, NodeFeature
from weightspace.graph._trace import GraphTrace
from weightspace.symmetry import PermutationSpec
from weightspace.tracing import flatten_tensors, tensor_keys, traced_run

log = logging.getLogger(__name__)

__all__ = ["NeuralGraph", "GraphTensors", "GraphError"]

NODE_TYPES = ("input", "linear", "conv", "embedding", "norm", "sum", "product", "concat", "split", "query", "key",
              "value", "attention", "output")
EDGE_TYPES = ("linear", "conv", "embedding", "norm", "residual", "gate", "concat", "split", "qk", "attention", "value")


@dataclass(frozen=True)
class GraphTensors:
    """Batched tensor form for graph networks (PyG-style).

    x : (N, F) node features (columns named by ``node_feature_names``, zero where absent);
    edge_index : (2, E) source and target node ids; edge_attr : (E, K) edge features (zero-padded);
    node_type, edge_type : (N,), (E,) indices into ``NODE_TYPES`` / ``EDGE_TYPES``;
    layer : (N,) layer index within its graph; position : (N,) unit index within its layer;
    depth : (N,) topological depth of the node's layer; batch : (N,) graph index of each node.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    node_type: torch.Tensor
    edge_type: torch.Tensor
    layer: torch.Tensor
    position: torch.Tensor
    depth: torch.Tensor
    batch: torch.Tensor
    node_feature_names: Tuple[str, ...]
    num_graphs: int


class NeuralGraph:
    """A model as a computational graph of neurons (see the module docstring)."""

    def __init__(self, layers: List[Layer], edges: List[EdgeBlock], node_feats: List[NodeFeature],
                 extras: Dict[str, torch.Tensor], meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
                 info: Dict[str, Any]):
        self.layers = layers
        off = 0
        for l in layers:
            l.offset = off
            off += l.size
        self.num_nodes = off
        self._edges = edges
        self._node_feats = node_feats
        self.extras = extras
        self._meta = meta
        self.info = info
        # node feature columns: one slot per name, as wide as its widest block
        widths: Dict[str, int] = {}
        for nf in node_feats:
            widths[nf.name] = max(widths.get(nf.name, 0), nf.values.shape[1])
        self._cols: Dict[str, Tuple[int, int]] = {}
        c = 0
        for name, w in widths.items():
            self._cols[name] = (c, w)
            c += w
        self.node_feature_names = tuple(f"{n}[{i}]" if w > 1 else n
                                        for n, (_, w) in self._cols.items() for i in range(w))
        self.x = torch.zeros(self.num_nodes, c, dtype=torch.float64)
        for nf in node_feats:
            l = layers[nf.layer]
            c0, _ = self._cols[nf.name]
            self.x[l.offset:l.offset + l.size, c0:c0 + nf.values.shape[1]] = nf.values.double()
        K = max([e.values.shape[1] for e in edges if e.values is not None] + [1])
        E = sum(e.num for e in edges)
        dtype = torch.float32  # the widest floating dtype of the stored weights: holds each exactly
        for e in edges:
            if e.values is not None and e.values.is_floating_point():
                dtype = torch.promote_types(dtype, e.values.dtype)
        self.edge_attr = torch.empty(E, K, dtype=dtype)
        if K > 1:
            self.edge_attr[:, 1:].zero_()
        self.edge_index = torch.empty(2, E, dtype=torch.long)
        self.edge_type = torch.empty(E, dtype=torch.long)
        self._edge_rows: List[Tuple[int, int, int]] = []
        e0 = 0
        for e in edges:
            n = e.num
            e.fill_index(self.edge_index[0, e0:e0 + n], self.edge_index[1, e0:e0 + n], layers[e.src_layer].offset,
                         layers[e.dst_layer].offset)
            self.edge_type[e0:e0 + n] = EDGE_TYPES.index(e.kind)
            width = 1 if e.values is None else e.values.shape[1]
            if e.values is None:
                self.edge_attr[e0:e0 + n, 0] = 1.0
            else:
                self.edge_attr[e0:e0 + n, :width] = e.values
                e.values = None  # the graph holds its own copy; do not keep the model's tensors alive
            self._edge_rows.append((e0, n, width))
            e0 += n
        empty = torch.zeros(0, dtype=torch.long)
        self.node_layer = torch.cat([torch.full((l.size,), i, dtype=torch.long)
                                     for i, l in enumerate(layers)]) if layers else empty
        self.node_position = torch.cat([torch.arange(l.size) for l in layers]) if layers else empty.clone()
        self.node_type = torch.cat([torch.full((l.size,), NODE_TYPES.index(l.kind), dtype=torch.long)
                                    for l in layers]) if layers else empty.clone()
        self.layer_depth = self._depths()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: torch.nn.Module, example_inputs: Any) -> "NeuralGraph":
        """Trace ``model`` once on ``example_inputs`` (eval mode, no gradients; the model is not changed)."""
        check_module(model, where="NeuralGraph.from_model")
        check_inputs(example_inputs, where="NeuralGraph.from_model")
        by_id, tensors, persistent = tensor_keys(model)
        g = GraphTrace({i: ks for i, ks in by_id.items()}, tensors)
        try:
            out = traced_run(model, example_inputs, g, g.module_stack)
        except GraphError:
            raise
        except Exception as exc:
            raise GraphError(f"running the model on the example inputs failed in {g.where()}: {type(exc).__name__}: "
                             f"{exc}") from exc
        for t in flatten_tensors(out):
            f = g.feat.get(id(t))
            if f is not None and g.layers[f.layer].kind not in ("input",):
                g.layers[f.layer].kind = "output" if g.layers[f.layer].kind in ("linear", "conv", "norm", "sum",
                                                                                "attention") else g.layers[f.layer].kind
        state = {k: tensors[k] for k in tensors if k in persistent}
        extras = {k: v.detach().clone() for k, v in state.items() if k not in g.placed}
        for k in extras:
            if k in g.unsupported:
                log.warning("NeuralGraph: parameter %s is used by %s, which the graph does not represent; it is kept "
                            "verbatim in graph.extras", k, g.unsupported[k])
        meta = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        info = {"unsupported": dict(g.unsupported), "extras": sorted(extras)}
        nfs = [nf for nf in g.node_feats if nf.key is None or nf.key in persistent]
        return cls(g.layers, g.edges, nfs, extras, meta, info)

    def _depths(self) -> torch.Tensor:
        depth = [0] * len(self.layers)
        preds: Dict[int, List[int]] = {i: [] for i in range(len(self.layers))}
        for e in self._edges:
            if e.kind != "qk":
                preds[e.dst_layer].append(e.src_layer)
        for i in range(len(self.layers)):  # layers are created in execution order: sources come first
            depth[i] = max([depth[p] + 1 for p in preds[i] if p < i] + [0])
        return torch.tensor(depth, dtype=torch.long)

    # -- views ----------------------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to_state_dict(self) -> Dict[str, torch.Tensor]:
        """Rebuild the state dict from the graph's node and edge features (exact round trip)."""
        flat = {k: torch.empty(math.prod(shape),
                               dtype=dtype) for k, (shape, dtype) in self._meta.items() if k not in self.extras}
        filled = {k: torch.zeros(v.numel(), dtype=torch.bool) for k, v in flat.items()}
        for e, (e0, n, k) in zip(self._edges, self._edge_rows):
            if e.key is None or e.key not in flat:
                continue
            flat[e.key][e.entries] = self.edge_attr[e0:e0 + n, :k].reshape(-1).to(flat[e.key].dtype)
            filled[e.key][e.entries] = True
        for nf in self._node_feats:
            if nf.key is None or nf.key not in flat:
                continue
            l = self.layers[nf.layer]
            c0, _ = self._cols[nf.name]
            flat[nf.key][nf.entries] = self.x[l.offset:l.offset + l.size,
                                              c0:c0 + nf.values.shape[1]].reshape(-1).to(flat[nf.key].dtype)
            filled[nf.key][nf.entries] = True
        out: Dict[str, torch.Tensor] = {}
        for key, (shape, _dtype) in self._meta.items():
            if key in self.extras:
                out[key] = self.extras[key].clone()
                continue
            if not bool(filled[key].all()):
                raise GraphError(f"the graph does not hold every entry of {key!r}; it cannot be rebuilt")
            out[key] = flat[key].reshape(shape)
        return out

    def to_tensors(self) -> GraphTensors:
        """This graph as batched tensors (a batch of one)."""
        return NeuralGraph.batch([self])

    @staticmethod
    def batch(graphs: Sequence["NeuralGraph"]) -> GraphTensors:
        """Many graphs in one batch: node ids offset per graph, feature columns aligned by name."""
        if not graphs:
            raise ValueError("batch() needs at least one graph")
        names: List[str] = []
        for g in graphs:
            names += [n for n in g.node_feature_names if n not in names]
        K = max(g.edge_attr.shape[1] for g in graphs)
        xs, eis, eas, nts, ets, ls, ps, ds, bs = [], [], [], [], [], [], [], [], []
        off = 0
        for i, g in enumerate(graphs):
            x = torch.zeros(g.num_nodes, len(names), dtype=torch.float64)
            for j, n in enumerate(g.node_feature_names):
                x[:, names.index(n)] = g.x[:, j]
            xs.append(x)
            eis.append(g.edge_index + off)
            ea = torch.zeros(g.num_edges, K, dtype=g.edge_attr.dtype)
            ea[:, :g.edge_attr.shape[1]] = g.edge_attr
            eas.append(ea)
            nts.append(g.node_type)
            ets.append(g.edge_type)
            ls.append(g.node_layer)
            ps.append(g.node_position)
            ds.append(g.layer_depth[g.node_layer])
            bs.append(torch.full((g.num_nodes,), i, dtype=torch.long))
            off += g.num_nodes
        return GraphTensors(torch.cat(xs), torch.cat(eis, 1), torch.cat(eas), torch.cat(nts), torch.cat(ets),
                            torch.cat(ls), torch.cat(ps), torch.cat(ds), torch.cat(bs), tuple(names), len(graphs))

    def to_networkx(self):
        """A ``networkx.DiGraph``: node attributes ``layer``, ``position`` (the unit's index for input
        and output units, -1 for hidden units, whose order is arbitrary), ``type``, ``depth``,
        ``activation`` and one attribute per node feature; edge attributes ``type`` and ``value``
        (a float, or a tuple for vector edges such as conv kernels)."""
        import networkx as nx

        G = nx.DiGraph()
        x = self.x.tolist()
        for n in range(self.num_nodes):
            li = int(self.node_layer[n])
            io = self.layers[li].kind in ("input", "output")
            attrs = {"layer": li, "position": int(self.node_position[n]) if io else -1, "type": self.layers[li].kind,
                     "depth": int(self.layer_depth[li]), "activation": self.layers[li].activation}
            attrs.update({name: x[n][j] for j, name in enumerate(self.node_feature_names)})
            G.add_node(n, **attrs)
        ea = self.edge_attr
        for e, (e0, n, width) in zip(self._edges, self._edge_rows):
            vals = ea[e0:e0 + n, :width].tolist()
            src = self.edge_index[0, e0:e0 + n].tolist()
            dst = self.edge_index[1, e0:e0 + n].tolist()
            for s, d, v in zip(src, dst, vals):
                if G.has_edge(s, d):
                    raise GraphError(f"two edges join nodes {s} and {d} ({G.edges[s, d]['type']} and {e.kind})")
                G.add_edge(s, d, type=e.kind, value=v[0] if width == 1 else tuple(v))
        return G

    # -- symmetry -------------------------------------------------------------------------------
    def node_permutation(self, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``m`` with node ``n`` of the permuted model's graph equal to node ``m[n]`` of this graph.

        For ``model_p = ws.permute(model, spec, perms)``: ``NeuralGraph.from_model(model_p).x ==
        graph.x[m]``, and every edge ``(s, d)`` of the permuted graph is the edge ``(m[s], m[d])`` here.
        """
        per: List[torch.Tensor] = []
        for i, l in enumerate(self.layers):
            p = self._layer_perm(i, spec, perms, per)
            if p.numel() != l.size or not torch.equal(torch.sort(p).values, torch.arange(l.size)):
                raise GraphError(f"layer {i} ({l.kind} in {l.name!r}) gets no valid relabelling from the spec; was the "
                                 "spec made for this model?")
            per.append(p)
        return torch.cat([p + l.offset for p, l in zip(per, self.layers)]) if per else torch.zeros(0, dtype=torch.long)

    def _layer_perm(self, i: int, spec: PermutationSpec, perms, done: List[torch.Tensor]) -> torch.Tensor:
        l = self.layers[i]
        if l.anchor is not None:
            key, axis = l.anchor[0], l.anchor[1]
            lay = spec.axes.get(key, (None,) * (axis + 1))[axis]
            if lay is not None and len(l.anchor) == 3:
                lay = lay.parts[l.anchor[2]] if lay.kind == "concat" else None
            return torch.arange(l.size) if lay is None else lay.index(perms)
        if l.follows is not None:
            split = next((e for e in self._edges if e.dst_layer == i and e.kind == "split"), None)
            if split is not None:  # a block of the parent layer (which may since have become query/key/value)
                lo = int(split.endpoints()[0].min())
                return done[l.follows][lo:lo + l.size] - lo
            return done[l.follows]
        if l.kind == "concat":
            parts = [(int(e.endpoints()[1].min()),
                      done[e.src_layer]) for e in self._edges if e.dst_layer == i and e.kind == "concat"]
            return torch.cat([p + lo for lo, p in sorted(parts, key=lambda t: t[0])])
        return torch.arange(l.size)

    def __repr__(self) -> str:
        kinds: Dict[str, int] = {}
        for l in self.layers:
            kinds[l.kind] = kinds.get(l.kind, 0) + 1
        return (f"NeuralGraph({self.num_nodes} nodes in {len(self.layers)} layers {kinds}, {self.num_edges} edges, "
                f"edge features {self.edge_attr.shape[1]}, node features {list(self._cols)})")
