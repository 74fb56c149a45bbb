"""One engine for every equivariant linear layer: pieces of a weight space and the complete basis.

**Pieces.** Each processed tensor of a spec is cut into *pieces*: a concatenated axis
(``Axis.concat``, e.g. the packed q|k|v ``in_proj_weight``) splits the tensor into blocks, a product
axis (``Axis.product``: ``(channels x ~H*W)`` after a flatten, ``(heads x head_dim)`` in attention)
is reshaped into its factors (row-major). A piece is then a tensor whose axes are either *slots*
(permuted by a group) or *dense* (never permuted: input features, logits, kernel positions, the
``~H*W`` factor); the dense axes are moved last and flattened into one axis of size ``F``, so a
piece is ``(B, n_{g_1}, ..., n_{g_k}, F, C)``.

**Basis** (Maron et al. 2019, arXiv:1812.09902; Zhou, Finn & Harrison 2024, "Universal Neural
Functionals", arXiv:2402.05232, Thm 3.3). A linear map from piece ``b`` to piece ``a`` commuting with
the group is a sum over the set partitions of the slots of ``a`` and ``b`` together in which each
block holds slots of one group:

* input slots in one block are tied (take the diagonal);
* blocks with input slots only are averaged out (means, not sums, so that the scale does not depend
  on widths);
* blocks with input and output slots carry the index through;
* output slots in one block are tied (embedded on the diagonal), blocks with output slots only are
  broadcast;

and for each partition a dense learned matrix over ``(F_b * C_in) x (F_a * C_out)`` (dense axes are
not acted on, so the map is arbitrary over them). The number of terms between ``a`` and ``b`` is
``prod_g Bell(c_g(a) + c_g(b))`` (``c_g`` = number of slots of group ``g``), times ``F_a F_b`` per
channel pair; with an invariant bias, ``prod_g Bell(c_g(a)) F_a`` more. These elements are the
orbit indicators of the group on coordinate pairs up to an invertible (Moebius) change of basis, so
they span the full commutant; they are linearly independent whenever every group has at least as
many elements as slots of it in the pair (``n_g >= c_g(a) + c_g(b)``), otherwise some are redundant
(the span is still complete).

**Computation.** A term factors through an intermediate tensor indexed by the blocks that carry an
index through (its *signature*: the sorted tuple of their groups). All terms with one signature
share one matrix product: every input piece is reduced to that signature (diagonals + means, one
``einsum`` per input pattern), the reductions are concatenated along features, multiplied once by
the signature's parameter matrix, and the result is split and laid out into every output piece
(diagonal embedding + broadcast, one ``einsum`` per output pattern). Channels are last throughout.

**Dense vs permuted fixed axes.** ``fixed_axes="dense"`` (default) keeps the spec's group exactly:
for an MLP it is the HNP group (hidden neurons only, the true symmetry). ``fixed_axes="permuted"``
additionally treats every fixed axis of size > 1 as permuted by a group of its own (the rows of a
``weight`` and its ``bias`` share one): for an MLP this is the NP group of Zhou et al. 2023
(arXiv:2302.14040), and for CNNs it permutes kernel positions as UNF does by default. It is a
larger group than the true symmetry (so a smaller, cheaper basis: ``F = 1`` everywhere) and is
equivariant to the true symmetry as well. ``fixed_axes="io"`` promotes only the fixed *neuron* axes
(axis 0 or 1 of a ``weight``/``bias``: the network's inputs and outputs) and keeps kernel positions
and flatten factors dense: the NP group of NFN for CNNs, which folds kernels into channels.
"""

from __future__ import annotations

import itertools
import logging
import math
import string
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from weightspace.results import WeightspaceError
from weightspace.symmetry import PermutationSpec

log = logging.getLogger(__name__)

__all__ = ["Piece", "SpaceLayout", "BasisPlan", "UnsupportedSpecError", "bell", "set_partitions"]

FIXED_MODES = ("dense", "permuted", "io")


class UnsupportedSpecError(WeightspaceError, ValueError):
    """A spec has a feature that a layer family does not support (the message says which, and what to use)."""


