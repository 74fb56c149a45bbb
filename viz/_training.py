"""Figures over training: neural collapse, the information plane, processor curves and predictions.

* Neural collapse (Papyan, Han & Donoho 2020, arXiv:2008.08186): NC1-NC4 per epoch from an
  ``analysis.CollapseTracker`` (or its ``history`` dict); NC1 spans decades, so its axis is logarithmic.
* Information plane (Shwartz-Ziv & Tishby 2017, arXiv:1703.00810; Saxe et al. 2018): one trajectory
  per layer in ``(I(X;T), I(T;Y))``, markers coloured by epoch, from an
  ``analysis.InformationPlaneTracker`` or a list of ``analysis.InformationPlane``.
* Weight-space processors: training curves from ``{"train_loss": [...], "val_tau": [...]}`` and
  predicted vs true accuracy (Kendall's tau, R^2 and RMSE over all points in the title).

Long curves are decimated with :func:`viz._common.minmax_decimate` (``max_points`` per trace);
scatters above ``max_points`` points become a 2-D histogram (counts per cell), computed on all points.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from viz._common import HOVER, VizError, finish, floats, minmax_decimate
from viz._palette import color

__all__ = ["collapse_figure", "infoplane_figure", "processor_figure", "prediction_figure"]

_NC_PANELS = (
    ("NC1: within-class variability (log)", ("nc1", "nc1_quotient", "nc1_cdnv"), True),
    (
        "NC2: equinorm and equiangularity",
        ("nc2_equinorm_means", "nc2_cos_shift_means", "nc2_equinorm_weights", "nc2_cos_shift_weights"),
        False,
    ),
    ("NC3: self-duality", ("nc3", "nc3_zhu"), False),
    ("NC4: classifier vs nearest centre", ("nc4_train", "nc4_test"), False),
)
_DASHES = ("solid", "dash", "dot", "dashdot")


def _history(obj: Any) -> Dict[str, List[Any]]:
    h = getattr(obj, "history", obj)
    if callable(h):
        h = h()
    if not isinstance(h, Mapping) or "epoch" not in h:
        raise VizError(
            f"expected a CollapseTracker or its history dict with an 'epoch' column, got {type(obj).__name__}"
        )
    return dict(h)


def collapse_figure(trackers, title: Optional[str] = None):
    """NC1-NC4 over epochs in four panels (NC1 on a log axis).

    ``trackers`` is an ``analysis.CollapseTracker``, its ``history`` dict, or ``{model name: tracker}``
    (one colour per model; within a panel the metric variants differ by dash). Metrics that were not
    computed (None, e.g. NC3 without a classifier) are left out.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    named = (
        list(trackers.items()) if isinstance(trackers, Mapping) and "epoch" not in trackers else [("model", trackers)]
    )
    fig = make_subplots(
        rows=2, cols=2, subplot_titles=[p[0] for p in _NC_PANELS], vertical_spacing=0.16, horizontal_spacing=0.1
    )
    for k, (_title, keys, logy) in enumerate(_NC_PANELS):
        r, c = k // 2 + 1, k % 2 + 1
        for name, tr in named:
            h = _history(tr)
            ep = h["epoch"]
            for d, key in enumerate(keys):
                vals = h.get(key)
                if vals is None:
                    continue
                pts = [
                    (e, float(v))
                    for e, v in zip(ep, vals)
                    if v is not None and math.isfinite(float(v)) and (not logy or float(v) > 0)
                ]
                if not pts:
                    continue
                label = key if len(named) == 1 else f"{name}: {key}"
                fig.add_trace(
                    go.Scatter(
                        x=[p[0] for p in pts],
                        y=[p[1] for p in pts],
                        mode="lines+markers",
                        name=label,
                        line={"color": color(name) if len(named) > 1 else color(key), "dash": _DASHES[d % 4]},
                        marker={"size": 5},
                        hovertemplate=f"{label}<br>epoch %{{x}}<br>%{{y:{HOVER}}}<extra></extra>",
                    ),
                    row=r,
                    col=c,
                )
        fig.update_xaxes(title_text="epoch", row=r, col=c)
        fig.update_yaxes(title_text="metric (dimensionless)", type="log" if logy else "linear", row=r, col=c)
    return finish(fig, title or "Neural collapse over training", height=720)


