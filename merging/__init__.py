"""merging: alignment and merging of checkpoints (imports ``weightspace`` only).

>>> import merging                                                               # doctest: +SKIP
>>> res = merging.merge(model_a, model_b, method="weight_matching", example_inputs=x)   # doctest: +SKIP
>>> res.model, res.state_dict, res.alignment, res.spec, res.settings, res.log          # doctest: +SKIP
>>> aln = merging.align(model_a, model_b, method="weight_matching", example_inputs=x)  # doctest: +SKIP
>>> merging.methods()        # name -> MethodInfo(paper, needs, options, aligns, ...)  # doctest: +SKIP

Methods are registered with :func:`register` (a decorator recording the paper); ``merging.methods()``
lists all of them however the package was imported. ``merging.solvers`` holds the matching solvers
(linear assignment, Sinkhorn, exact OT), batched and device-agnostic.
"""
from weightspace.lazy import lazy_dir, lazy_getattr

_EXPORTS = {
    "merge": "merging._api",
    "align": "merging._api",
    "methods": "merging._registry",
    "get_method": "merging._registry",
    "register": "merging._registry",
    "MethodInfo": "merging._registry",
    "MergeContext": "merging._registry",
    "MethodOutput": "merging._registry",
    "MergeError": "merging._registry",
    "Alignment": "merging._results",
    "MergeResult": "merging._results",
    "RotatedAlignment": "merging._procrustes",
    "solvers": "merging.solvers",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
