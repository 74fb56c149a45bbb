"""Neural functional transformers (Zhou et al., NeurIPS 2023, "Neural Functional Transformers",
arXiv:2305.13546), generalised from MLPs to every spec the tracer describes.

Attention that respects the group. For a group ``g`` acting on ``n_g`` units, every tensor in which
``g`` occurs on exactly one axis is cut into *tokens* along its other permuted axes: a token is the
``(n_g, F, C)`` slice at one index of those axes (for an MLP hidden layer ``i``: the columns of
``W_i``, the bias ``b_i`` and the rows of ``W_{i+1}``, as in the paper's "cross" term). Queries, keys
and values are per-tensor linear maps of ``(F * C)`` applied at every position of ``g``:
``q_t in R^{n_g x d}``. The score ``<q_s, k_t> / sqrt(n_g d_h)`` sums over the ``n_g`` positions, so it is
invariant to ``g`` and the output ``sum_t softmax(...)_{st} v_t`` moves with ``g``; permuting any other
group permutes the tokens, to which attention is equivariant (no positional encodings). A second term
(the paper's "diagonal" term) attends over one pooled token per tensor (means over its permuted
axes) and broadcasts the result back. Every update is a sum over groups, so the block is
equivariant to the whole group.

Block (pre-norm transformer): ``X + Attn(LN(X))`` then ``X + FFN(LN(X))``, with LN and FFN acting
on the channels of each weight separately (pointwise, hence equivariant). :class:`NFT` lifts the
weights with a :class:`~weightspace.nn.UNFLayer`, applies ``num_layers`` blocks, and reads out with
:class:`~weightspace.nn.InvariantPool` + MLP or a final equivariant :class:`~weightspace.nn.UNFLayer`.

Supported specs: all of :class:`~weightspace.nn.UNF`'s. Tensors without a group occurring once (a
square ``(g, g)`` weight, a fixed output bias) are reached by the pooled term and by the linear
layers. Cost: one ``T x T`` attention per group and head, ``T`` = number of tokens of the group.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from weightspace.nn._basis import BasisPlan, SpaceLayout
from weightspace.nn._batch import WeightSpaceBatch
from weightspace.nn._unf import (
    IOEmbedding,
    InvariantPool,
    SpecLike,
    UNFLayer,
    check_batch,
    check_dtype,
    feature_norm_layer,
    make_activation,
    readout_mlp,
    resolve_space,
)

__all__ = ["NFTBlock", "NFT", "EquivariantAttention"]


class EquivariantAttention(nn.Module):
    """Multi-head self-attention over the tokens of every group, plus attention over pooled tensor tokens."""

    def __init__(self, layout: SpaceLayout, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.layout, self.channels, self.heads = layout, channels, heads
        self.routes: List[Tuple[str, List[Tuple[int, int]]]] = []
        for g in layout.groups:
            r = [(pi, p.slots.index(g)) for pi, p in enumerate(layout.pieces) if p.slots.count(g) == 1]
            if r:
                self.routes.append((g, r))
        d = channels
        P = len(layout.pieces)

        def proj(n_in, n_out):
            return nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))

        self.qkv = nn.ParameterList()
        self.out = nn.ParameterList()
        for _, r in self.routes:
            for pi, _ in r:
                fc = layout.pieces[pi].F * channels
                self.qkv.append(proj(fc, 3 * d))
                self.out.append(nn.Parameter(torch.zeros(d, fc)))  # blocks start as the identity
        self.pool_qkv = nn.ParameterList(proj(p.F * channels, 3 * d) for p in layout.pieces)
        self.pool_out = nn.ParameterList(nn.Parameter(torch.zeros(d, p.F * channels)) for p in layout.pieces)
        self._P = P

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, T, n, d) -> (B, T, n, d); scores sum over the n positions and the head dims."""
        B, T, n, d = q.shape
        H = self.heads
        q, k, v = (t.reshape(B, T, n, H, d // H) for t in (q, k, v))
        scores = torch.einsum("btnhe,bsnhe->bhts", q, k) / math.sqrt(n * d // H)
        a = torch.softmax(scores, dim=-1)
        return torch.einsum("bhts,bsnhe->btnhe", a, v).reshape(B, T, n, d)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        pieces = self.layout.pieces
        d = self.channels
        upd: List[Optional[torch.Tensor]] = [None] * len(pieces)

        def add(pi, y):
            upd[pi] = y if upd[pi] is None else upd[pi] + y

        j = 0
        for _g, route in self.routes:
            qs, ks, vs, meta = [], [], [], []
            for pi, i in route:
                x = xs[pi]
                B = x.shape[0]
                xm = x.movedim(1 + i, -3)  # (B, others..., n_g, F, C)
                others = xm.shape[1:-3]
                n = xm.shape[-3]
                tok = xm.reshape(B, -1, n, xm.shape[-2] * xm.shape[-1])
                q, k, v = (tok @ self.qkv[j]).split(d, dim=-1)
                qs.append(q), ks.append(k), vs.append(v)
                meta.append((pi, i, others, tok.shape[1], j))
                j += 1
            o = self._attend(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1))
            off = 0
            for pi, i, others, T, jj in meta:
                p = pieces[pi]
                y = o[:, off : off + T] @ self.out[jj]  # (B, T, n_g, F*C)
                off += T
                y = y.reshape(y.shape[0], *others, p.slot_sizes[i], p.F, self.channels).movedim(-3, 1 + i)
                add(pi, y)
        # pooled tokens, one per tensor
        pooled = [x.mean(dim=tuple(range(1, x.dim() - 2))) if x.dim() > 3 else x for x in xs]  # (B, F, C)
        B = xs[0].shape[0]
        qkv = [pl.reshape(B, 1, 1, -1) @ w for pl, w in zip(pooled, self.pool_qkv)]  # (B, 1, 1, 3d)
        qkv = torch.cat(qkv, dim=1)  # (B, P, 1, 3d)
        q, k, v = qkv.split(d, dim=-1)
        o = self._attend(q, k, v)  # (B, P, 1, d)
        for pi, p in enumerate(pieces):
            y = (o[:, pi, 0] @ self.pool_out[pi]).reshape(B, *([1] * len(p.slot_sizes)), p.F, self.channels)
            add(pi, y.expand(B, *p.slot_sizes, p.F, self.channels))
        return upd


class NFTBlock(nn.Module):
    """Pre-norm transformer block on weight spaces: ``X + Attn(LN(X))``, ``X + FFN(LN(X))`` (LN and FFN per weight)."""

    def __init__(
        self,
        layout: SpaceLayout,
        channels: int,
        heads: int = 4,
        ffn_mult: int = 2,
        activation: Union[str, nn.Module] = "gelu",
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = EquivariantAttention(layout, channels, heads)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_mult * channels),
            make_activation(activation),
            nn.Linear(ffn_mult * channels, channels),
        )

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        upd = self.attn([self.norm1(x) for x in xs])
        xs = [x + u for x, u in zip(xs, upd)]
        return [x + self.ffn(self.norm2(x)) for x in xs]


class NFT(nn.Module):
    """Neural functional transformer: an equivariant lift (:class:`UNFLayer`), ``num_layers``
    :class:`NFTBlock` s, and an invariant readout (``out_features=k`` -> ``(B, k)``) or an equivariant
    output (``out_features=None`` -> :class:`WeightSpaceBatch` with ``out_channels``).

    ``fixed_axes`` as in :class:`~weightspace.nn.UNF` (default ``"dense"``: the spec's own group;
    ``"io"`` gives the paper's NP setting, with ``io_embed=True`` for its I/O embeddings).
    ``hidden_channels`` must be divisible by ``heads``. ``feature_norm``: standardise the pooled
    invariant features before the readout MLP (see :class:`~weightspace.nn.UNF`).
    """

    family = "NFT"

    def __init__(
        self,
        spec: SpecLike,
        hidden_channels: int = 16,
        num_layers: int = 3,
        out_features: Optional[int] = 1,
        *,
        heads: int = 4,
        in_channels: int = 1,
        out_channels: int = 1,
        keys: Optional[Sequence[str]] = None,
        fixed_axes: str = "dense",
        activation: Union[str, nn.Module] = "gelu",
        io_embed: bool = False,
        readout_hidden: Optional[int] = None,
        input_scale: float = 1.0,
        bottleneck: Optional[int] = None,
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        spec, keys = resolve_space(spec, keys)
        if feature_norm and out_features is None:
            raise ValueError("feature_norm=True normalises the invariant readout; it needs an integer out_features")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.keys, self.in_channels, self.out_features = tuple(keys), int(in_channels), out_features
        self.input_scale = float(input_scale)
        self.layout = SpaceLayout(spec, keys, fixed_axes)
        plan = BasisPlan(self.layout, bias=True)
        C = int(hidden_channels)
        self.lift = UNFLayer(spec, in_channels, C, keys=keys, layout=self.layout, plan=plan, bottleneck=bottleneck)
        self.io_embed = IOEmbedding(self.layout, C) if io_embed else None
        self.blocks = nn.ModuleList(NFTBlock(self.layout, C, heads, activation=activation) for _ in range(num_layers))
        if out_features is None:
            self.norm = nn.LayerNorm(C)
            self.proj = UNFLayer(spec, C, out_channels, keys=keys, layout=self.layout, plan=plan, bottleneck=bottleneck)
        else:
            self.norm = nn.LayerNorm(C)
            self.pool = InvariantPool(spec, C, keys=keys, layout=self.layout, plan=plan)
            self.head = readout_mlp(
                self.pool.out_features, readout_hidden or max(4 * C, 32), int(out_features), activation
            )
            self.feature_norm = feature_norm_layer(self.pool.out_features, feature_norm)

    def forward(self, batch: WeightSpaceBatch) -> Union[torch.Tensor, WeightSpaceBatch]:
        check_batch(batch, self.keys, self.in_channels, "NFT")
        check_dtype(self, batch, "NFT")
        xs = self.layout.extract(batch.tensors)
        if self.input_scale != 1.0:
            xs = [x * self.input_scale for x in xs]
        xs = self.lift.apply_pieces(xs)
        if self.io_embed is not None:
            xs = self.io_embed(xs)
        for block in self.blocks:
            xs = block(xs)
        xs = [self.norm(x) for x in xs]
        if self.out_features is None:
            return batch.with_tensors(self.layout.assemble(self.proj.apply_pieces(xs)))
        return self.head(self.feature_norm(self.pool.pool_pieces(xs)))
