"""Shared pieces of the figure builders: reading results, layout, the safe config, and decimation.

viz reads result objects through their public attributes and ``to_dict()`` (or the older
``as_dict()``) only; it imports no analysis or merging code, so any object with the documented
attributes can be plotted.

Large inputs are reduced before they reach a figure, so a report of several hundred thousand
points stays responsive in the browser:

* lines (training curves, any ``y`` against ``x``): :func:`minmax_decimate` keeps, in each of
  ``max_points / 2`` equal-count buckets, the minimum and the maximum in their original order, so
  spikes and the envelope survive (at most ``max_points`` points per trace);
* point clouds (predicted vs true): a seeded uniform subsample, or a 2-D histogram (density);
* grids (landscapes, cost matrices): :func:`block_mean` averages ``k x k`` blocks down to at most
  ``max_side`` cells per axis;
* distributions (weights): histograms are counted in NumPy and drawn as bars, never shipped raw.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG",
    "HOVER",
    "result_dict",
    "settings_of",
    "minmax_decimate",
    "block_mean",
    "figure_points",
    "finish",
    "floats",
    "VizError",
]

#: Plotly config used for every figure in a report: no "Share chart..." (send data to Plotly's cloud)
#: button, no Plotly logo link, PNG download at 2x, figures resize with the page.
CONFIG: Dict[str, Any] = {
    "responsive": True,
    "displaylogo": False,
    "showSendToCloud": False,
    "modeBarButtonsToRemove": ["sendDataToCloud"],
    "toImageButtonOptions": {"format": "png", "scale": 2},
}

#: Hover number format (d3-format): 10 significant digits, trailing zeros removed.
HOVER = ".10~g"


try:  # the project's error base, when weightspace is importable (it always is in this distribution)
    from weightspace.results import WeightspaceError as _Base
except Exception:  # pragma: no cover
    _Base = Exception


class VizError(_Base, ValueError):
    """A result or input that a figure or report cannot use; the message names the field and the fix."""


def result_dict(obj: Any) -> Dict[str, Any]:
    """``obj`` as a plain dict: ``to_dict()``, else the older ``as_dict()``, else dataclass fields, else a Mapping."""
    for name in ("to_dict", "as_dict"):
        fn = getattr(obj, name, None)
        if callable(fn):
            return dict(fn())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return dict(obj)
    raise VizError(
        f"cannot read a {type(obj).__name__} as a result: it has no to_dict()/as_dict() and is not a dataclass"
    )


_SETTING_FIELDS = (
    "estimator",
    "options",
    "units",
    "num_samples",
    "global_mean",
    "pinv_rank",
    "nc4_bias",
    "std_ddof",
    "nc1_variant",
    "nc3_variant",
    "nc4_variant",
    "dtype",
    "q",
    "kind",
    "method",
    "which",
    "alpha",
    "cumulative",
    "theorem",
    "loss",
)


def settings_of(obj: Any) -> Dict[str, Any]:
    """What produced a result: its ``settings`` mapping, plus variant-naming fields such as ``estimator``."""
    out: Dict[str, Any] = {}
    s = getattr(obj, "settings", None)
    if isinstance(s, Mapping):
        out.update(s)
    for f in _SETTING_FIELDS:
        if f not in out and hasattr(obj, f) and not callable(getattr(obj, f)):
            v = getattr(obj, f)
            if v is None or isinstance(v, (str, bool, int, float, Mapping)):
                out[f] = v
    opts = getattr(obj, "options", None)  # trackers keep their options here
    if isinstance(opts, Mapping) and "options" not in out:
        out["options"] = dict(opts)
    return out


def floats(a: Any) -> np.ndarray:
    """A float64 NumPy array from a list, array or tensor (moved to the CPU)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def minmax_decimate(x: Any, y: Any, max_points: int = 4000) -> Tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of the line ``(x, y)`` that keep its envelope.

    The ``n`` points are cut into ``max_points // 2`` consecutive buckets of (nearly) equal count; each
    bucket contributes its minimum and its maximum ``y`` (NaNs ignored), in their original order. The
    result is exactly the input when ``n <= max_points``.
    """
    x, y = floats(x), floats(y)
    if x.shape != y.shape or x.ndim != 1:
        raise VizError(f"x and y must be 1-D of one length, got shapes {x.shape} and {y.shape}")
    n = len(y)
    if max_points < 2:
        raise VizError(f"max_points must be >= 2, got {max_points}")
    if n <= max_points:
        return x, y
    nb = max_points // 2
    bounds = np.linspace(0, n, nb + 1).astype(np.int64)
    keep = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg = y[lo:hi]
        if hi <= lo or not np.isfinite(seg).any():
            continue
        i, j = lo + int(np.nanargmin(seg)), lo + int(np.nanargmax(seg))
        keep += [i] if i == j else sorted((i, j))
    idx = np.asarray(keep, dtype=np.int64)
    log.debug("decimated a line of %d points to %d (min/max per bucket)", n, len(idx))
    return x[idx], y[idx]


def block_mean(z: Any, max_side: int = 200) -> Tuple[np.ndarray, int, int]:
    """``z`` (2-D) averaged over ``kr x kc`` blocks so that no side exceeds ``max_side``; returns ``(z', kr, kc)``.

    Partial blocks at the edges are averaged over the cells they have (NaNs ignored).
    """
    z = floats(z)
    if z.ndim != 2:
        raise VizError(f"expected a 2-D array, got shape {z.shape}")
    kr, kc = max(1, math.ceil(z.shape[0] / max_side)), max(1, math.ceil(z.shape[1] / max_side))
    if kr == 1 and kc == 1:
        return z, 1, 1
    R, C = math.ceil(z.shape[0] / kr), math.ceil(z.shape[1] / kc)
    pad = np.full((R * kr, C * kc), np.nan)
    pad[: z.shape[0], : z.shape[1]] = z
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        out = np.nanmean(pad.reshape(R, kr, C, kc), axis=(1, 3))
    return out, kr, kc


def _size(v: Any) -> int:
    if v is None or isinstance(v, (str, bytes, int, float)):
        return 0
    try:
        return int(np.asarray(v, dtype=object).size) if not hasattr(v, "size") else int(v.size)
    except Exception:
        return 0


def figure_points(fig) -> int:
    """The number of data points a figure ships: per trace the largest of its ``x``/``y``/``z`` sizes
    (a heatmap or surface counts its cells), summed over traces."""
    total = 0
    for tr in fig.data:
        sizes = [_size(getattr(tr, k)) for k in ("x", "y", "z") if k in tr]
        total += max(sizes, default=0)
    return total


def finish(
    fig,
    title: str,
    x_title: Optional[str] = None,
    y_title: Optional[str] = None,
    *,
    height: Optional[int] = None,
    legend_below: bool = True,
):
    """Common layout: white template, title, axis titles, full trace names in hover, legend below."""
    upd: Dict[str, Any] = {
        "title": {"text": title},
        "template": "plotly_white",
        "hoverlabel": {"namelength": -1},
        "margin": {"l": 70, "r": 30, "t": 70, "b": 60},
    }
    if height:
        upd["height"] = height
    if legend_below:
        upd["legend"] = {"orientation": "h", "yanchor": "top", "y": -0.18, "xanchor": "left", "x": 0}
        upd["margin"]["b"] = 110
    fig.update_layout(**upd)
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def as_named(obj: Any, default: str) -> Sequence[Tuple[str, Any]]:
    """``[(name, result)]`` from one result or a mapping ``{name: result}``."""
    if isinstance(obj, Mapping):
        if not obj:
            raise VizError("got an empty mapping; pass at least one {name: result}")
        return [(str(k), v) for k, v in obj.items()]
    return [(default, obj)]
