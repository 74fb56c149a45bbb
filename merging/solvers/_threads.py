"""Threaded loops over a batch of independent CPU solves (SciPy's LAP, POT's and HiGHS's OT).

The CPU solvers the toolkit wraps release the GIL while they work, so the problems of a batch can
run on several threads. Each problem is still solved by the same call as in a plain loop, so results
do not depend on the number of threads.

Rule of ``workers=None``: threads only for batches of at least ``THREAD_MIN_ENTRIES`` cost entries
with at least ``THREAD_MIN_PROBLEM`` per problem. Smaller problems spend most of a call in Python
under the GIL, and small batches do not pay for the hand-off, so threads lose there. Measured for
SciPy's LAP on 2 cores (one thread's time / two threads'): 0.60 at B=128, n=8; 0.83 at B=16, n=32;
1.03 at B=4, n=64 (left unthreaded); 1.30 at B=16, n=48; 1.54 at B=16, n=64; 1.31 at B=2, n=128;
1.92 at B=128, n=256 (``python benchmarks/bench_solvers.py --crossover``; table in
``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch

#: ``workers=None`` threads a batch only from this many cost entries in all ...
THREAD_MIN_ENTRIES = 1 << 15
#: ... and this many per problem.
THREAD_MIN_PROBLEM = 1 << 11

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY = (0, 0)  # (process id, size): a forked child or a larger request gets a new pool
_POOL_LOCK = threading.Lock()


def check_workers(workers: Optional[int]) -> None:
    """Raise unless ``workers`` is ``None``, ``-1`` or a positive int."""
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or \
            (workers < 1 and workers != -1):
        raise ValueError(f"workers must be a positive int, -1 (all CPU cores) or None (automatic), "
                         f"got {workers!r}")


def n_workers(workers: Optional[int], B: int, entries: int) -> int:
    """Threads for a batch of ``B`` problems of ``entries`` cost entries each.

    ``workers``: ``None`` (the rule above, with ``torch.get_num_threads()`` threads, which
    ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` set), ``-1`` (all CPU cores) or a positive int;
    never more threads than problems.
    """
    check_workers(workers)
    if workers is None:
        if B < 2 or entries < THREAD_MIN_PROBLEM or B * entries < THREAD_MIN_ENTRIES:
            return 1
        workers = torch.get_num_threads()
    elif workers == -1:
        workers = os.cpu_count() or 1
    return max(1, min(int(workers), B))


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        pid = os.getpid()
        if _POOL is None or _POOL_KEY[0] != pid or _POOL_KEY[1] < size:
            if _POOL is not None and _POOL_KEY[0] == pid:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=size, thread_name_prefix="weightspace-solver")
            _POOL_KEY = (pid, size)
        return _POOL


def run_batch(solve: Callable[[int], None], B: int, entries: int, workers: Optional[int]) -> None:
    """Call ``solve(b)`` for ``b in range(B)``: in the calling thread, or in contiguous chunks on
    ``n_workers(workers, B, entries)`` pool threads. Exceptions are re-raised in the caller."""
    w = n_workers(workers, B, entries)
    if w == 1:
        for b in range(B):
            solve(b)
        return

    def chunk(lo: int, hi: int) -> None:
        for b in range(lo, hi):
            solve(b)

    bounds = np.linspace(0, B, w + 1).astype(int)
    futures = [_pool(w).submit(chunk, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()
