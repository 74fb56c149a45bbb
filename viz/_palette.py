"""One palette for every figure: a stable colour per model and per method name.

A name always gets the same colour, in every figure, every process and every run:

* well-known model roles (``"A"``, ``"B"``, ``"merged"``, ``"permuted"``, ``"ensemble"``, ``"base"``)
  and merging methods (``"naive"``, ``"weight_matching"``, ``"activation_matching"``, ``"ste"``,
  ``"zipit"``, ``"ot_fusion"``, ``"task_arithmetic"``, ``"ties"``, ``"dare"``, ...) have fixed colours;
* any other name is mapped by a CRC-32 of its normalised spelling (not Python's salted ``hash``) onto a
  24-colour list, so it is stable across processes (two unknown names may share a colour).

Names are normalised before lookup: case is ignored and ``"-"``/``" "`` count as ``"_"``, so
``"Weight-Matching"`` and ``"weight_matching"`` are one method. Splits are told apart by line dash
(``train`` dashed, ``test`` solid), never by colour, so a colour always means a model or a method.
"""

from __future__ import annotations

import re
import zlib
from typing import Dict

__all__ = ["color", "dash", "MODEL_COLORS", "METHOD_COLORS"]

MODEL_COLORS: Dict[str, str] = {
    "a": "#1f77b4",  # blue
    "b": "#d62728",  # red
    "merged": "#2ca02c",  # green
    "permuted": "#9467bd",  # purple
    "b_permuted": "#9467bd",
    "aligned": "#9467bd",
    "ensemble": "#8c564b",  # brown
    "base": "#7f7f7f",  # grey
    "init": "#bcbd22",  # olive
}

METHOD_COLORS: Dict[str, str] = {
    "naive": "#7f7f7f",
    "average": "#7f7f7f",
    "linear": "#7f7f7f",
    "identity": "#7f7f7f",
    "weight_matching": "#ff7f0e",
    "activation_matching": "#17becf",
    "ste": "#e377c2",
    "straight_through": "#e377c2",
    "zipit": "#6a3d9a",
    "ot_fusion": "#b15928",
    "sinkhorn": "#fb9a99",
    "repair": "#33a02c",
    "task_arithmetic": "#a6cee3",
    "ties": "#fdbf6f",
    "dare": "#cab2d6",
    "fisher": "#b2df8a",
    "regmean": "#1b9e77",
    "bezier": "#d95f02",
    "polychain": "#7570b3",
}

# Unknown names: a fixed list (Plotly's Dark24), indexed by CRC-32 of the normalised name.
_FALLBACK = (
    "#2E91E5",
    "#E15F99",
    "#1CA71C",
    "#FB0D0D",
    "#DA16FF",
    "#222A2A",
    "#B68100",
    "#750D86",
    "#EB663B",
    "#511CFB",
    "#00A08B",
    "#FB00D1",
    "#FC0080",
    "#B2828D",
    "#6C7C32",
    "#778AAE",
    "#862A16",
    "#A777F1",
    "#620042",
    "#1616A7",
    "#DA60CA",
    "#6C4516",
    "#0D2A63",
    "#AF0038",
)

_DASH = {"train": "dash", "test": "solid", "val": "dot", "valid": "dot", "validation": "dot"}


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def color(name: str) -> str:
    """The colour (``"#rrggbb"``) of a model or method ``name``; the same in every figure and process.

    >>> color("A"), color("weight-matching") == color("weight_matching")
    ('#1f77b4', True)
    """
    n = _norm(name)
    if n in MODEL_COLORS:
        return MODEL_COLORS[n]
    if n in METHOD_COLORS:
        return METHOD_COLORS[n]
    head = re.split(r"[^a-z0-9]+", n, maxsplit=1)[0]  # "A (test)", "merged@0.5": the leading role
    if head in MODEL_COLORS:
        return MODEL_COLORS[head]
    return _FALLBACK[zlib.crc32(n.encode("utf-8")) % len(_FALLBACK)]


def dash(split: str) -> str:
    """Line dash of a data split: ``train`` dashed, ``test`` solid, validation dotted, others dash-dot."""
    return _DASH.get(_norm(split), "dashdot")
