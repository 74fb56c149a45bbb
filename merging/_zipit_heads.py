"""Partial ZipIt!: a shared zipped trunk with one tail per model (a multi-head model).

The trunk is a copy of the architecture holding the zipped weights; it runs up to the *stop* module
(its output is the last zipped feature map, in the merged basis, ``d`` features). Each tail is a copy
of one model with its own weights; a forward hook on the tail's stop module replaces that module's
output with the trunk's features unmerged into the model's basis, ``h_k = U_k h`` along the feature
axis, so the tail computes exactly as the original model would from those features. Tails run
their layers before the stop too (their outputs are discarded): generic for any module, at the cost
of the early layers once per tail.

The stop must be a *cut* of the forward graph: everything after it may depend on the input only
through the stop's output (true for any layer of a plain stack, and for the output of a residual
block, not for a layer inside one). :func:`check_cut` verifies it numerically.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["MultiHeadModel", "check_cut"]


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__("stop")
        self.value = value


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return model(*x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def _first(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"the stop module produced a {type(out).__name__}, not a tensor")


def _map_axis(h: torch.Tensor, mat: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[..., i, ...] = sum_j mat[i, j] h[..., j, ...]`` along ``dim``."""
    return torch.movedim(torch.tensordot(mat.to(h.dtype), h, dims=([1], [dim])), 0, dim)


def run_until(model: nn.Module, stop: str, x: Any) -> torch.Tensor:
    """The output of module ``stop`` of ``model`` on ``x``; the forward pass is cut there."""
    mod = dict(model.named_modules())[stop]

    def hook(_m, _i, out):
        raise _Stop(_first(out))

    h = mod.register_forward_hook(hook)
    try:
        _call(model, x)
    except _Stop as s:
        return s.value
    finally:
        h.remove()
    raise RuntimeError(f"the forward pass never reached module {stop!r}")


def run_from(model: nn.Module, stop: str, x: Any, value: torch.Tensor) -> Any:
    """``model(x)`` with the output of module ``stop`` replaced by ``value``."""
    mod = dict(model.named_modules())[stop]
    h = mod.register_forward_hook(lambda _m, _i, out: value)
    try:
        return _call(model, x)
    finally:
        h.remove()


class MultiHeadModel(nn.Module):
    """A zipped trunk shared by ``N`` per-model tails (partial ZipIt!, Stoica et al. 2024, arXiv:2305.03053).

    ``forward(x)`` runs the trunk to ``stop`` once, unmerges its features into each model's basis and
    runs every tail. Output: with ``output="list"`` (default) a list of the ``N`` tails' outputs, in
    the order the models were given (``out[k]`` is what model ``k``'s head says, e.g. its task's
    logits); with ``output="concat"`` those outputs concatenated along the last dim
    (``(batch, N * classes)`` for classifiers: the tasks' logits side by side).

    Attributes: ``trunk`` (module with the zipped weights), ``tails`` (``nn.ModuleList``), ``stop``
    (module name), ``feature_dim`` (axis of the stop output that carries the features), buffers
    ``unmerge_{k}`` (``(d_k, d)``), ``output``.
    """

    def __init__(self, trunk: nn.Module, tails: Sequence[nn.Module], unmerges: Sequence[torch.Tensor], stop: str,
                 feature_dim: int, output: str = "list") -> None:
        super().__init__()
        if output not in ("list", "concat"):
            raise ValueError(f"output must be 'list' or 'concat', got {output!r}")
        if len(tails) != len(unmerges):
            raise ValueError(f"{len(tails)} tails but {len(unmerges)} unmerge matrices")
        self.trunk = trunk
        self.tails = nn.ModuleList(tails)
        for k, u in enumerate(unmerges):
            self.register_buffer(f"unmerge_{k}", u.detach().to(torch.float32).clone())
        self.stop = stop
        self.feature_dim = int(feature_dim)
        self.output = output

    def unmerge(self, k: int) -> torch.Tensor:
        return getattr(self, f"unmerge_{k}")

    def trunk_features(self, x: Any) -> torch.Tensor:
        """The trunk's features at ``stop`` (merged basis)."""
        return run_until(self.trunk, self.stop, x)

    def forward(self, x: Any) -> Any:
        h = self.trunk_features(x)
        outs = [run_from(tail, self.stop, x, _map_axis(h, self.unmerge(k), self.feature_dim))
                for k, tail in enumerate(self.tails)]
        if self.output == "concat":
            return torch.cat(outs, dim=-1)
        return outs

    def extra_repr(self) -> str:
        return f"stop={self.stop!r}, tails={len(self.tails)}, output={self.output!r}"


@torch.no_grad()
def check_cut(model: nn.Module, stop: str, x: Any, rtol: float = 1e-4) -> float:
    """Verify that module ``stop`` cuts ``model``'s forward graph on the batch ``x``.

    Injects the stop output of the batch rolled by one sample and checks that the model's outputs are
    the outputs of the rolled batch (they would not be if a later layer read an earlier activation,
    e.g. a residual branch around the stop). Returns the relative deviation; raises ``ValueError``.
    """
    if not torch.is_tensor(x) or x.shape[0] < 2:
        log.debug("check_cut skipped: needs a tensor batch of at least two samples")
        return 0.0
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        h = run_until(model, stop, x)
        ref = _first(_call(model, x.roll(1, 0)))
        got = _first(run_from(model, stop, x, h.roll(1, 0)))
    finally:
        for m, t in was.items():
            m.train(t)
    dev = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))
    if dev > rtol:
        raise ValueError(f"module {stop!r} does not cut the forward graph (a later layer reads an activation from "
                         f"before it, e.g. a residual branch; deviation {dev:.3g}); stop at the output of a whole "
                         "block or of a layer of a plain stack")
    return dev


@torch.no_grad()
def reset_bn(model: nn.Module, data: Any, device: torch.device, max_batches: Optional[int] = None) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` (owned by the caller) in one pass.

    Cumulative averages (``momentum=None``), only BatchNorm layers in train mode. Returns batches used."""
    from weightspace import iter_batches

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was = {m: m.training for m in model.modules()}
    moms = {m: m.momentum for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        for x, _ in iter_batches(data, device):
            if max_batches is not None and n >= max_batches:
                break
            _call(model, x)
            n += 1
    finally:
        for m, mo in moms.items():
            m.momentum = mo
        for m, t in was.items():
            m.train(t)
    return n
