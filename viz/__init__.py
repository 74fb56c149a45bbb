"""viz: Plotly figures and self-contained offline HTML reports (reads result objects only).

Every figure builder takes result objects (``analysis``/``merging`` results, read by attribute) and
returns a ``plotly.graph_objects.Figure``; one palette gives each model ("A", "B", "merged") and each
method ("naive", "weight_matching", ...) the same colour everywhere (:func:`color`). Reports inline
plotly.js once, fetch nothing, and are byte-identical for identical inputs.

>>> import viz                                                            # doctest: +SKIP
>>> viz.Report("LMC").add(viz.barrier_figure(curve)).write("report.html")  # doctest: +SKIP
>>> viz.analysis_report({"Interpolation": {"naive": c0}}, "A vs B").write("r.html")  # doctest: +SKIP
"""

from weightspace.lazy import lazy_dir, lazy_getattr

_EXPORTS = {
    # reports
    "Report": "viz._report",
    "analysis_report": "viz._builders",
    "add_result": "viz._builders",
    "barrier_rows": "viz._builders",
    "scalar_rows": "viz._builders",
    # connectivity
    "interpolation_figure": "viz._curves",
    "barrier_figure": "viz._curves",
    "barrier_trend_figure": "viz._curves",
    "layerwise_barrier_figure": "viz._curves",
    "landscape_figure": "viz._landscape",
    "matching_figure": "viz._matching",
    # over training
    "collapse_figure": "viz._training",
    "infoplane_figure": "viz._training",
    "processor_figure": "viz._training",
    "prediction_figure": "viz._training",
    # per layer / per model
    "spectral_figure": "viz._layers",
    "norms_figure": "viz._layers",
    "path_norm_figure": "viz._layers",
    "weight_histogram_figure": "viz._layers",
    "neural_graph_figure": "viz._graph",
    # shared
    "color": "viz._palette",
    "CONFIG": "viz._common",
    "VizError": "viz._common",
    "minmax_decimate": "viz._common",
    "figure_points": "viz._common",
    # headless browser (needs the [browser] extra and a system Chromium)
    "browser_check": "viz._browser",
    "screenshot": "viz._browser",
    "find_chromium": "viz._browser",
    "BrowserUnavailable": "viz._browser",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
