"""``activation_matching``: align hidden units by the correlation of their activations on data.

Git Re-Basin activation matching (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, eq. 1): for
each group, ``P = argmax_P <P, S>_F`` with ``S[i, j]`` the similarity of unit ``i`` of A and unit ``j``
of B at the group's activation point, one linear assignment per group. Two statistics:

* ``statistic="correlation"`` (default; REPAIR, Jordan et al. 2023, arXiv:2211.08403, and ZipIt!):
  Pearson ``(E[a b] - mu_a mu_b) / (sigma_a sigma_b + eps)`` with ``eps = 1e-4`` -- dead units give 0;
* ``statistic="second_moment"``: ``E[a b^T]``, the Git Re-Basin code's choice.

Statistics are streamed over ``data`` in float64 (:func:`weightspace.features.cross_stats`, features
reshaped to ``(N * H * W, C)``) at the *last* activation point of each group (after the
nonlinearity, ``point="last"``) or the first (``point="first"``, pre-activation).

``sequential=True`` matches the groups one by one in execution order on the already-permuted B, as
the REPAIR code does (one data pass per group). For an exact spec this gives the same permutations
as one joint pass (the default): permuting B's other groups is a symmetry, so B's activation at a
point only moves by that point's own permutation; the option exists to reproduce the literature and
as a check of the spec (a test asserts both agree).

Groups whose activation point does not expose exactly the group's units (attention heads x head dim,
groups without a traced point) are aligned afterwards by weight matching with the activation-matched
groups held fixed (``fallback="weight_matching"``), or kept at the identity (``fallback="identity"``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import torch

from weightspace.features import cross_stats, group_points
from weightspace.results import versions
from weightspace.symmetry import compose_permutations, identity_permutation, permute

from ._registry import MergeContext, MergeError, MethodOutput, register
from ._results import Alignment
from merging.solvers import linear_assignment

log = logging.getLogger(__name__)

__all__ = ["activation_matching", "align_activation_matching"]


def _module(ctx: MergeContext, state) -> torch.nn.Module:
    from ._api import _build_model

    return _build_model(ctx.reference, state).eval()


def _similarity(cs, statistic: str, eps: float) -> torch.Tensor:
    if statistic == "correlation":
        return cs.cov_ab / (torch.outer(cs.std_a, cs.std_b) + eps)
    return cs.second_moment_ab


def _stats(ctx, model_a, model_b, pts: Dict[str, tuple], max_batches) -> Dict[str, Any]:
    names = sorted({m for m, _ in pts.values()})
    fdims = {m: d for m, d in pts.values()}
    return cross_stats(
        model_a, model_b, ctx.data, names, feature_dim=fdims, device=ctx.device, max_batches=max_batches, eps=0.0
    )


def align_activation_matching(
    ctx: MergeContext,
    statistic: str = "correlation",
    point: str = "last",
    sequential: bool = False,
    eps: float = 1e-4,
    max_batches: Optional[int] = None,
    fallback: str = "weight_matching",
) -> Alignment:
    """Align ``states[1]`` to ``states[0]`` by activation matching (options as :func:`activation_matching`)."""
    if statistic not in ("correlation", "second_moment"):
        raise MergeError(f"statistic must be 'correlation' or 'second_moment', got {statistic!r}")
    if fallback not in ("weight_matching", "identity"):
        raise MergeError(f"fallback must be 'weight_matching' or 'identity', got {fallback!r}")
    if ctx.reference is None:
        raise MergeError("activation_matching runs the models: pass at least one model as an nn.Module")
    spec = ctx.spec
    t0 = time.perf_counter()
    try:
        pts_all = group_points(spec, point)
    except Exception as e:  # noqa: BLE001
        raise MergeError(
            f"activation_matching needs a traced spec with activation points ({e}); pass "
            "example_inputs= or data= instead of a hand-written spec, or use weight_matching"
        ) from e
    model_a = _module(ctx, ctx.states[0])
    model_b = _module(ctx, ctx.states[1])
    # keep only points whose feature axis holds exactly the group's units
    probe = _stats(ctx, model_a, model_a, pts_all, 1)
    pts = {g: p for g, p in pts_all.items() if probe[p[0]].std_a.numel() == spec.groups[g]}
    skipped = [g for g in spec.groups if g not in pts]
    perms = identity_permutation(spec)
    sims: Dict[str, float] = {}
    passes = 0
    if sequential:
        order = _execution_order(model_a, ctx, [m for m, _ in pts.values()])
        groups = sorted(pts, key=lambda g: order.get(pts[g][0], 0))
        b_cur = model_b
        for g in groups:
            cs = _stats(ctx, model_a, b_cur, {g: pts[g]}, max_batches)[pts[g][0]]
            passes += 1
            S = _similarity(cs, statistic, eps)
            perms[g] = linear_assignment(S, maximize=True).col_ind.to(torch.long).cpu()
            sims[g] = float(S.gather(1, perms[g].view(-1, 1)).sum())
            step = identity_permutation(spec)
            step[g] = perms[g]
            b_cur = permute(b_cur, spec, step)
    else:
        stats = _stats(ctx, model_a, model_b, pts, max_batches)
        passes = 1
        Ss = {g: _similarity(stats[p[0]], statistic, eps) for g, p in pts.items()}
        by_size: Dict[int, List[str]] = {}
        for g, S in Ss.items():
            by_size.setdefault(S.shape[0], []).append(g)
        for _n, gs in by_size.items():
            res = linear_assignment(torch.stack([Ss[g] for g in gs]), maximize=True)
            for i, g in enumerate(gs):
                perms[g] = res.col_ind[i].to(torch.long).cpu()
                sims[g] = float(Ss[g].gather(1, perms[g].view(-1, 1)).sum())
    wm_log = None
    if skipped and fallback == "weight_matching":
        from .weight_matching import match_weights

        b_perm = permute(ctx.states[1], spec, {g: p.to(ctx.device) for g, p in perms.items()})
        rest = spec.without(*[g for g in spec.groups if g in pts])
        if len(rest.groups):
            wm = match_weights(
                rest,
                ctx.states[0],
                b_perm,
                seed=ctx.seed,
                device=ctx.device,
                param_names=[k for k, _ in ctx.reference.named_parameters()],
            )
            extra = identity_permutation(spec)
            extra.update(wm.permutations)
            perms = compose_permutations(perms, extra)
            wm_log = {"groups": list(rest.groups), "objective": wm.objective}
    settings = {
        "method": "activation_matching",
        "statistic": statistic,
        "point": point,
        "sequential": sequential,
        "eps": eps,
        "max_batches": max_batches,
        "fallback": fallback,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "versions": versions(),
    }
    log_ = {
        "similarity": sims,
        "points": {g: list(p) for g, p in pts.items()},
        "not_activation_matched": skipped,
        "weight_matching_fallback": wm_log,
        "data_passes": passes,
        "seconds": time.perf_counter() - t0,
    }
    return Alignment(spec=spec, permutations=perms, objective=float(sum(sims.values())), settings=settings, log=log_)


def _execution_order(model: torch.nn.Module, ctx: MergeContext, names: List[str]) -> Dict[str, int]:
    from weightspace.utils import iter_batches

    order: Dict[str, int] = {}
    mods = dict(model.named_modules())

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            order.setdefault(name, len(order))

        return hook

    hooks = [mods[n].register_forward_hook(record(n)) for n in names]
    try:
        x, _ = next(iter(iter_batches(ctx.data, ctx.device)))
        with torch.no_grad():
            model.to(ctx.device)(**x) if isinstance(x, dict) else model.to(ctx.device)(x)
    finally:
        for h in hooks:
            h.remove()
    return order


@register(
    "activation_matching",
    needs=("spec", "data"),
    aligns=True,
    align_fn=align_activation_matching,
    paper="Git Re-Basin activation matching (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, eq. 1); "
    "correlation statistic and sequential order of REPAIR (Jordan et al. 2023, arXiv:2211.08403)",
)
def activation_matching(
    ctx: MergeContext,
    statistic: str = "correlation",
    point: str = "last",
    sequential: bool = False,
    eps: float = 1e-4,
    max_batches: Optional[int] = None,
    fallback: str = "weight_matching",
) -> MethodOutput:
    """Permute model_b into model_a's basis by activation matching on ``data``, then average.

    Options: ``statistic`` ("correlation" | "second_moment"), ``point`` ("last": after the
    nonlinearity | "first": pre-activation), ``sequential`` (False; True matches group by group on the
    already-permuted B), ``eps`` (1e-4, in the correlation's denominator), ``max_batches`` (None: one
    full pass), ``fallback`` ("weight_matching" | "identity") for groups without a usable point.
    """
    aln = align_activation_matching(
        ctx,
        statistic=statistic,
        point=point,
        sequential=sequential,
        eps=eps,
        max_batches=max_batches,
        fallback=fallback,
    )
    from weightspace.state import combine

    b_aligned = permute(ctx.states[1], ctx.spec, {g: p.to(ctx.device) for g, p in aln.permutations.items()})
    merged = combine([ctx.states[0], b_aligned], ctx.weights)
    return MethodOutput(
        state_dict=merged, alignment=aln, endpoints=[ctx.states[0], b_aligned], log={"objective": aln.objective}
    )
