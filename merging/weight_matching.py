"""``weight_matching``: Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836).

Objective (a sum of bilinear assignment problems, NP-hard in general)::

    max_pi  sum_k < W_A[k], pi(W_B)[k] >_F        (k over the permuted parameters, biases and norm
                                                    parameters included; BN running statistics follow
                                                    the permutation but do not vote)

Coordinate descent: holding every other group fixed, the objective is linear in the permutation
``P_g`` of one group ``g``, with the ``(n_g, n_g)`` cost

    C_g = sum_(k, a) mat_a(W_A[k]) mat_a(pi_not_g(W_B[k]))^T

where ``mat_a`` isolates ``g``'s (sub-)axis ``a`` as rows -- through the spec's layouts: a product
axis ``(channels x H*W)`` or ``(heads x head_dim)`` is reshaped, a concatenated axis ``(q | k | v)``
narrowed to ``g``'s block -- and ``pi_not_g`` applies every other permutation (``g``'s own current
permutation on its *other* axes, for self-coupled groups such as recurrent ``W_hh``). The step is a
maximising linear assignment on ``C_g``, accepted only when it raises the objective by more than a
round-off tolerance, so the objective never decreases and the descent terminates.

What this implementation adds to the reference algorithm (same fixed points):

* **dirty groups** -- ``C_g`` only changes when a group sharing a tensor with ``g`` changed since ``g``
  was last solved; clean groups are skipped, and the run stops when no group is dirty (the
  reference's final confirmation sweep costs nothing here);
* **per-occurrence cost caches** -- each ``(key, axis)`` term of ``C_g`` is recomputed only when one
  of the groups it depends on changed;
* **batched independent groups** -- groups are coloured (DSatur, Brelaz 1979) so that groups of one
  colour share no tensor; their assignments do not interact and are solved together in one batched
  :func:`merging.solvers.linear_assignment` call (threads over SciPy on the CPU);
* **local steps** (``steps="local"``; the default ``"auto"`` takes them for groups of 1024 units and
  more, where the ``O(n^3)`` LAPs dominate) -- once a group's full LAP moves at most a quarter of
  its units, its next steps solve the LAP exactly on a subset ``S`` only: the rows (and columns) furthest
  below their row (column) maximum plus the rows holding the columns they prefer, about a third of the
  rows at ``local_size=0.125``. The optimum over permutations that agree with the current one outside
  ``S`` never lowers the objective and costs ``O(|S|^3)`` instead of ``O(n^3)``. When no group is dirty,
  every group not yet proven optimal by a full LAP at its current cost gets one (certification sweeps,
  batched); so the run stops at the same kind of point as the reference: no single-group LAP improves
  it (checked by :func:`single_group_gains`). Two exact alternatives were measured first and rejected
  (on the 64-512x8-10 MLP): skipping a LAP by the dual bound ``sum_i max_j (C'_ij - v_j) + sum_j v_j -
  C'(pi)`` (``v`` the exact duals of the group's last solve) never fired -- a neighbour's move changes
  every entry of ``C_g`` by a low-rank term, so the bound was 0.2-1.4% of the group's value against a
  1e-5 tolerance in all 205 steps -- and warm-started Jonker-Volgenant augmentation from those duals
  freed 100-250 of 512 rows per step and took 10-30x a cold SciPy LAP in Python;
* the costs are built with batched torch operations on the models' device (GPU when asked);
* ``restarts`` with seeded orders (restart 0 from the identity, others from random permutations) keep
  the best objective; the visiting order is seeded (the objective depends on it by ~2% between seeds).

The per-sweep log records the objective (non-decreasing), the groups solved and the groups changed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from weightspace.results import versions
from weightspace.state import combine
from weightspace.symmetry import identity_permutation, permute, random_permutation

from . import _procrustes
from . import _wm_core as core
from ._registry import MergeContext, MergeError, MethodOutput, register
from ._results import Alignment

log = logging.getLogger(__name__)

__all__ = ["weight_matching", "align_weight_matching", "match_weights", "single_group_gains"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise MergeError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


#: ``steps="local"``: groups smaller than this always take full LAP steps (a full LAP is already cheap there)
LOCAL_MIN_N = 64
#: ``steps="auto"``: local steps only for groups of at least this many units. Measured on 2 shared CPU cores
#: (benchmarks/RESULTS.md): at n = 2048 the O(n^3) LAPs dominate and local steps cut the full LAPs from 55
#: to 17 (CPU time 25 s -> 15 s); at n <= 512 a full LAP costs about two cost updates, and the extra passes
#: that local steps need made the 8-layer 512-wide MLP slower than full steps.
AUTO_LOCAL_MIN_N = 1024
_STEPS = ("auto", "local", "full")


def _descent(
    prob: core.Problem,
    perms: Dict[str, torch.Tensor],
    gen: torch.Generator,
    *,
    max_sweeps: int,
    rtol: float,
    lap_method: str,
    steps: str = "auto",
    local_size: float = 0.125,
) -> Dict[str, Any]:
    """Coordinate descent from ``perms`` (modified in place). Returns the log.

    ``steps="full"``: every step of a dirty group is a full LAP. ``steps="local"``: a group whose last full
    LAP moved at most a quarter of its units takes one :func:`merging._wm_core.local_step` per step (an
    exact LAP on a subset of rows, ``ceil(local_size * n)`` candidates per side; repeating it on the same
    cost measured slower: the neighbours move on anyway) while its cost keeps changing; when
    no group is dirty, every group not proven optimal by a full LAP at its current cost gets one
    (a *certification* sweep, batched per colour class). The descent stops only when every group is clean
    and certified, so both variants stop at the same kind of point: no single-group assignment improves it.
    With local steps the run may take up to ``max_sweeps`` passes with local steps, then up to
    ``max_sweeps`` passes of full steps only.
    """
    if steps not in _STEPS:
        raise MergeError(f"steps must be one of {_STEPS}, got {steps!r}")
    if not 0 < local_size <= 1:
        raise MergeError(f"local_size must be in (0, 1], got {local_size!r}")
    groups = list(prob.spec.groups)
    order = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
    classes = core.color_classes(prob, order) if steps == "full" else core.color_classes_dsatur(prob, order)
    dirty = set(groups)  # cost changed since the group's last step
    unsettled = set(groups)  # not proven optimal by a full LAP at its current cost (always contains ``dirty``)
    min_n = LOCAL_MIN_N if steps == "local" else AUTO_LOCAL_MIN_N
    eligible = {
        g: steps != "full"
        and g not in prob.heads
        and g not in prob.self_coupled
        and prob.spec.groups[g] >= min_n
        for g in groups
    }
    local = {g: False for g in groups}  # the next step of a dirty group is a local one
    obj = obj_start = core.objective(prob, perms)
    sweeps: List[Dict[str, Any]] = []
    n_lap = n_local = 0
    converged = False

    def moved(g: str) -> None:
        prob.versions[g] += 1
        dirty.update(prob.neighbours[g])
        unsettled.update(prob.neighbours[g])

    # local passes are cheap (a few groups, small LAPs): up to ``max_sweeps`` of them, then up to
    # ``max_sweeps`` passes of full steps, so a run never does more full-LAP passes than the reference's cap
    for sweep in range(2 * max_sweeps if any(eligible.values()) else max_sweeps):
        if not dirty and not unsettled:
            converged = True
            break
        if sweep == max_sweeps and any(eligible.values()):  # the second budget: full steps only
            log.info("weight matching: %d sweeps without convergence; full LAP steps from here on", sweep)
            eligible = {g: False for g in groups}
            local = {g: False for g in groups}
        certify = not dirty
        pending = unsettled if certify else dirty
        t0 = time.perf_counter()
        solved, changed, n_loc = 0, [], 0
        for ci in torch.randperm(len(classes), generator=gen).tolist():
            todo = [g for g in classes[ci] if g in pending]
            if not todo:
                continue
            blocks = [g for g in todo if g in prob.heads]
            todo = [g for g in todo if g not in prob.heads]
            for H in blocks:  # attention heads: matched as blocks with their inner groups
                dirty.discard(H)
                unsettled.discard(H)
                solved += 1
                gain, scale, new = core.head_block_step(prob, H, perms, method=lap_method)
                if gain > rtol * max(scale, 1e-30) and any(not torch.equal(new[g], perms[g]) for g in new):
                    obj += gain
                    for g, p in new.items():
                        if not torch.equal(p, perms[g]):
                            perms[g] = p
                            moved(g)
                            changed.append(g)
            # independent groups are solved together; a streamed (lazy) problem caps how many cost
            # matrices exist at once (prob.batch_groups), which gives the same result
            cap = getattr(prob, "batch_groups", None) or max(len(todo), 1)
            todo_all = todo
            for i0 in range(0, len(todo_all), cap):
                todo = todo_all[i0 : i0 + cap]
                costs = {g: core.group_cost(prob, g, perms) for g in todo}
                full = [g for g in todo if certify or not local[g]]
                loc = [g for g in todo if g not in full]
                if loc:
                    ks = {g: max(1, math.ceil(local_size * costs[g].shape[0])) for g in loc}
                    res = core.local_batch({g: costs[g] for g in loc}, perms, ks, rtol)
                    for g in loc:
                        dirty.discard(g)
                        new, gain, n_steps = res[g]
                        n_local += n_steps
                        n_loc += n_steps
                        if gain > 0.0:  # every accepted local step gained more than the tolerance
                            obj += gain
                            perms[g] = new
                            moved(g)
                            changed.append(g)
                sols = core.solve_batch({g: costs[g] for g in full}, method=lap_method) if full else {}
                n_lap += len(full)
                solved += len(todo)
                for g in full:
                    dirty.discard(g)
                    unsettled.discard(g)
                    new, old = sols[g], perms[g]
                    n_moved = int((new.to(old.device) != old).sum())
                    local[g] = eligible[g]
                    if n_moved == 0:
                        continue
                    if g in prob.self_coupled:  # the cost is a linearisation: compare the exact objective
                        keys = prob.keys_of[g]
                        before = core.objective(prob, perms, keys)
                        trial = dict(perms)
                        trial[g] = new.to(old.device)
                        gain = core.objective(prob, trial, keys) - before
                        scale = abs(before)
                    else:
                        C = costs[g]
                        v_old, v_new = core.value(C, old), core.value(C, new)
                        gain, scale = v_new - v_old, max(abs(v_old), abs(v_new))
                    if gain > rtol * max(scale, 1e-30):
                        obj += gain
                        perms[g] = new.to(old.device)
                        local[g] = eligible[g] and n_moved * 4 <= old.numel()
                        moved(g)
                        changed.append(g)
        sweeps.append(
            {
                "sweep": sweep,
                "kind": "certify" if certify else "descent",
                "objective": obj,
                "solved": solved,
                "local": n_loc,
                "changed": len(changed),
                "seconds": time.perf_counter() - t0,
            }
        )
    else:
        converged = not dirty and not unsettled
    # per sweep: the running objective (float64 start + the accepted steps' gains, each > 0, so it never
    # decreases); the returned objective is recomputed in float64 from the final permutations
    obj = core.objective(prob, perms)
    return {
        "sweeps": sweeps,
        "objective": obj,
        "objective_start": obj_start,
        "converged": converged,
        "n_assignments": n_lap,
        "n_local_steps": n_local,
        "n_colors": len(classes),
    }


def match_weights(
    spec,
    state_a,
    state_b,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    restarts: int = 1,
    init: Optional[Dict[str, torch.Tensor]] = None,
    dtype: str = "float32",
    rtol: Optional[float] = None,
    device: Any = None,
    param_names: Optional[Sequence[str]] = None,
    lap_method: str = "auto",
    steps: str = "auto",
    local_size: float = 0.125,
) -> Alignment:
    """Weight matching of ``state_b`` onto ``state_a`` over ``spec`` (see the module docstring).

    Returns an :class:`~merging.Alignment` with CPU permutations, the best objective over restarts
    and a log per restart and sweep.
    """
    if max_sweeps < 1 or restarts < 1:
        raise MergeError(f"max_sweeps and restarts must be >= 1, got {max_sweeps} and {restarts}")
    if steps not in _STEPS:
        raise MergeError(f"steps must be 'auto', 'local' (local steps, full LAPs to certify) or 'full' (a full LAP "
                         f"per step), got {steps!r}")
    if not (isinstance(local_size, (int, float)) and 0 < local_size <= 1):
        raise MergeError(f"local_size must be a fraction in (0, 1], got {local_size!r}")
    dt = _dtype(dtype)
    if rtol is None:
        rtol = 1e-5 if dt == torch.float32 else 1e-10
    keys = core.matched_keys(spec, state_a, param_names)
    if not keys:
        raise MergeError("the spec permutes no floating-point parameter of the models; nothing to match")
    dev = torch.device(device) if device is not None else state_a[keys[0]].device
    t0 = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    best = None
    obj_id = None
    for r in range(restarts):
        prob = core.build_problem(spec, state_a, state_b, keys=keys, dtype=dt, device=dev)
        gen = torch.Generator()
        gen.manual_seed(int(seed) + 1000003 * r)
        if r == 0:
            start = identity_permutation(spec) if init is None else {g: init[g].clone() for g in spec.groups}
        else:
            start = random_permutation(spec, gen)
        perms = {g: p.to(dev) for g, p in start.items()}
        run = _descent(
            prob,
            perms,
            gen,
            max_sweeps=max_sweeps,
            rtol=rtol,
            lap_method=lap_method,
            steps=steps,
            local_size=local_size,
        )
        run["restart"] = r
        if r == 0:
            obj_id = (
                run["objective_start"] if init is None else core.objective(prob, identity_permutation_on(spec, dev))
            )
        runs.append(run)
        if best is None or run["objective"] > best[0]:
            best = (run["objective"], {g: p.cpu() for g, p in perms.items()}, r)
    obj, perms, r_best = best
    settings = {
        "method": "weight_matching",
        "seed": int(seed),
        "max_sweeps": max_sweeps,
        "restarts": restarts,
        "dtype": dtype,
        "rtol": rtol,
        "steps": steps,
        "local_size": local_size,
        "device": str(dev),
        "keys": len(keys),
        "versions": versions(),
    }
    log_ = {"restarts": runs, "best_restart": r_best, "seconds": time.perf_counter() - t0, "objective_identity": obj_id}
    return Alignment(spec=spec, permutations=perms, objective=float(obj), settings=settings, log=log_)


def identity_permutation_on(spec, device) -> Dict[str, torch.Tensor]:
    return {g: p.to(device) for g, p in identity_permutation(spec).items()}


def single_group_gains(
    spec,
    state_a,
    state_b,
    perms: Dict[str, torch.Tensor],
    *,
    dtype: str = "float64",
    param_names: Optional[Sequence[str]] = None,
) -> Dict[str, float]:
    """For each group, the largest objective gain one optimal assignment of that group alone could bring
    (all others fixed). All ``<= 0`` (up to round-off) certifies a coordinate-wise local optimum."""
    keys = core.matched_keys(spec, state_a, param_names)
    dev = state_a[keys[0]].device
    prob = core.build_problem(spec, state_a, state_b, keys=keys, dtype=_dtype(dtype), device=dev)
    p = {g: v.to(dev) for g, v in perms.items()}
    out = {}
    for g in spec.groups:
        C = core.group_cost(prob, g, p, use_cache=False)
        new = core.solve_batch({g: C})[g]
        if g in prob.self_coupled:
            trial = dict(p)
            trial[g] = new.to(dev)
            out[g] = core.objective(prob, trial, prob.keys_of[g]) - core.objective(prob, p, prob.keys_of[g])
        else:
            out[g] = core.value(C, new) - core.value(C, p[g])
    return out


def _param_names(ctx: MergeContext) -> Optional[List[str]]:
    return None if ctx.reference is None else [k for k, _ in ctx.reference.named_parameters()]


def align_weight_matching(
    ctx: MergeContext,
    max_sweeps: int = 100,
    restarts: int = 1,
    init: Any = None,
    dtype: str = "float32",
    rtol: Optional[float] = None,
    steps: str = "auto",
    local_size: float = 0.125,
    attention: str = "permutation",
) -> Alignment:
    """Align ``states[1]`` to ``states[0]`` by weight matching (options as :func:`weight_matching`)."""
    _procrustes.check_attention(attention)
    aln = match_weights(
        ctx.spec,
        ctx.states[0],
        ctx.states[1],
        seed=ctx.seed,
        max_sweeps=max_sweeps,
        restarts=restarts,
        init=init,
        dtype=dtype,
        rtol=rtol,
        device=ctx.device,
        param_names=_param_names(ctx),
        steps=steps,
        local_size=local_size,
    )
    # attention="procrustes": head re-matching + an orthogonal map per head on top of the permutations
    return _procrustes.align_heads(ctx, aln, attention, param_names=_param_names(ctx))


@register(
    "weight_matching",
    needs=("spec",),
    aligns=True,
    align_fn=align_weight_matching,
    paper="Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, Alg. 1): "
    "coordinate descent of sum_k <W_A, pi(W_B)> over the spec's groups, one LAP per step",
)
def weight_matching(
    ctx: MergeContext,
    max_sweeps: int = 100,
    restarts: int = 1,
    init: Any = None,
    dtype: str = "float32",
    rtol: Optional[float] = None,
    steps: str = "auto",
    local_size: float = 0.125,
    attention: str = "permutation",
) -> MethodOutput:
    """Permute model_b into model_a's basis by weight matching, then take the weighted average.

    Options: ``max_sweeps`` (100) caps the sweeps of coordinate descent (with local steps: up to
    ``max_sweeps`` cheap local passes, then up to ``max_sweeps`` full-step passes); ``restarts`` (1) runs of
    descent with different seeded orders, the best objective kept; ``init`` (None) starting
    permutations (``{group: LongTensor}``, e.g. from an earlier alignment); ``dtype`` ("float32") of
    the cost matrices ("float64" for exact ties); ``rtol`` the relative gain below which a step is
    rejected as round-off (1e-5 in float32, 1e-10 in float64); ``steps``: "local" takes cheap local
    steps (an exact LAP on the ``local_size`` (0.125) fraction of rows furthest from their best column,
    plus the rows these compete with) and certifies every group with a full LAP before stopping, "full"
    a full LAP at every step (the reference algorithm), "auto" (default) local steps for groups of at
    least ``AUTO_LOCAL_MIN_N`` (1024) units only; all stop at a coordinate-wise optimum.
    ``attention`` ("permutation"), "procrustes": after the descent, re-match attention heads on
    rotation-invariant scores and map each head's q/k and v/o dims of B by the orthogonal Procrustes
    solution (Zhang et al. 2025, arXiv:2502.00264; an exact symmetry, refused for RoPE q/k), or
    "procrustes_vo": v/o only (RoPE models); the alignment is then a ``RotatedAlignment`` (see
    ``merging._procrustes``).
    """
    aln = align_weight_matching(
        ctx,
        max_sweeps=max_sweeps,
        restarts=restarts,
        init=init,
        dtype=dtype,
        rtol=rtol,
        steps=steps,
        local_size=local_size,
        attention=attention,
    )
    b_aligned = permute(ctx.states[1], ctx.spec, {g: p.to(ctx.device) for g, p in aln.permutations.items()})
    if attention != "permutation":  # the per-head orthogonal maps of merging._procrustes
        b_aligned = _procrustes.rotate_state(b_aligned, aln)
    merged = combine([ctx.states[0], b_aligned], ctx.weights)
    return MethodOutput(
        state_dict=merged,
        alignment=aln,
        endpoints=[ctx.states[0], b_aligned],
        log={
            "objective": aln.objective,
            "sweeps": len(aln.log["restarts"][aln.log["best_restart"]]["sweeps"]),
            **_procrustes.merge_log(aln),
        },
    )
