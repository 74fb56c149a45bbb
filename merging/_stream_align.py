"""Streaming weight matching of safetensors checkpoints larger than memory.

``merging.merge(a.safetensors, b.safetensors, method="weight_matching", spec=..., out="m.safetensors")``
lands here (see ``merging._api._maybe_stream``). The alignment is the library's own weight matching
(:func:`merging.weight_matching.match_weights`: same coordinate descent, same seeded order, same
acceptance rule; Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, Alg. 1), run on a problem whose
tensors stay on disk:

* the two checkpoints are :class:`LazyState` mappings over :class:`merging._stream.LazySafetensors`
  (``pread`` one tensor at a time, finiteness checked on the first read of each key);
* ``_wm_core.build_problem`` sees ``LazyState`` and hands over to :func:`lazy_problem`, which builds the
  problem's structure (occurrences, dependencies, fused ``[W | b]`` blocks, neighbours, heads) from the
  headers alone -- the core's own builder run on ``meta`` tensors -- and then replaces every matrix by a
  lazy one: an occurrence's ``(n, m)`` matrices of A and B are read, cast and isolated when its cost
  term is built, and dropped afterwards;
* two byte budgets bound what is kept between reads: ``work_bytes`` (an LRU of the tensors and isolated
  matrices in use, so a cost term reuses what it has just read; default 4x the largest matched tensor in
  the cost dtype, at least 64 MiB) and ``cache_bytes`` (the per-occurrence cost caches ``A B^T`` of size
  ``(n_g, n_g)`` and the general path's last ``B`` matrices, LRU; default 2x the largest matched tensor,
  at least 64 MiB). An evicted cache is recomputed in full instead of updated by a low-rank correction,
  which changes the costs only by float rounding. With budgets that hold everything the descent is the
  in-memory one bit for bit (tested); with smaller budgets it agrees to float tolerance;
* the merge ``(1 - alpha) A + alpha pi(B)`` is then computed key by key (the same ``index_select``
  gathers and the same :func:`weightspace.state.combine` arithmetic as the in-memory path) and written
  through :class:`merging._stream.StreamWriter` as produced.

Peak memory is the working set (a few tensors of the largest key) plus the cost caches, plus the costs
the descent holds at once: it builds the ``(n_g, n_g)`` cost of every group of one colour class (groups
sharing no tensor) and solves them in one batched LAP (a float64 stack), i.e. about 12 bytes x n_g^2 per
group of the class -- for a chain of square layers half the groups, about 1.5x one float32 checkpoint.
The lazy problem therefore sets ``prob.batch_groups`` (how many groups of a class to build and solve at
once; from ``cache_bytes``) for the descent to honour: the groups of a class are independent, so solving
them in chunks gives the same permutations. ``merging.weight_matching._descent`` does not read it yet (it
is being rewritten for speed on another branch); the patch is to loop over
``todo[i:i + getattr(prob, "batch_groups", None) or len(todo)]`` around the build / solve / accept block
of each class. See ``benchmarks/bench_stream_memory.py`` and ``benchmarks/RESULTS.md`` for both numbers.

What does not stream (``merging.merge`` loads those in memory and logs a warning): three or more models
(MergeMany holds every model's permuted copy), ``repair=`` (runs the model on data), and the methods that
need the model or data (activation matching, STE, ZipIt!, OT fusion). The spec cannot be traced from
files: pass ``spec=`` (the ``weightspace merge`` command traces it from ``--model``, on the meta device for
checkpoints of 256 MiB and more). The structure is built on ``meta`` tensors, whose first use in a
process imports torch's meta kernels (a few seconds, once).
The extra disk reads are logged (``bytes_read``): one pass over A's permuted keys to list them, one
pass over both for the starting objective, the reads of each cost term, the final objective and the
merge pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ._registry import MergeContext, MergeError, MethodInfo
from ._results import MergeResult
from ._stream import MERGE_METADATA_KEY, LazySafetensors, StreamWriter, _check_headers, _finite

log = logging.getLogger(__name__)

__all__ = ["LazyState", "lazy_problem", "stream_align", "stream_align_merge", "STREAMABLE_ALIGNERS"]

# aligning methods whose alignment only reads weights (so can run on lazy states) and whose merge is
# "permute B, then the weighted average"
STREAMABLE_ALIGNERS = ("weight_matching",)
_MIN_BUDGET = 64 * 2**20


class _LRU:
    """Tensors by key under a byte budget, least recently used evicted first; an item larger than the
    whole budget is not kept. ``peak`` records the most bytes held at once."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._items: "OrderedDict[Any, torch.Tensor]" = OrderedDict()
        self.bytes = 0
        self.peak = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def get(self, key: Any) -> Optional[torch.Tensor]:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: Any, t: torch.Tensor) -> None:
        self.pop(key)
        n = self._size(t)
        if n > self.budget:
            return
        while self._items and self.bytes + n > self.budget:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._size(old)
            self.evictions += 1
        self._items[key] = t
        self.bytes += n
        self.peak = max(self.peak, self.bytes)

    def pop(self, key: Any) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= self._size(old)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> Dict[str, int]:
        return {"budget": self.budget, "peak": self.peak, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


class LazyState(Mapping):
    """``{key: tensor}`` over a safetensors file for weight matching: a tensor is read (``pread``) when
    indexed and checked to be finite the first time (a :class:`MergeError` names the key and file).

    ``build_problem`` of the weight-matching core recognises it (``weightspace_lazy``) and builds a
    lazy problem (:func:`lazy_problem`) whose reads go through ``work`` and whose cost caches live in
    ``costs`` (both :class:`_LRU`, shared by the two states of one alignment).
    """

    weightspace_lazy = True

    def __init__(self, reader: LazySafetensors, name: str, *, work: _LRU, costs: _LRU):
        self.reader, self.name, self.work, self.costs = reader, name, work, costs
        self._checked: set = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.reader[key]
        if key not in self._checked:
            _finite(t, key, self.name, self.reader.path)
            self._checked.add(key)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader)

    def __len__(self) -> int:
        return len(self.reader)

    def meta(self, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Header-only stand-ins (``meta`` tensors of the right shapes and dtypes; nothing is read)."""
        shapes, dtypes = self.reader.shapes(), self.reader.dtypes()
        return {k: torch.empty(shapes[k], dtype=dtypes[k], device="meta") for k in keys}


class _CastView(Mapping):
    """The problem's ``A`` or ``B``: the matched keys of a :class:`LazyState`, cast to the cost dtype and
    moved to the device on each read, through the shared working-set LRU."""

    def __init__(self, state: LazyState, side: str, keys: Sequence[str], dtype: torch.dtype, device: torch.device):
        self.state, self.side, self.keys = state, side, list(keys)
        self.dtype, self.device = dtype, device
        self._keyset = set(self.keys)
        self._shapes = state.reader.shapes()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        t = self.state.work.get((self.side, key))
        if t is None:
            t = self.state[key].detach().to(device=self.device, dtype=self.dtype)
            self.state.work.put((self.side, key), t)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keyset


def _lazy_occ_class():
    from . import _wm_core as core

    class LazyOcc(core.Occ):
        """An occurrence whose ``A``/``Bm0`` matrices are rebuilt from disk on access (through the working
        set) and whose caches (``cache``, ``B_last``) live in the budgeted cost LRU."""

        @classmethod
        def wrap(cls, occ, prob, has_b: bool) -> "LazyOcc":
            new = cls.__new__(cls)
            for name, value in vars(occ).items():  # every field and any extra attribute the builder set
                if name not in ("A", "Bm0", "cache", "B_last"):
                    new.__dict__[name] = value
            new.__dict__["_prob"] = prob
            new.__dict__["_has_b"] = has_b
            new.__dict__["_uid"] = next(_UIDS)  # LRU keys: unique for the process (ids of freed objects recur)
            return new

        def _matrix(self, side: str) -> torch.Tensor:
            prob = self._prob
            work = prob.A.state.work
            key = (self._uid, side)
            m = work.get(key)
            if m is not None:
                return m
            src = prob.A if side == "A" else prob.B
            if self.parts:  # simple occurrences, fused side by side as in build_problem
                mats = [core.isolate(src[k], ax, prob.spec.axes[k][ax], ()).contiguous() for k, ax in self.parts]
                m = mats[0] if len(mats) == 1 else torch.cat(mats, 1)
            else:
                m = core.isolate(src[self.key], self.ax, prob.spec.axes[self.key][self.ax], self.path).contiguous()
            work.put(key, m)
            return m

        @property
        def A(self):  # noqa: N802 - the core's field name
            return self._matrix("A")

        @A.setter
        def A(self, value):  # noqa: N802
            pass  # rebuilt from disk on access

        @property
        def Bm0(self):  # noqa: N802
            return self._matrix("B") if self._has_b else None

        @Bm0.setter
        def Bm0(self, value):  # noqa: N802
            pass

        def _cached(self, name):
            return self._prob.A.state.costs.get((self._uid, name))

        def _store(self, name, value):
            costs = self._prob.A.state.costs
            if value is None:
                costs.pop((self._uid, name))
            else:
                costs.put((self._uid, name), value)

        cache = property(lambda self: self._cached("cache"), lambda self, v: self._store("cache", v))
        B_last = property(lambda self: self._cached("B_last"), lambda self, v: self._store("B_last", v))

    return LazyOcc


_LAZY_OCC = None
_UIDS = itertools.count()


def lazy_problem(spec, state_a: LazyState, state_b: LazyState, *, keys: Sequence[str], dtype, device):
    """A weight-matching ``Problem`` over two :class:`LazyState` s whose matrices are read when used.

    The structure comes from ``build_problem`` itself, run on header-only ``meta`` tensors, so it is the
    in-memory problem's; the tensors are then swapped for lazy ones (see the module docstring).
    """
    global _LAZY_OCC
    from . import _wm_core as core

    if _LAZY_OCC is None:
        _LAZY_OCC = _lazy_occ_class()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    state_a.work.clear()  # a new problem (another restart): nothing of the last one is reused
    state_a.costs.clear()
    prob = core.build_problem(spec, state_a.meta(keys), state_b.meta(keys), keys=keys, dtype=dtype, device="meta")
    prob.A = _CastView(state_a, "A", keys, dtype, dev)
    prob.B = _CastView(state_b, "B", keys, dtype, dev)
    prob.device = dev
    # a hint for the descent: how many groups of one colour class to build and solve at once (independent
    # groups, so the result does not depend on it). The descent of this branch builds a whole class; see
    # the module docstring for the patch that honours it.
    n_max = max(spec.groups.values(), default=1)
    prob.batch_groups = max(1, state_a.costs.budget // (16 * n_max * n_max))
    prob.occs = {g: [_LAZY_OCC.wrap(o, prob, o.Bm0 is not None) for o in lst] for g, lst in prob.occs.items()}
    # anything else the builder precomputed from the tensors would be a meta tensor now: refuse loudly
    left = [f.name for f in dataclasses.fields(prob) if torch.is_tensor(getattr(prob, f.name))]
    for lst in prob.occs.values():
        for o in lst:
            left += [f"Occ.{k}" for k, v in o.__dict__.items() if torch.is_tensor(v) and v.is_meta]
    if left:
        raise RuntimeError(
            f"streaming weight matching cannot keep {sorted(set(left))} of the core's problem lazy; "
            "merging._stream_align.lazy_problem needs updating for it (or merge in memory)"
        )
    return prob


# --------------------------------------------------------------------------------------------------
# the streaming aligned merge
# --------------------------------------------------------------------------------------------------
def _check_spec(spec, state: LazyState) -> None:
    from ._api import _check_spec_fits

    shapes = state.reader.shapes()
    _check_spec_fits(spec, state.meta(list(shapes)), state.name)


def _default_budgets(spec, reader: LazySafetensors, dtype: torch.dtype) -> Tuple[int, int]:
    shapes = reader.shapes()
    size = torch.empty((), dtype=dtype).element_size()
    largest = max((int(torch.Size(shapes[k]).numel()) * size for k in spec.permuted_keys() if k in shapes), default=0)
    return max(4 * largest, _MIN_BUDGET), max(2 * largest, _MIN_BUDGET)


def _lazy_align(info: MethodInfo, paths, spec, options, seed, device, weights, work_bytes, cache_bytes):
    """Checks, lazy states, then ``info.align_fn`` on them: ``(alignment, readers, states, LRUs, budgets,
    device, timings)``. Nothing is loaded whole."""
    from weightspace import resolve_device

    from ._api import _model_name

    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    if info.name not in STREAMABLE_ALIGNERS:
        raise MergeError(f"method {info.name!r} cannot stream; streamable aligning methods: {STREAMABLE_ALIGNERS}")
    if len(paths) != 2:
        raise MergeError(f"streaming {info.name} aligns two checkpoints, got {len(paths)}")
    if spec is None:
        raise MergeError(
            f"method {info.name!r} on safetensors files needs spec= (files cannot be traced): build it with "
            "weightspace.permutation_spec(model, example_inputs) on a module of this architecture (the meta "
            "device is enough: with torch.device('meta'): model = ...), or use `weightspace merge --model`"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"seed must be an int, got {seed!r}")
    names = [_model_name(i) for i in range(2)]
    readers = [LazySafetensors(p) for p in paths]
    _check_headers(readers, names)
    align_opts = {k: v for k, v in options.items() if k in info.align_options}
    cost_dtype = {"float32": torch.float32, "float64": torch.float64}.get(align_opts.get("dtype"), torch.float32)
    dw, dc = _default_budgets(spec, readers[0], cost_dtype)
    budgets = {"work_bytes": dw if work_bytes is None else int(work_bytes),
               "cache_bytes": dc if cache_bytes is None else int(cache_bytes)}
    work, costs = _LRU(budgets["work_bytes"]), _LRU(budgets["cache_bytes"])
    states = [LazyState(r, n, work=work, costs=costs) for r, n in zip(readers, names)]
    _check_spec(spec, states[0])
    dev = resolve_device(device)
    timings["check"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    ctx = MergeContext(
        states=states,
        models=[None, None],
        reference=None,
        spec=spec,
        weights=weights,
        data=None,
        base=None,
        seed=int(seed),
        device=dev,
        generator=gen,
        example_inputs=None,
    )
    aln = info.align_fn(ctx, **align_opts)
    timings["align"] = time.perf_counter() - t0
    stats = {"bytes_read_align": sum(r.bytes_read for r in readers), "budgets": budgets,
             "work_lru": work.stats(), "cost_cache_lru": costs.stats()}
    work.clear()  # the alignment is done: free the working set and the caches
    costs.clear()
    return aln, readers, states, dev, timings, stats


def _sweeps(aln) -> Dict[str, int]:
    try:
        return {"sweeps": len(aln.log["restarts"][aln.log["best_restart"]]["sweeps"])}
    except (KeyError, IndexError, TypeError):  # another log layout: the alignment's log has it all
        return {}


def stream_align(
    *,
    info: MethodInfo,
    paths: Sequence[Path],
    spec: Any,
    options: Dict[str, Any],
    seed: int = 0,
    device: Any = "auto",
    work_bytes: Optional[int] = None,
    cache_bytes: Optional[int] = None,
):
    """``merging.align(a.safetensors, b.safetensors, method="weight_matching", spec=...)`` without loading
    either file: the :class:`~merging.Alignment` of :func:`merging.weight_matching.match_weights` on lazy
    states (budgets as in :func:`stream_align_merge`); its log adds the bytes read and the LRU peaks."""
    aln, readers, _, _, timings, stats = _lazy_align(
        info, paths, spec, options, seed, device, [0.5, 0.5], work_bytes, cache_bytes
    )
    aln.log.setdefault("timings", {}).update(timings)
    aln.log.update({"streamed": True, "spec_source": "given", **stats})
    return aln


def stream_align_merge(
    *,
    info: MethodInfo,
    paths: Sequence[Path],
    spec: Any,
    weights: Any = None,
    alpha: Any = None,
    options: Dict[str, Any],
    seed: int = 0,
    device: Any = "auto",
    out: Path,
    overwrite: bool = False,
    work_bytes: Optional[int] = None,
    cache_bytes: Optional[int] = None,
) -> MergeResult:
    """Align model_b to model_a by weight matching on lazy states, then merge key by key into ``out``.

    ``paths`` are two safetensors files of one architecture, ``spec`` their
    :class:`weightspace.PermutationSpec`. ``options`` are the method's (``max_sweeps``, ``restarts``,
    ``init``, ``dtype``, ``rtol``); ``weights``/``alpha``, ``seed`` and ``device`` as in
    :func:`merging.merge`. ``work_bytes``/``cache_bytes`` bound the working set and the cost caches
    (defaults in the module docstring; ``0`` keeps nothing between reads). Returns a
    :class:`~merging.MergeResult` with the :class:`~merging.Alignment`, ``state_dict`` a lazy mapping
    over ``out`` and ``model`` None; settings are also stored in the file's metadata
    (``"weightspace.merge"``). ``log`` records bytes read and written, the budgets, the peaks of both
    LRUs and the time of each stage.
    """
    from weightspace.results import to_jsonable, versions
    from weightspace.state import combine

    from . import _wm_core as core
    from ._api import _resolve_weights

    t_start = time.perf_counter()
    w = _resolve_weights(2, weights, alpha)
    out = Path(out)
    for p in paths:
        if Path(p).resolve() == out.resolve():
            raise MergeError(f"out={str(out)!r} is one of the input checkpoints; write the merge to a new file")
    if out.exists() and not overwrite:
        raise MergeError(f"out={str(out)!r} already exists; pass overwrite=True to replace it")
    aln, readers, states, dev, timings, stats = _lazy_align(
        info, paths, spec, options, seed, device, w, work_bytes, cache_bytes
    )

    settings = {
        "method": info.name,
        "options": options,
        "weights": w,
        "seed": int(seed),
        "device": str(dev),
        "repair": None,
        "n_models": 2,
        "inputs": [str(p) for p in paths],
        "streamed": True,
        **stats["budgets"],
        "versions": versions(),
    }
    metadata = {MERGE_METADATA_KEY: json.dumps(to_jsonable(settings), sort_keys=True)}
    perms = {g: p.to(dev) for g, p in aln.permutations.items()}
    keys = list(readers[0])
    shapes, dtypes = readers[0].shapes(), readers[0].dtypes()
    t0 = time.perf_counter()
    peak_key_bytes = 0
    with StreamWriter(out, [(k, dtypes[k], shapes[k]) for k in keys], metadata, overwrite=overwrite) as writer:
        for key in keys:
            a, b = (s[key].to(dev) for s in states)
            if key in spec.axes:
                b = core.permute_axes(b, spec.axes[key], perms)
            merged = combine([{key: a}, {key: b}], w)[key].detach().to(dtypes[key])
            peak_key_bytes = max(peak_key_bytes, sum(t.numel() * t.element_size() for t in (a, b, merged)))
            writer.write(key, merged)
            del a, b, merged
    timings["merge"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    read = sum(r.bytes_read for r in readers)
    log_ = {
        "method": {"objective": aln.objective, **_sweeps(aln)},
        "timings": timings,
        "spec_source": "given",
        "out": str(out),
        "streamed": True,
        "bytes_read": read,
        "bytes_read_align": stats["bytes_read_align"],
        "bytes_written": writer.bytes_written,
        "largest_key_bytes": peak_key_bytes,
        "input_bytes": sum(r.nbytes() for r in readers),
        "work_lru": stats["work_lru"],
        "cost_cache_lru": stats["cost_cache_lru"],
    }
    log.info(
        "streamed %s: alignment read %.1f MB (%.1f s), merge wrote %.1f MB; working-set peak %.1f MB, "
        "cost caches peak %.1f MB",
        info.name,
        stats["bytes_read_align"] / 1e6,
        timings["align"],
        writer.bytes_written / 1e6,
        stats["work_lru"]["peak"] / 1e6,
        stats["cost_cache_lru"]["peak"] / 1e6,
    )
    return MergeResult(
        model=None, state_dict=LazySafetensors(out), alignment=aln, spec=spec, settings=settings, log=log_
    )

