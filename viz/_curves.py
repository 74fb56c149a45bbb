"""Connectivity figures: interpolation curves with barriers, barrier trends, layer-wise barrier heatmaps.

Inputs are ``analysis.InterpolationCurve`` (or its subclass ``CurveEvaluation``), ``analysis.Barrier``
and ``analysis.LayerwiseBarriers`` objects, read by attribute. Barrier variants follow
``InterpolationCurve.barrier``: ``"chord"`` (Entezari et al. 2022,
arXiv:2110.06296), ``"mean_endpoint"`` (Frankle et al. 2020, arXiv:1912.05671; Ainsworth et al. 2023,
arXiv:2209.04836) and ``"midpoint"``; layer-wise barriers follow Adilova et al. (ICLR 2024,
arXiv:2307.06966).
"""

from __future__ import annotations

from numbers import Number
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np

from viz._common import HOVER, VizError, as_named, finish, floats
from viz._palette import color, dash

__all__ = ["interpolation_figure", "barrier_figure", "barrier_trend_figure", "layerwise_barrier_figure"]

_UNITS = {"loss": "loss (nats)", "accuracy": "accuracy (fraction)", "error": "error (fraction)"}


def _metric_title(metric: str, settings: Mapping[str, Any]) -> str:
    if metric == "loss":
        fn = settings.get("loss_fn", "cross_entropy") if isinstance(settings, Mapping) else "cross_entropy"
        return "cross-entropy loss (nats)" if fn in (None, "cross_entropy") else f"loss: {fn}"
    return _UNITS.get(metric, metric)


def _path_title(curve) -> str:
    path = str(getattr(curve, "settings", {}).get("path", "linear"))
    return "t (curve parameter; 0 = A, 1 = B)" if path.startswith("curve") else "alpha (0 = A, 1 = B)"


def _series(curve, metric: str, split: str) -> np.ndarray:
    vals = curve.values[split]
    if metric == "error" and "error" not in vals and "accuracy" in vals:
        return 1.0 - floats(vals["accuracy"])
    if metric not in vals:
        raise VizError(f"metric {metric!r} is not in the curve's split {split!r}; available: {list(vals)}")
    return floats(vals[metric])


def _reference(b, metric: str) -> float:
    """The barrier's baseline at ``b.alpha`` in the plotted metric's units (accuracy = 1 - error)."""
    if b.kind == "chord":
        ref = (1.0 - b.alpha) * b.endpoint_a + b.alpha * b.endpoint_b
    else:
        ref = 0.5 * (b.endpoint_a + b.endpoint_b)
    return 1.0 - ref if metric == "accuracy" else ref


