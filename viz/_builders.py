"""Report builders: tables of the key numbers, and :func:`analysis_report`, which assembles a whole
report from a dict of analysis results in one call (for ``weightspace analyze --report`` and the
demo / merge reports).

Results are recognised by their class name (``InterpolationCurve``, ``LayerwiseBarriers``,
``Landscape``, ``PlaneResult``, ``PathNorm``, ``SpectralMetrics``, ``NormMeasures``,
``NeuralCollapse``, ``CollapseTracker``, ``InformationPlane``, ``InformationPlaneTracker``,
``NetworkMetrics``, ``HessianEigen``, ``HessianTrace``, ``NeuralGraph``, ``Barrier``); viz imports no
analysis code. Anything else becomes a table of its scalar ``to_dict()`` fields, so new result types
(merging's) appear in reports before they get a figure of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Number
from typing import Any, Dict, List, Optional, Sequence

from viz._common import VizError, result_dict

__all__ = ["analysis_report", "barrier_rows", "scalar_rows", "add_result"]

_KINDS = ("chord", "mean_endpoint", "midpoint")


def _is_result(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return bool(v) and all(_is_result(x) for x in v)
    return not isinstance(v, (Number, str, bytes, Mapping)) and v is not None and not hasattr(v, "__array__")


def _is_series(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) or hasattr(v, "__array__")) and all(isinstance(x, Number) for x in list(v))


def _names(obj: Any) -> set:
    return {c.__name__ for c in type(obj).__mro__}


def barrier_rows(curves, kinds: Sequence[str] = _KINDS) -> List[Dict[str, Any]]:
    """One row per (curve, split, metric, barrier kind): barrier, its alpha, relative value and endpoints.

    ``curves`` is an ``InterpolationCurve`` or ``{name: curve}``. Kinds the curve cannot give (e.g.
    ``midpoint`` without alpha = 0.5 on the grid) are left out.
    """
    items = curves.items() if isinstance(curves, Mapping) else [("curve", curves)]
    rows = []
    for name, c in items:
        for sp in c.values:
            for m in c.values[sp]:
                for k in kinds:
                    try:
                        b = c.barrier(m, split=sp, kind=k)
                    except ValueError:
                        continue
                    rows.append(
                        {
                            "curve": name,
                            "split": sp,
                            "metric": b.metric,
                            "kind": k,
                            "barrier": b.value,
                            "at alpha": b.alpha,
                            "relative": b.relative,
                            "value at A": b.endpoint_a,
                            "value at B": b.endpoint_b,
                        }
                    )
    return rows


def scalar_rows(obj: Any, skip: Sequence[str] = ("settings", "log", "type")) -> Dict[str, Any]:
    """The scalar fields (numbers, strings, booleans, None) of a result, by ``to_dict()``/``as_dict()``."""
    d = result_dict(obj)
    return {k: v for k, v in d.items() if k not in skip and (v is None or isinstance(v, (Number, str, bool)))}


def _layerwise_rows(lb) -> List[Dict[str, Any]]:
    rows = []
    for base, d in lb.barriers.items():
        for sp, md in d.items():
            for m, arr in md.items():
                for g, v in zip(lb.groups, list(arr)):
                    rows.append(
                        {
                            "layer group": g,
                            "others from": base,
                            "split": sp,
                            "metric": "error" if m == "accuracy" else m,
                            "barrier": float(v),
                        }
                    )
    return rows


def add_result(report, name: str, res: Any, *, kind: str = "chord") -> None:
    """Add the figures and tables of one result (or ``{label: result}`` of one type) to ``report``."""
    from viz import _curves, _graph, _landscape, _layers, _training

    group = dict(res) if isinstance(res, Mapping) and res and all(_is_result(v) for v in res.values()) else None
    first = next(iter(group.values())) if group else res
    if isinstance(first, (list, tuple)) and first:
        first = first[0]
    names = _names(first)
    report.section(name)
    if isinstance(res, Mapping) and res and all(_is_series(v) for v in res.values()):  # processor history
        report.add(_training.processor_figure(res))
        report.add_table({k: (list(v)[-1] if len(v) else None) for k, v in res.items()}, title="Last values")
    elif "InterpolationCurve" in names:
        report.add(_curves.interpolation_figure(group or res, kind=kind))
        report.add_table(barrier_rows(group or res), title="Barriers (all variants)")
    elif "LayerwiseBarriers" in names:
        for label, lb in (group or {name: res}).items():
            for metric in [
                m for m in ("loss", "accuracy") if m in next(iter(next(iter(lb.barriers.values())).values()))
            ]:
                report.add(
                    _curves.layerwise_barrier_figure(lb, metric=metric), title=f"{label}: {metric}" if group else None
                )
            report.add_table(_layerwise_rows(lb), title=f"{label}: layer-wise barriers at alpha = {lb.alpha:g}")
    elif "Landscape" in names or "PlaneResult" in names:
        for label, land in (group or {name: res}).items():
            two_d = getattr(land, "dims", 2) == 2
            report.add(_landscape.landscape_figure(land, title=f"{label}: loss contour" if two_d else None))
            if two_d:
                report.add(_landscape.landscape_figure(land, style="surface", title=f"{label}: loss surface"))
            centre = getattr(land, "center", None) or getattr(land, "model_values", None)
            if centre:
                rows = []
                for k, v in centre.items():
                    if isinstance(v, Mapping) and all(isinstance(x, Mapping) for x in v.values()):
                        rows += [{"point": k, "split": s, **dict(mv)} for s, mv in v.items()]
                    else:
                        rows.append({"split": k, **dict(v)})
                report.add_table(rows, title=f"{label}: values at the marked models")
    elif "PathNorm" in names:
        pn = group or {"model": res}
        report.add(_layers.path_norm_figure(pn))
        report.add_table(
            [
                {"model": k, "q": p.q, "path-norm": p.value, "log path-norm": p.log_value}
                for k, v in pn.items()
                for p in (v if isinstance(v, (list, tuple)) else [v])
            ],
            title="Path-norms",
        )
    elif "SpectralMetrics" in names:
        report.add(_layers.spectral_figure(group or res))
        for label, sm in (group or {"model": res}).items():
            report.add_table(
                [{k: v for k, v in result_dict(r).items() if k not in ("shape",)} for r in sm.layers],
                title=f"{label}: spectral metrics per layer",
            )
    elif "NormMeasures" in names:
        report.add(_layers.norms_figure(group or res))
        for label, nm in (group or {"model": res}).items():
            report.add_table(scalar_rows(nm), title=f"{label}: norm measures")
    elif "CollapseTracker" in names:
        report.add(_training.collapse_figure(group or res))
        for label, tr in (group or {"model": res}).items():
            report.add_table(tr.history, title=f"{label}: neural collapse per epoch")
    elif "NeuralCollapse" in names:
        for label, nc in (group or {"model": res}).items():
            report.add_table(scalar_rows(nc), title=f"{label}: neural collapse")
    elif "InformationPlaneTracker" in names or "InformationPlane" in names:
        for label, ip in (group or {name: res}).items():
            report.add(_training.infoplane_figure(ip, title=f"{label}: information plane" if group else None))
            rows = (
                ip.history
                if hasattr(ip, "history")
                else {k: list(v) for k, v in zip(("layer", "i_xt", "i_ty"), (ip.layers, ip.i_xt, ip.i_ty))}
            )
            report.add_table(rows, title=f"{label}: I(X;T), I(T;Y) ({getattr(ip, 'units', 'bits')})")
    elif "NetworkMetrics" in names:
        for label, nm in (group or {"model": res}).items():
            rows = [
                {k: v for k, v in dict(r).items() if not hasattr(v, "__len__") or isinstance(v, str)}
                for r in nm.per_layer
            ]
            report.add_table(rows, title=f"{label}: node strength and centralities per layer")
    elif "NeuralGraph" in names:
        for label, g in (group or {name: res}).items():
            report.add(_graph.neural_graph_figure(g), title=label if group else None)
    elif "Barrier" in names:
        report.add_table([{"name": k, **scalar_rows(v)} for k, v in (group or {name: res}).items()], title="Barriers")
    else:  # HessianEigen, HessianTrace, future merging results: their scalar fields
        rows = []
        for label, r in (group or {name: res}).items():
            d = result_dict(r)
            flat = {
                k: v
                for k, v in d.items()
                if k not in ("settings", "log")
                and (
                    v is None
                    or isinstance(v, (Number, str, bool))
                    or (isinstance(v, (list, tuple)) and len(v) <= 8 and all(isinstance(x, Number) for x in v))
                )
            }
            rows.append({"result": label, **flat})
        report.add_table(rows, title=f"{name} ({type(first).__name__})")


def analysis_report(
    results: Mapping[str, Any],
    title: str = "weightspace analysis",
    *,
    report=None,
    kind: str = "chord",
    intro: Optional[str] = None,
    provenance: Optional[Mapping[str, Any]] = None,
):
    """A :class:`viz.Report` with one section per entry of ``results``, then "Provenance".

    Parameters
    ----------
    results : ``{section title: result}`` or ``{section title: {label: result of one type}}`` — e.g.
        ``{"Linear interpolation": {"naive": c0, "weight_matching": c1}, "Path-norm": {"A": pa, "B": pb},
        "Landscape around A": land}``. Each recognised result gets its figures and a table of its key
        numbers (see the module docstring); others a table of their scalar fields.
    title : the report's title.
    report : an existing report to append to (default: a new one).
    kind : barrier variant marked on interpolation figures (all variants go in the tables).
    intro : a paragraph under the title.
    provenance : extra key-value pairs for the Provenance section (command line, seeds, data).

    >>> r = viz.analysis_report({"LMC": {"naive": curve}}, "A vs B")    # doctest: +SKIP
    >>> r.write("report.html")                                          # doctest: +SKIP
    """
    from viz._report import Report

    if not isinstance(results, Mapping) or not results:
        raise VizError("results must be a non-empty mapping {section title: result or {label: result}}")
    rep = report if report is not None else Report(title)
    if intro:
        rep.add_text(intro)
    for name, res in results.items():
        add_result(rep, str(name), res, kind=kind)
    rep.add_provenance(results, **dict(provenance or {}))
    return rep
