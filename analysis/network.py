"""Complex-network metrics of a neural computational graph (node strength, degrees, centralities).

E. La Malfa, G. La Malfa, G. Nicosia and V. Latora, "Characterizing learning dynamics of deep neural
networks via complex networks", ICTAI 2021, arXiv:2110.02628 (extended in "Deep neural networks via
complex network theory: a perspective", 2024, arXiv:2404.11172).

The graph is :class:`weightspace.NeuralGraph` (neurons are nodes, parameters are edges). Every edge
``e = (j -> i)`` gets one scalar weight ``w_e`` from its feature vector ``a_e`` (``K`` entries: one for
a Linear weight or a norm scale ``gamma``, ``kh*kw`` for a conv kernel, the ``H*W`` block for a Linear
after a flatten), chosen by ``weight=``:

* ``"sum"`` (default, the paper's signed strength): ``w_e = sum_k a_e[k]``;
* ``"abs_sum"``: ``w_e = sum_k |a_e[k]|``;
* ``"l2"``: ``w_e = ||a_e||_2``.

Node strength (the definition of La Malfa et al. 2021, arXiv:2110.02628) is the **signed** sum

    s_in(i)  = b_i + sum_{e = (j -> i)} w_e          (b_i: the node's ``bias`` feature, 0 if none)
    s_out(i) =       sum_{e = (i -> j)} w_e
    s(i)     = s_in(i) + s_out(i)

with the boundary convention of the authors' code (``boundary="unit"``, the default): nodes of a
*source* layer (a layer with no incoming edge of any type: model inputs, the vocabulary of an
embedding) get ``s_in = +1``, and nodes of a *sink* layer (a layer of kind ``output``, or any layer
other than a ``key`` layer with no outgoing edge of any type) get ``s_out = +1`` in place of the
(empty) sums. ``boundary="zero"`` keeps the plain sums (no ``+1``). The layer fluctuation is the
population standard deviation (``ddof = 0``) of ``s`` within a layer.

Which edges count. ``include_structural=False`` (default) keeps only parameter edges (types
``linear``, ``conv``, ``embedding`` and ``norm``, whose value is ``gamma``, or 1 for a norm without
affine scale) and drops the value-1 structural edges (``residual``, ``gate``, ``concat``, ``split``,
``qk``, ``attention``, ``value``), which carry no parameter; nodes of ``sum``/``concat``/...
layers then have only their parameter edges (often only outgoing ones). ``include_structural=True``
counts them with their stored value 1.

Differences from the published code. Convolutions are not unrolled per patch: a conv edge joins two
*channels* and ``weight="sum"`` adds its kernel, so a channel's in- and out-strength equal those of
one interior spatial unit of the per-patch unrolled graph of a stride-1 conv (units at padded borders
and of strided convs differ). A Linear after a flatten has one edge per
(channel, output) whose weight sums the ``H*W`` block, i.e. the channel's out-strength adds up the
out-strengths of all its spatial units. Normalisation shifts (``beta``) are node ``bias`` features and
are added to ``s_in`` like biases; running statistics are ignored. The data-dependent strength of the
2024 version (probably ``sum_j w_ij x_j``, unconfirmed) is not implemented.

Centralities are computed with NetworkX on the kept edges: ``degree`` / ``in_degree`` /
``out_degree`` (unweighted, normalised by ``N - 1``), ``pagerank`` on ``|w_e|``, ``eigenvector`` on the
*undirected* graph with weights ``|w_e|`` (the adjacency of a feed-forward DAG is nilpotent, so the
directed eigenvector centrality is identically zero), and ``betweenness`` with distance ``1/|w_e|``
(zero-weight edges dropped) or hop count, exact (Brandes 2001) or sampled over ``betweenness_k``
sources (Brandes & Pich 2007); exact betweenness costs about ``N * E`` edge relaxations in Python and
is refused above ``betweenness_max_work`` (default ``5e7``: about 8 s for weighted betweenness on one
core; measured 1.3 s for an MLP 64-128-128-10, N = 330, E = 25,856, N * E = 8.5e6).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from weightspace.checks import check_inputs, check_model
from weightspace.results import Result, records_time

log = logging.getLogger(__name__)

__all__ = ["network_metrics", "NetworkMetrics"]

STRUCTURAL_EDGE_TYPES = ("residual", "gate", "concat", "split", "qk", "attention", "value")
_WEIGHTS = ("sum", "abs_sum", "l2")
_BOUNDARIES = ("unit", "zero")
_CENTRALITIES = ("degree", "in_degree", "out_degree", "pagerank", "eigenvector", "betweenness")
_BETWEENNESS_DISTANCES = ("inverse_abs", "hops")
_PAPER = ("La Malfa et al., Characterizing learning dynamics of deep neural networks via complex networks, "
          "arXiv:2110.02628")


@dataclass(frozen=True)
class NetworkMetrics(Result):
    """Result of :func:`network_metrics`. Node arrays are indexed by the graph's global node id.

    Attributes
    ----------
    strength, in_strength, out_strength : np.ndarray, (N,) float64
        ``s = s_in + s_out`` (see the module docstring for the exact convention).
    in_degree, out_degree : np.ndarray, (N,) int64
        Number of kept incoming / outgoing edges.
    node_layer : np.ndarray, (N,) int64
        Layer index of every node (into ``layer_names`` / ``layer_kinds``).
    layer_names, layer_kinds : tuple of str
        Module name and kind (``input``, ``linear``, ``conv``, ``norm``, ``sum``, ...) of each layer.
    fluctuation : np.ndarray, (L,) float64
        Population std of ``strength`` within each layer (La Malfa et al.'s layer fluctuation).
    hist_edges : np.ndarray, (B + 1,)
        Common bin edges of the per-layer strength histograms (``per_layer[l]["strength_hist"]``).
    per_layer : tuple of dict
        One row per layer, ready for plotting (``pandas.DataFrame(list(m.per_layer))``): ``layer``,
        ``name``, ``kind``, ``depth``, ``size``, ``strength_mean``, ``strength_std`` (= fluctuation),
        ``strength_min``, ``strength_max``, ``strength_median``, ``in_strength_mean``,
        ``out_strength_mean``, ``in_degree_mean``, ``out_degree_mean``, ``in_degree_max``,
        ``out_degree_max``, ``strength_hist`` (counts over ``hist_edges``) and ``<centrality>_mean``
        for each centrality computed.
    centralities : Mapping[str, np.ndarray]
        ``name -> (N,)`` values for the centralities requested.
    num_nodes, num_edges : int
        Nodes of the graph and edges that were counted (after dropping structural edges).
    settings : Mapping
        ``weight``, ``include_structural``, ``boundary``, ``bias``, edge types counted, source and
        sink layers, ``bins``, centrality options, and the paper.
    """

    strength: np.ndarray
    in_strength: np.ndarray
    out_strength: np.ndarray
    in_degree: np.ndarray
    out_degree: np.ndarray
    node_layer: np.ndarray
    layer_names: Tuple[str, ...]
    layer_kinds: Tuple[str, ...]
    fluctuation: np.ndarray
    hist_edges: np.ndarray
    per_layer: Tuple[Dict[str, Any], ...]
    centralities: Mapping[str, np.ndarray] = field(default_factory=dict)
    num_nodes: int = 0
    num_edges: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    def layer_strength(self, layer: int) -> np.ndarray:
        """Strengths of the nodes of layer ``layer`` (in node order)."""
        if not 0 <= layer < len(self.layer_names):
            raise IndexError(f"layer {layer} out of range: the graph has {len(self.layer_names)} layers")
        return self.strength[self.node_layer == layer]

    def layer_table(self) -> Dict[str, List[Any]]:
        """``per_layer`` as columns: ``{column: [value per layer]}`` (histograms as lists)."""
        cols: Dict[str, List[Any]] = {}
        for row in self.per_layer:
            for k, v in row.items():
                cols.setdefault(k, []).append(v.tolist() if isinstance(v, np.ndarray) else v)
        return cols

    def degree_distribution(self, direction: str = "in") -> np.ndarray:
        """``counts[k]`` = number of nodes with ``k`` kept edges in ``direction`` (``in``/``out``/``total``)."""
        deg = {"in": self.in_degree, "out": self.out_degree, "total": self.in_degree + self.out_degree}.get(direction)
        if deg is None:
            raise ValueError(f"direction must be 'in', 'out' or 'total', got {direction!r}")
        return np.bincount(deg, minlength=1)



# ----------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------
@records_time
def network_metrics(
    model_or_graph: Any,
    example_inputs: Any = None,
    *,
    weight: str = "sum",
    include_structural: bool = False,
    boundary: str = "unit",
    bias: bool = True,
    centralities: Sequence[str] = ("degree", "pagerank"),
    bins: Union[int, Sequence[float]] = 20,
    betweenness_k: Optional[int] = None,
    betweenness_distance: str = "inverse_abs",
    betweenness_max_work: float = 5e7,
    seed: int = 0,
) -> NetworkMetrics:
    """Node strength, degree distributions, layer fluctuation and centralities of a network's graph.

    Parameters
    ----------
    model_or_graph : torch.nn.Module or weightspace.NeuralGraph
        A model (traced once with ``example_inputs``; it is not modified) or a graph built already.
    example_inputs : Any
        Inputs for tracing a model (a tensor, a tuple of positional inputs or a dict of keyword
        inputs); required for a module, ignored for a graph.
    weight : {"sum", "abs_sum", "l2"}
        Scalar weight of an edge from its feature vector: signed sum (the paper; a conv edge's
        kernel summed), sum of absolute values, or Euclidean norm.
    include_structural : bool
        Also count the value-1 structural edges (residual, gate, concat, split, qk, attention,
        value). Default False: parameter edges only.
    boundary : {"unit", "zero"}
        ``"unit"``: source-layer nodes get ``s_in = 1`` and sink-layer nodes ``s_out = 1`` (authors'
        code); ``"zero"``: no boundary terms.
    bias : bool
        Add each node's ``bias`` feature (Linear/conv bias, norm ``beta``) to ``s_in``.
    centralities : sequence of str
        Any of ``degree``, ``in_degree``, ``out_degree``, ``pagerank``, ``eigenvector``,
        ``betweenness`` (see the module docstring). ``()`` computes none (and skips NetworkX).
    bins : int or sequence of float
        Number of equal-width bins over ``[min s, max s]`` of the whole graph (common to all layers),
        or explicit bin edges.
    betweenness_k : int, optional
        Sample this many source nodes (seeded with ``seed``) for an approximate betweenness.
    betweenness_distance : {"inverse_abs", "hops"}
        Edge length for shortest paths: ``1/|w_e|`` or 1.
    betweenness_max_work : float
        Refuse betweenness when ``(k or N) * E`` exceeds this (a ``ValueError`` says what to do).
    seed : int
        Seed for sampled betweenness.

    Returns
    -------
    NetworkMetrics
    """
    if type(model_or_graph).__name__ != "NeuralGraph":
        check_model(model_or_graph, "model_or_graph", where="analysis.network_metrics",
                    expected="a torch.nn.Module or a weightspace.NeuralGraph")
        if example_inputs is not None:
            check_inputs(example_inputs, where="analysis.network_metrics")
    g = _as_graph(model_or_graph, example_inputs)
    if weight not in _WEIGHTS:
        raise ValueError(f"weight must be one of {_WEIGHTS}, got {weight!r}")
    if boundary not in _BOUNDARIES:
        raise ValueError(f"boundary must be one of {_BOUNDARIES}, got {boundary!r}")
    if isinstance(centralities, str):
        centralities = (centralities,)
    bad = [c for c in centralities if c not in _CENTRALITIES]
    if bad:
        raise ValueError(f"unknown centralities {bad}; choose from {_CENTRALITIES}")
    if betweenness_distance not in _BETWEENNESS_DISTANCES:
        raise ValueError(f"betweenness_distance must be one of {_BETWEENNESS_DISTANCES}, got {betweenness_distance!r}")

    from weightspace.graph import EDGE_TYPES

    N, L = int(g.num_nodes), len(g.layers)
    if N == 0:
        raise ValueError("the graph has no nodes: the model's forward pass touched no feature layer")
    node_layer = g.node_layer.numpy().astype(np.int64)
    src_all, dst_all = g.edge_index[0].numpy(), g.edge_index[1].numpy()
    etype = g.edge_type.numpy()
    ea = g.edge_attr.detach().to(torch.float64)
    if not bool(torch.isfinite(ea).all()):
        bad_rows = torch.nonzero(~torch.isfinite(ea).all(1)).flatten()
        li = int(g.node_layer[int(dst_all[int(bad_rows[0])])])
        raise ValueError(f"{bad_rows.numel()} edge(s) hold NaN/inf weights, the first into layer {li} "
                         f"({g.layers[li].name!r}, {g.layers[li].kind}); fix the model's parameters first")
    if weight == "sum":
        w_all = ea.sum(1)
    elif weight == "abs_sum":
        w_all = ea.abs().sum(1)
    else:
        w_all = torch.linalg.vector_norm(ea, dim=1)
    w_all = w_all.numpy()

    structural = np.isin(etype, [EDGE_TYPES.index(t) for t in STRUCTURAL_EDGE_TYPES])
    keep = np.ones_like(structural) if include_structural else ~structural
    src, dst, w = src_all[keep], dst_all[keep], w_all[keep]
    if src.size == 0:
        raise ValueError(f"the graph of {N} nodes has no parameter edges to measure "
                         f"({int(structural.sum())} structural edges; pass include_structural=True to count them)")

    in_s = np.bincount(dst, weights=w, minlength=N).astype(np.float64)
    out_s = np.bincount(src, weights=w, minlength=N).astype(np.float64)
    in_d = np.bincount(dst, minlength=N).astype(np.int64)
    out_d = np.bincount(src, minlength=N).astype(np.int64)
    if bias:
        b = _node_bias(g)
        if not np.isfinite(b).all():
            li = int(node_layer[np.flatnonzero(~np.isfinite(b))[0]])
            raise ValueError(f"bias of layer {li} ({g.layers[li].name!r}) holds NaN/inf; fix the model's parameters "
                             "first")
        in_s = in_s + b
    sources, sinks = _boundary_layers(g, src_all, dst_all, node_layer)
    if boundary == "unit":
        in_s[np.isin(node_layer, sources)] = 1.0
        out_s[np.isin(node_layer, sinks)] = 1.0
    s = in_s + out_s

    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        lo, hi = float(s.min()), float(s.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"bins as edges must be a strictly increasing 1-D sequence of >= 2 values, got {bins!r}")

    cents: Dict[str, np.ndarray] = {}
    if centralities:
        cents = _centralities(N, src, dst, w, tuple(centralities), betweenness_k, betweenness_distance,
                              betweenness_max_work, seed)

    depth = g.layer_depth.tolist()
    rows: List[Dict[str, Any]] = []
    fluct = np.zeros(L)
    for li, lay in enumerate(g.layers):
        m = node_layer == li
        sl = s[m]
        fluct[li] = float(sl.std())
        row: Dict[str, Any] = {
            "layer": li, "name": lay.name, "kind": lay.kind, "depth": int(depth[li]), "size": int(m.sum()),
            "strength_mean": float(sl.mean()), "strength_std": float(fluct[li]),
            "strength_min": float(sl.min()), "strength_max": float(sl.max()), "strength_median": float(np.median(sl)),
            "in_strength_mean": float(in_s[m].mean()), "out_strength_mean": float(out_s[m].mean()),
            "in_degree_mean": float(in_d[m].mean()), "out_degree_mean": float(out_d[m].mean()),
            "in_degree_max": int(in_d[m].max()), "out_degree_max": int(out_d[m].max()),
            "strength_hist": np.histogram(sl, bins=edges)[0],
        }
        for name, c in cents.items():
            row[f"{name}_mean"] = float(c[m].mean())
        rows.append(row)

    settings = {
        "weight": weight, "include_structural": bool(include_structural), "boundary": boundary, "bias": bool(bias),
        "edge_types": tuple(sorted({EDGE_TYPES[t] for t in np.unique(etype[keep])})),
        "dropped_structural_edges": 0 if include_structural else int(structural.sum()),
        "source_layers": tuple(int(i) for i in sources), "sink_layers": tuple(int(i) for i in sinks),
        "bins": int(edges.size - 1), "fluctuation": "population std (ddof=0) of strength within a layer",
        "centralities": tuple(cents), "betweenness_k": betweenness_k, "betweenness_distance": betweenness_distance,
        "seed": seed, "paper": _PAPER,
    }
    log.debug("network_metrics: %d nodes, %d edges counted (%s), weight=%s, boundary=%s", N, int(src.size),
              ", ".join(settings["edge_types"]), weight, boundary)
    return NetworkMetrics(
        strength=s, in_strength=in_s, out_strength=out_s, in_degree=in_d, out_degree=out_d, node_layer=node_layer,
        layer_names=tuple(l.name for l in g.layers), layer_kinds=tuple(l.kind for l in g.layers),
        fluctuation=fluct, hist_edges=edges, per_layer=tuple(rows), centralities=cents,
        num_nodes=N, num_edges=int(src.size), settings=settings,
    )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _as_graph(obj: Any, example_inputs: Any):
    from weightspace.graph import NeuralGraph

    if isinstance(obj, NeuralGraph):
        return obj
    if isinstance(obj, torch.nn.Module):
        if example_inputs is None:
            raise ValueError(
                f"network_metrics needs example_inputs to trace the {type(obj).__name__} into a NeuralGraph "
                "(e.g. torch.zeros(1, in_features) or one batch of your data); or pass a graph built with "
                "weightspace.NeuralGraph.from_model(model, example_inputs)")
        return NeuralGraph.from_model(obj, example_inputs)
    raise TypeError(f"network_metrics expects a torch.nn.Module or a weightspace.NeuralGraph, got {type(obj).__name__}")


def _node_bias(g) -> np.ndarray:
    """(N,) the node feature named ``bias`` (zero where a node has none)."""
    names = list(g.node_feature_names)
    if "bias" not in names:
        return np.zeros(int(g.num_nodes))
    return g.x[:, names.index("bias")].detach().to(torch.float64).numpy().copy()


def _boundary_layers(g, src_all: np.ndarray, dst_all: np.ndarray, node_layer: np.ndarray) -> Tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Source layers (no incoming edge of any type) and sink layers (kind ``output``, or no outgoing
    edge of any type and not a ``key`` layer, whose units end in the attention scores)."""
    L = len(g.layers)
    has_in = np.zeros(L, dtype=bool)
    has_out = np.zeros(L, dtype=bool)
    if dst_all.size:
        has_in[np.unique(node_layer[dst_all])] = True
        has_out[np.unique(node_layer[src_all])] = True
    kinds = [l.kind for l in g.layers]
    sources = np.array([i for i in range(L) if not has_in[i]], dtype=np.int64)
    sinks = np.array([i for i in range(L) if kinds[i] == "output" or (not has_out[i] and kinds[i] != "key")],
                     dtype=np.int64)
    return sources, sinks


def _centralities(N: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, names: Tuple[str, ...],
                  k: Optional[int], distance: str, max_work: float, seed: int) -> Dict[str, np.ndarray]:
    import networkx as nx

    E = int(src.size)
    if "betweenness" in names:  # check the cost before building anything
        sources = N if k is None else int(k)
        if k is not None and not 1 <= k <= N:
            raise ValueError(f"betweenness_k must be in [1, {N}] (number of nodes), got {k}")
        if sources * E > max_work:
            raise ValueError(
                f"betweenness on a graph of {N} nodes and {E} edges needs about {sources} x {E} = {sources * E:.3g} "
                f"edge relaxations, above betweenness_max_work={max_work:.3g}; pass betweenness_k=<number of "
                f"sampled sources> (e.g. {max(1, int(max_work // max(E, 1)))}) for the sampled estimate, raise "
                "betweenness_max_work, or drop 'betweenness' from centralities")
    absw = np.abs(w)
    G = nx.DiGraph()
    G.add_nodes_from(range(N))
    acc: Dict[Tuple[int, int], float] = {}
    for a, b, x in zip(src.tolist(), dst.tolist(), absw.tolist()):
        acc[(a, b)] = acc.get((a, b), 0.0) + x  # parallel edges (include_structural) add up
    G.add_weighted_edges_from((a, b, x) for (a, b), x in acc.items())
    out: Dict[str, np.ndarray] = {}

    def arr(d: Mapping[int, float]) -> np.ndarray:
        return np.array([d[n] for n in range(N)], dtype=np.float64)

    for name in names:
        if name == "degree":
            out[name] = arr(nx.degree_centrality(G))
        elif name == "in_degree":
            out[name] = arr(nx.in_degree_centrality(G))
        elif name == "out_degree":
            out[name] = arr(nx.out_degree_centrality(G))
        elif name == "pagerank":
            out[name] = arr(nx.pagerank(G, weight="weight"))
        elif name == "eigenvector":
            U = G.to_undirected()
            try:
                out[name] = arr(nx.eigenvector_centrality_numpy(U, weight="weight"))
            except Exception as exc:  # ARPACK on tiny or degenerate graphs
                raise ValueError(f"eigenvector centrality failed on the undirected |w| graph ({N} nodes, {E} edges): "
                                 f"{type(exc).__name__}: {exc}; drop 'eigenvector' from centralities") from exc
        elif name == "betweenness":
            if distance == "inverse_abs":
                H = nx.DiGraph()
                H.add_nodes_from(range(N))
                H.add_weighted_edges_from((a, b, 1.0 / x) for a, b, x in G.edges(data="weight") if x > 0)
                wkey: Optional[str] = "weight"
            else:
                H, wkey = G, None
            out[name] = arr(nx.betweenness_centrality(H, k=k, weight=wkey, normalized=True, seed=seed))
    return out
