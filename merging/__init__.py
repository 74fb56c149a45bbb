"""merging: alignment and merging of checkpoints (imports ``weightspace`` only).

``merging.solvers`` holds the matching solvers (linear assignment, Sinkhorn, exact OT), batched and
device-agnostic.
"""
from weightspace.lazy import lazy_dir, lazy_getattr

_EXPORTS = {
    "solvers": "merging.solvers",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
