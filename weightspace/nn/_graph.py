"""Graph processors on neural computational graphs (``ws.NeuralGraph.batch``): message passing.

A network becomes a graph whose nodes are neurons/channels and whose edges are parameters
(:mod:`weightspace.graph`). A graph network on it is equivariant to hidden-neuron permutations *by
construction*: permuting a hidden layer only relabels nodes, and message passing commutes with
relabelling. Graph processors therefore accept batches that **mix architectures** (any widths,
depths, convs, residual or attention layers the graph builder represents), unlike dense processors
(NFN, UNF, DWS) that need one architecture per batch.

Following Kofinas et al. (ICLR 2024, "Graph Neural Networks for Learning Equivariant
Representations of Neural Networks", arXiv:2403.12143) and Lim et al. (ICLR 2024, "Graph
Metanetworks for Processing Diverse Neural Architectures", arXiv:2312.04501):

* **Inputs.** Node scalars (``node_features``, default the bias) and edge vectors (the weight, or
  the ``kh*kw`` kernel of a conv edge, zero-padded to ``edge_dim``) are projected linearly, and
  node/edge **type embeddings** are added.
* **Positional embeddings that keep the symmetry exactly.** Hidden nodes of one layer share one
  embedding (of the layer's depth from the input and from the output, so the last hidden layer of a
  deep and of a shallow net look alike); input and output nodes each get their own embedding by
  position, since inputs and outputs are *not* permutable. ``positions="all"`` also embeds hidden
  positions -- this breaks the symmetry and exists only as an ablation / negative control.
* **Message passing (NG-GNN style, PNA aggregation with edge updates).** Layer ``t``:
  ``m_ij = phi_f([h_i, h_j, e_ij])`` along each edge ``i -> j`` and ``m'_ji = phi_b([h_j, h_i, e_ij])``
  against it; node ``j`` aggregates its incoming and outgoing messages with each aggregator of
  ``aggregators`` (mean, max, sum, std; Corso et al. 2020, arXiv:2004.05718),
  ``h_j <- h_j + psi([LN(h_j), agg_in, agg_out])``, and every edge is updated from its endpoints,
  ``e_ij <- e_ij + chi([LN(e_ij), h_i, h_j])``. Mean aggregation keeps the width-duplication
  invariance (Kofinas et al. 2024, arXiv:2403.12143); sum does not.
* **Outputs.** ``out_features=k``: an invariant readout (per graph: mean and max over nodes, mean
  over edges, then an MLP) -> (B, k). ``out_features=None``: equivariant outputs,
  :class:`GraphOutput` with (N, len(node_features)) node and (E, edge_dim) edge values, which
  :func:`graph_outputs_to_state_dicts` turns back into state dicts through the graph's exact round
  trip (``residual=True`` adds them to the input weights, ``theta + f(theta)``).

Message passing is plain torch (``index_add_`` / ``scatter_reduce``). With torch_geometric a user
would gain fused sparse kernels (``torch_scatter``/``pyg-lib``), neighbour sampling for graphs that
do not fit in memory, and its library of convolutions (PNAConv with degree scalers, GATv2,
TransformerConv) to swap in; for the graphs of small networks plain torch is adequate.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from weightspace.graph import EDGE_TYPES, NODE_TYPES, GraphTensors, NeuralGraph
from weightspace.results import WeightspaceError

log = logging.getLogger(__name__)

__all__ = ["GraphProcessor", "GraphOutput", "GraphInputError", "graph_outputs_to_state_dicts", "graphs_from_states"]

AGGREGATORS = ("mean", "max", "sum", "std")


class GraphInputError(WeightspaceError, ValueError):
    """A graph batch cannot be processed (empty, missing features, too wide, bad outputs)."""


@dataclass(frozen=True)
class GraphOutput:
    """Equivariant outputs of a graph processor on a batch: ``nodes`` (N, node channels) in the
    batch's node order, ``edges`` (E, edge channels) in its edge order; ``node_features`` names the
    node channels (the input features they replace in :func:`graph_outputs_to_state_dicts`)."""

    nodes: torch.Tensor
    edges: torch.Tensor
    node_features: Tuple[str, ...]


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


def _scatter(
    src: torch.Tensor, index: torch.Tensor, n: int, how: str, count: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Aggregate rows of ``src`` (M, d) into ``n`` rows by ``index`` (M,): mean / max / sum / std."""
    d = src.shape[1]
    if how == "max":
        out = src.new_full((n, d), float("-inf"))
        out = out.scatter_reduce(0, index.unsqueeze(1).expand(-1, d), src, reduce="amax", include_self=True)
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    s = src.new_zeros(n, d).index_add_(0, index, src)
    if how == "sum":
        return s
    c = count if count is not None else src.new_zeros(n).index_add_(0, index, src.new_ones(index.shape[0]))
    mean = s / c.clamp(min=1).unsqueeze(1)
    if how == "mean":
        return mean
    sq = src.new_zeros(n, d).index_add_(0, index, src * src) / c.clamp(min=1).unsqueeze(1)
    return (sq - mean * mean).clamp(min=0).add(1e-6).sqrt()


