"""Input handling shared by the solvers: kind/device bookkeeping, validation, marginals.

Every solver accepts NumPy arrays or torch tensors, one problem ``(n, m)`` or a batch ``(B, n, m)``,
and hands its results back in the input's kind (NumPy in -> NumPy out, torch in -> torch out on the
input's device). Internally the solvers work on float64 torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class _Kind:
    """Where the input came from, so results can be returned in the same form."""

    is_numpy: bool
    device: torch.device
    batched: bool

    def out(self, t: Optional[torch.Tensor]) -> Any:
        """Convert an internal tensor (batched layout) to the caller's kind and layout."""
        if t is None:
            return None
        if not self.batched:
            t = t[0]
        if self.is_numpy:
            return t.detach().cpu().numpy()
        return t.to(self.device)


def as_cost_numpy(cost: Any, name: str = "cost") -> Tuple[np.ndarray, bool]:
    """Validate a non-tensor cost (array, list, scalar) and return a float64 ``(B, n, m)`` C-contiguous
    array and whether the input was batched. NumPy only: no torch call on this path, so a single small
    problem costs microseconds on top of SciPy (see :func:`merging.solvers.linear_assignment`)."""
    arr = np.asarray(cost)
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must be a real numeric array (NumPy or torch), got dtype {arr.dtype}; "
            "pass e.g. np.asarray(cost, dtype=float)"
        )
    _check_ndim(name, arr.ndim, arr.shape)
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    batched = arr.ndim == 3
    if not batched:
        arr = arr[None]
    if arr.size and not np.isfinite(arr).all():
        _raise_nonfinite(name, np.argwhere(~np.isfinite(arr))[0].tolist(), arr.shape, batched)
    return arr, batched


def _check_ndim(name: str, ndim: int, shape) -> None:
    if ndim not in (2, 3):
        raise ValueError(
            f"{name} must have shape (n, m) or (B, n, m), got ndim={ndim} shape={tuple(shape)}; "
            "reshape it, e.g. stack problems of one size along a leading batch axis"
        )


def _raise_nonfinite(name: str, first: list, shape3, batched: bool) -> None:
    where = tuple(first) if batched else tuple(first[1:])
    shape = tuple(shape3) if batched else tuple(shape3[1:])
    raise ValueError(
        f"{name} contains NaN or inf (first at index {where}, shape {shape}); replace non-finite "
        "entries, e.g. with a large finite penalty for forbidden pairs"
    )


def as_cost(cost: Any, name: str = "cost", allow_empty: bool = True) -> Tuple[torch.Tensor, _Kind]:
    """Validate a cost matrix or batch and return it as a float64 ``(B, n, m)`` tensor and its kind.

    Raises ``TypeError`` for non-array input and ``ValueError`` for a wrong ndim, NaN/inf entries or
    (when ``allow_empty`` is False) an empty side.
    """
    if isinstance(cost, torch.Tensor):
        if cost.is_complex() or cost.dtype == torch.bool:
            raise TypeError(f"{name} must be a real floating/integer tensor, got dtype {cost.dtype}")
        _check_ndim(name, cost.ndim, cost.shape)
        t = cost.detach()
        if t.dtype != torch.float64:
            t = torch.from_numpy(t.cpu().numpy().astype(np.float64)).to(t.device) if t.device.type == "cpu" \
                else t.to(torch.float64)
        batched = t.ndim == 3
        t = (t if batched else t.unsqueeze(0)).contiguous()
        # on the CPU check in NumPy: small torch ops pay intra-op thread overhead
        finite = bool(np.isfinite(t.numpy()).all()) if t.device.type == "cpu" else bool(torch.isfinite(t).all())
        if t.numel() and not finite:
            _raise_nonfinite(name, (~torch.isfinite(t)).nonzero()[0].tolist(), t.shape, batched)
        kind = _Kind(False, cost.device, batched)
    elif isinstance(cost, (np.ndarray, list, tuple)) or np.isscalar(cost):
        arr, batched = as_cost_numpy(cost, name)
        t, kind = torch.from_numpy(arr), _Kind(True, torch.device("cpu"), batched)
    else:
        raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(cost).__name__}")
    if not allow_empty and (t.shape[1] == 0 or t.shape[2] == 0):
        raise ValueError(
            f"{name} has an empty side: shape {tuple(t.shape if batched else t.shape[1:])}; "
            "a transport problem needs n >= 1 sources and m >= 1 targets"
        )
    return t, kind


def as_marginal(x: Any, name: str, B: int, size: int, axis_name: str, device: torch.device,
                batched: bool) -> torch.Tensor:
    """Return marginal ``x`` as a float64 ``(B, size)`` tensor on ``device``; uniform when None.

    Checks: finite, non-negative, right length (``size`` = the cost's ``axis_name`` length), positive
    total. Does not compare totals between ``a`` and ``b`` (see :func:`check_mass`).
    """
    if x is None:
        return torch.full((B, size), 1.0 / size, dtype=torch.float64, device=device)
    t = x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else torch.as_tensor(
        np.asarray(x, dtype=np.float64))
    t = t.to(device)
    if t.ndim == 1:
        t = t.unsqueeze(0).expand(B, -1)
    elif t.ndim != 2 or (t.shape[0] != B):
        raise ValueError(
            f"{name} must have shape ({size},) or ({B}, {size}) to match the cost's {axis_name} axis, "
            f"got shape {tuple(t.shape)}"
        )
    if t.shape[-1] != size:
        raise ValueError(
            f"{name} has length {t.shape[-1]} but the cost has {size} entries along its {axis_name} "
            f"axis; pass a marginal with {size} entries (or None for uniform)"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; marginals must be finite non-negative weights")
    if bool((t < 0).any()):
        raise ValueError(f"{name} has negative entries (min {t.min().item():.3g}); marginals must be >= 0")
    if bool((t.sum(-1) <= 0).any()):
        raise ValueError(f"{name} sums to 0 for some problem; each marginal needs positive total mass")
    return t.contiguous()


def check_mass(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> None:
    """Raise if the totals of ``a`` and ``b`` differ beyond ``rtol`` (relative) for any problem."""
    sa, sb = a.sum(-1), b.sum(-1)
    diff = (sa - sb).abs()
    bad = diff > rtol * torch.maximum(sa, sb)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"marginals a and b have different total mass (problem {k}: sum(a)={sa[k].item():.10g}, "
            f"sum(b)={sb[k].item():.10g}); normalize both to sum to 1, or use an unbalanced solver"
        )