@lru_cache(maxsize=None)
def bell(n: int) -> int:
    """The Bell number B_n: the number of set partitions of n elements (B_0 = 1)."""
    row = [1]
    for _ in range(n):
        nxt = [row[-1]]
        for x in row:
            nxt.append(nxt[-1] + x)
        row = nxt
    return row[0]


def set_partitions(items: Sequence[int]) -> Iterator[List[List[int]]]:
    """Every set partition of ``items`` (as lists of blocks), Bell(len(items)) of them."""
    items = list(items)
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in set_partitions(rest):
        yield [[first]] + p
        for i in range(len(p)):
            yield p[:i] + [[first] + p[i]] + p[i + 1 :]


# ----------------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One block of one tensor: ``slices`` cut it out (concat axes), ``sub_sizes``/``sub_groups`` describe
    its axes after product axes are split; ``sub_groups[i]`` is a group name (a slot) or ``None`` (dense)."""

    key: str
    label: str
    slices: Tuple[Tuple[int, int, int], ...]
    sub_sizes: Tuple[int, ...]
    sub_groups: Tuple[Optional[str], ...]

    @cached_property
    def slot_pos(self) -> Tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.sub_groups) if g is not None)

    @cached_property
    def dense_pos(self) -> Tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.sub_groups) if g is None)

    @cached_property
    def slots(self) -> Tuple[str, ...]:
        return tuple(self.sub_groups[i] for i in self.slot_pos)

    @cached_property
    def slot_sizes(self) -> Tuple[int, ...]:
        return tuple(self.sub_sizes[i] for i in self.slot_pos)

    @cached_property
    def F(self) -> int:
        return math.prod(self.sub_sizes[i] for i in self.dense_pos)


def _flatten_layout(lay, size: int, where: str) -> List[Tuple[int, int, List[Tuple[Optional[str], int]]]]:
    """A layout as a list of ``(start, stop, [(group or None, size), ...])`` blocks of the axis."""
    if lay is None or lay.kind == "fixed":
        return [(0, size, [(None, size)])]
    if lay.kind == "group":
        return [(0, size, [(lay.name, size)])]
    if lay.kind == "product":
        subs: List[Tuple[Optional[str], int]] = []
        for p in lay.parts:
            opts = _flatten_layout(p, p.size, where)
            if len(opts) != 1:
                raise UnsupportedSpecError(
                    f"{where} is a product axis with a concatenated factor ({lay}); the equivariant layers support "
                    "products of groups and fixed sizes and concatenations of those, not concatenations inside products"
                )
            subs += opts[0][2]
        return [(0, size, subs)]
    out, off = [], 0
    for p in lay.parts:
        for s, e, subs in _flatten_layout(p, p.size, where):
            out.append((off + s, off + e, subs))
        off += p.size
    return out


class SpaceLayout:
    """The pieces of the processed keys of a spec, for one treatment of fixed axes.

    ``groups`` maps every group that acts on a slot (the spec's, plus the promoted fixed axes in
    ``"permuted"`` mode) to its size, in a fixed order that defines canonical signatures.
    """

    def __init__(self, spec: PermutationSpec, keys: Sequence[str], fixed_axes: str = "dense") -> None:
        if fixed_axes not in FIXED_MODES:
            raise UnsupportedSpecError(f"fixed_axes must be one of {FIXED_MODES}, not {fixed_axes!r}")
        self.spec, self.keys, self.fixed_axes = spec, tuple(keys), fixed_axes
        groups: Dict[str, int] = dict(spec.groups)
        pieces: List[Piece] = []
        self.key_pieces: Dict[str, List[int]] = {}
        for key in self.keys:
            if key not in spec.axes:
                raise UnsupportedSpecError(f"key {key!r} is not described by the spec")
            shape = spec.shapes.get(key)
            layouts = spec.axes[key]
            if shape is None:
                shape = tuple(l.size if l is not None else -1 for l in layouts)
                if -1 in shape:
                    raise UnsupportedSpecError(
                        f"the spec has no shape for {key!r}; build it with shapes (from_axes_to_perm does)"
                    )
            per_axis = [_flatten_layout(l, shape[ax], f"{key!r} axis {ax}") for ax, l in enumerate(layouts)]

            def nsub_ok(ax: int, subs, per_axis=per_axis, key=key) -> bool:  # "io": a neuron axis of a weight/bias
                return (
                    ax <= 1
                    and len(subs) == 1
                    and len(per_axis[ax]) == 1
                    and key.rpartition(".")[2] in ("weight", "bias")
                )

            self.key_pieces[key] = []
            for combo in itertools.product(*per_axis) if per_axis else [()]:
                slices = tuple((ax, s, e) for ax, (s, e, _) in enumerate(combo) if len(per_axis[ax]) > 1)
                sizes, names = [], []
                for ax, (_, _, subs) in enumerate(combo):
                    for j, (g, n) in enumerate(subs):
                        promote = fixed_axes == "permuted" or (fixed_axes == "io" and nsub_ok(ax, subs))
                        if g is None and promote and n > 1:
                            g = self._promoted_name(key, ax, j, len(subs), len(shape))
                            if groups.setdefault(g, n) != n:
                                raise UnsupportedSpecError(f"fixed axes tied as {g!r} have sizes {groups[g]} and {n}")
                        sizes.append(n)
                        names.append(g)
                label = key if not slices else key + "[" + ",".join(f"{ax}:{s}:{e}" for ax, s, e in slices) + "]"
                self.key_pieces[key].append(len(pieces))
                pieces.append(Piece(key, label, slices, tuple(sizes), tuple(names)))
        self.pieces: Tuple[Piece, ...] = tuple(pieces)
        used = {g for p in pieces for g in p.slots}
        self.groups: Dict[str, int] = {g: n for g, n in groups.items() if g in used}
        self.order: Dict[str, int] = {g: i for i, g in enumerate(self.groups)}

    @staticmethod
    def _promoted_name(key: str, ax: int, j: int, nsub: int, ndim: int) -> str:
        mod, _, leaf = key.rpartition(".")
        if ax == 0 and nsub == 1 and leaf in ("weight", "bias") and mod:
            return f"{mod}:out"  # a module's output units: rows of its weight and its bias
        return f"{key}:{ax}" + (f".{j}" if nsub > 1 else "")

    # -- tensors <-> pieces ------------------------------------------------------------------------
    def extract(self, tensors: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Pieces as ``(B, n_{g_1}, ..., n_{g_k}, F, C)`` tensors (views where possible)."""
        out = []
        for p in self.pieces:
            x = tensors[p.key]
            for ax, s, e in p.slices:
                x = x.narrow(ax + 1, s, e - s)
            B, C = x.shape[0], x.shape[-1]
            x = x.reshape(B, *p.sub_sizes, C)
            order = [0] + [1 + i for i in p.slot_pos] + [1 + i for i in p.dense_pos] + [len(p.sub_sizes) + 1]
            out.append(x.permute(order).reshape(B, *p.slot_sizes, p.F, C))
        return out

    def assemble(self, pieces: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Inverse of :meth:`extract`: ``{key: (B, *shape, C)}``."""
        out: Dict[str, torch.Tensor] = {}
        for key, idxs in self.key_pieces.items():
            shape = self.spec.shapes[key]
            parts = []
            for i in idxs:
                p, y = self.pieces[i], pieces[i]
                B, C = y.shape[0], y.shape[-1]
                y = y.reshape(B, *p.slot_sizes, *(p.sub_sizes[j] for j in p.dense_pos), C)
                order = list(p.slot_pos) + list(p.dense_pos)
                inv = [0] * len(order)
                for pos, j in enumerate(order):
                    inv[j] = pos
                y = y.permute([0] + [1 + j for j in inv] + [len(order) + 1])
                sliced = list(shape)
                for ax, s, e in p.slices:
                    sliced[ax] = e - s
                parts.append((p, y.reshape(B, *sliced, C)))
            if len(parts) == 1 and not parts[0][0].slices:
                out[key] = parts[0][1]
                continue
            B, C = parts[0][1].shape[0], parts[0][1].shape[-1]
            full = parts[0][1].new_zeros((B, *shape, C))
            for p, y in parts:
                index = [slice(None)] * (len(shape) + 2)
                for ax, s, e in p.slices:
                    index[ax + 1] = slice(s, e)
                full[tuple(index)] = y
            out[key] = full
        return out


# ----------------------------------------------------------------------------------------------------
# patterns
# ----------------------------------------------------------------------------------------------------
def _partitions_by_group(slots: Tuple[str, ...]) -> Iterator[List[Tuple[int, ...]]]:
    names = list(dict.fromkeys(slots))
    per = [list(set_partitions([i for i, s in enumerate(slots) if s == g])) for g in names]
    for combo in itertools.product(*per):
        yield sorted(tuple(sorted(b)) for part in combo for b in part)


_LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class InTerm:
    piece: int
    equation: str  # einsum: piece (B, slots..., D) -> (B, signature..., D)
    divisor: float  # product of the sizes of averaged-out blocks
    sum_dims: Optional[Tuple[int, ...]] = None  # fast path (no diagonal): slot axes to sum ...
    perm: Tuple[int, ...] = ()  # ... then this order of the remaining axes

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The input side of the term on a flattened piece ``(B, n..., D)`` -> ``(B, n_sig..., D)``."""
        if self.sum_dims is None:
            y = torch.einsum(self.equation, x)
        else:
            y = x.sum(dim=[1 + d for d in self.sum_dims]) if self.sum_dims else x
            if self.perm != tuple(range(len(self.perm))):
                y = y.permute(0, *(1 + j for j in self.perm), y.dim() - 1)
        return y / self.divisor if self.divisor != 1.0 else y


@dataclass(frozen=True)
class OutTerm:
    piece: int
    equation: str  # einsum: chunk (B, signature..., D), deltas... -> (B, slots..., D)
    deltas: Tuple[Tuple[int, int], ...]  # (size, order) of each delta / ones operand
    carried: Optional[Tuple[int, ...]] = None  # fast path (no diagonal): the slot each signature axis lands on


class BasisPlan:
    """The complete equivariant basis between all pieces of a layout, grouped by signature."""

    def __init__(self, layout: SpaceLayout, bias: bool = True) -> None:
        self.layout, self.bias = layout, bias
        order, sizes = layout.order, layout.groups
        in_terms: Dict[Tuple[str, ...], List[InTerm]] = {}
        out_terms: Dict[Tuple[str, ...], List[OutTerm]] = {}
        for pi, p in enumerate(layout.pieces):
            slots = p.slots
            k = len(slots)
            if k > 20:
                raise UnsupportedSpecError(
                    f"{p.label}: {k} permuted axes in one tensor; the basis enumeration supports at most 20"
                )
            for blocks in _partitions_by_group(slots):
                for mask in range(1 << len(blocks)):
                    kept = [bi for bi in range(len(blocks)) if mask >> bi & 1]
                    kept.sort(key=lambda bi: (order[slots[blocks[bi][0]]], blocks[bi][0]))
                    sig = tuple(slots[blocks[bi][0]] for bi in kept)
                    # input side: slot letter = its block's letter; output keeps the kept blocks in order
                    letter = {}
                    for bi, b in enumerate(blocks):
                        for s in b:
                            letter[s] = _LETTERS[bi]
                    src = "".join(letter[s] for s in range(k))
                    dst = "".join(_LETTERS[bi] for bi in kept)
                    div = float(math.prod(sizes[slots[b[0]]] for bi, b in enumerate(blocks) if bi not in kept))
                    simple = all(len(b) == 1 for b in blocks)
                    sum_dims = tuple(b[0] for bi, b in enumerate(blocks) if bi not in kept) if simple else None
                    rest = sorted(blocks[bi][0] for bi in kept)
                    perm = tuple(rest.index(blocks[bi][0]) for bi in kept)
                    in_terms.setdefault(sig, []).append(InTerm(pi, f"Y{src}Z->Y{dst}Z", div, sum_dims, perm))
                    # output side: every matching of the signature positions onto the kept blocks
                    for assign in self._assignments(sig, [blocks[bi] for bi in kept], slots):
                        out_terms.setdefault(sig, []).append(self._out_term(pi, k, blocks, assign, slots, sizes))
        self.signatures = sorted(
            set(in_terms) & set(out_terms) | ({()} if bias and () in out_terms else set()),
            key=lambda s: (len(s), [order[g] for g in s]),
        )
        self.in_terms = {s: in_terms.get(s, []) for s in self.signatures}
        self.out_terms = {s: out_terms[s] for s in self.signatures}

    @staticmethod
    def _assignments(
        sig: Tuple[str, ...], kept_blocks: List[Tuple[int, ...]], slots
    ) -> Iterator[Tuple[Tuple[int, ...], ...]]:
        """Yield, for each group-respecting bijection, the block assigned to each signature position."""
        by_group: Dict[str, List[int]] = {}
        for j, g in enumerate(sig):
            by_group.setdefault(g, []).append(j)
        names = list(by_group)
        blocks_of = {g: [b for b in kept_blocks if slots[b[0]] == g] for g in names}
        for combo in itertools.product(*(itertools.permutations(blocks_of[g]) for g in names)):
            assign: List[Optional[Tuple[int, ...]]] = [None] * len(sig)
            for g, perm in zip(names, combo):
                for j, b in zip(by_group[g], perm):
                    assign[j] = b
            yield tuple(assign)

    @staticmethod
    def _out_term(pi: int, k: int, blocks, assign, slots, sizes) -> OutTerm:
        chunk = "".join(_LETTERS[b[0]] for b in assign)  # each signature axis -> first slot of its block
        operands, deltas = [], []
        carried = {b for b in assign}
        for b in blocks:
            if b in carried and len(b) == 1:
                continue
            operands.append("".join(_LETTERS[s] for s in b))  # delta over the block's slots (ones if 1 slot)
            deltas.append((sizes[slots[b[0]]], len(b)))
        out = "".join(_LETTERS[s] for s in range(k))
        eq = ",".join([f"Y{chunk}Z"] + operands) + f"->Y{out}Z"
        simple = all(len(b) == 1 for b in blocks)
        return OutTerm(pi, eq, tuple(deltas), tuple(b[0] for b in assign) if simple else None)

    # -- counts ------------------------------------------------------------------------------------------
    def in_width(self, sig: Tuple[str, ...]) -> int:
        """Input features of one signature for one channel (sum of F over its input patterns)."""
        return sum(self.layout.pieces[t.piece].F for t in self.in_terms[sig])

    def out_width(self, sig: Tuple[str, ...]) -> int:
        return sum(self.layout.pieces[t.piece].F for t in self.out_terms[sig])

    def num_terms(self) -> int:
        """Dimension of the linear part of the span for one channel pair (= the commutant's dimension
        when every group is at least as large as its number of slots in each pair)."""
        return sum(self.in_width(s) * self.out_width(s) for s in self.signatures)

    def num_bias_terms(self) -> int:
        return self.out_width(()) if self.bias and () in self.out_terms else 0

    def bell_count(self) -> int:
        """``sum_{a,b} prod_g Bell(c_g(a) + c_g(b)) F_a F_b`` (Zhou, Finn & Harrison 2024, App. B.2)."""
        pieces = self.layout.pieces
        total = 0
        for a in pieces:
            for b in pieces:
                t = a.F * b.F
                for g in set(a.slots) | set(b.slots):
                    t *= bell(a.slots.count(g) + b.slots.count(g))
                total += t
        return total


_DELTA_CACHE: Dict[Tuple[int, int, str, torch.dtype], torch.Tensor] = {}


def delta(n: int, m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The order-``m`` identity over ``n`` indices (``ones(n)`` for ``m = 1``, ``eye(n)`` for ``m = 2``)."""
    key = (n, m, str(device), dtype)
    t = _DELTA_CACHE.get(key)
    if t is None:
        if m == 1:
            t = torch.ones(n, device=device, dtype=dtype)
        else:
            t = torch.zeros((n,) * m, device=device, dtype=dtype)
            idx = torch.arange(n, device=device)
            t[(idx,) * m] = 1
        if len(_DELTA_CACHE) > 256:
            _DELTA_CACHE.clear()
        _DELTA_CACHE[key] = t
    return t