class GraphEncoder(nn.Module):
    """Initial node and edge states of a graph batch (see the module docstring), shared by
    :class:`GraphProcessor` and :class:`~weightspace.nn.RelationalTransformer`."""

    def __init__(
        self,
        node_dim: int,
        edge_dim_hidden: int,
        node_features: Sequence[str] = ("bias",),
        edge_dim: int = 9,
        max_depth: int = 64,
        max_io: int = 256,
        positions: str = "io",
    ) -> None:
        super().__init__()
        if positions not in ("io", "all"):
            raise ValueError(
                f"positions must be 'io' (input/output units only; equivariant) or 'all' (an ablation that breaks the symmetry), got {positions!r}"  # noqa: E501
            )
        self.node_features = tuple(node_features)
        self.edge_dim, self.max_depth, self.max_io, self.positions = (
            int(edge_dim),
            int(max_depth),
            int(max_io),
            positions,
        )
        self.node_in = nn.Linear(max(1, len(self.node_features)), node_dim)
        self.edge_in = nn.Linear(self.edge_dim, edge_dim_hidden)
        self.node_type = nn.Embedding(len(NODE_TYPES), node_dim)
        self.edge_type = nn.Embedding(len(EDGE_TYPES), edge_dim_hidden)
        self.depth = nn.Embedding(self.max_depth, node_dim)
        self.rdepth = nn.Embedding(self.max_depth, node_dim)
        self.in_pos = nn.Embedding(self.max_io, node_dim)
        self.out_pos = nn.Embedding(self.max_io, node_dim)
        if positions == "all":
            self.hidden_pos = nn.Embedding(self.max_io, node_dim)

    def check(self, batch: Any) -> None:
        if isinstance(batch, (list, tuple)):
            raise GraphInputError(
                "graph processors take a batch of tensors: pass ws.NeuralGraph.batch(graphs), not a list of graphs"
            )
        if not isinstance(batch, GraphTensors):
            raise GraphInputError(
                f"expected a GraphTensors batch (ws.NeuralGraph.batch(graphs)), got {type(batch).__name__}"
            )
        if batch.num_graphs < 1 or batch.x.shape[0] == 0:
            raise GraphInputError("the graph batch is empty (no graphs or no nodes); pass at least one non-empty graph")
        missing = [f for f in self.node_features if f not in batch.node_feature_names]
        if missing:
            raise GraphInputError(
                f"node feature(s) {missing} are needed but no graph in the batch has them (it has {list(batch.node_feature_names)}); "  # noqa: E501
                f"build the processor with node_features= listing features the graphs carry (e.g. node_features=() for bias-free networks)"  # noqa: E501
            )
        extra = [f for f in batch.node_feature_names if f not in self.node_features]
        if extra:
            raise GraphInputError(
                f"the graphs carry node feature(s) {extra} that this processor was not built for; pass "
                f"node_features={tuple(self.node_features) + tuple(extra)} so none is silently dropped"
            )
        if batch.edge_attr.shape[1] > self.edge_dim:
            raise GraphInputError(
                f"edges carry {batch.edge_attr.shape[1]} values (e.g. a conv kernel or a flattened block) but edge_dim={self.edge_dim}; "  # noqa: E501
                f"build the processor with edge_dim>={batch.edge_attr.shape[1]}"
            )
        if batch.edge_index.shape[1] == 0:
            raise GraphInputError(
                "the graph batch has no edges (networks without parameters between units); nothing to process"
            )
        io = (batch.node_type == NODE_TYPES.index("input")) | (batch.node_type == NODE_TYPES.index("output"))
        if int(batch.depth.max()) >= self.max_depth:
            raise GraphInputError(
                f"a graph is {int(batch.depth.max()) + 1} layers deep but max_depth={self.max_depth}; build the processor with a larger max_depth"  # noqa: E501
            )
        if bool(io.any()) and int(batch.position[io].max()) >= self.max_io:
            raise GraphInputError(
                f"an input/output layer has {int(batch.position[io].max()) + 1} units but max_io={self.max_io}; build the processor with a larger max_io"  # noqa: E501
            )
        if not torch.isfinite(batch.x).all() or not torch.isfinite(batch.edge_attr).all():
            raise GraphInputError("the graph batch has non-finite node or edge features (NaN/inf weights)")

    def forward(self, batch: GraphTensors) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check(batch)
        dev, dt = self.node_in.weight.device, self.node_in.weight.dtype
        cols = [batch.node_feature_names.index(f) for f in self.node_features]
        x = (
            batch.x[:, cols].to(device=dev, dtype=dt)
            if cols
            else torch.zeros(batch.x.shape[0], 1, device=dev, dtype=dt)
        )
        ntype, depth, pos = batch.node_type.to(dev), batch.depth.to(dev), batch.position.to(dev)
        gid = batch.batch.to(dev)
        maxd = torch.zeros(batch.num_graphs, dtype=torch.long, device=dev).scatter_reduce(
            0, gid, depth, reduce="amax", include_self=True
        )
        h = self.node_in(x) + self.node_type(ntype) + self.depth(depth) + self.rdepth(maxd[gid] - depth)
        is_in = (ntype == NODE_TYPES.index("input")).unsqueeze(1)
        is_out = (ntype == NODE_TYPES.index("output")).unsqueeze(1)
        p = pos.clamp(max=self.max_io - 1)
        h = h + is_in * self.in_pos(p) + is_out * self.out_pos(p)
        if self.positions == "all":
            h = h + (~(is_in | is_out)) * self.hidden_pos(p)
        ea = batch.edge_attr.to(device=dev, dtype=dt)
        if ea.shape[1] < self.edge_dim:
            ea = torch.cat([ea, ea.new_zeros(ea.shape[0], self.edge_dim - ea.shape[1])], 1)
        e = self.edge_in(ea) + self.edge_type(batch.edge_type.to(dev))
        return h, e