def _planes(obj: Any, epochs: Optional[Sequence[Any]]):
    if hasattr(obj, "trajectories") and hasattr(obj, "planes"):
        return list(obj.epochs), list(obj.planes)
    if hasattr(obj, "i_xt"):
        return [0 if epochs is None else epochs[0]], [obj]
    if isinstance(obj, (list, tuple)) and obj and all(hasattr(p, "i_xt") for p in obj):
        ep = list(epochs) if epochs is not None else list(range(len(obj)))
        if len(ep) != len(obj):
            raise VizError(f"epochs has {len(ep)} entries for {len(obj)} information planes")
        return ep, list(obj)
    raise VizError(
        f"expected an InformationPlaneTracker, an InformationPlane or a list of them, got {type(obj).__name__}"
    )


def infoplane_figure(planes, epochs: Optional[Sequence[Any]] = None, title: Optional[str] = None):
    """Information-plane trajectories: ``I(X;T)`` vs ``I(T;Y)`` per layer, markers coloured by epoch.

    ``planes`` is an ``analysis.InformationPlaneTracker``, one ``InformationPlane`` or a list of them
    (``epochs`` labels the list). Each layer is a line in its own colour with its name in the legend;
    the markers on it share one epoch colour scale. The plug-in ceilings ``H(X)`` and ``H(Y)`` are
    drawn as dotted lines. Units follow the estimator's ``units`` (bits or nats).
    """
    import plotly.graph_objects as go

    ep, ps = _planes(planes, epochs)
    layers: List[str] = []
    for p in ps:
        layers += [l for l in p.layers if l not in layers]
    units, est = ps[0].units, ps[0].estimator
    numeric = all(isinstance(e, (int, float)) for e in ep)
    cvals = [float(e) for e in ep] if numeric else list(range(len(ep)))
    fig = go.Figure()
    for li, layer in enumerate(layers):
        xs, ys, cs, es = [], [], [], []
        for e, cv, p in zip(ep, cvals, ps):
            if layer in p.layers:
                a, b = p[layer]
                xs.append(float(a))
                ys.append(float(b))
                cs.append(cv)
                es.append(str(e))
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=f"layer {layer}",
                customdata=es,
                line={"color": color(f"layer {layer}"), "width": 1.5},
                marker={
                    "size": 9,
                    "color": cs,
                    "coloraxis": "coloraxis",
                    "line": {"color": color(f"layer {layer}"), "width": 1.5},
                    "symbol": ("circle", "square", "diamond", "triangle-up", "cross", "x", "star", "hexagon")[li % 8],
                },
                hovertemplate=(
                    f"layer {layer}<br>epoch %{{customdata}}<br>I(X;T)=%{{x:{HOVER}}} {units}"
                    f"<br>I(T;Y)=%{{y:{HOVER}}} {units}<extra></extra>"
                ),
            )
        )
    hx, hy = float(ps[0].h_x), float(ps[0].h_y)
    fig.add_hline(
        y=hy,
        line={"dash": "dot", "color": "#888"},
        annotation_text=f"H(Y) = {hy:.4g} {units}",
        annotation_position="top left",
    )
    fig.add_vline(
        x=hx,
        line={"dash": "dot", "color": "#888"},
        annotation_text=f"H(X) = {hx:.4g} {units}",
        annotation_position="bottom right",
    )
    finish(fig, title or f"Information plane ({est} estimator)", f"I(X;T) ({units})", f"I(T;Y) ({units})", height=560)
    fig.update_layout(
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": "epoch" if numeric else "update"}}}
    )
    return fig


