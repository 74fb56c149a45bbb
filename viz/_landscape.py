"""Loss-landscape figures: 1-D lines, 2-D contours and 3-D surfaces with trajectory and models marked.

Reads ``analysis.Landscape`` (random filter-normalised or PCA directions, Li et al. 2018,
arXiv:1712.09913) and ``analysis.PlaneResult`` (the plane through three weight vectors, Garipov et al.
2018, arXiv:1802.10026) by attribute. Both axes share one scale (``scaleanchor``; in 3-D the aspect
ratio follows the coordinate ranges), so angles and distances in the picture are true to the slice.
Grids larger than ``max_side`` per axis are block-averaged (see :func:`viz._common.block_mean`).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from viz._common import HOVER, VizError, block_mean, finish, floats
from viz._palette import color

__all__ = ["landscape_figure"]


def _grid(land, metric: str, split: Optional[str]):
    """(x, y, Z[i, j] at (x[i], y[j]), split, marked points, x title, y title) of a Landscape or PlaneResult."""
    vals = land.values
    sp = split or next(iter(vals))
    if sp not in vals:
        raise VizError(f"split {sp!r} not in this landscape; available: {list(vals)}")
    if metric not in vals[sp]:
        raise VizError(f"metric {metric!r} not in this landscape; available: {list(vals[sp])}")
    z = floats(vals[sp][metric])
    if hasattr(land, "coordinates") and hasattr(land, "dx"):  # PlaneResult
        pts = {k: tuple(map(float, v)) for k, v in land.coordinates.items()}
        return (
            floats(land.x),
            floats(land.y),
            z,
            sp,
            pts,
            "x (parameter-space distance along w2 - w0)",
            "y (parameter-space distance, orthogonal part of w1 - w0)",
        )
    coords = [floats(c) for c in land.coords]
    norms = tuple(getattr(land, "direction_norms", ()) or ())
    kind = land.settings.get("directions", "") if isinstance(land.settings, Mapping) else ""
    t = [
        f"{'alpha' if i == 0 else 'beta'} (direction {i + 1}"
        + (f", |d{i + 1}| = {norms[i]:.4g}" if i < len(norms) else "")
        + (f"; {kind})" if kind else ")")
        for i in range(len(coords))
    ]
    if land.dims == 1:
        return coords[0], None, z, sp, {}, t[0], None
    return coords[0], coords[1], z, sp, {}, t[0], t[1]


def _interp(x: np.ndarray, y: np.ndarray, z: np.ndarray, px: float, py: float) -> float:
    """Bilinear value of the grid at (px, py), clamped to the grid."""
    from scipy.interpolate import RegularGridInterpolator

    f = RegularGridInterpolator((x, y), z, bounds_error=False, fill_value=None)
    return float(f([[min(max(px, x[0]), x[-1]), min(max(py, y[0]), y[-1])]])[0])


def landscape_figure(
    land,
    metric: str = "loss",
    split: Optional[str] = None,
    title: Optional[str] = None,
    *,
    style: str = "contour",
    points: Optional[Mapping[str, Tuple[float, float]]] = None,
    labels: Optional[Mapping[str, str]] = None,
    center: Optional[str] = "A",
    trajectory: bool = True,
    log: bool = False,
    max_side: int = 200,
):
    """A landscape slice as a line (1-D), a contour (``style="contour"``) or a 3-D surface (``"surface"``).

    Parameters
    ----------
    land : ``analysis.Landscape`` (1-D or 2-D) or ``analysis.PlaneResult``.
    metric, split : which values (default the first split).
    style : ``"contour"`` or ``"surface"``.
    points : extra models to mark, ``{name: (x, y)}`` in the slice's coordinates (e.g. ``{"B": (1, 0)}``).
    labels : names for a PlaneResult's ``w0``/``w1``/``w2`` (e.g. ``{"w0": "A", "w1": "merged", "w2": "B"}``).
    center : name of the model at the origin of a ``Landscape`` (``theta*``), or None to leave it unmarked.
    trajectory : draw ``land.trajectory`` (least-squares coordinates of checkpoints) when present.
    log : plot ``log10`` of the metric (useful for losses spanning decades).
    max_side : grids with more points per axis are block-averaged to this many (the docstring of
        :mod:`viz._common` says how).

    Models get their palette colour; axes share one scale.
    """
    import plotly.graph_objects as go

    if style not in ("contour", "surface"):
        raise VizError(f"style must be 'contour' or 'surface', got {style!r}")
    x, y, z, sp, marks, xt, yt = _grid(land, metric, split)
    ztitle = ("log10 " if log else "") + ("loss (nats)" if metric == "loss" else metric)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(z > 0, z, np.nan))
    ttl = title or f"{metric} landscape ({sp})"
    if y is None:  # 1-D
        fig = go.Figure(
            go.Scatter(
                x=x.tolist(),
                y=z.tolist(),
                mode="lines",
                name=f"{metric} ({sp})",
                line={"color": color(center or "A")},
                hovertemplate=f"alpha=%{{x:{HOVER}}}<br>{ztitle}=%{{y:{HOVER}}}<extra></extra>",
            )
        )
        if center:
            fig.add_trace(
                go.Scatter(
                    x=[0.0],
                    y=[float(np.interp(0.0, x, z))],
                    mode="markers+text",
                    name=center,
                    text=[center],
                    textposition="top center",
                    marker={"size": 11, "color": color(center), "symbol": "star"},
                )
            )
        return finish(fig, ttl, xt, ztitle, height=420)
    if z.shape != (len(x), len(y)):
        raise VizError(f"values have shape {z.shape} but the grid is {len(x)} x {len(y)}")
    if max(z.shape) > max_side:
        z, kr, kc = block_mean(z, max_side)
        x = np.array([x[i : i + kr].mean() for i in range(0, len(x), kr)])  # block centres
        y = np.array([y[j : j + kc].mean() for j in range(0, len(y), kc)])
    # marked models: a PlaneResult's three points (renamed by labels), the centre, user points
    named: Dict[str, Tuple[float, float]] = {}
    for k, v in marks.items():
        named[(labels or {}).get(k, k)] = v
    if center and not marks:
        named[center] = (0.0, 0.0)
    for k, v in (points or {}).items():
        named[str(k)] = (float(v[0]), float(v[1]))
    traj = getattr(land, "trajectory", None) if trajectory else None
    traj = None if traj is None else floats(traj)
    zt = z.T.tolist()  # plotly: z[row = y][col = x]
    if style == "contour":
        fig = go.Figure(
            go.Contour(
                x=x.tolist(),
                y=y.tolist(),
                z=zt,
                colorscale="Viridis",
                ncontours=30,
                colorbar={"title": {"text": ztitle}},
                name=ztitle,
                hovertemplate=f"x=%{{x:{HOVER}}}<br>y=%{{y:{HOVER}}}<br>{ztitle}=%{{z:{HOVER}}}<extra></extra>",
            )
        )
        if traj is not None and traj.shape[1] >= 2:
            fig.add_trace(
                go.Scatter(
                    x=traj[:, 0].tolist(),
                    y=traj[:, 1].tolist(),
                    mode="lines+markers",
                    name="trajectory",
                    line={"color": "white", "width": 2},
                    marker={
                        "size": 6,
                        "color": list(range(len(traj))),
                        "colorscale": "Greys",
                        "line": {"color": "black", "width": 1},
                    },
                    customdata=list(range(len(traj))),
                    hovertemplate="checkpoint %{customdata}<br>(%{x:.6g}, %{y:.6g})<extra>trajectory</extra>",
                )
            )
        for name, (px, py) in named.items():
            fig.add_trace(
                go.Scatter(
                    x=[px],
                    y=[py],
                    mode="markers+text",
                    name=name,
                    text=[name],
                    textposition="top center",
                    textfont={"color": "white", "size": 13},
                    marker={
                        "size": 13,
                        "color": color(name),
                        "symbol": "star",
                        "line": {"color": "white", "width": 1.5},
                    },
                    hovertemplate=f"{name}<br>(%{{x:{HOVER}}}, %{{y:{HOVER}}})<extra></extra>",
                )
            )
        finish(fig, ttl, xt, yt, height=560)
        fig.update_yaxes(scaleanchor="x", scaleratio=1, constrain="domain")
        fig.update_xaxes(constrain="domain")
        return fig
    fig = go.Figure(
        go.Surface(
            x=x.tolist(),
            y=y.tolist(),
            z=zt,
            colorscale="Viridis",
            name=ztitle,
            colorbar={"title": {"text": ztitle}},
            hovertemplate=f"x=%{{x:{HOVER}}}<br>y=%{{y:{HOVER}}}<br>{ztitle}=%{{z:{HOVER}}}<extra></extra>",
        )
    )
    if traj is not None and traj.shape[1] >= 2:
        tz = [_interp(x, y, z, a, b) for a, b in traj[:, :2]]
        fig.add_trace(
            go.Scatter3d(
                x=traj[:, 0].tolist(),
                y=traj[:, 1].tolist(),
                z=tz,
                mode="lines+markers",
                name="trajectory",
                line={"color": "black", "width": 4},
                marker={"size": 3, "color": "black"},
            )
        )
    for name, (px, py) in named.items():
        fig.add_trace(
            go.Scatter3d(
                x=[px],
                y=[py],
                z=[_interp(x, y, z, px, py)],
                mode="markers+text",
                name=name,
                text=[name],
                marker={"size": 6, "color": color(name), "symbol": "diamond"},
                hovertemplate=f"{name}<br>%{{z:{HOVER}}}<extra></extra>",
            )
        )
    rx, ry = float(x[-1] - x[0]) or 1.0, float(y[-1] - y[0]) or 1.0
    s = max(rx, ry)
    finish(fig, ttl, height=620)
    short = ("x", "y") if marks else ("alpha", "beta")  # long titles do not fit along 3-D axes: details in the title
    fig.update_layout(
        title={"text": f"{ttl}<br><sup>x: {xt}; y: {yt}</sup>"},
        scene={
            "xaxis": {"title": {"text": short[0]}},
            "yaxis": {"title": {"text": short[1]}},
            "zaxis": {"title": {"text": ztitle}},
            "aspectmode": "manual",
            "aspectratio": {"x": rx / s, "y": ry / s, "z": 0.6},
        },
    )
    return fig
