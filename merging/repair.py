"""Repairing merged models: BatchNorm reset and REPAIR (Jordan et al. 2023, arXiv:2211.08403).

Averaging two networks shrinks the variance of hidden pre-activations: at alpha = 1/2,
``var(avg)/var = (1 + rho)/2`` for units whose activations correlate with ``rho`` ("variance
collapse"), which compounds with depth.

* ``"bn_reset"``: every BatchNorm's running statistics are reset and recomputed on ``data`` with a
  cumulative average over one no-grad pass (``momentum=None``, as ``torch.optim.swa_utils.update_bn``).
  For BN networks this is what REPAIR reduces to.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

import torch

from weightspace.state import has_batchnorm, recalibrate_bn

from ._registry import MergeContext, MergeError, MethodOutput

log = logging.getLogger(__name__)

__all__ = ["apply_repair", "bn_reset"]


def bn_reset(ctx: MergeContext, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with every BatchNorm's statistics recomputed on ``ctx.data`` (one cumulative pass)."""
    ref = ctx.reference
    if not has_batchnorm(ref):
        raise MergeError(f"repair='bn_reset' recomputes BatchNorm statistics, but {type(ref).__name__} has no "
                         "BatchNorm layer tracking statistics; use repair='repair' (REPAIR works without BatchNorm)")
    return dict(recalibrate_bn(ref, ctx.data, state, device=ctx.device))


def apply_repair(kind: str, ctx: MergeContext, out: MethodOutput) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Apply ``repair=kind`` to a method's output; returns the repaired state and a log."""
    if kind == "bn_reset":
        return bn_reset(ctx, out.state_dict), {"kind": "bn_reset"}
    raise MergeError(f"repair={kind!r} is not available yet; use repair='bn_reset'")
