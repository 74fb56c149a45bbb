"""``merge_many``: MergeMany for three or more models (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, Alg. 3).

Every model keeps a permutation ``pi_k`` (identity at first). A round visits the models in a seeded
random order; model ``k`` is aligned to the weighted average of the *other* aligned models,
``sum_{j != k} w_j pi_j(theta_j) / sum_{j != k} w_j``, with the inner aligning method (weight
matching by default; its options pass through). Rounds repeat until no permutation changes (or
``max_rounds``); the result is ``sum_k w_k pi_k(theta_k)``. Model 0 is not pinned: the merge lives in
a basis of the average, which is itself a permutation of model 0's -- every ``pi_k`` is reported,
and ``MethodOutput.endpoints`` holds the aligned models (REPAIR reads them).

``merging.merge(m1, m2, m3, method="weight_matching")`` runs this method with ``inner="weight_matching"``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List

import torch

from weightspace.results import versions
from weightspace.state import combine
from weightspace.symmetry import compose_permutations, identity_permutation, permute

from ._registry import MergeContext, MergeError, MethodOutput, get, register
from ._results import Alignment

log = logging.getLogger(__name__)

__all__ = ["merge_many"]


def _to(perms, device):
    return {g: p.to(device) for g, p in perms.items()}


@register(
    "merge_many",
    needs=("spec",),
    min_models=2,
    paper="MergeMany (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, Alg. 3): align each model to the "
    "average of the others until the permutations stop changing, then average",
)
def merge_many(
    ctx: MergeContext, inner: str = "weight_matching", max_rounds: int = 20, **inner_options: Any
) -> MethodOutput:
    """Align every model to the running average of the others with ``inner``, then take the weighted average.

    Options: ``inner`` ("weight_matching") an aligning method; ``max_rounds`` (20) the most rounds;
    any other option goes to the inner method's alignment (e.g. ``max_sweeps``, ``statistic``).
    """
    info = get(inner)
    if not info.aligns:
        raise MergeError(f"merge_many needs an aligning inner method; {inner!r} does not align")
    bad = sorted(set(inner_options) - set(info.align_options))
    if bad:
        raise MergeError(
            f"options {bad} are not options of {inner!r} alignment; its options: {sorted(info.align_options)}"
        )
    if inner_options.get("attention", "permutation") != "permutation":  # merging._procrustes: two models only
        raise MergeError(
            f"attention={inner_options['attention']!r} aligns two models (B onto A); MergeMany applies permutations "
            "only: merge three or more models with attention='permutation', or merge them in pairs"
        )
    if max_rounds < 1:
        raise MergeError(f"max_rounds must be >= 1, got {max_rounds}")
    spec, n, t0 = ctx.spec, len(ctx.states), time.perf_counter()
    perms: List[Dict[str, torch.Tensor]] = [identity_permutation(spec) for _ in range(n)]
    aligned = list(ctx.states)
    rounds: List[Dict[str, Any]] = []
    converged = False
    for r in range(max_rounds):
        changed = 0
        for k in torch.randperm(n, generator=ctx.generator).tolist():
            others = [j for j in range(n) if j != k]
            wsum = sum(ctx.weights[j] for j in others)
            coeffs = [ctx.weights[j] / wsum if wsum > 0 else 1.0 / len(others) for j in others]
            target = combine([aligned[j] for j in others], coeffs)
            sub = dataclasses.replace(
                ctx, states=[target, ctx.states[k]], models=[None, ctx.models[k]], weights=[0.5, 0.5]
            )
            opts = dict(inner_options)
            if "init" in info.align_options and "init" not in opts:
                opts["init"] = perms[k]  # warm start from the current permutation
            aln = info.align_fn(sub, **opts)
            new = {g: p.cpu() for g, p in aln.permutations.items()}
            if any(not torch.equal(new[g], perms[k][g]) for g in spec.groups):
                changed += 1
                perms[k] = new
                aligned[k] = permute(ctx.states[k], spec, _to(new, ctx.device))
        rounds.append({"round": r, "changed": changed})
        if changed == 0:
            converged = True
            break
    merged = combine(aligned, ctx.weights)
    # report model 1 in model 0's basis, as two-model alignments do: pi_0^-1 then pi_1 ... expressed as B -> A
    inv0 = {g: torch.argsort(p) for g, p in perms[0].items()}
    rel = [compose_permutations(perms[k], inv0) for k in range(n)]
    aln = Alignment(
        spec=spec,
        permutations=rel[1],
        objective=float("nan"),
        settings={
            "method": "merge_many",
            "inner": inner,
            "options": inner_options,
            "seed": ctx.seed,
            "versions": versions(),
        },
        log={
            "rounds": rounds,
            "converged": converged,
            "permutations": perms,
            "relative_to_model_a": rel,
            "seconds": time.perf_counter() - t0,
        },
    )
    return MethodOutput(
        state_dict=merged,
        alignment=aln,
        endpoints=aligned,
        log={"rounds": len(rounds), "converged": converged, "inner": inner},
    )
