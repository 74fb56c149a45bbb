"""Repairing merged models: BatchNorm reset and REPAIR (Jordan et al. 2023, arXiv:2211.08403).

Averaging two networks shrinks the variance of hidden pre-activations: at alpha = 1/2,
``var(avg)/var = (1 + rho)/2`` for units whose activations correlate with ``rho`` ("variance
collapse"), which compounds with depth.

* ``"bn_reset"``: every BatchNorm's running statistics are reset and recomputed on ``data`` with a
  cumulative average over one no-grad pass (``momentum=None``, as ``torch.optim.swa_utils.update_bn``).
  For BN networks this is what REPAIR reduces to.
* ``"repair"`` (REPAIR, Jordan, Sedghi, Saukh, Entezari & Neyshabur 2023, arXiv:2211.08403): for every
  affine unit-wise module -- Linear and conv layers with a bias, BatchNorm / LayerNorm / GroupNorm with
  weight and bias -- except the one producing the model's output, the per-unit mean and std of its
  output are measured on ``data`` at every endpoint ``theta_k`` (the models in the merged basis) and
  at the merged model. The goal is the interpolation of the endpoint statistics,
  ``mu* = sum_k w_k mu_k`` and ``sigma* = sum_k w_k sigma_k`` (the *std* is interpolated, not the
  variance), and the module's output ``y`` is replaced by ``(sigma* / sigma) (y - mu) + mu*``, folded
  into its own weight and bias (``W <- s W``, ``b <- s (b - mu) + mu*``). Modules are corrected one at a
  time in execution order, each measured after the corrections upstream, so afterwards every corrected
  output has exactly the goal statistics on ``data``; at ``alpha`` in {0, 1} the merge is an endpoint,
  ``s = 1`` and nothing moves. Works with and without BatchNorm, after any method.

Statistics are streamed in float64 (:func:`weightspace.features.activation_stats`, population std,
features of conv maps reshaped to ``(N * H * W, C)``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import time

import torch
from torch import nn

from weightspace.features import activation_stats
from weightspace.state import has_batchnorm, recalibrate_bn, state_of

from ._registry import MergeContext, MergeError, MethodOutput

log = logging.getLogger(__name__)

__all__ = ["apply_repair", "bn_reset", "repair_state"]


def bn_reset(ctx: MergeContext, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with every BatchNorm's statistics recomputed on ``ctx.data`` (one cumulative pass)."""
    ref = ctx.reference
    if not has_batchnorm(ref):
        raise MergeError(
            f"repair='bn_reset' recomputes BatchNorm statistics, but {type(ref).__name__} has no "
            "BatchNorm layer tracking statistics; use repair='repair' (REPAIR works without BatchNorm)"
        )
    return dict(recalibrate_bn(ref, ctx.data, state, device=ctx.device))


def _correctable(model: nn.Module, data: Any, device) -> List[str]:
    """Affine unit-wise modules in execution order, without the one whose output is the model's output."""
    from weightspace.utils import iter_batches

    cands = {}
    for name, m in model.named_modules():
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)) or w.dim() < 1 or b.dim() != 1:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and w.shape[0] == b.shape[0]:
            cands[name] = m
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and w.dim() == 1:
            cands[name] = m
    order: List[str] = []
    outs: Dict[str, Any] = {}

    def hook(mod, inp, out, name):
        if name not in outs:
            order.append(name)
            outs[name] = out

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in cands.items()]
    try:
        x, _ = next(iter(iter_batches(data, device)))
        with torch.no_grad():
            y = model(**x) if isinstance(x, dict) else model(x)
    finally:
        for h in hooks:
            h.remove()
    final = y if torch.is_tensor(y) else None
    return [n for n in order if not (final is not None and outs[n] is final)]


def _stats(model: nn.Module, data: Any, points: List[str], device) -> Dict[str, Any]:
    return activation_stats(model, data, points, covariance=False, device=device)


def repair_state(
    ctx: MergeContext, out: MethodOutput, min_std: float = 1e-8
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """REPAIR (see the module docstring): the merged state with corrected affine modules, and a log."""
    from weightspace.symmetry import permute

    from ._api import _build_model

    t0 = time.perf_counter()
    if out.endpoints is not None:
        ends = out.endpoints
    elif out.alignment is not None and len(ctx.states) == 2 and out.alignment.spec is not None:
        perms = {g: p.to(ctx.device) for g, p in out.alignment.permutations.items()}
        ends = [ctx.states[0], permute(ctx.states[1], out.alignment.spec, perms)]
    else:
        ends = ctx.states
    if len(ends) != len(ctx.weights):
        raise MergeError(f"REPAIR got {len(ends)} endpoints for {len(ctx.weights)} weights")
    merged = _build_model(ctx.reference, out.state_dict).to(ctx.device).eval()
    points = _correctable(merged, ctx.data, ctx.device)
    if not points:
        raise MergeError(
            f"repair='repair' found no Linear/conv layer with a bias or affine norm layer to correct in "
            f"{type(ctx.reference).__name__}"
        )
    goal_mu: Dict[str, torch.Tensor] = {}
    goal_sd: Dict[str, torch.Tensor] = {}
    for w, st in zip(ctx.weights, ends):
        stats = _stats(_build_model(ctx.reference, st).to(ctx.device).eval(), ctx.data, points, ctx.device)
        for p in points:
            goal_mu[p] = goal_mu.get(p, 0) + w * stats[p].mean
            goal_sd[p] = goal_sd.get(p, 0) + w * stats[p].std
    mods = dict(merged.named_modules())
    scales = {}
    with torch.no_grad():
        for p in points:
            st = _stats(merged, ctx.data, [p], ctx.device)[p]
            sd = st.std
            s = torch.where(sd > min_std, goal_sd[p] / sd.clamp_min(min_std), torch.ones_like(sd))
            m = mods[p]
            w, b = m.weight, m.bias
            s_w = s.to(device=w.device, dtype=w.dtype)
            w.mul_(s_w.view(-1, *([1] * (w.dim() - 1))))
            b.copy_((s * (b.detach().double().cpu() - st.mean) + goal_mu[p]).to(device=b.device, dtype=b.dtype))
            scales[p] = {"mean_scale": float(s.mean()), "min_scale": float(s.min()), "max_scale": float(s.max())}
    state = {k: v.detach().clone() for k, v in state_of(merged).items()}
    return state, {
        "kind": "repair",
        "points": points,
        "scales": scales,
        "endpoints": len(ends),
        "data_passes": len(ends) + len(points),
        "seconds": time.perf_counter() - t0,
    }


def apply_repair(kind: str, ctx: MergeContext, out: MethodOutput) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Apply ``repair=kind`` to a method's output; returns the repaired state and a log."""
    if kind == "bn_reset":
        return bn_reset(ctx, out.state_dict), {"kind": "bn_reset"}
    if kind == "repair":
        return repair_state(ctx, out)
    raise MergeError(f"unknown repair {kind!r}; use None, 'bn_reset' or 'repair'")
