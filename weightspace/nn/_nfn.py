"""Neural functional networks, NP and HNP (Zhou et al., NeurIPS 2023, "Permutation Equivariant Neural
Functionals", arXiv:2302.14040).

Scope (as in the paper): MLPs and CNNs made of conv layers, a global pooling and dense layers, i.e.
a chain of ``weight`` (axis 0: this layer's units, axis 1: the previous layer's units, further
axes: kernel positions) and optional ``bias`` tensors in which every hidden group acts on exactly the
rows of one weight (and its bias) and the columns of the next weight. Residual connections,
normalisation layers, attention and flattens (``(channels x ~H*W)``) are refused with a pointer to
:class:`~weightspace.nn.UNF`, which handles them.

Variants
--------
* ``"NP"`` -- the input and output neurons are permuted too (``fixed_axes="io"``; kernel positions stay
  dense, NFN folds them into channels). Eq. 2 of the paper spans this commutant; so do we (62 maps on a
  [3,4,5,2] MLP). ``io_embed=True`` (default for NP processors) adds the paper's learned I/O
  embeddings, making the processor equivariant to the true (HNP) group only.
* ``"HNP"`` -- the true symmetry (``fixed_axes="dense"``): inputs/outputs fixed, the map is dense over
  them. The published HNP layer misses some maps (140 of 142 on [3,4,5,2]: the ``v^(L-1) -> W^(L)``
  terms); ours is built from the complete basis and reaches 142.

Both are the basis engine of :mod:`weightspace.nn._basis` restricted to NFN's architectures, with
NFN's pooling for invariant heads (means over permuted axes, HNP keeping one feature per fixed
input/output index) -- see :class:`~weightspace.nn.InvariantPool`. Hence on these architectures
``NFN(spec, variant="HNP")`` and ``UNF(spec, fixed_axes="dense")`` are the same model (same basis, same
parameters in the same order, so the same initialisation under one seed); UNF's own default for
kernels, ``fixed_axes="permuted"`` (Zhou, Finn & Harrison 2024), is a different, smaller model.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple


from weightspace.nn._basis import UnsupportedSpecError
from weightspace.nn._unf import UNF, SpecLike, UNFLayer, resolve_space
from weightspace.symmetry import PermutationSpec

__all__ = ["NFNLayer", "NFN", "check_chain_spec", "VARIANTS"]

VARIANTS = {"NP": "io", "HNP": "dense"}


def check_chain_spec(spec: PermutationSpec, keys: Sequence[str], family: str, allow_kernels: bool = True) -> None:
    """Refuse specs that are not a plain chain of weights (and biases), naming the feature."""
    hint = f"{family} supports MLPs{' and conv -> pool -> dense CNNs' if allow_kernels else ''}; use weightspace.nn.UNF for this spec"  # noqa: E501
    keyset = set(keys)
    for k in keys:
        lays = spec.axes[k]
        for ax, lay in enumerate(lays):
            if lay is not None and not lay.is_simple:
                what = (
                    "concatenated (packed q|k|v)"
                    if lay.kind == "concat"
                    else "structured (a flatten or attention heads)"
                )
                raise UnsupportedSpecError(f"{family}: {k!r} axis {ax} is {what}: {lay}. {hint}")
        leaf = k.rpartition(".")[2]
        if not ((leaf == "weight" and len(lays) >= 2) or (leaf == "bias" and len(lays) == 1)):
            raise UnsupportedSpecError(
                f"{family}: {k!r} (shape {spec.shapes.get(k)}) is neither a weight nor a bias "
                f"(a normalisation, embedding or other parameter); {hint}"
            )
        if len(lays) > 2 and not allow_kernels:
            raise UnsupportedSpecError(f"{family}: {k!r} has shape {spec.shapes.get(k)} (a conv kernel); {hint}")
        if len(lays) > 2 and any(l is not None and l.kind == "group" for l in lays[2:]):
            raise UnsupportedSpecError(f"{family}: {k!r} has permuted kernel axes; {hint}")
    for g in spec.groups:
        where = [(k, ax) for k, ax, _ in spec.perm_to_axes[g] if k in keyset]
        rows = [k for k, ax in where if ax == 0 and len(spec.axes[k]) >= 2]
        cols = [k for k, ax in where if ax == 1]
        biases = [k for k, ax in where if ax == 0 and len(spec.axes[k]) == 1]
        ok = len(rows) == 1 and len(cols) == 1 and len(where) == 2 + len(biases) and len(biases) <= 1
        if ok and biases:
            ok = biases[0].rpartition(".")[0] == rows[0].rpartition(".")[0]
        if not ok:
            shown = ", ".join(f"{k}[{ax}]" for k, ax in where[:6]) + (" ..." if len(where) > 6 else "")
            raise UnsupportedSpecError(
                f"{family}: group {g!r} acts on {len(where)} axes ({shown}); {family} needs each hidden group on the rows of one "  # noqa: E501
                f"weight (+ its bias) and the columns of the next (residual connections and normalisation layers are "
                f"not supported). {hint}"
            )


def _fixed_axes(variant: str, family: str) -> str:
    if variant not in VARIANTS:
        raise UnsupportedSpecError(f"{family}: variant must be 'NP' or 'HNP', not {variant!r}")
    return VARIANTS[variant]


class NFNLayer(UNFLayer):
    """An NFN linear layer, ``variant="NP"`` or ``"HNP"``: the complete equivariant basis of that group
    on NFN's architectures (see the module docstring). Same call as :class:`UNFLayer`."""

    def __init__(
        self,
        spec: SpecLike,
        in_channels: int,
        out_channels: int,
        variant: str = "NP",
        *,
        keys: Optional[Sequence[str]] = None,
        bias: bool = True,
        **kwargs,
    ) -> None:
        spec_, keys_ = resolve_space(spec, keys)
        check_chain_spec(spec_, keys_, "NFNLayer")
        super().__init__(
            spec_,
            in_channels,
            out_channels,
            keys=keys_,
            fixed_axes=_fixed_axes(variant, "NFNLayer"),
            bias=bias,
            **kwargs,
        )
        self.variant = variant


class NFN(UNF):
    """An NFN processor: NFN layers (NP or HNP) with pointwise nonlinearities, then an invariant pooling and
    an MLP (``out_features=k``) or an equivariant output (``out_features=None``). ``io_embed`` defaults to
    ``True`` for NP (the paper's setting) and must be ``False`` for HNP. Other options as :class:`UNF`."""

    family = "NFN"

    def __init__(
        self,
        spec: SpecLike,
        hidden_channels: int = 16,
        num_layers: int = 3,
        out_features: Optional[int] = 1,
        *,
        variant: str = "NP",
        io_embed: Optional[bool] = None,
        **kwargs,
    ) -> None:
        if "fixed_axes" in kwargs:
            raise TypeError("NFN sets fixed_axes from variant ('NP' or 'HNP'); use UNF for other choices")
        fixed = _fixed_axes(variant, "NFN")
        if io_embed is None:
            io_embed = variant == "NP"
        self.variant = variant
        super().__init__(spec, hidden_channels, num_layers, out_features, fixed_axes=fixed, io_embed=io_embed, **kwargs)

    def validate_spec(self, spec: PermutationSpec, keys: Tuple[str, ...]) -> None:
        check_chain_spec(spec, keys, "NFN")
