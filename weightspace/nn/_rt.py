"""Relational transformer on neural graphs (NG-T of Kofinas et al., ICLR 2024, arXiv:2403.12143,
after Diao & Loynd's relational attention, ICLR 2023, arXiv:2210.05062).

Every node attends to **every node of its own graph**; the edge between them, if any, enters the
keys and values. Per head, with node states ``h`` and relation vectors ``r_ij``:

    score_ij = q_i . (k_j + W_k r_ij) / sqrt(d_head),    out_i = sum_j softmax_j(score_ij) (v_j + W_v r_ij)

``r_ij`` is the edge state of ``j -> i`` projected by ``W_fwd`` (``i`` attends to its inputs), of
``i -> j`` projected by ``W_bwd`` (``i`` attends to its outputs), or a learned *no-edge* vector.
Edges keep their own states and are updated from their endpoints, ``e_ij <- e_ij + MLP([LN(e_ij),
h_i, h_j])``, so the model has the equivariant edge outputs of :class:`GraphProcessor`. Attention is
computed densely per graph on a padded (B, N_max, N_max) layout, like the anchor's (memory grows
with the square of the largest graph's node count); padded nodes are masked out of the keys.

Inputs, embeddings (type, depth, input/output positions), readout, equivariant outputs and errors are
those of :class:`~weightspace.nn.GraphProcessor`; batches may mix architectures.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from weightspace.graph import GraphTensors
from weightspace.nn._graph import GraphEncoder, GraphOutput, GraphReadout, _mlp

__all__ = ["RelationalTransformer"]


class _RTLayer(nn.Module):
    def __init__(self, d: int, de: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"hidden_channels ({d}) must be divisible by num_heads ({heads})")
        self.h, self.dh = heads, d // heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.rel_f = nn.Linear(de, de)
        self.rel_b = nn.Linear(de, de)
        self.no_edge = nn.Parameter(torch.zeros(de))
        self.rel_kv = nn.Linear(de, 2 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = _mlp([d, 2 * d, d])
        self.ln_e = nn.LayerNorm(de)
        self.edge_upd = _mlp([de + 2 * d, de, de])
        self.drop = nn.Dropout(dropout)

    def forward(self, h, e, slot, src, dst, B, Nm, mask):
        N, d = h.shape
        hn = self.ln1(h)
        q, k, v = self.qkv(hn).chunk(3, -1)
        dense = lambda t: t.new_zeros(B * Nm, t.shape[1]).index_copy(0, slot, t).view(B, Nm, self.h, self.dh)
        q, k, v = dense(q), dense(k), dense(v)  # (B, Nm, H, dh)
        de = e.shape[1]
        rel = self.no_edge.expand(B * Nm * Nm, de).clone()
        # relation of (i attends j): forward edge j -> i at [i, j]; backward edge i -> j at [i, j] via rel_b
        ps, pd = slot[src], slot[dst]
        bs = ps // Nm
        rel = rel.index_put((bs * Nm * Nm + (pd % Nm) * Nm + (ps % Nm),), self.rel_f(e), accumulate=False)
        rel = rel.index_put((bs * Nm * Nm + (ps % Nm) * Nm + (pd % Nm),), self.rel_b(e), accumulate=False)
        rk, rv = self.rel_kv(rel).view(B, Nm, Nm, 2, self.h, self.dh).unbind(3)  # (B, Nm, Nm, H, dh)
        scale = 1.0 / math.sqrt(self.dh)
        score = torch.einsum("bihd,bjhd->bhij", q, k) + torch.einsum("bihd,bijhd->bhij", q, rk)
        score = score * scale
        score = score.masked_fill(~mask.view(B, 1, 1, Nm), float("-inf"))
        att = self.drop(torch.softmax(score, -1))
        out = torch.einsum("bhij,bjhd->bihd", att, v) + torch.einsum("bhij,bijhd->bihd", att, rv)
        out = out.reshape(B * Nm, d)[slot]
        h = h + self.proj(out)
        h = h + self.ffn(self.ln2(h))
        hn = self.ln2(h)
        e = e + self.edge_upd(torch.cat([self.ln_e(e), hn[src], hn[dst]], 1))
        return h, e


class RelationalTransformer(nn.Module):
    """Relational transformer on ``ws.NeuralGraph.batch(graphs)`` (see the module docstring).

    Parameters as :class:`~weightspace.nn.GraphProcessor` (``out_features``, ``hidden_channels``,
    ``num_layers``, ``edge_channels``, ``node_features``, ``edge_dim``, ``max_depth``, ``max_io``,
    ``positions``), plus ``num_heads`` and attention ``dropout``. NG-T used d_node 64, d_edge 32,
    8 heads; the defaults here are smaller (32, 32, 4) for CPU-sized zoos.
    """

    def __init__(
        self,
        out_features: Optional[int] = 1,
        hidden_channels: int = 32,
        num_layers: int = 4,
        *,
        num_heads: int = 4,
        edge_channels: Optional[int] = None,
        node_features: Sequence[str] = ("bias",),
        edge_dim: int = 9,
        dropout: float = 0.0,
        max_depth: int = 64,
        max_io: int = 256,
        positions: str = "io",
    ) -> None:
        super().__init__()
        if out_features is not None and int(out_features) < 1:
            raise ValueError(f"out_features must be >= 1 or None (equivariant outputs), got {out_features}")
        if int(num_layers) < 0 or int(hidden_channels) < 1 or int(num_heads) < 1:
            raise ValueError(
                f"num_layers must be >= 0, hidden_channels and num_heads >= 1, got {num_layers}, {hidden_channels}, {num_heads}"  # noqa: E501
            )
        d = int(hidden_channels)
        de = int(edge_channels or hidden_channels)
        self.out_features = None if out_features is None else int(out_features)
        self.encoder = GraphEncoder(d, de, node_features, edge_dim, max_depth, max_io, positions)
        self.layers = nn.ModuleList(_RTLayer(d, de, int(num_heads), float(dropout)) for _ in range(int(num_layers)))
        self.ln = nn.LayerNorm(d)
        if self.out_features is None:
            self.node_out = nn.Linear(d, len(self.encoder.node_features))
            self.edge_out = nn.Linear(de, self.encoder.edge_dim)
        else:
            self.readout = GraphReadout(d, de, self.out_features)

    @property
    def node_features(self):
        return self.encoder.node_features

    def forward(self, batch: GraphTensors):
        h, e = self.encoder(batch)
        dev = h.device
        gid = batch.batch.to(dev)
        B = batch.num_graphs
        counts = torch.bincount(gid, minlength=B)
        Nm = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(h.shape[0], device=dev) - starts[gid]
        slot = gid * Nm + local  # node -> row of the padded (B * Nm) layout
        mask = torch.arange(Nm, device=dev).unsqueeze(0) < counts.unsqueeze(1)  # (B, Nm) real nodes
        src, dst = batch.edge_index[0].to(dev), batch.edge_index[1].to(dev)
        for layer in self.layers:
            h, e = layer(h, e, slot, src, dst, B, Nm, mask)
        h = self.ln(h)
        if self.out_features is None:
            return GraphOutput(self.node_out(h), self.edge_out(e), self.node_features)
        return self.readout(h, e, gid, gid[src], B)
