"""Self-contained, offline HTML reports: sections of text, tables of numbers and Plotly figures.

* plotly.js is inlined once in ``<head>`` (a CDN link renders nothing offline), and a
  Content-Security-Policy ``default-src 'none'`` forbids the page from fetching anything at all;
* every figure is a ``<div>`` with a fixed id (``figure-0``, ``figure-1``, ...) drawn by
  ``Plotly.newPlot`` with :data:`viz.CONFIG` (no "Share chart..." cloud button, no logo link);
* identical input gives byte-identical output (no timestamps, no random ids);
* numbers in tables are shown to 6 significant digits, with the exact value in the cell's tooltip;
* a "Provenance" section lists each result's ``settings`` and the library versions
  (``weightspace.results.versions()``); it is added automatically at the end if not added explicitly;
* files are written atomically (temporary file in the target directory, then rename); an existing
  file is replaced only with ``overwrite=True`` and a missing directory is an error, never created.

Figures of more than ``Report.max_points`` data points (200,000 by default) are accepted with a
logged warning: the figure builders decimate or aggregate large inputs, see :mod:`viz._common`.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Mapping
from numbers import Integral, Number
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from viz._common import CONFIG, VizError, figure_points, settings_of

log = logging.getLogger(__name__)

__all__ = ["Report"]


_CSP = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:; worker-src blob:; connect-src 'none'"
)

_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;"
    "color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}"  # noqa: E501
    "h3{margin-top:1.3em}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}"
    "table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em;display:block;overflow-x:auto;max-width:100%}"
    "th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;white-space:nowrap}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}"
    "caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}"
    "nav ol{columns:2;font-size:.95em}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"
)


def _fmt(v: Any) -> Tuple[str, Optional[str], bool]:
    """(shown text, exact text for the tooltip or None, is numeric)."""
    if isinstance(v, bool) or v is None:
        return ("" if v is None else str(v)), None, False
    if isinstance(v, Number) and not isinstance(v, complex):
        if isinstance(v, Integral):
            return str(int(v)), None, True
        f = float(v)
        if not math.isfinite(f):
            return str(f), None, True
        shown = f"{f:.6g}"
        return shown, (repr(f) if shown != repr(f) else None), True
    if hasattr(v, "item") and getattr(v, "size", 2) == 1:  # numpy / torch scalar
        return _fmt(v.item())
    if isinstance(v, (list, tuple)) and len(v) <= 8 and all(isinstance(x, (Number, str)) for x in v):
        return "(" + ", ".join(_fmt(x)[0] for x in v) + ")", None, False
    s = str(v)
    return (s if len(s) <= 300 else s[:297] + "..."), None, False


def _rows_of(data: Any, columns: Optional[Sequence[str]]) -> Tuple[List[str], List[List[Any]]]:
    """Normalise a table: list of dicts, dict of columns, or list of rows with ``columns``."""
    if isinstance(data, Mapping):
        cols = list(data)
        lens = {
            len(v) if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str) else None
            for v in data.values()
        }
        if None in lens:  # a flat {name: value} mapping: two columns
            return ["name", "value"], [[k, v] for k, v in data.items()]
        n = lens.pop() if len(lens) == 1 else None
        if n is None:
            raise VizError(f"table columns have different lengths: { {k: len(v) for k, v in data.items()} }")
        return cols, [[data[c][i] for c in cols] for i in range(n)]
    data = list(data)
    if data and isinstance(data[0], Mapping):
        cols = list(columns) if columns is not None else []
        if columns is None:
            for r in data:
                cols += [k for k in r if k not in cols]
        return cols, [[r.get(c) for c in cols] for r in data]
    if columns is None:
        raise VizError("a table given as a list of rows needs columns=[...]")
    cols = list(columns)
    for i, r in enumerate(data):
        if len(r) != len(cols):
            raise VizError(f"table row {i} has {len(r)} cells for {len(cols)} columns")
    return cols, [list(r) for r in data]


class Report:
    """An ordered list of sections with text, tables of numbers and figures, written as one HTML file.

    >>> r = viz.Report("LMC")                                                     # doctest: +SKIP
    >>> r.section("Interpolation").add(viz.interpolation_figure(curves))          # doctest: +SKIP
    >>> r.add_table(viz.barrier_rows(curves), title="Barriers")                   # doctest: +SKIP
    >>> r.add_provenance({"naive": c0, "weight_matching": c1}).write("lmc.html")   # doctest: +SKIP

    ``viz.Report("LMC").add(fig).write(path)`` keeps working: items added before any ``section`` go
    directly under the title.
    """

    max_points: int = 200_000

    def __init__(self, title: str = "weightspace report") -> None:
        self.title = str(title)
        self._items: List[Tuple[str, Any, Optional[str]]] = []
        self._has_provenance = False

    # -- building -------------------------------------------------------------------------------
    def section(self, title: str, text: Optional[str] = None) -> "Report":
        """Start a new section (a heading in the table of contents), optionally with an intro paragraph."""
        self._items.append(("section", str(title), None))
        if text:
            self.add_text(text)
        return self

    def add(self, fig, title: Optional[str] = None, caption: Optional[str] = None) -> "Report":
        """Append a ``plotly.graph_objects.Figure`` (``title`` becomes a sub-heading, ``caption`` a note)."""
        if not hasattr(fig, "to_plotly_json"):
            raise TypeError(f"Report.add takes a plotly Figure, not {type(fig).__name__}")
        n = figure_points(fig)
        if n > self.max_points:
            log.warning(
                "figure %r ships %d data points (> %d): the page may be slow; decimate or aggregate first",
                title or fig.layout.title.text,
                n,
                self.max_points,
            )
        self._items.append(("figure", (fig, caption), title))
        return self

    add_figure = add

    def add_text(self, text: str, title: Optional[str] = None) -> "Report":
        """Append a paragraph (plain text; HTML is escaped) or a preformatted block if it has newlines."""
        self._items.append(("text", str(text), title))
        return self

    def add_table(
        self,
        data: Any,
        title: Optional[str] = None,
        *,
        columns: Optional[Sequence[str]] = None,
        caption: Optional[str] = None,
    ) -> "Report":
        """Append a table of numbers: a list of dict rows, a dict of columns, a flat ``{name: value}``
        dict, or a list of rows with ``columns``. Floats show 6 significant digits, exact on hover."""
        cols, rows = _rows_of(data, columns)
        self._items.append(("table", (cols, rows, caption), title))
        return self

    def add_provenance(self, results: Optional[Mapping[str, Any]] = None, **extra: Any) -> "Report":
        """Append the "Provenance" section: each result's ``settings`` (variant, options, seed, device,
        versions recorded in it), any ``extra`` key-value pairs (e.g. ``seed=0``, ``command="..."``)
        and ``weightspace.results.versions()``."""
        from weightspace.results import versions

        self.section("Provenance", "The settings, seeds and library versions that produced the numbers above.")
        for name, res in (results or {}).items():
            objs = res.items() if isinstance(res, Mapping) and not hasattr(res, "settings") else [(None, res)]
            for sub, obj in objs:
                s = settings_of(obj)
                if s:
                    label = f"{name}" + (f" / {sub}" if sub is not None else "") + f" ({type(obj).__name__})"
                    self.add_table({k: s[k] for k in s}, title=label)
        if extra:
            self.add_table(dict(extra), title="Run")
        self.add_table(versions(), title="Versions")
        self._has_provenance = True
        return self

    @property
    def num_figures(self) -> int:
        return sum(1 for kind, _, _ in self._items if kind == "figure")

    # -- output ---------------------------------------------------------------------------------
    def _table_html(self, cols: List[str], rows: List[List[Any]], caption: Optional[str]) -> str:
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr></thead><tbody>")
        for r in rows:
            cells = []
            for v in r:
                shown, exact, num = _fmt(v)
                attrs = (' class="num"' if num else "") + (f' title="{html.escape(exact)}"' if exact else "")
                cells.append(f"<td{attrs}>{html.escape(shown)}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
        return "".join(out)

    def to_html(self) -> str:
        from plotly.offline import get_plotlyjs

        items = list(self._items)
        if not self._has_provenance:
            from weightspace.results import versions

            items += [("section", "Provenance", None), ("table", (*_rows_of(versions(), None), None), "Versions")]
        sections = [t for kind, t, _ in items if kind == "section"]
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="weightspace viz">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{_CSS}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>",
            "<body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if len(sections) > 1:
            parts.append(
                "<nav><ol>"
                + "".join(f'<li><a href="#section-{i}">{html.escape(t)}</a></li>' for i, t in enumerate(sections))
                + "</ol></nav>"
            )
        n = s = 0
        open_section = False
        for kind, obj, title in items:
            if kind == "section":
                if open_section:
                    parts.append("</section>")
                parts.append(f'<section id="section-{s}"><h2>{html.escape(obj)}</h2>')
                s += 1
                open_section = True
                continue
            if title:
                parts.append(f"<h3>{html.escape(title)}</h3>" if open_section else f"<h2>{html.escape(title)}</h2>")
            if kind == "text":
                body = html.escape(obj)
                parts.append(f"<pre>{body}</pre>" if "\n" in obj else f"<p>{body}</p>")
            elif kind == "table":
                parts.append(self._table_html(*obj))
            else:
                fig, caption = obj
                div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{n}", config=CONFIG)
                parts.append(
                    "<figure>"
                    + div
                    + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "")
                    + "</figure>"
                )
                n += 1
        if open_section:
            parts.append("</section>")
        parts += ["</body>", "</html>"]
        return "\n".join(parts)

    def write(self, path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
        """Write the report atomically and return its path, after the toolkit's one output rule
        (:func:`weightspace.io.check_output_path`): an existing file is replaced only with ``overwrite``
        (``weightspace.io.OutputExistsError``, a ``FileExistsError``), a missing directory is named,
        never created (``OutputPathError``). Nothing is left behind on failure."""
        from weightspace.io import atomic_write

        path = atomic_write(path, self.to_html(), overwrite=overwrite, flag="overwrite=True (or --overwrite)")
        log.info("wrote %s (%d figures)", path, self.num_figures)
        return path