class _MPLayer(nn.Module):
    def __init__(self, d: int, de: int, aggregators: Sequence[str]) -> None:
        super().__init__()
        self.aggs = tuple(aggregators)
        self.msg_f = _mlp([2 * d + de, d, d])
        self.msg_b = _mlp([2 * d + de, d, d])
        self.ln_h = nn.LayerNorm(d)
        self.ln_e = nn.LayerNorm(de)
        self.upd = _mlp([d + 2 * len(self.aggs) * d, d, d])
        self.edge_upd = _mlp([de + 2 * d, de, de])

    def forward(self, h, e, src, dst, cnt_in, cnt_out):
        n = h.shape[0]
        hn = self.ln_h(h)
        hs, hd = hn[src], hn[dst]
        mf = self.msg_f(torch.cat([hs, hd, e], 1))
        mb = self.msg_b(torch.cat([hd, hs, e], 1))
        agg = [_scatter(mf, dst, n, a, cnt_in) for a in self.aggs] + [
            _scatter(mb, src, n, a, cnt_out) for a in self.aggs
        ]
        h = h + self.upd(torch.cat([hn] + agg, 1))
        hn = self.ln_h(h)
        e = e + self.edge_upd(torch.cat([self.ln_e(e), hn[src], hn[dst]], 1))
        return h, e


class GraphReadout(nn.Module):
    """Invariant per-graph readout: [mean_nodes(h), max_nodes(h), mean_edges(e)] -> MLP -> out."""

    def __init__(self, d: int, de: int, out_features: int) -> None:
        super().__init__()
        self.mlp = _mlp([2 * d + de, d, int(out_features)])

    def forward(self, h, e, node_graph, edge_graph, num_graphs):
        feats = torch.cat(
            [
                _scatter(h, node_graph, num_graphs, "mean"),
                _scatter(h, node_graph, num_graphs, "max"),
                _scatter(e, edge_graph, num_graphs, "mean"),
            ],
            1,
        )
        return self.mlp(feats)


