"""Tensor-level maths of the task-vector merges (private; the methods live in ``merging.task_vectors``).

Everything here works on plain tensors, one parameter at a time, so the same code serves in-memory
merges and the streaming merger of checkpoints larger than memory (``merging._stream``):

* :func:`trim_threshold` / :func:`kth_largest_abs` -- the magnitude threshold of TIES's trim step,
  per tensor or over a whole task vector (exact, in a fixed number of streaming passes);
* :func:`dare_drop` -- DARE's random drop and rescale, seeded per tensor by a stable hash;
* :func:`elect_and_merge` -- TIES's sign election and disjoint mean (or sum).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, List, Sequence

import torch

from ._registry import MergeError

__all__ = [
    "compute_dtype",
    "task_vector",
    "trim_threshold",
    "kth_largest_abs",
    "trim",
    "dare_drop",
    "tensor_seed",
    "elect_and_merge",
    "check_density",
]


def check_density(density: float, method: str) -> float:
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise MergeError(
            f"option density of {method!r} must lie in (0, 1] (the fraction of each task vector kept), got {density!r}"
        )
    return d


def check_scaling(scaling: float, method: str) -> float:
    try:
        lam = float(scaling)
    except (TypeError, ValueError):
        raise MergeError(f"option scaling of {method!r} must be a number (lambda), got {scaling!r}") from None
    if not math.isfinite(lam):
        raise MergeError(f"option scaling of {method!r} must be finite, got {scaling!r}")
    return lam


def check_choice(value: str, choices: Sequence[str], option: str, method: str) -> str:
    if value not in choices:
        raise MergeError(f"option {option} of {method!r} must be one of {list(choices)}, got {value!r}")
    return value


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype (half/bfloat16 are upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vector(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``theta - base`` in the compute dtype of ``theta``."""
    dt = compute_dtype(theta)
    return theta.to(dt) - base.to(device=theta.device, dtype=dt)


# ------------------------------------------------------------------------------------------------
# trim (TIES step 1)
# ------------------------------------------------------------------------------------------------
def keep_count(n: int, density: float, at_least_one: bool) -> int:
    """Entries kept out of ``n``: ``floor(density * n)`` (mergekit's count), at least one when asked."""
    if density >= 1.0:
        return n
    k = int(math.floor(density * n + 1e-9))
    return max(k, 1 if (at_least_one and n > 0) else 0)


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """The ``k``-th largest ``|delta|`` of one tensor, ``k = max(1, floor(density * numel))``.

    Entries with ``|delta| >= threshold`` are kept (ties at the threshold are all kept).
    """
    n = delta.numel()
    k = keep_count(n, density, at_least_one=True)
    if k >= n:
        return 0.0
    return float(torch.kthvalue(delta.reshape(-1).abs(), n - k + 1).values)  # k-th largest = (n-k+1)-th smallest


def _bits(x: torch.Tensor, wide: bool) -> torch.Tensor:
    """Integer bit patterns of ``|x|``: monotone in the value for non-negative floats."""
    a = x.detach().abs().reshape(-1)
    return a.to(torch.float64).view(torch.int64) if wide else a.to(torch.float32).view(torch.int32)


