"""Streaming merges of safetensors checkpoints larger than memory.

``merging.merge(a.safetensors, b.safetensors, ..., method=<elementwise method>, out="m.safetensors")``
lands here (see ``merging._api``). Nothing is loaded whole:

* :class:`LazySafetensors` parses a file's header (dtype, shape and byte range of every tensor) and reads
  one tensor at a time with ``pread`` into a fresh buffer. Not ``mmap``: pages of a memory map that were
  touched stay in the process's resident set (``RssFile``) until the map is closed, so merging two
  10 GiB files through ``safe_open`` shows ~20 GiB of RSS even though the kernel may drop those pages;
  with ``pread`` the resident set is the tensors in flight, and the file data is only page cache (not
  RSS; ``benchmarks/bench_stream_memory.py`` measures both).
* :class:`StreamWriter` writes a valid safetensors file incrementally: the header is written first (every
  output tensor's dtype, shape and offsets are known from the inputs' headers before anything is
  computed), then each tensor's bytes as it is produced, into a temporary file in the output directory,
  then ``fsync`` and an atomic rename (no-clobber unless ``overwrite``). A failure leaves nothing behind.
* :func:`stream_merge` runs an elementwise method key by key: read the key from every model (and the
  base), check it is finite, call the method on a context holding that one key, write the result, drop
  everything. Peak memory is about (N + 2) tensors of the largest key, not the checkpoints.
  Methods that need a statistic over the whole files first (TIES with ``trim="global"``: the magnitude
  threshold of each task vector) expose a ``stream_prepare`` hook; it runs extra read passes before the
  merge pass (2 for float32/16 checkpoints, 4 for float64; see ``merging.task_vectors``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ._registry import MergeContext, MergeError, MethodInfo, MethodOutput
from ._results import MergeResult

log = logging.getLogger(__name__)

__all__ = ["LazySafetensors", "StreamWriter", "stream_merge", "MERGE_METADATA_KEY"]

MERGE_METADATA_KEY = "weightspace.merge"
# weightspace.io keeps a state dict's key order in this metadata entry (safetensors sorts keys); the
# streaming writer follows the same convention so io.load_state_dict returns the merged keys in order.
_ORDER_KEY = "__weightspace_key_order__"
_MAX_HEADER = 100 * 1024 * 1024

_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class LazySafetensors(Mapping):
    """A read-only ``{key: tensor}`` mapping over a safetensors file; a tensor is read when indexed.

    ``shapes()``, ``dtypes()`` and ``metadata`` come from the header without reading any tensor data.
    Keys are in the order the file was written with by weightspace (its key-order metadata), else in
    the order of their bytes in the file. Malformed files raise :class:`MergeError` naming the file.
    """

    def __init__(self, path: "os.PathLike | str"):
        self.path = Path(path)
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise MergeError("streaming safetensors needs a little-endian machine")
        if not self.path.is_file():
            raise MergeError(f"checkpoint {self.path} does not exist (or is not a file)")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise MergeError(
                f"{self.path} is not a valid safetensors file ({e}); it may be corrupt, truncated or "
                "a pickle renamed .safetensors (convert it with weightspace.io, which refuses pickled "
                "objects)"
            ) from e
        self._data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        self.metadata: Dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
        data_len = size - self._data_start
        for key, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise MergeError(
                    f"{self.path}: header entry {key!r} is malformed or has an unsupported dtype "
                    f"({exc!r}); supported dtypes: {sorted(_DTYPES)}"
                ) from exc
            want = math.prod(shape) * _itemsize(dtype)
            if not (0 <= start <= end <= data_len) or end - start != want:
                raise MergeError(
                    f"{self.path}: tensor {key!r} has byte range [{start}, {end}) that does not fit its "
                    f"shape {shape} and dtype {e['dtype']} or the file ({data_len} data bytes); the "
                    "file is corrupt or truncated"
                )
            entries[key] = (dtype, shape, start, end)
        order = None
        try:
            order = json.loads(self.metadata.get(_ORDER_KEY, "null"))
        except ValueError:
            order = None
        if isinstance(order, list) and sorted(order) == sorted(entries):
            keys = order
        else:
            keys = sorted(entries, key=lambda k: entries[k][2])
        self._entries = OrderedDict((k, entries[k]) for k in keys)
        self.bytes_read = 0

    # Mapping interface
    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            dtype, shape, start, end = self._entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None
        n = end - start
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(n)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + start)
            got = f.readinto(memoryview(buf))
        if got != n:
            raise MergeError(f"{self.path}: could not read tensor {key!r} ({got} of {n} bytes); the file is truncated")
        self.bytes_read += n
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"LazySafetensors({str(self.path)!r}, {len(self)} tensors)"

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return OrderedDict((k, e[1]) for k, e in self._entries.items())

    def dtypes(self) -> Dict[str, torch.dtype]:
        return OrderedDict((k, e[0]) for k, e in self._entries.items())

    def nbytes(self, key: Optional[str] = None) -> int:
        if key is not None:
            e = self._entries[key]
            return e[3] - e[2]
        return sum(e[3] - e[2] for e in self._entries.values())


class StreamWriter:
    """Write a safetensors file tensor by tensor, atomically.

    ``entries`` lists ``(key, dtype, shape)`` in the order the tensors will be written; the header
    (with ``metadata``, str -> str) is written at once, then :meth:`write` appends each tensor's bytes
    (checking key, dtype and shape), and :meth:`commit` fsyncs and moves the temporary file into place.
    Used as a context manager, an exception (or a missing tensor) removes the temporary file and
    leaves ``path`` untouched. ``path`` is never replaced unless ``overwrite``.
    """

    def __init__(
        self,
        path: "os.PathLike | str",
        entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
        metadata: Optional[Mapping[str, str]] = None,
        *,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.overwrite = overwrite
        if self.path.exists() and not overwrite:
            raise MergeError(f"{self.path} already exists; refusing to overwrite it (pass overwrite=True)")
        if not self.path.parent.is_dir():
            raise MergeError(f"the directory of {self.path} does not exist; create it first")
        header: Dict[str, Any] = {}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta[_ORDER_KEY] = json.dumps([k for k, _, _ in entries])
        header["__metadata__"] = meta
        self._plan: List[Tuple[str, torch.dtype, Tuple[int, ...], int]] = []
        offset = 0
        for key, dtype, shape in entries:
            if dtype not in _NAMES:
                raise MergeError(f"cannot write {key!r}: dtype {dtype} has no safetensors name")
            shape = tuple(int(s) for s in shape)
            n = math.prod(shape) * _itemsize(dtype)
            header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._plan.append((key, dtype, shape, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0
        self.bytes_written = 0
        self.total_bytes = offset

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise MergeError(f"StreamWriter: unexpected extra tensor {key!r}")
        want_key, dtype, shape, n = self._plan[self._next]
        if key != want_key:
            raise MergeError(f"StreamWriter: expected tensor {want_key!r} next, got {key!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergeError(f"StreamWriter: {key!r} must be {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        if n:
            t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._f.write(memoryview(t.numpy()))
        self._next += 1
        self.bytes_written += n

    def commit(self) -> Path:
        if self._next != len(self._plan):
            raise MergeError(
                f"StreamWriter: {len(self._plan) - self._next} tensors were not written "
                f"(next: {self._plan[self._next][0]!r}); nothing was saved"
            )
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.overwrite:
            os.replace(self._tmp, self.path)
        else:
            try:  # no-clobber: fails if the file appeared meanwhile
                os.link(self._tmp, self.path)
            except FileExistsError:
                raise MergeError(f"{self.path} appeared while merging; refusing to overwrite it") from None
            except OSError:  # file systems without hard links
                if self.path.exists():
                    raise MergeError(f"{self.path} appeared while merging; refusing to overwrite it") from None
                os.replace(self._tmp, self.path)
            else:
                os.unlink(self._tmp)
        try:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - directories cannot be fsynced on some platforms
            pass
        return self.path

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------
# the streaming merge
# --------------------------------------------------------------------------------------------------
def _check_headers(readers: Sequence[LazySafetensors], names: Sequence[str]) -> None:
    ref, ref_name = readers[0], names[0]
    ref_shapes, ref_dtypes = ref.shapes(), ref.dtypes()
    for r, name in zip(readers[1:], names[1:]):
        shapes, dtypes = r.shapes(), r.dtypes()
        only_ref = [k for k in ref_shapes if k not in shapes]
        only_r = [k for k in shapes if k not in ref_shapes]
        if only_ref or only_r:
            first = (only_ref or only_r)[0]
            raise MergeError(
                f"{ref_name} ({ref.path}) and {name} ({r.path}) have different keys: {first!r} is only in "
                f"{ref_name if only_ref else name} (only in {ref_name}: {only_ref[:5]}, only in {name}: "
                f"{only_r[:5]}); both must share one architecture"
            )
        for k, s in ref_shapes.items():
            if shapes[k] != s:
                raise MergeError(
                    f"parameter {k!r}: {ref_name} ({ref.path}) has shape {s} but {name} ({r.path}) has "
                    f"{shapes[k]}; both must share one architecture"
                )
            if dtypes[k] != ref_dtypes[k]:
                raise MergeError(
                    f"parameter {k!r}: {ref_name} has dtype {ref_dtypes[k]} but {name} has {dtypes[k]}; "
                    "cast one checkpoint first"
                )


def _finite(t: torch.Tensor, key: str, name: str, path: Path) -> None:
    # min and max propagate NaN and show +-inf: one reduction pass, ~10x cheaper than isfinite().all() on CPU
    if t.is_floating_point() and t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t.reshape(-1))):
        raise MergeError(
            f"{name}[{key!r}] ({path}) contains NaN or inf; the checkpoint is broken (training diverged?) "
            "and nothing was written"
        )


def stream_merge(
    *,
    info: MethodInfo,
    paths: Sequence[Path],
    base: Any = None,
    weights: Any = None,
    alpha: Any = None,
    options: Dict[str, Any],
    seed: int = 0,
    device: Any = "auto",
    out: Path,
    overwrite: bool = False,
) -> MergeResult:
    """Merge safetensors files key by key with an elementwise method, writing ``out`` as it goes.

    Called by :func:`merging.merge` when every input is a ``.safetensors`` path, the method is
    elementwise, ``out=`` ends in ``.safetensors`` and no repair is asked. Returns a
    :class:`~merging.MergeResult` whose ``state_dict`` is a :class:`LazySafetensors` over ``out`` (tensors
    are read back only when indexed) and ``model`` is None. The output holds model_a's keys, dtypes and
    shapes; arithmetic runs in float32 (float64 for float64 tensors) on ``device``. The settings (method,
    options, weights, seed, inputs, versions) are stored in the file's metadata under
    ``"weightspace.merge"`` (JSON). ``log`` records the bytes read and written, the largest working set
    (bytes of the tensors of one key held at once) and the time of each stage.
    """
    from weightspace import resolve_device
    from weightspace.results import to_jsonable, versions

    from ._api import _model_name, _resolve_weights

    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    if not info.elementwise:
        raise MergeError(f"method {info.name!r} is not elementwise and cannot stream; load the models instead")
    n = len(paths)
    if n < info.min_models:
        raise MergeError(f"method {info.name!r} needs at least {info.min_models} models, got {n}")
    if base is not None and "base" not in info.needs:
        raise MergeError(f"method {info.name!r} does not use base=")
    if base is None and "base" in info.needs:
        raise MergeError(f"method {info.name!r} works on task vectors and needs base= (the pretrained model)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"seed must be an int, got {seed!r}")
    w = _resolve_weights(n, weights, alpha)
    names = [_model_name(i) for i in range(n)]
    readers = [LazySafetensors(p) for p in paths]
    base_reader = LazySafetensors(base) if base is not None else None
    out = Path(out)
    for p in list(paths) + ([Path(base)] if base is not None else []):
        if Path(p).resolve() == out.resolve():
            raise MergeError(f"out={str(out)!r} is one of the input checkpoints; write the merge to a new file")
    _check_headers(readers, names)
    if base_reader is not None:
        _check_headers([readers[0], base_reader], [names[0], "base"])
    dev = resolve_device(device)
    timings["check"] = time.perf_counter() - t_start

    gen = torch.Generator()
    gen.manual_seed(int(seed))
    # options are checked by the method itself: a call on empty states validates them before any work
    info.fn(
        MergeContext(
            states=[OrderedDict() for _ in paths],
            models=[None] * n,
            reference=None,
            spec=None,
            weights=w,
            data=None,
            base=None if base_reader is None else OrderedDict(),
            seed=int(seed),
            device=dev,
            generator=gen,
            example_inputs=None,
        ),
        **options,
    )
    keys = list(readers[0])
    shapes, dtypes = readers[0].shapes(), readers[0].dtypes()
    float_keys = [k for k in keys if dtypes[k].is_floating_point]
    method_log: Dict[str, Any] = {}
    prepare = getattr(info.fn, "stream_prepare", None)
    guard = None
    if prepare is not None:
        from ._task_math import task_vector

        t0 = time.perf_counter()

        def passes():
            for k in float_keys:
                b = base_reader[k].to(dev) if base_reader is not None else None
                yield [task_vector(r[k].to(dev), b) for r in readers]

        counts = [sum(math.prod(shapes[k]) for k in float_keys)] * n
        guard, extra = prepare(options, passes, counts, any(dtypes[k] == torch.float64 for k in float_keys))
        method_log.update(extra)
        timings["prepass"] = time.perf_counter() - t0

    settings = {
        "method": info.name,
        "options": options,
        "weights": w,
        "seed": int(seed),
        "device": str(dev),
        "repair": None,
        "n_models": n,
        "inputs": [str(p) for p in paths],
        "base": str(base) if base is not None else None,
        "streamed": True,
        "versions": versions(),
    }
    metadata = {MERGE_METADATA_KEY: json.dumps(to_jsonable(settings), sort_keys=True)}
    t0 = time.perf_counter()
    peak_key_bytes, negative_var = 0, []
    with StreamWriter(out, [(k, dtypes[k], shapes[k]) for k in keys], metadata, overwrite=overwrite) as writer:
        if guard is not None:
            guard.__enter__()
        try:
            for key in keys:
                ts = [r[key].to(dev) for r in readers]
                for t, name, r in zip(ts, names, readers):
                    _finite(t, key, name, r.path)
                b = None
                if base_reader is not None:
                    b = base_reader[key].to(dev)
                    _finite(b, key, "base", base_reader.path)
                ctx = MergeContext(
                    states=[{key: t} for t in ts],
                    models=[None] * n,
                    reference=None,
                    spec=None,
                    weights=w,
                    data=None,
                    base=None if b is None else {key: b},
                    seed=int(seed),
                    device=dev,
                    generator=gen,
                    example_inputs=None,
                )
                res = info.fn(ctx, **options)
                if not isinstance(res, MethodOutput) or key not in res.state_dict:
                    raise RuntimeError(f"method {info.name!r} returned no value for {key!r} when streaming")
                merged = res.state_dict[key].detach().to(dtypes[key])
                key_bytes = sum(t.numel() * t.element_size() for t in ts) + merged.numel() * merged.element_size()
                peak_key_bytes = max(peak_key_bytes, key_bytes + (0 if b is None else b.numel() * b.element_size()))
                negative_var += res.log.get("negative_running_var", [])
                if not method_log.get("per_key_example"):
                    method_log["per_key_example"] = {k: v for k, v in res.log.items() if k != "negative_running_var"}
                writer.write(key, merged)
                del ts, b, ctx, res, merged
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)
    timings["merge"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    if negative_var:
        method_log["negative_running_var"] = negative_var
    read = sum(r.bytes_read for r in readers) + (base_reader.bytes_read if base_reader is not None else 0)
    log_ = {
        "method": method_log,
        "timings": timings,
        "spec_source": None,
        "out": str(out),
        "streamed": True,
        "bytes_read": read,
        "bytes_written": writer.bytes_written,
        "largest_key_bytes": peak_key_bytes,
        "input_bytes": sum(r.nbytes() for r in readers) + (base_reader.nbytes() if base_reader is not None else 0),
    }
    log.info(
        "streamed %s over %d tensors: read %.1f MB, wrote %.1f MB in %.2f s",
        info.name,
        len(keys),
        read / 1e6,
        writer.bytes_written / 1e6,
        timings["total"],
    )
    return MergeResult(
        model=None, state_dict=LazySafetensors(out), alignment=None, spec=None, settings=settings, log=log_
    )
