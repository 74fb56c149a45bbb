"""Figure builders: each returns a ``plotly.graph_objects.Figure`` and reads result objects by their
attributes only (``viz`` imports no analysis or merging code)."""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

__all__ = ["barrier_figure", "landscape_figure"]


def barrier_figure(curves, metric: str = "loss", split: Optional[str] = None, kind: str = "chord",
                   title: Optional[str] = None):
    """Metric along linear interpolation paths, with each curve's barrier (variant ``kind``) in the legend.

    ``curves`` is one ``analysis.InterpolationCurve`` or a mapping label -> curve.
    """
    import plotly.graph_objects as go

    items = curves.items() if isinstance(curves, Mapping) else [("curve", curves)]
    fig = go.Figure()
    for label, c in items:
        sp = split or c.splits[0]
        y = np.asarray(c.values[sp]["accuracy"]) if metric == "error" and "error" not in c.values[sp] else None
        y = 1.0 - y if y is not None else np.asarray(c.values[sp][metric])
        b = c.barrier(metric, split=sp, kind=kind)
        fig.add_trace(go.Scatter(x=list(map(float, c.alphas)), y=list(map(float, y)), mode="lines+markers",
                                 name=f"{label} ({kind} barrier {b.value:.3g})"))
    fig.update_layout(title=title or f"{metric} along the linear path ({split or 'first split'}; barrier: {kind})",
                      xaxis_title="alpha (0 = A, 1 = B)", yaxis_title=metric, template="plotly_white",
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0})
    return fig


def landscape_figure(land, metric: str = "loss", split: Optional[str] = None, title: Optional[str] = None):
    """A 1-D line or a 2-D contour of an ``analysis.Landscape`` slice."""
    import plotly.graph_objects as go

    sp = split or next(iter(land.values))
    z = np.asarray(land.values[sp][metric])
    norm = land.settings.get("norm", land.settings.get("directions", ""))
    if land.dims == 1:
        fig = go.Figure(go.Scatter(x=list(map(float, land.coords[0])), y=list(map(float, z)), mode="lines"))
        fig.update_layout(xaxis_title="alpha", yaxis_title=metric)
    else:
        fig = go.Figure(go.Contour(x=list(map(float, land.coords[0])), y=list(map(float, land.coords[1])),
                                   z=z.T.tolist(), colorbar={"title": metric}))
        fig.update_layout(xaxis_title="alpha (direction 1)", yaxis_title="beta (direction 2)")
    fig.update_layout(title=title or f"{metric} landscape ({sp}; directions: {norm})", template="plotly_white")
    return fig