class GraphProcessor(nn.Module):
    """Message passing on neural graphs (see the module docstring for the math and the paper).

    Parameters
    ----------
    out_features : k -> invariant predictions (B, k); None -> equivariant :class:`GraphOutput`.
    hidden_channels, edge_channels : node and edge state widths (NG-GNN: 32/32 by default here).
    num_layers : message-passing layers.
    node_features : node feature columns read from the batch (default the bias; names as in
        ``GraphTensors.node_feature_names``). Graphs carrying other features raise unless listed.
    edge_dim : edge vector width accepted (9 = a 3x3 kernel); narrower edges are zero-padded.
    aggregators : subset of ("mean", "max", "sum", "std").
    max_depth, max_io : sizes of the depth and input/output-position embedding tables.
    positions : "io" (equivariant) or "all" (ablation: also embeds hidden positions; not equivariant).

    Input: ``ws.NeuralGraph.batch(graphs)``; graphs of different architectures may be mixed.
    """

    def __init__(
        self,
        out_features: Optional[int] = 1,
        hidden_channels: int = 32,
        num_layers: int = 4,
        *,
        edge_channels: Optional[int] = None,
        node_features: Sequence[str] = ("bias",),
        edge_dim: int = 9,
        aggregators: Sequence[str] = ("mean", "max"),
        max_depth: int = 64,
        max_io: int = 256,
        positions: str = "io",
    ) -> None:
        super().__init__()
        bad = [a for a in aggregators if a not in AGGREGATORS]
        if bad or not aggregators:
            raise ValueError(f"aggregators must be a non-empty subset of {AGGREGATORS}, got {tuple(aggregators)}")
        if int(num_layers) < 0 or int(hidden_channels) < 1:
            raise ValueError(f"num_layers must be >= 0 and hidden_channels >= 1, got {num_layers}, {hidden_channels}")
        if out_features is not None and int(out_features) < 1:
            raise ValueError(f"out_features must be >= 1 or None (equivariant outputs), got {out_features}")
        d = int(hidden_channels)
        de = int(edge_channels or hidden_channels)
        self.out_features = None if out_features is None else int(out_features)
        self.encoder = GraphEncoder(d, de, node_features, edge_dim, max_depth, max_io, positions)
        self.layers = nn.ModuleList(_MPLayer(d, de, aggregators) for _ in range(int(num_layers)))
        if self.out_features is None:
            self.node_out = nn.Linear(d, len(self.encoder.node_features))
            self.edge_out = nn.Linear(de, self.encoder.edge_dim)
        else:
            self.readout = GraphReadout(d, de, self.out_features)

    @property
    def node_features(self) -> Tuple[str, ...]:
        return self.encoder.node_features

    def forward(self, batch: GraphTensors):
        h, e = self.encoder(batch)
        dev = h.device
        src, dst = batch.edge_index[0].to(dev), batch.edge_index[1].to(dev)
        n = h.shape[0]
        ones = h.new_ones(src.shape[0])
        cnt_in = h.new_zeros(n).index_add_(0, dst, ones)
        cnt_out = h.new_zeros(n).index_add_(0, src, ones)
        for layer in self.layers:
            h, e = layer(h, e, src, dst, cnt_in, cnt_out)
        if self.out_features is None:
            return GraphOutput(self.node_out(h), self.edge_out(e), self.node_features)
        gid = batch.batch.to(dev)
        return self.readout(h, e, gid, gid[src], batch.num_graphs)


# -- graphs <-> state dicts -------------------------------------------------------------------------


