"""Task-vector merges: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``.

Each fine-tuned model ``theta_k`` is seen through its task vector ``delta_k = theta_k - theta_base``
(``base=`` is the pretrained model they were all fine-tuned from), and the merge is
``theta = theta_base + lambda * tau`` with ``lambda = scaling`` and ``tau`` a combination of the
task vectors:

================  ==========================================================================================
method            ``tau``
================  ==========================================================================================
task_arithmetic   ``sum_k c_k delta_k`` (Ilharco et al. 2023, arXiv:2212.04089)
ties              trim each ``delta_k`` to its top-``density`` magnitudes, elect a sign per entry, disjoint
                  mean (or sum) of the entries that agree (Yadav et al. 2023, arXiv:2306.01708)
dare_linear       ``sum_k c_k DARE(delta_k)``: random drop with probability ``1 - density``, rescale
                  (Yu et al. 2024, arXiv:2311.03099)
dare_ties         DARE in place of the magnitude trim, then TIES's election and disjoint merge
================  ==========================================================================================

Weights. ``merging.merge(..., weights=w)`` gives weights summing to one; here they act as relative
task coefficients ``c_k = N * w_k``, so the default uniform weights give ``c_k = 1`` -- the papers'
plain sum ``theta_base + lambda * sum_k delta_k``.

Conventions where implementations disagree, all named options:

* TIES trim: ``trim="per_tensor"`` keeps ``max(1, floor(density * numel))`` entries of each tensor
  (mergekit's per-tensor count; mergekit refuses 0); ``trim="global"`` keeps ``floor(density * n)``
  entries of each task's whole flattened vector over every floating tensor (the paper's and
  FusionBench's). Entries tied with the threshold are all kept.
* Sign election by ``sign(sum_k c_k trimmed_k)``; ``merge="mean"`` (paper, mergekit) or ``"sum"``
  (FusionBench).
* DARE rescale: ``rescale="inverse"`` (``1 / density``, the paper and FusionBench), ``"l1"`` (mergekit:
  the kept entries are scaled so the tensor keeps its L1 norm) or ``"none"``. The mask of tensor
  ``key`` of task ``k`` is drawn on the CPU from a generator seeded with a BLAKE2b hash of
  ``(seed, k, key)``: the same on every device and in the streaming merger.

Every floating tensor (parameters and float buffers such as BatchNorm statistics) is merged; other
tensors (``num_batches_tracked``) are taken from model_a. Merging BatchNorm running variances through
task vectors can leave them negative with ``merge="sum"`` or ``scaling > 1``: such keys are listed in
the log; pass ``repair="bn_reset"`` with data to recompute them.

All four are elementwise (tensor by tensor), so they stream checkpoints larger than memory. TIES with
``trim="global"`` needs the threshold over the whole task vector first: in memory it is computed from
the states; when streaming, ``merging._stream`` runs the exact radix selection of
:func:`merging._task_math.kth_largest_abs` as two extra read passes over the inputs (four for float64
checkpoints) before the merge pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch

from . import _task_math as tm
from ._registry import MergeContext, MergeError, MethodOutput, register

log = logging.getLogger(__name__)

__all__ = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "global_thresholds"]

_TRIMS = ("per_tensor", "global")
_MERGES = ("mean", "sum")
_RESCALES = ("inverse", "l1", "none")

# Set by the streaming merger (which computes the global TIES thresholds in a pre-pass over the files).
_GLOBAL_THRESHOLDS: contextvars.ContextVar[Optional[List[float]]] = contextvars.ContextVar(
    "merging_ties_global_thresholds", default=None
)

_TA_PAPER = "Task arithmetic: Ilharco et al. 2023, 'Editing models with task arithmetic', arXiv:2212.04089"
_TIES_PAPER = (
    "TIES-Merging: Yadav et al. 2023, 'Resolving interference when merging models', arXiv:2306.01708 "
    "(trim per_tensor = mergekit, global = paper/FusionBench; disjoint mean or sum)"
)
_DARE_PAPER = (
    "DARE: Yu et al. 2024, 'Language models are Super Mario', arXiv:2311.03099 "
    "(drop with p = 1 - density, rescale 1/density; mergekit's L1 rescale as rescale='l1')"
)


# ------------------------------------------------------------------------------------------------
# shared plumbing
# ------------------------------------------------------------------------------------------------
def _base(ctx: MergeContext, method: str) -> Mapping[str, torch.Tensor]:
    if ctx.base is None:
        raise MergeError(
            f"method {method!r} works on task vectors theta_k - theta_base and needs base= "
            "(the pretrained model the others were fine-tuned from)"
        )
    missing = [k for k in ctx.states[0] if k not in ctx.base]
    if missing:
        raise MergeError(
            f"base lacks key {missing[0]!r} of model_a ({len(missing)} missing); base= must be the "
            "pretrained model of the same architecture"
        )
    return ctx.base


def _merge_keys(
    ctx: MergeContext,
    method: str,
    per_key: Callable[[str, List[torch.Tensor], torch.Tensor], torch.Tensor],
) -> MethodOutput:
    """Apply ``per_key(key, deltas, base) -> tau`` to every floating key; assemble ``base + scaling * tau``
    (the caller's closure applies the scaling) in model_a's dtype."""
    base = _base(ctx, method)
    out: Dict[str, torch.Tensor] = OrderedDict()
    negative_var: List[str] = []
    for key, t0 in ctx.states[0].items():
        if not t0.is_floating_point():
            out[key] = t0
            continue
        b = base[key]
        deltas = [tm.task_vector(s[key], b) for s in ctx.states]
        merged = per_key(key, deltas, b.to(device=t0.device, dtype=deltas[0].dtype))
        if key.endswith("running_var") and bool((merged < 0).any()):
            negative_var.append(key)
        out[key] = merged.to(t0.dtype)
    logd: Dict[str, Any] = {"n_models": len(ctx.states), "coeffs": tm.relative_coeffs(ctx.weights)}
    if negative_var:
        log.warning(
            "%s left negative BatchNorm running variances in %s; pass repair='bn_reset' with data",
            method,
            negative_var[:5],
        )
        logd["negative_running_var"] = negative_var
    return MethodOutput(state_dict=out, log=logd)


def _float_items(ctx: MergeContext) -> List[str]:
    return [k for k, v in ctx.states[0].items() if v.is_floating_point()]


def global_thresholds(
    passes: Callable[[], Iterable[Sequence[torch.Tensor]]], counts: Sequence[int], density: float, *, wide: bool
) -> List[float]:
    """Per task, the ``floor(density * n_k)``-th largest ``|delta_k|`` over the whole task vector.

    ``passes()`` yields, per key, the list of task-vector tensors ``[delta_1, ..., delta_N]``; ``counts`` are
    the numbers of floating entries of each task vector. Exact (radix selection,
    :func:`merging._task_math.kth_largest_abs`); 2 passes for float32/16 data, 4 when any tensor is float64.
    """
    ks = [tm.keep_count(int(n), density, at_least_one=False) for n in counts]
    return tm.kth_largest_abs(passes, ks, wide=wide)


@contextlib.contextmanager
def use_global_thresholds(thresholds: Sequence[float]) -> Iterator[None]:
    """Within the block, ``ties(trim="global")`` uses these per-task thresholds instead of computing them
    from the states it is given (the streaming merger passes one key at a time)."""
    token = _GLOBAL_THRESHOLDS.set([float(t) for t in thresholds])
    try:
        yield
    finally:
        _GLOBAL_THRESHOLDS.reset(token)


def _in_memory_thresholds(ctx: MergeContext, density: float) -> List[float]:
    base = _base(ctx, "ties")
    keys = _float_items(ctx)

    def passes() -> Iterator[List[torch.Tensor]]:
        for key in keys:
            yield [tm.task_vector(s[key], base[key]) for s in ctx.states]

    n = sum(ctx.states[0][k].numel() for k in keys)
    wide = any(ctx.states[0][k].dtype == torch.float64 for k in keys)
    return global_thresholds(passes, [n] * len(ctx.states), density, wide=wide)


def _ties_stream_prepare(
    options: Mapping[str, Any],
    passes: Callable[[], Iterable[Sequence[torch.Tensor]]],
    counts: Sequence[int],
    wide: bool,
):
    """Hook for ``merging._stream``: a context manager under which per-key calls of ``ties`` use thresholds
    computed over the whole files (None when the options need no pre-pass)."""
    if options.get("trim", "per_tensor") != "global":
        return None, {}
    density = tm.check_density(options.get("density", 0.2), "ties")
    thr = global_thresholds(passes, counts, density, wide=wide)
    return use_global_thresholds(thr), {"global_thresholds": thr, "threshold_passes": 4 if wide else 2}


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
@register("task_arithmetic", paper=_TA_PAPER, needs=("base",), elementwise=True, min_models=1)
def task_arithmetic(ctx: MergeContext, scaling: float = 1.0) -> MethodOutput:
    """Task arithmetic: ``theta = theta_base + scaling * sum_k c_k (theta_k - theta_base)``.

    ``c_k = N w_k`` (1 for uniform weights). ``scaling`` is the paper's ``lambda`` (chosen on held-out data
    there; FusionBench uses 0.3 for eight tasks). With one model and ``scaling=1`` it returns that model.
    """
    lam = tm.check_scaling(scaling, "task_arithmetic")
    c = tm.relative_coeffs(ctx.weights)

    def per_key(key, deltas, b):
        tau = sum(d * ck for d, ck in zip(deltas, c))
        return b + lam * tau

    out = _merge_keys(ctx, "task_arithmetic", per_key)
    out.log.update(scaling=lam)
    return out


@register("ties", paper=_TIES_PAPER, needs=("base",), elementwise=True, min_models=1)
def ties(
    ctx: MergeContext, density: float = 0.2, scaling: float = 1.0, trim: str = "per_tensor", merge: str = "mean"
) -> MethodOutput:
    """TIES-Merging: trim, elect sign, disjoint merge; ``theta = theta_base + scaling * tau``.

    1. Trim: ``hat_k = delta_k * [|delta_k| >= t_k]`` with ``t_k`` the ``k``-th largest magnitude, per tensor
       (``trim="per_tensor"``, ``k = max(1, floor(density * numel))``) or over the whole task vector
       (``trim="global"``, ``k = floor(density * n)``).
    2. Elect: ``gamma = sign(sum_k c_k hat_k)`` per entry.
    3. Disjoint merge over ``A = {k : sign(hat_k) = gamma, hat_k != 0}``: ``merge="mean"``:
       ``tau = sum_A c_k hat_k / sum_A c_k``; ``merge="sum"``: ``tau = sum_A c_k hat_k``.

    ``density`` in (0, 1] (paper: 0.2), ``scaling`` is ``lambda`` (paper: 1 with the mean; FusionBench: 0.3
    with the sum).
    """
    density = tm.check_density(density, "ties")
    tm.check_choice(trim, _TRIMS, "trim", "ties")
    tm.check_choice(merge, _MERGES, "merge", "ties")
    lam = tm.check_scaling(scaling, "ties")
    c = tm.relative_coeffs(ctx.weights)
    thresholds: Optional[List[float]] = None
    if trim == "global":
        thresholds = _GLOBAL_THRESHOLDS.get()
        if thresholds is None:
            thresholds = _in_memory_thresholds(ctx, density)
        if len(thresholds) != len(ctx.states):
            raise RuntimeError(f"ties: {len(thresholds)} global thresholds for {len(ctx.states)} task vectors")

    def per_key(key, deltas, b):
        # the deltas are fresh tensors owned here: trim them in place
        if thresholds is None:
            trimmed = [tm.trim(d, tm.trim_threshold(d, density), inplace=True) for d in deltas]
        else:
            trimmed = [tm.trim(d, t, inplace=True) for d, t in zip(deltas, thresholds)]
        return b + lam * tm.elect_and_merge(trimmed, c, merge)

    out = _merge_keys(ctx, "ties", per_key)
    out.log.update(scaling=lam, density=density, trim=trim, merge=merge)
    if thresholds is not None:
        out.log["global_thresholds"] = list(thresholds)
    return out


def _dare(
    ctx: MergeContext, key: str, deltas: Sequence[torch.Tensor], density: float, rescale: str
) -> List[torch.Tensor]:
    return [tm.dare_drop(d, density, tm.tensor_seed(ctx.seed, key, k), rescale) for k, d in enumerate(deltas)]


@register("dare_linear", paper=_DARE_PAPER, needs=("base",), elementwise=True, min_models=1)
def dare_linear(
    ctx: MergeContext, density: float = 0.5, scaling: float = 1.0, rescale: str = "inverse"
) -> MethodOutput:
    """DARE + task arithmetic: ``theta = theta_base + scaling * sum_k c_k DARE(delta_k)``.

    ``DARE(delta) = m * delta * r`` with ``m ~ Bernoulli(density)`` per entry and ``r = 1/density``
    (``rescale="inverse"``, the paper: unbiased), ``||delta||_1 / ||m delta||_1`` per tensor (``"l1"``,
    mergekit) or 1 (``"none"``). Seeded per (seed, task, key): reproducible, device- and streaming-invariant.
    """
    density = tm.check_density(density, "dare_linear")
    tm.check_choice(rescale, _RESCALES, "rescale", "dare_linear")
    lam = tm.check_scaling(scaling, "dare_linear")
    c = tm.relative_coeffs(ctx.weights)

    def per_key(key, deltas, b):
        dropped = _dare(ctx, key, deltas, density, rescale)
        return b + lam * sum(d * ck for d, ck in zip(dropped, c))

    out = _merge_keys(ctx, "dare_linear", per_key)
    out.log.update(scaling=lam, density=density, rescale=rescale, seed=ctx.seed)
    return out


@register(
    "dare_ties",
    paper=_DARE_PAPER + "; sign election and disjoint merge of TIES (Yadav et al. 2023, arXiv:2306.01708)",
    needs=("base",),
    elementwise=True,
    min_models=1,
)
def dare_ties(
    ctx: MergeContext, density: float = 0.5, scaling: float = 1.0, rescale: str = "inverse", merge: str = "mean"
) -> MethodOutput:
    """DARE in place of TIES's trim, then TIES's sign election and disjoint merge.

    ``hat_k = DARE(delta_k)`` (see ``dare_linear``), ``gamma = sign(sum_k c_k hat_k)``, disjoint ``mean``
    (default, as TIES) or ``sum`` (mergekit's dare_ties) over the agreeing entries;
    ``theta = theta_base + scaling * tau``.
    """
    density = tm.check_density(density, "dare_ties")
    tm.check_choice(rescale, _RESCALES, "rescale", "dare_ties")
    tm.check_choice(merge, _MERGES, "merge", "dare_ties")
    lam = tm.check_scaling(scaling, "dare_ties")
    c = tm.relative_coeffs(ctx.weights)

    def per_key(key, deltas, b):
        return b + lam * tm.elect_and_merge(_dare(ctx, key, deltas, density, rescale), c, merge)

    out = _merge_keys(ctx, "dare_ties", per_key)
    out.log.update(scaling=lam, density=density, rescale=rescale, merge=merge, seed=ctx.seed)
    return out


ties.stream_prepare = _ties_stream_prepare  # type: ignore[attr-defined]