def kth_largest_abs(
    passes: Callable[[], Iterable[Sequence[torch.Tensor]]], k: Sequence[int], *, wide: bool = False
) -> List[float]:
    """Exact ``k[t]``-th largest ``|x|`` over every tensor of stream ``t``, by radix selection.

    ``passes()`` returns a fresh iterable; each item is a sequence with one tensor per stream (one per
    task vector: ``[delta_1[key], ..., delta_N[key]]``). Non-negative IEEE floats order like their bit
    patterns, so the threshold is found 16 bits at a time: each pass histograms the next 16-bit digit of
    the entries whose higher digits match the prefix found so far (``torch.bincount``, 65,536 bins).
    float32 values (``wide=False``) need 2 passes, float64 values (``wide=True``) 4; memory is one tensor
    per stream plus the histograms, never the whole vector, so it works on task vectors larger than memory.
    ``k[t] <= 0`` gives ``inf`` (keep nothing); ``k[t]`` at least the number of entries gives ``0.0``
    (keep everything). Equals ``torch.topk(|cat(all)|, k).values.min()`` exactly (tested).
    """
    n_streams = len(k)
    total_bits = 64 if wide else 32
    prefix = [0] * n_streams  # value of the digits found so far
    remaining = [int(v) for v in k]  # rank still to find inside the current prefix
    active = [v > 0 for v in remaining]
    counts_total = None
    for p in range(total_bits // 16):
        shift = total_bits - 16 * (p + 1)
        hists = [torch.zeros(65536, dtype=torch.int64) for _ in range(n_streams)]
        seen = [0] * n_streams
        for tensors in passes():
            if len(tensors) != n_streams:
                raise ValueError(f"kth_largest_abs: expected {n_streams} tensors per item, got {len(tensors)}")
            for t, x in enumerate(tensors):
                if not active[t] or x.numel() == 0:
                    continue
                b = _bits(x, wide)
                seen[t] += b.numel()
                if p > 0:
                    b = b[(b >> (shift + 16)) == prefix[t]]
                if b.numel():
                    digit = (b >> shift) & 0xFFFF
                    hists[t] += torch.bincount(digit, minlength=65536).cpu()  # histogram on the data's device
        if counts_total is None:
            counts_total = seen
            for t in range(n_streams):
                if remaining[t] >= counts_total[t]:
                    active[t] = False  # keep everything
        for t in range(n_streams):
            if not active[t]:
                continue
            suffix = hists[t].flip(0).cumsum(0).flip(0)  # suffix[d] = #entries with digit >= d
            d = int((suffix >= remaining[t]).nonzero().max())
            above = int(suffix[d + 1]) if d + 1 < 65536 else 0
            remaining[t] -= above
            prefix[t] = (prefix[t] << 16) | d
        if not any(active):
            break
    out = []
    for t in range(n_streams):
        if k[t] <= 0:
            out.append(math.inf)
        elif counts_total is None or k[t] >= counts_total[t]:
            out.append(0.0)
        else:
            bits = torch.tensor([prefix[t]], dtype=torch.int64)
            val = bits.view(torch.float64) if wide else bits.to(torch.int32).view(torch.float32)
            out.append(float(val))
    return out


def trim(delta: torch.Tensor, threshold: float, *, inplace: bool = False) -> torch.Tensor:
    """``delta`` with every entry of ``|delta| < threshold`` set to zero (in place when ``inplace``)."""
    if threshold <= 0.0:
        return delta
    a = delta.abs()
    if float(torch.tensor(threshold, dtype=delta.dtype)) != threshold:
        a = a.to(torch.float64)  # the threshold is not representable in delta's dtype: compare exactly
    drop = a < threshold
    del a
    return delta.masked_fill_(drop, 0) if inplace else delta.masked_fill(drop, 0)


# ------------------------------------------------------------------------------------------------
# DARE
# ------------------------------------------------------------------------------------------------
def tensor_seed(seed: int, key: str, task: int) -> int:
    """A 63-bit seed from (seed, key, task index) by BLAKE2b: stable across runs and processes
    (Python's ``hash`` of strings is salted per process)."""
    h = hashlib.blake2b(f"{int(seed)}\x00{task}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def dare_mask(shape: torch.Size, density: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bernoulli(``density``) keep-mask, drawn on the CPU from a generator seeded with ``seed`` so that
    every device and the streaming merger draw the same mask."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).to(device)


def dare_drop(delta: torch.Tensor, density: float, seed: int, rescale: str = "inverse") -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099): drop each entry with probability ``1 - density`` and
    rescale the kept ones.

    ``rescale="inverse"`` multiplies by ``1 / density`` (the paper; keeps the expectation:
    ``E[dare(delta)] = delta``); ``"l1"`` multiplies the kept entries by ``||delta||_1 / ||m * delta||_1``
    per tensor (mergekit's norm matching); ``"none"`` keeps them as they are.
    """
    if density >= 1.0:
        return delta
    m = dare_mask(delta.shape, density, seed, delta.device)
    kept = torch.where(m, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale == "inverse":
        return kept / density
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if float(after) <= 0.0:
            return kept
        return kept * (before / after)
    return kept


# ------------------------------------------------------------------------------------------------
# sign election and disjoint merge (TIES steps 2-3)
# ------------------------------------------------------------------------------------------------
def elect_and_merge(deltas: Sequence[torch.Tensor], coeffs: Sequence[float], merge: str = "mean") -> torch.Tensor:
    """TIES sign election and disjoint merge of (trimmed) task vectors of one tensor.

    ``gamma = sign(sum_k c_k delta_k)``; entry ``p`` of task ``k`` takes part when
    ``sign(delta_k[p]) == gamma[p]`` (zeros never do). ``merge="mean"``:
    ``sum_k c_k m_k delta_k / sum_k c_k m_k`` (0 where no task takes part; the TIES paper with uniform
    ``c_k``, mergekit's weighted form otherwise); ``merge="sum"``: ``sum_k c_k m_k delta_k`` (FusionBench).
    Where ``sum_k c_k delta_k`` is exactly 0, ``gamma = 0`` and the merged entry is 0 (the paper's
    formula; mergekit elects +, FusionBench the overall majority -- a measure-zero difference).
    """
    gamma = torch.zeros_like(deltas[0])
    for d, c in zip(deltas, coeffs):
        gamma.add_(d, alpha=c)
    gamma.sign_()
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if merge == "mean" else None
    for d, c in zip(deltas, coeffs):  # a few full-size temporaries at a time (streaming keeps memory low)
        m = torch.sign(d) == gamma
        m &= d != 0
        num.add_(d.masked_fill(~m, 0), alpha=c)
        if den is not None:
            den.add_(m.to(d.dtype), alpha=c)
        del m
    if den is None:
        return num
    pos = den > 0
    return num.div_(den.masked_fill_(~pos, 1.0)).masked_fill_(~pos, 0.0)


def relative_coeffs(weights: Sequence[float]) -> List[float]:
    """Per-task coefficients ``c_k = N * w_k``: uniform weights give ``c_k = 1`` (the papers' plain sum)."""
    n = len(weights)
    return [n * float(w) for w in weights]
