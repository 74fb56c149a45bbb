"""Checkpoint I/O: safe loading, atomic saving, model factories.

* :func:`save_state_dict` writes safetensors (when installed and the path ends in
  ``.safetensors``) or ``torch.save`` of a plain dict of tensors, **atomically** (a temp file in the
  target directory, then ``os.replace``) and refuses to overwrite an existing file unless
  ``overwrite=True``.
* :func:`load_state_dict` reads either format with ``torch.load(weights_only=True)`` for pickles —
  never unpickling arbitrary objects — unwraps ``{"state_dict": ...}`` / ``{"model": ...}``, and
  reports corrupt or truncated files (and, on request, NaN/inf weights) naming the file and key.
* :func:`resolve_factory` / :func:`build_model` turn ``"pkg.module:callable"`` (or
  ``"path/to/file.py:callable"``) into a model; :func:`load_into` returns a new model copy with
  given weights and explains every key or shape mismatch.

Saved tensors are detached and moved to the CPU; tensors sharing storage (tied weights) are cloned
for safetensors, which refuses shared storage.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from weightspace.results import WeightspaceError

log = logging.getLogger(__name__)

__all__ = ["save_state_dict", "load_state_dict", "read_metadata", "resolve_factory", "build_model",
           "load_into", "CheckpointError", "check_output_path", "atomic_write", "OutputPathError",
           "OutputExistsError"]

PathLike = Union[str, os.PathLike]
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_ORDER_KEY = "__weightspace_key_order__"  # safetensors sorts keys; the original order rides in the header


class CheckpointError(WeightspaceError, ValueError):
    """A checkpoint file could not be read or written safely (the message names the file)."""


class OutputPathError(WeightspaceError, ValueError):
    """An output path cannot be written: its directory is missing, or it names a directory."""


class OutputExistsError(WeightspaceError, FileExistsError, ValueError):
    """An output file exists and no overwrite was asked for (also a ``FileExistsError``)."""


def check_output_path(path: PathLike, *, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    """Validate an output file path before any work is done; return it as a ``Path``.

    The one rule for every writer of the toolkit (``save_state_dict``, ``viz.Report.write``, the CLI):

    * an existing file is never replaced unless ``overwrite`` (the message names ``flag``, e.g.
      ``"--overwrite"`` for the command line) -> :class:`OutputExistsError`;
    * a path naming a directory -> :class:`OutputPathError`;
    * a missing parent directory is **not** created: :class:`OutputPathError` names it and says to
      create it (a typo in a directory name should not silently create a tree, e.g. at ``/``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an output path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputPathError("the output path is empty; give a file name")
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file name inside it (e.g. {path / 'out.html'})")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it (pass {flag} to replace it)")
    parent = path.parent
    if not parent.exists():
        raise OutputPathError(f"directory {parent} does not exist; create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise OutputPathError(f"{parent} is not a directory, so {path} cannot be written there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"directory {parent} is not writable; choose another output path")
    return path