def interpolation_figure(
    curves,
    metrics: Optional[Sequence[str]] = None,
    splits: Optional[Sequence[str]] = None,
    kind: str = "chord",
    title: Optional[str] = None,
):
    """Metrics along interpolation paths: one panel per metric, several methods overlaid, barriers marked.

    Parameters
    ----------
    curves : one ``InterpolationCurve`` or ``{method or pair name: InterpolationCurve}`` (e.g.
        ``{"naive": c0, "weight_matching": c1}``); each name keeps its palette colour in every figure.
    metrics : panels, default ``("loss", "accuracy")`` where present (``"error"`` = 1 - accuracy works).
    splits : data splits to draw (default all); train is dashed, test solid.
    kind : barrier variant marked on each line: ``"chord"``, ``"mean_endpoint"`` or ``"midpoint"``.

    The barrier ``B`` of each (method, split) is drawn as a dotted vertical segment at its ``alpha``
    from the baseline (the chord ``(1-alpha) L_A + alpha L_B``, or ``(L_A + L_B)/2``) to the curve, with
    a marker; its value is in the legend and the hover text. For accuracy the barrier is on the error.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = as_named(curves, "curve")
    first = items[0][1]
    avail = list(next(iter(first.values.values())))
    metrics = list(metrics) if metrics is not None else [m for m in ("loss", "accuracy") if m in avail] or avail[:1]
    fig = make_subplots(
        rows=1,
        cols=len(metrics),
        subplot_titles=[_metric_title(m, first.settings) for m in metrics],
        horizontal_spacing=0.1,
    )
    for col, metric in enumerate(metrics, start=1):
        for name, c in items:
            for sp in splits if splits is not None else list(c.values):
                if sp not in c.values:
                    raise VizError(f"split {sp!r} is not in curve {name!r}; available: {list(c.values)}")
                x, y = floats(c.alphas), _series(c, metric, sp)
                try:
                    b = c.barrier(metric, split=sp, kind=kind)
                except ValueError:
                    b = None
                label = f"{name} · {sp}" + (f" ({kind} barrier {b.value:.3g})" if b is not None else "")
                group = f"{name}|{sp}"
                fig.add_trace(
                    go.Scatter(
                        x=x.tolist(),
                        y=y.tolist(),
                        mode="lines+markers",
                        name=label,
                        legendgroup=group,
                        showlegend=(col == 1) or len(metrics) == 1,
                        marker={"size": 5, "color": color(name)},
                        line={"color": color(name), "dash": dash(sp)},
                        hovertemplate=f"{name} · {sp}<br>alpha=%{{x:{HOVER}}}<br>{metric}=%{{y:{HOVER}}}<extra></extra>",  # noqa: E501
                    ),
                    row=1,
                    col=col,
                )
                if b is None:
                    continue
                at = float(np.interp(b.alpha, x, y))
                ref = _reference(b, metric)
                fig.add_trace(
                    go.Scatter(
                        x=[b.alpha, b.alpha],
                        y=[ref, at],
                        mode="lines+markers",
                        legendgroup=group,
                        showlegend=False,
                        name=f"{name} · {sp} barrier",
                        line={"color": color(name), "dash": "dot", "width": 1.5},
                        marker={
                            "symbol": ["line-ew", "diamond"],
                            "size": [10, 9],
                            "color": color(name),
                            "line": {"color": color(name), "width": 2},
                        },
                        hovertemplate=(
                            f"{name} · {sp}<br>{kind} barrier on {b.metric} = {b.value:.10g}"
                            f"<br>at alpha=%{{x:{HOVER}}}<br>relative = {b.relative:.6g}<extra></extra>"
                        ),
                    ),
                    row=1,
                    col=col,
                )
        fig.update_xaxes(title_text=_path_title(first), row=1, col=col)
        fig.update_yaxes(title_text=_metric_title(metric, first.settings), row=1, col=col)
    return finish(fig, title or f"Interpolation between the endpoints ({kind} barrier marked)", height=460)


def barrier_figure(
    curves, metric: str = "loss", split: Optional[str] = None, kind: str = "chord", title: Optional[str] = None
):
    """One metric along interpolation paths, each curve's barrier (variant ``kind``) marked and in the legend.

    ``curves`` is one ``analysis.InterpolationCurve`` or a mapping label -> curve; ``split`` defaults to
    each curve's first split. See :func:`interpolation_figure` for several metrics and splits.
    """
    items = as_named(curves, "curve")
    sp = split or items[0][1].splits[0]
    return interpolation_figure(
        dict(items),
        metrics=[metric],
        splits=[sp],
        kind=kind,
        title=title or f"{metric} along the path ({sp}; barrier: {kind})",
    )


def _barrier_value(v: Any, metric: str, split: Optional[str], kind: str) -> float:
    if isinstance(v, Number):
        return float(v)
    if hasattr(v, "barrier"):
        return float(v.barrier(metric, split=split, kind=kind).value)
    if hasattr(v, "value"):
        return float(v.value)
    raise VizError(f"cannot read a barrier from a {type(v).__name__}: pass an InterpolationCurve, a Barrier or a float")


def barrier_trend_figure(
    results: Mapping,
    x_title: str = "width multiplier",
    metric: str = "loss",
    split: Optional[str] = None,
    kind: str = "chord",
    title: Optional[str] = None,
):
    """Barrier against a swept quantity (width, epoch, depth...), one line per method.

    ``results`` is ``{x: curve | Barrier | float}`` or ``{method: {x: curve | Barrier | float}}``; numeric
    ``x`` are sorted (a log axis is used when they span more than a factor of 20), others keep their
    order as categories. Curves are reduced with ``curve.barrier(metric, split, kind)``.
    """
    import plotly.graph_objects as go

    if not isinstance(results, Mapping) or not results:
        raise VizError("results must be a non-empty mapping {x: curve} or {method: {x: curve}}")
    nested = all(isinstance(v, Mapping) for v in results.values())
    series = results if nested else {"barrier": results}
    fig = go.Figure()
    xs_all: List[Any] = []
    for name, pts in series.items():
        xs = list(pts)
        numeric = all(isinstance(x, Number) for x in xs)
        if numeric:
            xs = sorted(xs)
        ys = [_barrier_value(pts[x], metric, split, kind) for x in xs]
        xs_all += xs
        fig.add_trace(
            go.Scatter(
                x=[float(x) if numeric else str(x) for x in xs],
                y=ys,
                mode="lines+markers",
                name=str(name),
                line={"color": color(name)},
                marker={"size": 7},
                hovertemplate=f"{name}<br>{x_title}=%{{x}}<br>{kind} barrier=%{{y:{HOVER}}}<extra></extra>",
            )
        )
    ytitle = f"{kind} barrier on {'error' if metric in ('accuracy', 'error') else metric}"
    finish(
        fig,
        title or f"Barrier vs {x_title}",
        x_title,
        ytitle + (" (fraction)" if metric in ("accuracy", "error") else " (nats)"),
        height=420,
    )
    nums = [float(x) for x in xs_all if isinstance(x, Number)]
    if nums and len(nums) == len(xs_all) and min(nums) > 0 and max(nums) / min(nums) > 20:
        fig.update_xaxes(type="log")
    fig.add_hline(y=0.0, line={"color": "#999", "width": 1})
    return fig


def layerwise_barrier_figure(
    result,
    metric: str = "loss",
    split: Optional[str] = None,
    base: str = "A",
    epochs: Optional[Sequence[Any]] = None,
    title: Optional[str] = None,
):
    """Layer-wise barriers (Adilova et al. 2024) as a heatmap, rows = layer groups in network order.

    * one ``LayerwiseBarriers``: columns are the bases computed (``A``, ``B``: which endpoint the other
      layers come from);
    * a sequence of them (e.g. one per epoch): columns are the results (labels ``epochs``), for
      ``base`` ``"A"``, ``"B"`` or ``"mean"``.

    The colour scale is diverging and centred at 0 (red = barrier, blue = below the reference);
    cells show the value when there are at most 400 of them, and hover gives it to 10 digits.
    """
    import plotly.graph_objects as go

    if isinstance(result, (list, tuple)):
        if not result:
            raise VizError("an empty sequence of LayerwiseBarriers")
        g0 = result[0].groups
        for i, r in enumerate(result):
            if tuple(r.groups) != tuple(g0):
                raise VizError(f"results[{i}] has other layer groups than results[0]; compute all with the same groups")
        z = np.concatenate([r.as_matrix(metric, base, split) for r in result], axis=1)
        cols = [str(e) for e in (epochs if epochs is not None else range(len(result)))]
        if len(cols) != z.shape[1]:
            raise VizError(f"epochs has {len(cols)} labels for {z.shape[1]} results")
        groups, alpha, xtitle = list(g0), result[0].alpha, "epoch"
    else:
        bases = list(result.barriers)
        z = np.concatenate([result.as_matrix(metric, b, split) for b in bases], axis=1)
        cols = [f"others from {b}" for b in bases]
        groups, alpha, xtitle = list(result.groups), result.alpha, "base model"
    m = "error" if metric in ("accuracy", "error") else metric
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=cols,
            y=groups,
            colorscale="RdBu_r",
            zmid=0.0,
            colorbar={"title": {"text": f"barrier ({m})"}},
            texttemplate="%{z:.3g}" if z.size <= 400 else None,
            hovertemplate=f"layer %{{y}}<br>%{{x}}<br>barrier on {m}=%{{z:{HOVER}}}<extra></extra>",
        )
    )
    finish(
        fig,
        title or f"Layer-wise barriers at alpha = {alpha:g} ({m})",
        xtitle,
        "layer group (network order)",
        height=max(360, 28 * len(groups) + 160),
        legend_below=False,
    )
    fig.update_yaxes(autorange="reversed")
    return fig
