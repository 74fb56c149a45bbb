"""viz: Plotly figures and self-contained HTML reports (imports result types only).

>>> import viz                                                            # doctest: +SKIP
>>> viz.Report("LMC").add(viz.barrier_figure(curve)).write("report.html")  # doctest: +SKIP
"""
from weightspace.lazy import lazy_dir, lazy_getattr

_EXPORTS = {
    "Report": "viz._report",
    "barrier_figure": "viz._figures",
    "landscape_figure": "viz._figures",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