def atomic_write(path: PathLike, data: Union[str, bytes, Callable[[str], None]], *, overwrite: bool = False,
                 flag: str = "overwrite=True", mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` atomically after :func:`check_output_path`; return the path.

    ``data`` is text (UTF-8), bytes, or a callable ``writer(tmp_path)`` that writes the file itself
    (e.g. ``torch.save``). It goes to a temporary file in the target directory, is flushed to disk
    and moved into place with ``os.replace``, so a failure never leaves a partial file at ``path``
    and an existing file is replaced (with ``overwrite``) in one step. The file gets ``mode`` minus
    the umask (``mkstemp`` alone would create it 0600).
    """
    path = check_output_path(path, overwrite=overwrite, flag=flag)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputExistsError(f"{path} appeared while it was being written; refusing to overwrite it "
                                    f"(pass {flag})")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def _as_tensor_dict(obj: Union[nn.Module, Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an nn.Module or a state dict (mapping of str -> Tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise TypeError(f"state dict keys must be strings, got {k!r} ({type(k).__name__})")
        if not torch.is_tensor(v):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor; only tensors are saved")
        out[k] = v.detach().cpu()
    return out


def _check_metadata(metadata: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    if _ORDER_KEY in metadata:
        raise ValueError(f"metadata key {_ORDER_KEY!r} is reserved by weightspace; rename it")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata must map str -> str; entries {bad} are not (convert values with str() "
                        "or json.dumps())")
    return dict(metadata)


def _untie(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Clone tensors that share storage with another entry or are non-contiguous views."""
    seen: Dict[int, str] = {}
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        shared = ptr is not None and ptr in seen
        partial = t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if shared or partial or not t.is_contiguous():
            if shared:
                log.debug("cloning %r: shares storage with %r", k, seen[ptr])
            t = t.contiguous().clone()
        elif ptr is not None:
            seen[ptr] = k
        out[k] = t
    return out


def save_state_dict(state_dict_or_module: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                    metadata: Optional[Mapping[str, str]] = None, *, overwrite: bool = False) -> Path:
    """Write a state dict (or a module's) to ``path`` atomically; return the path.

    Format: safetensors when ``path`` ends in ``.safetensors`` (requires the ``safetensors``
    package; ``metadata`` goes into its header), otherwise ``torch.save`` of a plain dict of tensors
    (with ``metadata``, the file holds ``{"state_dict": tensors, "metadata": metadata}``, which
    :func:`load_state_dict` unwraps). ``metadata`` maps str -> str.

    The data is written to a temporary file in the target directory and moved into place with
    ``os.replace``, so a failure never leaves a partial file at ``path``. An existing ``path`` is
    never replaced unless ``overwrite=True``.
    """
    path = check_output_path(path, overwrite=overwrite)
    tensors = _as_tensor_dict(state_dict_or_module)
    meta = _check_metadata(metadata)
    use_st = path.suffix == ".safetensors"
    if use_st and not _has_safetensors():
        raise ImportError(f"saving {path} needs the 'safetensors' package: pip install safetensors "
                          "(or use a .pt path to save with torch.save)")
    if use_st:
        atomic_write(path, lambda tmp: _write_safetensors(_untie(tensors), tmp, meta), overwrite=overwrite)
    else:
        obj = tensors if meta is None else {"state_dict": tensors, "metadata": meta}
        atomic_write(path, lambda tmp: _write_torch(obj, tmp), overwrite=overwrite)
    log.debug("saved %d tensors to %s", len(tensors), path)
    return path


def _write_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]]) -> None:
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps(list(tensors))
    save_file(tensors, path, metadata=meta)


def _write_torch(obj: Any, path: str) -> None:
    torch.save(obj, path)


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch"  # legacy (non-zip) torch.save pickle
    return "safetensors" if path.suffix == ".safetensors" else "torch"


def _read(path: Path, map_location: Any) -> Any:
    fmt = _sniff(path)
    if fmt == "safetensors":
        if not _has_safetensors():
            raise ImportError(f"{path} is a safetensors file; install it with: pip install safetensors")
        from safetensors import safe_open

        dev = "cpu" if map_location is None else str(torch.device(map_location))
        try:
            with safe_open(str(path), framework="pt", device=dev) as f:
                order = _key_order(f.metadata(), list(f.keys()))
                return {k: f.get_tensor(k) for k in order}
        except Exception as e:  # SafetensorError and friends
            raise CheckpointError(f"could not read safetensors file {path}: it looks corrupt or truncated ({e})") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled objects that are not tensors or plain "
                "containers, and loading it would run arbitrary code. If you trust the file, load it "
                "yourself with torch.load(path, weights_only=False) and pass the state dict on. "
                f"(torch said: {str(e).splitlines()[0]})") from e
        raise CheckpointError(f"could not read {path}: corrupt or truncated pickle ({e})") from e
    except Exception as e:  # RuntimeError (zip reader), EOFError, IndexError, ... from a damaged file
        raise CheckpointError(f"could not read {path}: the file looks corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


def _key_order(metadata: Optional[Mapping[str, str]], keys: list) -> list:
    try:
        order = json.loads((metadata or {}).get(_ORDER_KEY, "null"))
    except ValueError:
        order = None
    return order if isinstance(order, list) and sorted(order) == sorted(keys) else keys


def _unwrap(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    for _ in range(4):
        if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
            key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if key is None:
                break
            obj = obj[key]
        else:
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path} is not a plain state dict: entries {bad[:5]} are not tensors "
                              f"(top-level keys: {list(obj)[:8]}); extract the weights first")
    return dict(obj)


def load_state_dict(path: PathLike, map_location: Any = "cpu", *,
                    check_finite: bool = False) -> Dict[str, torch.Tensor]:
    """Load a state dict from a safetensors or ``torch.save`` file, safely.

    The format is detected from the file's first bytes. Pickles are read with
    ``torch.load(weights_only=True)``: a file holding other pickled objects raises
    :class:`CheckpointError` instead of running their code. ``{"state_dict": ...}``,
    ``{"model": ...}``, ``{"model_state_dict": ...}`` and ``{"module": ...}`` wrappers are unwrapped.
    Corrupt or truncated files raise :class:`CheckpointError` naming the file. With
    ``check_finite=True`` a floating tensor containing NaN or inf raises ``ValueError`` naming the key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory; pass the weights file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    sd = _unwrap(_read(path, map_location), path)
    if check_finite:
        for k, t in sd.items():
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise ValueError(f"{path}: tensor {k!r} {tuple(t.shape)} has {n_nan} NaN and {n_inf} inf "
                                 "values; the checkpoint is broken (training diverged?)")
    return sd


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The str -> str metadata saved with :func:`save_state_dict` ({} when there is none)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _sniff(path) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: v for k, v in (f.metadata() or {}).items() if k != _ORDER_KEY}
        except Exception as e:
            raise CheckpointError(f"could not read safetensors header of {path} ({e})") from e
    obj = _read(path, "cpu")
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _import_module(mod_name: str, spec: str):
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        file = Path(mod_name)
        if not file.is_file():
            raise ImportError(f"cannot resolve {spec!r}: file {file} does not exist")
        name = f"_weightspace_user_{abs(hash(str(file.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ImportError(f"cannot resolve {spec!r}: module {e.name!r} was not found; check the "
                              "spelling and that it is importable (installed or on PYTHONPATH)") from e
        raise ImportError(f"cannot resolve {spec!r}: importing {mod_name!r} failed because its "
                          f"dependency {e.name!r} is missing") from e


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``"pkg.module:callable"`` (attribute path may be dotted, e.g. ``"m:Class.build"``).

    The module part may also be a path to a ``.py`` file. Raises ``ValueError`` for a malformed
    spec, ``ImportError`` when the module cannot be imported, ``AttributeError`` (with close
    matches) when the attribute is missing and ``TypeError`` when it is not callable.
    """
    if not isinstance(spec, str):
        raise TypeError(f"factory spec must be a string 'pkg.module:callable', got {type(spec).__name__}")
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name.strip() or not attr.strip() or (mod_name.count(":") and not os.path.exists(mod_name)):
        raise ValueError(f"bad factory spec {spec!r}: expected 'pkg.module:callable' (e.g. "
                         "'weightspace.zoo:MLP' or 'path/to/file.py:make_model')")
    module = _import_module(mod_name.strip(), spec)
    obj: Any = module
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AttributeError(f"cannot resolve {spec!r}: {getattr(obj, '__name__', type(obj).__name__)!r} "
                                 f"has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"cannot use {spec!r}: it resolves to a {type(obj).__name__}, which is not callable")
    return obj


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Call the factory named by ``spec`` with ``kwargs`` and check that it returns an ``nn.Module``.

    ``spec`` is ``"pkg.module:callable"`` (see :func:`resolve_factory`) or the name of a zoo model
    ("mlp", "vgg", "resnet20", "vit"; see :func:`weightspace.zoo.make`).
    """
    if isinstance(spec, str) and ":" not in spec:
        from weightspace.zoo.models import MODELS, make

        if spec.lower() in MODELS:
            return make(spec, **kwargs)
        raise ValueError(f"bad model spec {spec!r}: give 'pkg.module:callable' or a zoo name ({', '.join(MODELS)})")
    model = resolve_factory(spec)(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_into(model: nn.Module, state_dict: Union[PathLike, Mapping[str, torch.Tensor]],
              strict: bool = True) -> nn.Module:
    """Return a NEW copy of ``model`` holding the weights of ``state_dict`` (a mapping or a path).

    ``model`` itself is untouched. Missing and unexpected keys raise ``ValueError`` listing them
    (when ``strict``; otherwise they are logged and skipped), and every shape mismatch raises
    naming the key and both shapes, strict or not. Values are cast to the model's dtypes and device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_state_dict(state_dict)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping or a path, got {type(state_dict).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_type = [k for k in state_dict if k in own and not torch.is_tensor(state_dict[k])]
    if bad_type:
        raise TypeError(f"state dict entries {bad_type} are not tensors")
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (keys start with 'module.': strip that DataParallel prefix first)"
        raise ValueError(f"state dict does not fit {type(model).__name__}: " + "; ".join(problems) + hint)
    if missing or unexpected:
        log.warning("load_into (strict=False): %d missing keys %s, %d unexpected keys %s skipped",
                    len(missing), missing[:5], len(unexpected), unexpected[:5])
    new = copy.deepcopy(model)
    new.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=strict)
    return new
