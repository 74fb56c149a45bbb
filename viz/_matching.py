"""Matching figures: a cost (or similarity) matrix with the chosen assignment drawn on it.

Weight matching (Ainsworth et al., Git Re-Basin, ICLR 2023, arXiv:2209.04836) and activation matching
solve, per permutation group, a linear assignment ``max_P <C, P>`` (or ``min``) over an ``(n, n)``
matrix. The figure shows ``C`` as a heatmap, the assignment ``j = p[i]`` as markers, the objective
``sum_i C[i, p[i]]`` of the assignment and, for matrices up to 1,000,000 entries, SciPy's optimum for
comparison (``scipy.optimize.linear_sum_assignment``), so a sub-optimal assignment is visible.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from viz._common import HOVER, VizError, block_mean, finish, floats

__all__ = ["matching_figure"]


def _pick(obj: Any, group: Optional[str], what: str):
    if isinstance(obj, Mapping):
        if not obj:
            raise VizError(f"{what} is an empty mapping")
        g = group if group is not None else next(iter(obj))
        if g not in obj:
            raise VizError(f"group {g!r} is not among the {what}: {list(obj)[:10]}")
        return obj[g], g
    return obj, group


def matching_figure(
    costs,
    assignment=None,
    *,
    group: Optional[str] = None,
    maximize: bool = False,
    title: Optional[str] = None,
    max_side: int = 200,
):
    """Heatmap of a cost matrix with the assignment ``row i -> column assignment[i]`` marked.

    Parameters
    ----------
    costs : (n, m) array or tensor; a ``{group: matrix}`` mapping; or any object with ``.costs`` (and
        ``.permutations``, ``{group: perm}``) such as a merging alignment result, in which case
        ``group`` selects the permutation group (default: the first).
    assignment : (n,) integer array (or tensor, or ``{group: perm}``): the column chosen for each row.
    maximize : whether the matrix is a similarity (higher is better) rather than a cost.
    max_side : larger matrices are block-averaged to at most ``max_side`` cells per side for display
        (objective and optimum are computed on the full matrix); markers are placed in block units.
    """
    import plotly.graph_objects as go

    if assignment is None and hasattr(costs, "permutations"):
        assignment = costs.permutations
    if hasattr(costs, "costs"):
        costs = costs.costs
    C, g = _pick(costs, group, "costs")
    C = floats(C)
    if C.ndim != 2:
        raise VizError(f"costs must be a 2-D matrix, got shape {C.shape}")
    n, m = C.shape
    if not np.isfinite(C).all():
        raise VizError("costs contain NaN or inf; the assignment objective is undefined")
    p = None
    if assignment is not None:
        a, _ = _pick(assignment, g, "permutations")
        p = floats(a)
        if p.ndim != 1 or len(p) != n or np.any(p != np.round(p)) or p.min(initial=0) < 0 or p.max(initial=0) >= m:
            raise VizError(f"assignment must be {n} integer column indices in [0, {m}); got shape {p.shape}")
        p = p.astype(np.int64)
        if len(np.unique(p)) != len(p):
            raise VizError("assignment repeats a column; a matching assigns each column at most once")
    Z, kr, kc = block_mean(C, max_side)
    word = "similarity" if maximize else "cost"
    fig = go.Figure(
        go.Heatmap(
            z=Z.tolist(),
            x=(np.arange(Z.shape[1]) * kc).tolist(),
            y=(np.arange(Z.shape[0]) * kr).tolist(),
            colorscale="Viridis" if maximize else "Viridis_r",
            colorbar={"title": {"text": word}},
            name=word,
            hovertemplate=f"row %{{y}}<br>column %{{x}}<br>{word}=%{{z:{HOVER}}}<extra></extra>",
        )
    )
    sub = ""
    if p is not None:
        obj = float(C[np.arange(n), p].sum())
        sub = f"objective {obj:.6g}"
        if n * m <= 1_000_000:
            from scipy.optimize import linear_sum_assignment

            r, c = linear_sum_assignment(C, maximize=maximize)
            best = float(C[r, c].sum())
            sub += f" (optimum {best:.6g})"
        fig.add_trace(
            go.Scatter(
                x=((p // kc) * kc).tolist(),
                y=((np.arange(n) // kr) * kr).tolist(),
                mode="markers",
                name="assignment",
                marker={
                    "symbol": "square-open",
                    "size": max(3, min(12, 600 // max(Z.shape))),
                    "color": "#d62728",
                    "line": {"width": 2},
                },
                customdata=np.stack([np.arange(n), p, C[np.arange(n), p]], 1).tolist(),
                hovertemplate=f"row %{{customdata[0]}} -> column %{{customdata[1]}}<br>{word}=%{{customdata[2]:{HOVER}}}<extra></extra>",  # noqa: E501
            )
        )
    head = f"Matching {word} matrix" + (f" for group {g}" if g is not None else "") + f" ({n} x {m})"
    finish(
        fig,
        title or (head + (f": {sub}" if sub else "")),
        "column (model B unit)",
        "row (model A unit)",
        height=560,
        legend_below=False,
    )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", scaleratio=1, constrain="domain")
    fig.update_xaxes(constrain="domain")
    return fig
