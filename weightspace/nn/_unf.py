"""Universal neural functionals: equivariant linear layers built from any PermutationSpec.

Zhou, Finn & Harrison 2024, "Universal Neural Functionals", arXiv:2402.05232. The layer spans the
*whole* space of linear maps that commute with the spec's permutation group (see
:mod:`weightspace.nn._basis` for the enumeration and its proof sketch), for every architecture the
tracer describes:

=========================  =================================================================
spec feature               how the layer treats it
=========================  =================================================================
MLP hidden units           group slots (HNP: inputs/outputs fixed, the true symmetry)
conv channels              group slots; kernel positions dense (``fixed_axes="dense"``) or
                           permuted per layer (``"permuted"``, the UNF paper's default, not a symmetry)
flatten ``(c x ~H*W)``     the product axis is split: ``c`` a slot, ``H*W`` dense
residual groups            one group on many tensors: every pair of them gets its terms
attention ``(heads x d)``  split into a head slot and a head-dim slot; q/k share a head-dim group
packed ``in_proj`` (q|k|v) the concat axis is split into one piece per block
BatchNorm / LayerNorm      their vectors are pieces with one slot (or dense if fixed)
square / recurrent W       repeated slots of one group: the diagonal terms (Bell counts) appear
=========================  =================================================================

Refused (:class:`UnsupportedSpecError`): a concatenation inside a product axis, more than 20 permuted
axes in one tensor. Basis growth: between two tensors with ``c_g`` slots of group ``g`` the layer has
``prod_g Bell(c_g(a)+c_g(b)) * F_a * F_b`` terms per channel pair, where ``F`` is the product of the
dense sizes; e.g. a hidden MLP weight to itself ``Bell(2)^2 = 4``, a square ``W -> W`` with one
group ``Bell(4) = 15``, a conv kernel to itself ``4 * 9 * 9 = 324`` in dense mode (``4 * Bell(2)^2 =
16`` with permuted kernel axes). Every pair of tensors is connected at least through its pooled
term, so the parameter count grows with the square of the number of tensors times ``F^2``;
``bottleneck=r`` factorises each signature's matrix through ``r`` dimensions (still equivariant,
full span only when ``r`` is large enough).

Measured basis sizes (terms per channel pair, i.e. parameters of one layer / (C_in C_out); the
zoo models of :mod:`weightspace.zoo`, traced specs, BatchNorm buffers excluded)::

    model (parameters)                   pieces   dense    io   permuted
    MLP 64-128-128-10 (26,122)                6   12,070    62        62
    VGG 16-M-32-M, BN, flatten (6,138)        8    8,266 1,476       124
    ResNet20 w=1, BN (272,186)               65   76,172 66,970    5,400
    TinyViT dim 32, depth 2 (18,218)         40    9,698 6,274     2,862

(``dense`` = the exact group; the MLP's dense count is dominated by the 64 input and 10 output
indices, the ResNet's by 9 x 9 kernel blocks between its 65 tensors.) Verified exactly against the
numerical commutant on small instances in ``tests/weightspace/nn/test_nn_span.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from weightspace.nn._basis import BasisPlan, SpaceLayout, UnsupportedSpecError, delta
from weightspace.nn._batch import BatchError, WeightSpaceBatch, default_keys
from weightspace.symmetry import PermutationSpec

log = logging.getLogger(__name__)

__all__ = ["UNFLayer", "UNF", "InvariantPool", "resolve_space", "make_activation", "EquivariantActivation"]

SpecLike = Union[PermutationSpec, WeightSpaceBatch]


def resolve_space(spec: SpecLike, keys: Optional[Sequence[str]]) -> Tuple[PermutationSpec, Tuple[str, ...]]:
    """``(spec, keys)`` from a spec (keys default to :func:`default_keys`) or from a batch (its keys)."""
    if isinstance(spec, WeightSpaceBatch):
        return spec.spec, tuple(keys) if keys is not None else spec.keys
    if not isinstance(spec, PermutationSpec):
        raise UnsupportedSpecError(
            f"expected a weightspace.PermutationSpec or a WeightSpaceBatch, not {type(spec).__name__}"
        )
    return spec, tuple(keys) if keys is not None else default_keys(spec)


def check_dtype(module: nn.Module, batch: WeightSpaceBatch, who: str) -> None:
    p = next(module.parameters(), None)
    if p is not None and p.is_floating_point() and p.dtype != batch.dtype:
        raise BatchError(
            f"{who} has {p.dtype} parameters but the batch holds {batch.dtype}; convert one of them "
            f"(batch.to({p.dtype}) or module.to({batch.dtype}))"
        )
    if p is not None and p.device != batch.device:
        raise BatchError(
            f"{who} is on {p.device} but the batch is on {batch.device}; move one of them (batch.to(device))"
        )


def check_batch(batch: Any, keys: Tuple[str, ...], channels: int, who: str) -> None:
    if not isinstance(batch, WeightSpaceBatch):
        raise BatchError(
            f"{who} takes a WeightSpaceBatch (wsnn.WeightSpaceBatch.from_state_dicts(state_dicts, spec)), "
            f"not {type(batch).__name__}"
        )
    if batch.keys != keys:
        extra, missing = sorted(set(batch.keys) - set(keys)), sorted(set(keys) - set(batch.keys))
        raise BatchError(
            f"{who} was built for other keys than the batch holds (batch only: {extra[:4]}, layer only: "
            f"{missing[:4]}{', or another order' if not extra and not missing else ''}); build the layer "
            "from the batch (pass the batch as spec, or keys=batch.keys)"
        )
    if batch.num_channels != channels:
        raise BatchError(f"{who} expects {channels} input channels but the batch has {batch.num_channels}")


class UNFLayer(nn.Module):
    """Equivariant linear map ``WeightSpaceBatch (C_in channels) -> WeightSpaceBatch (C_out channels)``.

    ``Y_a = sum_b sum_{partitions} E_a(R_b(X_b)) Theta + beta_a``: for every pair of pieces, every
    partition term (diagonal/mean on the input side, diagonal-embed/broadcast on the output side)
    with its own ``(F_b C_in) x (F_a C_out)`` matrix, plus an invariant bias (constant on each orbit of
    output coordinates). Spans the full commutant of the spec's group (module docstring of
    :mod:`weightspace.nn._basis`).

    Parameters
    ----------
    spec : a PermutationSpec (keys: :func:`default_keys`) or a WeightSpaceBatch (its spec and keys).
    in_channels, out_channels : channels per weight.
    keys : the processed keys (must equal the batch's keys).
    fixed_axes : ``"dense"`` (exact group; HNP for MLPs; the default here), ``"permuted"`` (every fixed
        axis permuted too; NP for MLPs, the UNF paper's default for kernels) or ``"io"`` (only the
        input/output neuron axes permuted; NFN's NP for CNNs).
    bias : add the invariant bias.
    bottleneck : factorise each signature's matrix through this many dimensions (None: full).
    """

    def __init__(
        self,
        spec: SpecLike,
        in_channels: int,
        out_channels: int,
        *,
        keys: Optional[Sequence[str]] = None,
        fixed_axes: str = "dense",
        bias: bool = True,
        bottleneck: Optional[int] = None,
        layout: Optional[SpaceLayout] = None,
        plan: Optional[BasisPlan] = None,
    ) -> None:
        super().__init__()
        spec, keys = resolve_space(spec, keys)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.layout = layout if layout is not None else SpaceLayout(spec, keys, fixed_axes)
        self.plan = plan if plan is not None else BasisPlan(self.layout, bias=bias)
        self.keys, self.in_channels, self.out_channels = tuple(keys), int(in_channels), int(out_channels)
        self.fixed_axes, self.bottleneck = self.layout.fixed_axes, bottleneck
        pieces = self.layout.pieces
        # fan-in of each output piece over all its terms, for a variance-preserving init
        fan = [0] * len(pieces)
        for s in self.plan.signatures:
            w = self.plan.in_width(s) * in_channels
            for t in self.plan.out_terms[s]:
                fan[t.piece] += w
        self.thetas = nn.ParameterList()
        self.factors = nn.ParameterList()
        for s in self.plan.signatures:
            n_in = self.plan.in_width(s) * in_channels + (1 if s == () and self.plan.bias else 0)
            cols = [
                torch.full((pieces[t.piece].F * out_channels,), 1.0 / math.sqrt(max(fan[t.piece], 1)))
                for t in self.plan.out_terms[s]
            ]
            std = torch.cat(cols)
            if bottleneck is None:
                theta = torch.randn(n_in, std.numel()) * std
                if s == () and self.plan.bias:
                    theta[-1].zero_()
                self.thetas.append(nn.Parameter(theta))
            else:
                r = int(bottleneck)
                self.thetas.append(nn.Parameter(torch.randn(n_in, r) / math.sqrt(max(n_in, 1))))
                self.factors.append(nn.Parameter(torch.randn(r, std.numel()) * std * math.sqrt(n_in / r)))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.out_channels}, {len(self.layout.pieces)} pieces, "
            f"{self.plan.num_terms()} terms, fixed_axes={self.fixed_axes!r}"
        )

    def matrices(self) -> List[torch.Tensor]:
        if self.bottleneck is None:
            return list(self.thetas)
        return [u @ v for u, v in zip(self.thetas, self.factors)]

    def forward(self, batch: WeightSpaceBatch) -> WeightSpaceBatch:
        check_batch(batch, self.keys, self.in_channels, "UNFLayer")
        check_dtype(self, batch, "UNFLayer")
        xs = self.layout.extract(batch.tensors)
        return batch.with_tensors(self.layout.assemble(self.apply_pieces(xs)))

    def apply_pieces(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """The layer on pieces ``(B, n..., F, C_in)`` -> pieces ``(B, n..., F, C_out)``.

        Output terms without diagonals are summed at their own (small) size per set of carried axes
        and broadcast once; terms with diagonal embeddings go through ``einsum`` with delta tensors."""
        pieces, plan = self.layout.pieces, self.plan
        B = xs[0].shape[0]
        flat = [x.reshape(*x.shape[:-2], -1) for x in xs]
        small: List[dict] = [{} for _ in pieces]  # per piece: carried slots -> (B, n_carried..., D)
        full: List[List[torch.Tensor]] = [[] for _ in pieces]
        dev, dt = flat[0].device, flat[0].dtype
        for s, theta in zip(plan.signatures, self.matrices()):
            zs = [t.reduce(flat[t.piece]) for t in plan.in_terms[s]]
            if s == () and plan.bias:
                zs.append(torch.ones(B, 1, device=dev, dtype=dt))
            z = torch.cat(zs, dim=-1) if len(zs) > 1 else zs[0]
            h = z @ theta
            off = 0
            for t in plan.out_terms[s]:
                w = pieces[t.piece].F * self.out_channels
                chunk = h[..., off : off + w]
                off += w
                if t.carried is not None:
                    order = sorted(range(len(t.carried)), key=lambda j: t.carried[j])
                    if order != list(range(len(order))):
                        chunk = chunk.permute(0, *(1 + j for j in order), chunk.dim() - 1)
                    key = tuple(sorted(t.carried))
                    acc = small[t.piece]
                    acc[key] = chunk if key not in acc else acc[key] + chunk
                else:
                    full[t.piece].append(torch.einsum(t.equation, chunk, *[delta(n, m, dev, dt) for n, m in t.deltas]))
        out = []
        for pi, p in enumerate(pieces):
            D = p.F * self.out_channels
            y = None
            for key, v in sorted(small[pi].items(), key=lambda kv: -len(kv[0])):
                shape = [B] + [p.slot_sizes[i] if i in key else 1 for i in range(len(p.slot_sizes))] + [D]
                v = v.reshape(shape)
                y = v if y is None else y + v
            for v in full[pi]:
                y = v if y is None else y + v
            y = y.expand(B, *p.slot_sizes, D)
            out.append(y.reshape(B, *p.slot_sizes, p.F, self.out_channels))
        return out


class InvariantPool(nn.Module):
    """All invariant linear functionals of a batch: ``(B, D_inv * C)``.

    For every piece and every partition of its slots, the mean over the diagonal (a full set of
    orbit indicators on coordinates): per-tensor means, means of diagonals of square weights, and every
    dense (fixed) index separately in ``"dense"`` mode (e.g. one mean per input feature of the first
    layer, per logit of the last) -- the complete HNP pooling.
    """

    def __init__(
        self,
        spec: SpecLike,
        channels: int,
        *,
        keys: Optional[Sequence[str]] = None,
        fixed_axes: str = "dense",
        layout: Optional[SpaceLayout] = None,
        plan: Optional[BasisPlan] = None,
    ) -> None:
        super().__init__()
        spec, keys = resolve_space(spec, keys)
        self.layout = layout if layout is not None else SpaceLayout(spec, keys, fixed_axes)
        self.plan = plan if plan is not None else BasisPlan(self.layout, bias=False)
        self.keys, self.channels = tuple(keys), int(channels)
        self.out_features = self.plan.in_width(()) * self.channels

    def forward(self, batch: WeightSpaceBatch) -> torch.Tensor:
        check_batch(batch, self.keys, self.channels, "InvariantPool")
        return self.pool_pieces(self.layout.extract(batch.tensors))

    def pool_pieces(self, xs: List[torch.Tensor]) -> torch.Tensor:
        flat = [x.reshape(*x.shape[:-2], -1) for x in xs]
        return torch.cat([t.reduce(flat[t.piece]) for t in self.plan.in_terms[()]], dim=-1)


def make_activation(name: Union[str, nn.Module, None]) -> nn.Module:
    if isinstance(name, nn.Module):
        return name
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, None: nn.Identity, "none": nn.Identity}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of relu, gelu, silu, tanh, none or pass a module")
    return table[name]()


class EquivariantActivation(nn.Module):
    """A pointwise nonlinearity applied to every weight and channel (equivariant to any permutation)."""

    def __init__(self, activation: Union[str, nn.Module] = "relu") -> None:
        super().__init__()
        self.act = make_activation(activation)

    def forward(self, batch: WeightSpaceBatch) -> WeightSpaceBatch:
        return batch.map(self.act)


def feature_norm_layer(features: int, enabled: bool) -> nn.Module:
    """``BatchNorm1d(features, affine=False)`` for ``feature_norm=True`` (no parameters, so state dicts
    without it keep their keys), else the identity."""
    return nn.BatchNorm1d(int(features), affine=False) if enabled else nn.Identity()


def readout_mlp(in_features: int, hidden: int, out_features: int, activation: Union[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), make_activation(activation), nn.Linear(hidden, out_features))


class UNF(nn.Module):
    """A universal neural functional: ``num_layers`` :class:`UNFLayer` s with pointwise nonlinearities.

    ``out_features=k`` (invariant): after the layers, :class:`InvariantPool` and a two-layer MLP give
    ``(B, k)``, invariant to the spec's group. ``out_features=None`` (equivariant): the last layer maps to
    ``out_channels`` and the result is a :class:`WeightSpaceBatch` (e.g. an edit or a learned update of
    the input weights; ``to_state_dicts()`` on it with ``out_channels=1``).

    Parameters
    ----------
    spec : PermutationSpec (processed keys :func:`default_keys`) or a WeightSpaceBatch (its keys).
    hidden_channels, num_layers : width and depth (``num_layers >= 1``).
    out_features : ``int`` for an invariant readout, ``None`` for an equivariant output.
    in_channels, out_channels : input channels (1 for raw weights), output channels when equivariant.
    fixed_axes, bottleneck : as in :class:`UNFLayer`.
    activation : pointwise nonlinearity between layers (``"relu"``, ``"gelu"``, ...).
    input_scale : multiply the input weights by this constant (weights are small; a scale near
        ``1 / weight std`` helps optimisation and keeps equivariance).
    io_embed : add learned embeddings to the promoted (input/output) axes after the first layer
        (Zhou et al. 2023, arXiv:2302.14040, Sec. 3.3): the processor is then equivariant only to the
        spec's own group (HNP), which removes the surplus NP symmetry. Needs ``fixed_axes != "dense"``.
    feature_norm : standardise the pooled invariant features over the batch (``BatchNorm1d`` without
        affine parameters, running statistics in eval mode) before the readout MLP, as StatNN does
        with its statistics (Unterthiner et al. 2020, arXiv:2002.11448). It keeps invariance (it acts
        on invariant features) and matters when networks share most of their weights: INRs fitted
        from one initialisation pool to features whose spread between networks is a few percent of
        their mean, which a plain MLP head learns from only slowly. Training batches need >= 2
        networks.
    """

    family = "UNF"

    def __init__(
        self,
        spec: SpecLike,
        hidden_channels: int = 16,
        num_layers: int = 3,
        out_features: Optional[int] = 1,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        keys: Optional[Sequence[str]] = None,
        fixed_axes: str = "dense",
        bottleneck: Optional[int] = None,
        activation: Union[str, nn.Module] = "relu",
        readout_hidden: Optional[int] = None,
        input_scale: float = 1.0,
        io_embed: bool = False,
        residual: bool = False,
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        spec, keys = resolve_space(spec, keys)
        self.validate_spec(spec, keys)
        if feature_norm and out_features is None:
            raise ValueError("feature_norm=True normalises the invariant readout; it needs an integer out_features")
        self.residual = bool(residual)
        if self.residual and (out_features is not None or out_channels != in_channels):
            raise ValueError(
                "residual=True needs an equivariant output (out_features=None) with out_channels == in_channels"
            )
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.keys, self.out_features, self.in_channels = tuple(keys), out_features, int(in_channels)
        self.input_scale = float(input_scale)
        self.layout = SpaceLayout(spec, keys, fixed_axes)
        plan = BasisPlan(self.layout, bias=True)
        widths = [in_channels] + [hidden_channels] * num_layers
        if out_features is None:
            widths[-1] = out_channels
        self.layers = nn.ModuleList(
            UNFLayer(spec, widths[i], widths[i + 1], keys=keys, bottleneck=bottleneck, layout=self.layout, plan=plan)
            for i in range(num_layers)
        )
        if self.residual:
            with torch.no_grad():
                for p in self.layers[-1].parameters():
                    p.zero_()
        self.act = make_activation(activation)
        self.io_embed = IOEmbedding(self.layout, widths[1]) if io_embed else None
        if io_embed and self.layout.fixed_axes == "dense":
            raise UnsupportedSpecError(
                "io_embed=True needs fixed_axes='io' or 'permuted' (there are no promoted axes to embed)"
            )
        if out_features is not None:
            self.pool = InvariantPool(spec, widths[-1], keys=keys, layout=self.layout, plan=plan)
            self.head = readout_mlp(
                self.pool.out_features, readout_hidden or max(hidden_channels * 4, 32), int(out_features), activation
            )
            self.feature_norm = feature_norm_layer(self.pool.out_features, feature_norm)
        log.debug(
            "UNF: %d pieces, %d basis terms per channel pair, %d parameters",
            len(self.layout.pieces),
            plan.num_terms(),
            sum(p.numel() for p in self.parameters()),
        )

    def forward(self, batch: WeightSpaceBatch) -> Union[torch.Tensor, WeightSpaceBatch]:
        check_batch(batch, self.keys, self.in_channels, type(self).__name__)
        check_dtype(self, batch, type(self).__name__)
        xs = self.layout.extract(batch.tensors)
        if self.input_scale != 1.0:
            xs = [x * self.input_scale for x in xs]
        for i, layer in enumerate(self.layers):
            xs = layer.apply_pieces(xs)
            if i == 0 and self.io_embed is not None:
                xs = self.io_embed(xs)
            if i < len(self.layers) - 1 or self.out_features is not None:
                xs = [self.act(x) for x in xs]
        if self.out_features is None:
            out = self.layout.assemble(xs)
            if self.residual:
                out = {k: batch.tensors[k] + v for k, v in out.items()}
            return batch.with_tensors(out)
        return self.head(self.feature_norm(self.pool.pool_pieces(xs)))

    def validate_spec(self, spec: PermutationSpec, keys: Tuple[str, ...]) -> None:
        """Families restricted to some architectures refuse the others here (UNF takes every spec)."""


class IOEmbedding(nn.Module):
    """Learned ``(n_g, C)`` embeddings added along every axis of each promoted group ``g`` (the groups a
    ``fixed_axes="io"/"permuted"`` layout adds for fixed axes): positions on the network's input and output
    axes become distinguishable, so the model is equivariant to the spec's own group only."""

    def __init__(self, layout: SpaceLayout, channels: int) -> None:
        super().__init__()
        self.layout = layout
        self.promoted = [g for g in layout.groups if g not in layout.spec.groups]
        self.embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(layout.groups[g], channels) * 0.1) for g in self.promoted
        )

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for p, x in zip(self.layout.pieces, xs):
            for i, g in enumerate(p.slots):
                if g in self.promoted:
                    e = self.embeddings[self.promoted.index(g)]
                    shape = [1] * x.dim()
                    shape[1 + i], shape[-1] = e.shape[0], e.shape[1]
                    x = x + e.reshape(shape)
            out.append(x)
        return out
