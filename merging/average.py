"""``average``: the weighted average of the models' weights, without alignment."""
from __future__ import annotations

from weightspace.state import combine

from ._registry import MergeContext, MethodOutput, register

__all__ = ["average"]


@register("average", elementwise=True,
          paper="Weighted parameter averaging (Utans 1996; model soups: Wortsman et al. 2022, arXiv:2203.05482); "
                "no alignment -- the naive baseline of Git Re-Basin (Ainsworth et al. 2023, arXiv:2209.04836)")
def average(ctx: MergeContext) -> MethodOutput:
    """Weighted average ``theta = sum_k w_k theta_k`` of every floating tensor, with no alignment.

    Integer buffers (``num_batches_tracked``) are taken from model_a. With two models and ``alpha``,
    this is the point ``(1 - alpha) theta_A + alpha theta_B`` of the straight line between them;
    ``alpha`` in {0, 1} returns an endpoint exactly. Elementwise, so it streams.
    """
    return MethodOutput(state_dict=combine(ctx.states, ctx.weights), log={"n_models": len(ctx.states)})
