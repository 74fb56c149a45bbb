"""Matching solvers for merging: linear assignment, entropic OT (Sinkhorn) and exact OT, batched.

Every solver takes NumPy arrays or torch tensors, one problem ``(n, m)`` or a batch ``(B, n, m)``, and
returns a frozen dataclass whose arrays are in the input's kind (NumPy in -> NumPy out, torch in ->
torch out on the input's device).

* :func:`linear_assignment` -- exact LAP (SciPy, or a batched certified torch auction), square or
  rectangular, ``maximize=`` option; :func:`hierarchical_assignment` for head-then-unit matching.
* :func:`sinkhorn` -- batched log-domain Sinkhorn with convergence record and epsilon annealing;
  :func:`round_to_permutation` rounds a plan to a permutation.
* :func:`emd` -- exact OT (POT's network simplex, or SciPy HiGHS on the transport LP).
"""
from ._emd import EMDResult, emd
from ._lap import (HierarchicalAssignmentResult, LinearAssignmentResult, hierarchical_assignment,
                   linear_assignment)
from ._sinkhorn import SinkhornResult, round_to_permutation, sinkhorn

__all__ = [
    "EMDResult",
    "HierarchicalAssignmentResult",
    "LinearAssignmentResult",
    "SinkhornResult",
    "emd",
    "hierarchical_assignment",
    "linear_assignment",
    "round_to_permutation",
    "sinkhorn",
]
