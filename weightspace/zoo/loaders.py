"""Zoos a user brings: a folder of checkpoints with a metadata table, and writing a zoo as one.

Layout::

    my_zoo/
      metadata.csv          # one row per network; a "file" column names its checkpoint
      net_0000.safetensors  # or .pt/.pth/.bin (read with torch.load(weights_only=True))
      ...

The table is CSV (header row) or JSON (a list of objects, or ``{"models": [...]}``). Numeric-looking
CSV cells become int/float; every other column is kept as text. Checkpoints are read with
:func:`weightspace.io.load_state_dict` (safetensors, or ``torch.load(weights_only=True)``; never
pickled objects). ``builder`` (a callable ``row -> nn.Module``, or a ``"pkg.module:factory"`` string
called with the row's ``model_kwargs`` if any) lets :meth:`ModelZoo.model` rebuild modules.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Union


from weightspace.results import versions
from weightspace.zoo.zoos import ModelZoo, ZooError

log = logging.getLogger(__name__)

__all__ = ["load_zoo", "save_zoo"]

_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _cell(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    s = v.strip()
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return v


def _read_table(path: Path) -> List[Dict[str, Any]]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ZooError(f"metadata table {path} is not valid JSON: {exc}") from exc
        rows = data.get("models") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ZooError(f"metadata table {path} must be a JSON list of objects or {{'models': [...]}}")
        return [dict(r) for r in rows]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ZooError(f"metadata table {path} is empty; it needs a header row with a file column")
        rows = []
        for i, r in enumerate(reader):
            if None in r:
                raise ZooError(f"metadata table {path}, data row {i + 1}: more cells than header columns")
            rows.append({k: _cell(v) for k, v in r.items()})
        return rows


class _FactoryBuilder:
    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(self, row: Mapping[str, Any]):
        from weightspace.io import build_model

        kw = row.get("model_kwargs") or {}
        if isinstance(kw, str):
            kw = json.loads(kw) if kw.strip() else {}
        return build_model(self.spec, **kw)


def load_zoo(
    folder: Union[str, os.PathLike],
    metadata: str = "metadata.csv",
    *,
    file_column: str = "file",
    builder: Union[None, str, Callable[[Mapping[str, Any]], Any]] = None,
    check_finite: bool = True,
    map_location: Any = "cpu",
) -> ModelZoo:
    """Load a zoo from ``folder`` (see the module docstring) as a :class:`ModelZoo`.

    Raises :class:`ZooError` naming the file/row/column when the folder or table is missing, a row
    has no file, a file is listed twice, escapes the folder or does not exist, or a checkpoint has
    non-finite values (``check_finite``). Checkpoint files in the folder that the table does not list
    are reported in the log and skipped.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ZooError(f"zoo folder {root} does not exist or is not a folder")
    table = root / metadata
    if not table.is_file():
        found = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".csv", ".json"))
        raise ZooError(
            f"metadata table {table} not found; tables in the folder: {found or 'none'} (pass metadata=NAME)"
        )
    rows = _read_table(table)
    if not rows:
        raise ZooError(f"metadata table {table} has no rows")
    seen: Dict[str, int] = {}
    states, meta = [], []
    rootr = root.resolve()
    for i, r in enumerate(rows):
        f = r.get(file_column)
        if f in (None, ""):
            cols = sorted(r)
            raise ZooError(
                f"{table.name}, row {i + 1}: no {file_column!r} value (columns: {cols}); pass file_column= if it is named differently"  # noqa: E501
            )
        f = str(f)
        if f in seen:
            raise ZooError(f"{table.name}: file {f!r} is listed twice (rows {seen[f] + 1} and {i + 1})")
        seen[f] = i
        p = (root / f).resolve()
        if rootr not in p.parents:
            raise ZooError(f"{table.name}, row {i + 1}: file {f!r} is outside the zoo folder {root}")
        if not p.is_file():
            raise ZooError(f"{table.name}, row {i + 1}: checkpoint {p} does not exist")
        from weightspace.io import load_state_dict

        try:
            sd = load_state_dict(p, map_location=map_location, check_finite=check_finite)
        except Exception as exc:
            raise ZooError(f"{table.name}, row {i + 1}: cannot read checkpoint {p}: {exc}") from exc
        states.append(sd)
        meta.append(dict(r))
    listed = {(root / f).resolve() for f in seen}
    unlisted = sorted(p.name for p in root.iterdir() if p.suffix.lower() in _SUFFIXES and p.resolve() not in listed)
    logs = [f"loaded {len(states)} checkpoints from {root}"]
    if unlisted:
        log.warning(
            "load_zoo: %d checkpoint files in %s are not in %s and were skipped (first: %s)",
            len(unlisted),
            root,
            table.name,
            unlisted[0],
        )
        logs.append(f"skipped {len(unlisted)} unlisted files: {unlisted[:5]}")
    b = _FactoryBuilder(builder) if isinstance(builder, str) else builder
    settings = {
        "loader": "load_zoo",
        "folder": str(root),
        "metadata": metadata,
        "file_column": file_column,
        "builder": builder
        if isinstance(builder, str)
        else (None if builder is None else getattr(builder, "__name__", type(builder).__name__)),
        "versions": versions(),
    }
    return ModelZoo(tuple(states), tuple(meta), settings, tuple(logs), b)


def save_zoo(
    zoo: ModelZoo,
    folder: Union[str, os.PathLike],
    *,
    metadata: str = "metadata.csv",
    file_column: str = "file",
    overwrite: bool = False,
) -> Path:
    """Write ``zoo`` as a folder of safetensors checkpoints (``net_00000.safetensors``...) and a
    metadata table that :func:`load_zoo` reads back exactly. The folder must not exist (or be empty)
    unless ``overwrite=True``; it is written to a temporary sibling and renamed into place."""
    dst = Path(folder).expanduser()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ZooError(f"{dst} exists and is not empty; pass overwrite=True to replace it")
    if len(zoo) == 0:
        raise ZooError("the zoo is empty; nothing to save")
    from weightspace.io import save_state_dict

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=dst.name + ".tmp"))
    try:
        rows = []
        for i, (sd, r) in enumerate(zip(zoo.states, zoo.metadata)):
            name = f"net_{i:05d}.safetensors"
            save_state_dict({k: v.contiguous() for k, v in sd.items()}, tmp / name)
            row = {k: v for k, v in r.items() if k != file_column}
            row[file_column] = name
            rows.append(row)
        if metadata.endswith(".json"):
            (tmp / metadata).write_text(json.dumps(rows, indent=1))
        else:
            cols: List[str] = [file_column]
            for r in rows:
                cols += [k for k in r if k not in cols]
            with open(tmp / metadata, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                for r in rows:
                    w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
        if dst.exists():
            import shutil

            old = dst.with_name(dst.name + ".old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
