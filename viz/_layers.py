"""Per-layer and per-model figures: spectral metrics, norms, path-norms and weight histograms.

* Spectral metrics (WeightWatcher-style ESD analysis, Martin & Mahoney 2021, arXiv:2002.06658):
  power-law ``alpha``, ``log10 lambda_max``, stable rank and spectral entropy per layer, from
  ``analysis.SpectralMetrics``.
* Norms (Jiang et al., ICLR 2020, arXiv:1912.02178): squared spectral and Frobenius norms per layer
  from ``analysis.NormMeasures.layers``.
* Path-norms (Gonon et al., ICLR 2024, arXiv:2310.01225): ``||Phi(theta)||_q`` per model from
  ``analysis.PathNorm`` (a whole-network quantity), on a log axis.
* Weight histograms: counted in NumPy over shared bin edges (never the raw weights), so a model
  of any size costs ``bins`` points per trace.

Models are compared by overlaying ``{model name: result}``; each model keeps its palette colour.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from viz._common import HOVER, VizError, as_named, finish, floats
from viz._palette import color

__all__ = ["spectral_figure", "norms_figure", "path_norm_figure", "weight_histogram_figure"]

_SPECTRAL = {
    "alpha": ("power-law alpha", False),
    "log_spectral_norm": ("log10 lambda_max", False),
    "stable_rank": ("stable rank (sum lambda / lambda_max)", False),
    "entropy": ("spectral entropy (normalised)", False),
    "alpha_weighted": ("alpha * log10 lambda_max", False),
    "log_norm": ("log10 ||W||_F^2", False),
}


def spectral_figure(
    results,
    metrics: Sequence[str] = ("alpha", "log_spectral_norm", "stable_rank", "entropy"),
    title: Optional[str] = None,
):
    """Spectral metrics per layer (one panel per metric, layers in model order, one line per model).

    ``results`` is an ``analysis.SpectralMetrics`` or ``{model name: SpectralMetrics}``. Skipped layers
    (too small, e.g.) are listed in the title; NaN values (no power-law fit) are gaps.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = as_named(results, "model")
    for k in metrics:
        if k not in _SPECTRAL:
            raise VizError(f"unknown spectral metric {k!r}; use some of {sorted(_SPECTRAL)}")
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_SPECTRAL[k][0] for k in metrics], vertical_spacing=0.22)
    skipped: List[str] = []
    for name, res in items:
        layers = list(res.analysed)
        skipped += [r.name for r in res.skipped if r.name not in skipped]
        names = [r.name for r in layers]
        for i, key in enumerate(metrics):
            y = [float(getattr(r, key)) for r in layers]
            y = [v if math.isfinite(v) else None for v in y]
            fig.add_trace(
                go.Scatter(
                    x=names,
                    y=y,
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=i == 0,
                    line={"color": color(name)},
                    marker={"size": 7},
                    hovertemplate=f"{name}<br>layer %{{x}}<br>{key}=%{{y:{HOVER}}}<extra></extra>",
                ),
                row=i // cols + 1,
                col=i % cols + 1,
            )
    for i, key in enumerate(metrics):
        fig.update_xaxes(title_text="layer", row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(title_text=_SPECTRAL[key][0], row=i // cols + 1, col=i % cols + 1)
    ttl = title or "Spectral metrics per layer" + (f" (skipped: {', '.join(skipped[:6])})" if skipped else "")
    return finish(fig, ttl, height=max(420, 340 * rows))


def norms_figure(results, title: Optional[str] = None):
    """Squared spectral and Frobenius norms per layer (log axes), from ``analysis.NormMeasures``
    (or ``{model name: NormMeasures}``); BN folding as recorded in the result's settings."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = as_named(results, "model")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["||W||_2^2 (squared spectral norm)", "||W||_F^2 (squared Frobenius norm)"]
    )
    for name, res in items:
        rows = [dict(r) for r in res.layers]
        if not rows:
            raise VizError(f"NormMeasures of {name!r} has no per-layer rows")
        names = [str(r["name"]) for r in rows]
        for c, key in enumerate(("spectral_sq", "frobenius_sq"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=names,
                    y=[float(r[key]) for r in rows],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=c == 1,
                    line={"color": color(name)},
                    hovertemplate=f"{name}<br>layer %{{x}}<br>{key}=%{{y:{HOVER}}}<extra></extra>",
                ),
                row=1,
                col=c,
            )
            fig.update_yaxes(type="log", title_text=key.replace("_sq", " norm squared"), row=1, col=c)
            fig.update_xaxes(title_text="layer", row=1, col=c)
    return finish(fig, title or "Weight norms per layer", height=440)


def path_norm_figure(results: Mapping[str, Any], title: Optional[str] = None):
    """Path-norms ``||Phi(theta)||_q`` per model as bars on a log axis, grouped by ``q``.

    ``results`` is ``{model name: PathNorm}`` or ``{model name: [PathNorm, ...]}`` (several ``q``).
    The path-norm is invariant to permutations of hidden units, so a model and its permuted copy
    have equal bars. Hover gives the value and its natural log (exact even when the value overflows).
    """
    import plotly.graph_objects as go

    items = as_named(results, "model")
    by_q: Dict[float, List[tuple]] = {}
    for name, r in items:
        for pn in r if isinstance(r, (list, tuple)) else [r]:
            by_q.setdefault(float(pn.q), []).append((name, float(pn.value), float(pn.log_value)))
    fig = go.Figure()
    for q, rows in sorted(by_q.items()):
        fig.add_trace(
            go.Bar(
                x=[r[0] for r in rows],
                y=[r[1] for r in rows],
                name=f"q = {q:g}",
                marker={
                    "color": [color(r[0]) for r in rows],
                    "pattern": {"shape": ["", "/", ".", "x"][len(fig.data) % 4]},
                },
                customdata=[[r[2]] for r in rows],
                text=[f"{r[1]:.4g}" for r in rows],
                textposition="outside",
                hovertemplate=(
                    f"%{{x}}<br>L{q:g} path-norm=%{{y:{HOVER}}}<br>log=%{{customdata[0]:{HOVER}}}<extra></extra>"
                ),
            )
        )
    finish(fig, title or "Path-norms (Gonon et al. 2024)", "model", "path-norm ||Phi(theta)||_q", height=440)
    fig.update_layout(barmode="group")
    fig.update_yaxes(type="log")
    return fig


def _state(obj: Any) -> Mapping[str, Any]:
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise VizError(f"expected a module or a state dict, got {type(obj).__name__}")


def weight_histogram_figure(
    models,
    keys: Optional[Sequence[str]] = None,
    *,
    bins: int = 80,
    per_layer: bool = False,
    max_layers: int = 12,
    title: Optional[str] = None,
):
    """Histograms of weight values, one step line per model over shared bin edges.

    ``models`` is a module / state dict or ``{model name: module or state dict}``. ``keys`` selects
    tensors (default: every floating tensor with two or more dimensions, i.e. weight matrices and
    kernels, not biases or BN statistics). The y axis is the fraction of the weights in each bin,
    so models of different sizes compare. ``per_layer=True`` draws one panel per key (at most
    ``max_layers``). Counting happens in NumPy: each trace has ``bins`` points whatever the model size.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = [(n, _state(m)) for n, m in as_named(models, "model")]
    if keys is None:
        keys = [k for k, v in items[0][1].items() if hasattr(v, "dim") and v.dim() >= 2 and v.is_floating_point()] or [
            k for k, v in items[0][1].items() if np.asarray(floats(v)).ndim >= 2
        ]
    keys = list(keys)
    if not keys:
        raise VizError("no weight tensors to histogram; pass keys=[...] naming the tensors")
    for n, sd in items:
        missing = [k for k in keys if k not in sd]
        if missing:
            raise VizError(f"model {n!r} has no tensors {missing[:5]}; all models need the same keys")
    groups = [[k] for k in keys[:max_layers]] if per_layer else [keys]
    if per_layer and len(keys) > max_layers:
        keys = keys[:max_layers]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[g[0] for g in groups] if per_layer else None,
        vertical_spacing=min(0.12, 0.6 / rows),
    )
    for gi, g in enumerate(groups):
        vals = {n: np.concatenate([floats(sd[k]).ravel() for k in g]) for n, sd in items}
        lo = min(float(np.nanmin(v)) for v in vals.values())
        hi = max(float(np.nanmax(v)) for v in vals.values())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise VizError(f"weights of {g[:3]} contain inf")
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        centres = 0.5 * (edges[1:] + edges[:-1])
        for n, v in vals.items():
            cnt, _ = np.histogram(v[np.isfinite(v)], bins=edges)
            frac = cnt / max(1, cnt.sum())
            fig.add_trace(
                go.Scatter(
                    x=centres.tolist(),
                    y=frac.tolist(),
                    mode="lines",
                    line={"shape": "hvh", "color": color(n)},
                    name=n,
                    legendgroup=n,
                    showlegend=gi == 0,
                    customdata=cnt.tolist(),
                    hovertemplate=(
                        f"{n}<br>weight %{{x:.4g}}<br>fraction=%{{y:{HOVER}}}<br>count=%{{customdata}}<extra></extra>"
                    ),
                ),
                row=gi // cols + 1,
                col=gi % cols + 1,
            )
        fig.update_xaxes(title_text="weight value", row=gi // cols + 1, col=gi % cols + 1)
        fig.update_yaxes(title_text="fraction of weights", row=gi // cols + 1, col=gi % cols + 1)
    n_w = sum(int(floats(items[0][1][k]).size) for k in keys)
    return finish(
        fig,
        title or f"Weight histograms ({len(keys)} tensors, {n_w} weights per model, {bins} bins)",
        height=max(420, 300 * rows),
    )
