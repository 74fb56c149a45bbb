"""The cache folder for generated data sets (zoos, INRs): ``$WEIGHTSPACE_CACHE`` or
``~/.cache/weightspace``, never inside the repository; files are written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

__all__ = ["cache_dir", "settings_key", "atomic_save", "load_tensors"]


def cache_dir(kind: str, root: Union[None, str, os.PathLike] = None) -> Path:
    """``<root>/<kind>``, root = ``root`` or ``$WEIGHTSPACE_CACHE`` or ``~/.cache/weightspace``."""
    base = (
        Path(root)
        if root is not None
        else Path(os.environ.get("WEIGHTSPACE_CACHE") or Path.home() / ".cache" / "weightspace")
    )
    d = base.expanduser() / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of the generation settings (the cache file name)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def atomic_save(obj: Dict[str, Any], path: Path) -> None:
    """``torch.save`` tensors/JSON-able data to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_tensors(path: Path) -> Optional[Dict[str, Any]]:
    """Read a cache file written by :func:`atomic_save` (``weights_only``); None if absent or unreadable."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache entry is regenerated, never trusted
        return None