def graph_outputs_to_state_dicts(
    graphs: Sequence[NeuralGraph], output: GraphOutput, *, residual: bool = False
) -> List[Dict[str, torch.Tensor]]:
    """Turn equivariant outputs on ``ws.NeuralGraph.batch(graphs)`` back into one state dict per graph.

    Edge values (E, >= K_g) replace graph ``g``'s ``K_g`` edge features, node values replace the node
    features named in ``output.node_features`` (others keep their input values); then the graph's
    exact round trip ``to_state_dict`` rebuilds the tensors. ``residual=True`` adds the outputs to
    the input weights instead (``theta + f(theta)``, Lim et al. 2024). Structural edges (residual,
    concat, value-1 edges) are not parameters and are ignored.
    """
    if not graphs:
        raise GraphInputError("graph_outputs_to_state_dicts needs the list of graphs the batch was built from")
    N = sum(g.num_nodes for g in graphs)
    E = sum(g.num_edges for g in graphs)
    if output.nodes.shape[0] != N or output.edges.shape[0] != E:
        raise GraphInputError(
            f"outputs have {output.nodes.shape[0]} nodes and {output.edges.shape[0]} edges but the graphs have {N} and {E}; "  # noqa: E501
            "pass the graphs in the order they were batched"
        )
    K = max(g.edge_attr.shape[1] for g in graphs)
    if output.edges.shape[1] < K:
        raise GraphInputError(
            f"edge outputs have {output.edges.shape[1]} channels but the graphs' edges carry up to {K}"
        )
    nodes, edges = output.nodes.detach().cpu(), output.edges.detach().cpu()
    out = []
    n0 = e0 = 0
    for g in graphs:
        new = copy.copy(g)
        k = g.edge_attr.shape[1]
        ev = edges[e0 : e0 + g.num_edges, :k].to(g.edge_attr.dtype)
        new.edge_attr = g.edge_attr + ev if residual else ev.clone()
        x = g.x.clone()
        for j, name in enumerate(output.node_features):
            cols = [c for c, nm in enumerate(g.node_feature_names) if nm == name or nm.startswith(name + "[")]
            for c in cols[:1]:  # vector node features take the first column only when a scalar name is given
                v = nodes[n0 : n0 + g.num_nodes, j].to(x.dtype)
                x[:, c] = x[:, c] + v if residual else v
        new.x = x
        out.append(new.to_state_dict())
        n0 += g.num_nodes
        e0 += g.num_edges
    return out


def graphs_from_states(
    model: nn.Module, example_inputs: Any, states: Sequence[Mapping[str, torch.Tensor]]
) -> List[NeuralGraph]:
    """``NeuralGraph`` of ``model``'s architecture for each state dict in ``states``: traced once,
    then filled with each state's values (equal to ``NeuralGraph.from_model`` on each loaded model,
    without re-tracing). Every state must have ``model``'s keys and shapes."""
    tmpl = NeuralGraph.from_model(model, example_inputs)
    meta = tmpl._meta
    out = []
    for i, sd in enumerate(states):
        missing = [k for k in meta if k not in sd]
        extra = [k for k in sd if k not in meta]
        if missing or extra:
            raise GraphInputError(
                f"state {i} does not match the model: missing keys {missing[:5]}, unexpected keys {extra[:5]}"
            )
        for k, (shape, _) in meta.items():
            if tuple(sd[k].shape) != tuple(shape):
                raise GraphInputError(f"state {i}: {k!r} has shape {tuple(sd[k].shape)}, the model has {tuple(shape)}")
        g = copy.copy(tmpl)
        ea = tmpl.edge_attr.clone()
        for eb, (e0, n, k) in zip(tmpl._edges, tmpl._edge_rows):
            if eb.key is None or eb.key not in sd or eb.key in tmpl.extras:
                continue
            ea[e0 : e0 + n, :k] = sd[eb.key].detach().reshape(-1)[eb.entries].reshape(n, k).to(ea.dtype)
        x = tmpl.x.clone()
        for nf in tmpl._node_feats:
            if nf.key is None or nf.key not in sd or nf.key in tmpl.extras:
                continue
            l = tmpl.layers[nf.layer]
            c0, _ = tmpl._cols[nf.name]
            w = nf.values.shape[1]
            x[l.offset : l.offset + l.size, c0 : c0 + w] = (
                sd[nf.key].detach().reshape(-1)[nf.entries].reshape(l.size, w).to(x.dtype)
            )
        g.edge_attr, g.x = ea, x
        g.extras = {k: sd[k].detach().clone() for k in tmpl.extras}
        out.append(g)
    return out