def processor_figure(
    history: Mapping[str, Any],
    steps: Optional[Sequence[float]] = None,
    *,
    x_title: str = "epoch",
    max_points: int = 4000,
    title: Optional[str] = None,
):
    """Training curves of a weight-space processor: one panel per series in ``history``.

    ``history`` is ``{"train_loss": [...], "val_tau": [...], ...}`` (plain sequences), or ``{run name:
    such a dict}`` to overlay runs (one colour per run). ``steps`` gives the x values (default
    ``0..n-1`` per series). Series whose name contains ``loss`` and are positive use a log axis.
    Each trace keeps at most ``max_points`` points (min/max per bucket).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not isinstance(history, Mapping) or not history:
        raise VizError("history must be a non-empty mapping {series name: values} (or {run: {series: values}})")
    runs = history if all(isinstance(v, Mapping) for v in history.values()) else {"processor": history}
    keys: List[str] = []
    for h in runs.values():
        keys += [k for k in h if k not in keys]
    cols = min(2, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=keys, vertical_spacing=min(0.15, 0.5 / rows))
    for k, key in enumerate(keys):
        r, c = k // cols + 1, k % cols + 1
        logy = "loss" in key
        for run, h in runs.items():
            if key not in h:
                continue
            y = floats(h[key])
            x = floats(steps) if steps is not None else np.arange(len(y), dtype=np.float64)
            if len(x) != len(y):
                raise VizError(f"steps has {len(x)} values but history[{key!r}] has {len(y)}")
            logy = logy and bool(np.all(y[np.isfinite(y)] > 0))
            x, y = minmax_decimate(x, y, max_points)
            fig.add_trace(
                go.Scatter(
                    x=x.tolist(),
                    y=y.tolist(),
                    mode="lines",
                    name=f"{run}: {key}" if len(runs) > 1 else key,
                    line={"color": color(run)},
                    showlegend=len(runs) > 1 and k == 0,
                    legendgroup=run,
                    hovertemplate=f"{run}<br>{x_title} %{{x:{HOVER}}}<br>{key}=%{{y:{HOVER}}}<extra></extra>",
                ),
                row=r,
                col=c,
            )
        fig.update_xaxes(title_text=x_title, row=r, col=c)
        fig.update_yaxes(title_text=key, type="log" if logy else "linear", row=r, col=c)
    return finish(fig, title or "Processor training", height=max(380, 320 * rows))


def prediction_figure(
    pred,
    true,
    *,
    quantity: str = "test accuracy (fraction)",
    name: str = "processor",
    max_points: int = 20000,
    title: Optional[str] = None,
):
    """Predicted against true values (e.g. generalization prediction from weights), with ``y = x``.

    The title gives Kendall's tau (``scipy.stats.kendalltau``, tau-b), ``R^2 = 1 - SS_res/SS_tot`` and
    the RMSE, over all points. Above ``max_points`` points the scatter becomes a 2-D histogram
    (counts per cell, 100 x 100 cells) so the figure stays small.
    """
    import plotly.graph_objects as go
    from scipy.stats import kendalltau

    p, t = floats(pred).ravel(), floats(true).ravel()
    if p.shape != t.shape or p.size < 2:
        raise VizError(f"pred and true must have one length >= 2, got {p.size} and {t.size}")
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    tau = float(kendalltau(t, p).statistic)
    ss = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float(((t - p) ** 2).sum()) / ss if ss > 0 else float("nan")
    rmse = float(np.sqrt(((t - p) ** 2).mean()))
    lo, hi = float(min(p.min(), t.min())), float(max(p.max(), t.max()))
    if p.size > max_points:
        H, xe, ye = np.histogram2d(t, p, bins=100, range=[[lo, hi], [lo, hi]])
        fig = go.Figure(
            go.Heatmap(
                z=H.T.tolist(),
                x=(0.5 * (xe[1:] + xe[:-1])).tolist(),
                y=(0.5 * (ye[1:] + ye[:-1])).tolist(),
                colorscale="Blues",
                colorbar={"title": {"text": "models per cell"}},
                name=name,
                hovertemplate="true %{x:.4g}<br>predicted %{y:.4g}<br>%{z} models<extra></extra>",
            )
        )
    else:
        fig = go.Figure(
            go.Scatter(
                x=t.tolist(),
                y=p.tolist(),
                mode="markers",
                name=name,
                marker={"size": 5, "color": color(name), "opacity": 0.7},
                hovertemplate=f"true %{{x:{HOVER}}}<br>predicted %{{y:{HOVER}}}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"color": "#888", "dash": "dash"})
    )
    finish(
        fig,
        title or f"Predicted vs true ({p.size} models): Kendall tau {tau:.4f}, R^2 {r2:.4f}, RMSE {rmse:.4g}",
        f"true {quantity}",
        f"predicted {quantity}",
        height=520,
    )
    fig.update_yaxes(scaleanchor="x", scaleratio=1)
    return fig
