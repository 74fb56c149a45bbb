"""Deep weight-space networks (Navon et al., ICML 2023, "Equivariant Architectures for Learning in Deep
Weight Spaces", arXiv:2301.12780).

Scope: MLPs (a chain of 2-D ``weight`` and 1-D ``bias`` tensors), the true (HNP) symmetry: hidden
neurons permuted, input and output neurons fixed.

The DWS layer is the affine map ``W' = (W -> W) + (b -> W)``, ``b' = (b -> b) + (W -> b)`` with one
block per pair of layers, and Thm 5.1 of the paper states that these blocks span all affine
HNP-equivariant maps. The published blocks (DeepSets/set layers per pair) miss some of them: 139
of 142 linear maps on a [3,4,5,2] MLP (a wrong "last dim is input" flag
in the ``i = j - 1, j = L - 1`` W->W block and a missing non-neighbour b->W case). Our
:class:`DWSLayer` is not a port of those set layers: it is the basis engine of
:mod:`weightspace.nn._basis` restricted to DWS's scope and group. Its terms are organised by the same
pairs of tensors as the DWS blocks (diagonal, mean and broadcast terms on the hidden axes, dense over
the fixed input and output indices, which DWS folds into the features), and it reaches 142/142, the
theorem's claim. :class:`DWSNet` stacks them with DWS's invariant head (pool, then an MLP).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from weightspace.nn._nfn import check_chain_spec
from weightspace.nn._unf import UNF, SpecLike, UNFLayer, resolve_space
from weightspace.symmetry import PermutationSpec

__all__ = ["DWSLayer", "DWSNet"]


class DWSLayer(UNFLayer):
    """An affine HNP-equivariant layer on MLP weight spaces spanning all such maps (Navon et al. 2023, Thm 5.1)."""

    def __init__(
        self,
        spec: SpecLike,
        in_channels: int,
        out_channels: int,
        *,
        keys: Optional[Sequence[str]] = None,
        bias: bool = True,
        **kwargs,
    ) -> None:
        spec_, keys_ = resolve_space(spec, keys)
        check_chain_spec(spec_, keys_, "DWSLayer", allow_kernels=False)
        super().__init__(spec_, in_channels, out_channels, keys=keys_, fixed_axes="dense", bias=bias, **kwargs)


class DWSNet(UNF):
    """DWSNet: :class:`DWSLayer` s with pointwise ReLUs, then the invariant pooling + MLP head
    (``out_features=k``) or an equivariant output (``out_features=None``). Options as :class:`UNF`."""

    family = "DWSNet"

    def __init__(
        self, spec: SpecLike, hidden_channels: int = 16, num_layers: int = 3, out_features: Optional[int] = 1, **kwargs
    ) -> None:
        if "fixed_axes" in kwargs:
            raise TypeError(
                "DWSNet is HNP-equivariant (fixed_axes='dense'); use UNF or NFN(variant='NP') for other groups"
            )
        super().__init__(spec, hidden_channels, num_layers, out_features, fixed_axes="dense", **kwargs)

    def validate_spec(self, spec: PermutationSpec, keys: Tuple[str, ...]) -> None:
        check_chain_spec(spec, keys, "DWSNet", allow_kernels=False)
