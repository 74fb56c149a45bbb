"""Self-contained, offline HTML reports of Plotly figures.

plotly.js is inlined once in ``<head>`` (a CDN link renders nothing offline), every figure is a
``<div>`` with a fixed id drawn by ``Plotly.newPlot``, and identical input gives byte-identical output.
Files are written atomically (temporary file, then rename) and an existing file is only replaced with
``overwrite=True``.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

__all__ = ["Report"]


class Report:
    """An ordered list of sections (figures and paragraphs) written as one HTML file.

    >>> viz.Report("LMC").add(viz.barrier_figure(curve)).write("report.html")   # doctest: +SKIP
    """

    def __init__(self, title: str = "weightspace report") -> None:
        self.title = title
        self._items: List[Tuple[str, object, Optional[str]]] = []

    def add(self, fig, title: Optional[str] = None) -> "Report":
        """Append a ``plotly.graph_objects.Figure``."""
        if not hasattr(fig, "to_plotly_json"):
            raise TypeError(f"Report.add takes a plotly Figure, not {type(fig).__name__}")
        self._items.append(("figure", fig, title))
        return self

    def add_text(self, text: str, title: Optional[str] = None) -> "Report":
        """Append a paragraph (plain text; HTML is escaped) or a preformatted block if it has newlines."""
        self._items.append(("text", str(text), title))
        return self

    @property
    def num_figures(self) -> int:
        return sum(1 for kind, _, _ in self._items if kind == "figure")

    def to_html(self) -> str:
        from plotly.offline import get_plotlyjs

        parts = [
            "<!DOCTYPE html>", "<html>", "<head>", '<meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "pre{background:#f6f6f6;padding:.8em;overflow-x:auto}h2{margin-top:1.6em}</style>",
            f'<script type="text/javascript">{get_plotlyjs()}</script>',
            "</head>", "<body>", f"<h1>{html.escape(self.title)}</h1>",
        ]
        n = 0
        for kind, obj, title in self._items:
            if title:
                parts.append(f"<h2>{html.escape(title)}</h2>")
            if kind == "text":
                body = html.escape(obj)
                parts.append(f"<pre>{body}</pre>" if "\n" in obj else f"<p>{body}</p>")
            else:
                parts.append(obj.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{n}",
                                         config={"responsive": True}))
                n += 1
        parts += ["</body>", "</html>"]
        return "\n".join(parts)

    def write(self, path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
        """Write the report atomically (temp file + ``os.replace``) after the toolkit's one output rule
        (:func:`weightspace.io.check_output_path`): an existing file is replaced only with
        ``overwrite``, and a missing directory is not created but named in the error."""
        from weightspace.io import atomic_write, check_output_path

        check_output_path(path, overwrite=overwrite, flag="overwrite=True (or --overwrite)")
        return atomic_write(path, self.to_html(), overwrite=overwrite, flag="overwrite=True (or --overwrite)")
