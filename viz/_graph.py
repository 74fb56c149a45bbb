"""The neural computational graph drawn from NetworkX, weights as edge colours.

Graph conventions follow ``weightspace.NeuralGraph`` (Lim et al., ICLR 2024, arXiv:2312.04501;
Kofinas et al., ICLR 2024, arXiv:2403.12143): neurons are nodes, parameters are edges.

* A small model (at most ``max_edges`` edges and ``max_nodes`` nodes) is drawn unit by unit from
  ``graph.to_networkx()``, laid out with ``networkx.multipartite_layout`` (one column per layer, in
  execution order). Edge colour is the weight on a diverging scale symmetric about 0 (quantised
  into ``colors`` bins, one trace per bin); a vector edge (a conv kernel, a flattened block) is
  coloured by the mean of its entries. Hover on an edge's midpoint gives its exact value.
* A larger model is summarised per layer: one node per layer (marker size ~ log of its unit count),
  one edge per pair of connected layers, coloured by the mean weight, width ~ log of the number of
  edges, hover with count, mean, mean |w| and std. That graph is also built in NetworkX.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from viz._common import HOVER, finish, floats

__all__ = ["neural_graph_figure"]

_NODE_COLORS = {
    "input": "#636efa",
    "output": "#ef553b",
    "linear": "#00cc96",
    "conv": "#00cc96",
    "norm": "#ab63fa",
    "sum": "#ffa15a",
    "concat": "#19d3f3",
    "split": "#19d3f3",
    "embedding": "#ff6692",
    "query": "#b6e880",
    "key": "#b6e880",
    "value": "#b6e880",
    "attention": "#ff97ff",
    "product": "#fecb52",
}


def _diverging(t: float) -> str:
    """RdBu_r at t in [0, 1] (0 = blue = negative, 1 = red = positive)."""
    import plotly.colors as pc

    return pc.sample_colorscale("RdBu_r", [min(1.0, max(0.0, t))])[0]


def _sequential(t: float) -> str:
    import plotly.colors as pc

    return pc.sample_colorscale("Reds", [0.15 + 0.85 * min(1.0, max(0.0, t))])[0]


def _edge_value(v: Any) -> float:
    return float(np.mean(v)) if isinstance(v, (tuple, list)) else float(v)


def _layer_names(graph: Any, G) -> Dict[int, str]:
    layers = getattr(graph, "layers", None)
    if layers is not None:
        return {i: f"{getattr(l, 'name', '') or l.kind} ({l.kind})" for i, l in enumerate(layers)}
    out: Dict[int, str] = {}
    for _, d in G.nodes(data=True):
        out.setdefault(int(d.get("layer", 0)), str(d.get("type", "layer")))
    return out


def _edge_traces(fig, segs: List[Tuple[float, float, float, float, float]], vmax: float, colors: int, width: float):
    import plotly.graph_objects as go

    bins: Dict[int, List] = {}
    for x0, y0, x1, y1, v in segs:
        b = min(colors - 1, int((v / vmax + 1.0) / 2.0 * colors)) if vmax > 0 else colors // 2
        bins.setdefault(b, []).append((x0, y0, x1, y1))
    for b in sorted(bins, key=lambda b: abs(b + 0.5 - colors / 2)):  # strongest weights drawn last, on top
        xs: List[Optional[float]] = []
        ys: List[Optional[float]] = []
        for x0, y0, x1, y1 in bins[b]:
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        lo, hi = -vmax + 2 * vmax * b / colors, -vmax + 2 * vmax * (b + 1) / colors
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                showlegend=False,
                name=f"weights in [{lo:.3g}, {hi:.3g})",
                line={"color": _diverging((b + 0.5) / colors), "width": width},
            )
        )


def neural_graph_figure(
    graph, *, max_edges: int = 3000, max_nodes: int = 600, colors: int = 11, title: Optional[str] = None
):
    """Draw a ``weightspace.NeuralGraph`` (or a ``networkx.DiGraph`` from ``to_networkx()``).

    Unit-level for graphs up to ``max_edges`` edges and ``max_nodes`` nodes, per-layer summary
    beyond (see the module docstring). ``colors`` is the number of colour bins for edge weights.
    """
    import networkx as nx
    import plotly.graph_objects as go

    is_nx = isinstance(graph, nx.Graph)
    n_nodes = graph.number_of_nodes() if is_nx else int(graph.num_nodes)
    n_edges = graph.number_of_edges() if is_nx else int(graph.num_edges)
    if n_edges <= max_edges and n_nodes <= max_nodes:
        G = graph if is_nx else graph.to_networkx()
        names = _layer_names(graph, G)
        pos = nx.multipartite_layout(G, subset_key="layer", align="vertical")
        vals = {(u, v): _edge_value(d.get("value", 0.0)) for u, v, d in G.edges(data=True)}
        vmax = max((abs(x) for x in vals.values()), default=0.0)
        fig = go.Figure()
        segs = [(*pos[u], *pos[v], val) for (u, v), val in vals.items()]
        _edge_traces(fig, segs, vmax, colors, width=1.0 if n_edges > 300 else 2.0)
        mids = [((pos[u][0] + pos[v][0]) / 2, (pos[u][1] + pos[v][1]) / 2, u, v, val) for (u, v), val in vals.items()]
        fig.add_trace(
            go.Scatter(
                x=[m[0] for m in mids],
                y=[m[1] for m in mids],
                mode="markers",
                name="edge weights",
                marker={"size": 6, "opacity": 0, "color": [m[4] for m in mids], "coloraxis": "coloraxis"},
                customdata=[[m[2], m[3], m[4], G.edges[m[2], m[3]].get("type", "")] for m in mids],
                hovertemplate=f"edge %{{customdata[0]}} -> %{{customdata[1]}} (%{{customdata[3]}})"
                f"<br>weight=%{{customdata[2]:{HOVER}}}<extra></extra>",
                showlegend=False,
            )
        )
        kinds: Dict[str, List[int]] = {}
        for n, d in G.nodes(data=True):
            kinds.setdefault(str(d.get("type", "unit")), []).append(n)
        for kind, nodes in kinds.items():
            fig.add_trace(
                go.Scatter(
                    x=[pos[n][0] for n in nodes],
                    y=[pos[n][1] for n in nodes],
                    mode="markers",
                    name=f"{kind} units",
                    marker={
                        "size": 9 if n_nodes < 200 else 6,
                        "color": _NODE_COLORS.get(kind, "#444"),
                        "line": {"color": "white", "width": 1},
                    },
                    customdata=[
                        [n, names.get(int(G.nodes[n].get("layer", 0)), ""), G.nodes[n].get("bias", float("nan"))]
                        for n in nodes
                    ],
                    hovertemplate=f"node %{{customdata[0]}}<br>%{{customdata[1]}}<br>bias=%{{customdata[2]:{HOVER}}}<extra>{kind}</extra>",  # noqa: E501
                )
            )
        ttl = title or f"Neural graph: {n_nodes} units, {n_edges} edges (edge colour = weight)"
    else:
        G, pos = _summary(graph, nx)
        vmax = max((d["mean_abs"] for _, _, d in G.edges(data=True)), default=0.0)
        fig = go.Figure()
        cmax = max((d["count"] for _, _, d in G.edges(data=True)), default=1)
        for u, v, d in G.edges(data=True):
            w = 1.0 + 5.0 * math.log1p(d["count"]) / math.log1p(cmax)
            t = 0.0 if vmax == 0 else d["mean_abs"] / vmax
            fig.add_trace(
                go.Scatter(
                    x=[pos[u][0], pos[v][0]],
                    y=[pos[u][1], pos[v][1]],
                    mode="lines",
                    hoverinfo="skip",
                    showlegend=False,
                    line={"color": _sequential(t), "width": w},
                )
            )
        es = list(G.edges(data=True))
        fig.add_trace(
            go.Scatter(
                x=[(pos[u][0] + pos[v][0]) / 2 for u, v, _ in es],
                y=[(pos[u][1] + pos[v][1]) / 2 for u, v, _ in es],
                mode="markers",
                name="layer connections",
                showlegend=False,
                marker={
                    "size": 8,
                    "opacity": 0.0,
                    "color": [d["mean_abs"] for _, _, d in es],
                    "coloraxis": "coloraxis",
                },
                customdata=[
                    [G.nodes[u]["label"], G.nodes[v]["label"], d["count"], d["mean"], d["mean_abs"], d["std"]]
                    for u, v, d in es
                ],
                hovertemplate=(
                    "%{customdata[0]} -> %{customdata[1]}<br>%{customdata[2]} edges"
                    f"<br>mean=%{{customdata[3]:{HOVER}}}<br>mean |w|=%{{customdata[4]:{HOVER}}}"
                    f"<br>std=%{{customdata[5]:{HOVER}}}<extra></extra>"
                ),
            )
        )
        nodes = list(G.nodes(data=True))
        smax = max(d["size"] for _, d in nodes)
        fig.add_trace(
            go.Scatter(
                x=[pos[n][0] for n, _ in nodes],
                y=[pos[n][1] for n, _ in nodes],
                mode="markers+text",
                name="layers",
                text=[d["label"] for _, d in nodes],
                textposition="top center",
                textfont={"size": 10},
                marker={
                    "size": [8 + 22 * math.log1p(d["size"]) / math.log1p(smax) for _, d in nodes],
                    "color": [_NODE_COLORS.get(d["kind"], "#444") for _, d in nodes],
                    "line": {"color": "white", "width": 1},
                },
                customdata=[[d["label"], d["size"]] for _, d in nodes],
                hovertemplate="%{customdata[0]}<br>%{customdata[1]} units<extra></extra>",
            )
        )
        ttl = title or (
            f"Neural graph summarised per layer: {n_nodes} units, {n_edges} edges in {G.number_of_nodes()} "
            "layers (edge colour = mean |weight|, width ~ log edge count)"
        )
    summary = not (n_edges <= max_edges and n_nodes <= max_nodes)
    finish(fig, ttl, "layer (execution order)", None, height=620)
    fig.update_layout(
        coloraxis={
            "colorscale": [[0, _sequential(0)], [1, _sequential(1)]],
            "cmin": 0.0,
            "cmax": vmax,
            "colorbar": {"title": {"text": "mean |weight|"}},
        }
        if summary
        else {
            "colorscale": "RdBu_r",
            "cmin": -vmax,
            "cmax": vmax,
            "cmid": 0.0,
            "colorbar": {"title": {"text": "weight"}},
        }
    )
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    return fig


def _summary(graph, nx):
    """A layer-level DiGraph (nodes = layers, edges = connected layer pairs with weight statistics)."""
    if isinstance(graph, nx.Graph):
        layer = {n: int(d.get("layer", 0)) for n, d in graph.nodes(data=True)}
        kinds = {int(d.get("layer", 0)): str(d.get("type", "layer")) for _, d in graph.nodes(data=True)}
        depth = {int(d.get("layer", 0)): int(d.get("depth", d.get("layer", 0))) for _, d in graph.nodes(data=True)}
        src = np.array([layer[u] for u, _ in graph.edges()], dtype=np.int64)
        dst = np.array([layer[v] for _, v in graph.edges()], dtype=np.int64)
        val = np.array([_edge_value(d.get("value", 0.0)) for _, _, d in graph.edges(data=True)])
        sizes = np.bincount(np.array(list(layer.values()), dtype=np.int64))
        labels = {i: f"{kinds.get(i, 'layer')} {i} ({sizes[i]})" for i in range(len(sizes))}
    else:
        nl = graph.node_layer.cpu().numpy()
        ei = graph.edge_index.cpu().numpy()
        src, dst = nl[ei[0]], nl[ei[1]]
        ea = floats(graph.edge_attr)
        val = ea.mean(axis=1) if ea.shape[1] > 1 else ea[:, 0]  # vector edges: mean entry (zero padding included)
        sizes = np.array([l.size for l in graph.layers])
        kinds = {i: l.kind for i, l in enumerate(graph.layers)}
        depth = {i: int(d) for i, d in enumerate(graph.layer_depth.tolist())}
        labels = {
            i: (l.kind if l.kind in ("input", "output") else (l.name or l.kind)) + f" ({l.size})"
            for i, l in enumerate(graph.layers)
        }
    S = nx.DiGraph()
    for i in range(len(sizes)):
        S.add_node(i, size=int(sizes[i]), kind=kinds.get(i, "layer"), depth=depth.get(i, i), label=labels[i])
    key = src * (len(sizes) + 1) + dst
    order = np.argsort(key, kind="stable")
    uk, starts = np.unique(key[order], return_index=True)
    for k, s, e in zip(uk, starts, list(starts[1:]) + [len(order)]):
        v = val[order[s:e]]
        S.add_edge(
            int(k // (len(sizes) + 1)),
            int(k % (len(sizes) + 1)),
            count=int(len(v)),
            mean=float(v.mean()),
            mean_abs=float(np.abs(v).mean()),
            std=float(v.std()),
        )
    pos = nx.multipartite_layout(S, subset_key="depth", align="vertical")
    return S, pos
