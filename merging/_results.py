"""Result objects of ``merging``: :class:`Alignment` and :class:`MergeResult`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from weightspace.results import Result

__all__ = ["Alignment", "MergeResult"]


@dataclass(frozen=True)
class Alignment(Result):
    """Permutations taking model B into model A's basis.

    ``permutations[g]`` is a LongTensor of the size of group ``g``; ``ws.permute(model_b, spec,
    permutations)`` gives B in A's basis with ``B'[i] = B[perm[i]]`` (Git Re-Basin's convention).
    ``objective`` is the method's objective at the returned permutations (weight matching: the sum of
    Frobenius inner products ``sum_k <W_A[k], pi(W_B)[k]>``; activation matching: the summed
    correlations of matched units). ``log`` records the run (per sweep for weight matching).
    """

    spec: Any
    permutations: Dict[str, torch.Tensor]
    objective: float
    settings: Dict[str, Any] = field(default_factory=dict)
    log: Dict[str, Any] = field(default_factory=dict, compare=False)

    _skip_in_dict = ("spec",)

    def apply(self, model_b: Any) -> Any:
        """``model_b`` (a module or a state dict, not modified) permuted into A's basis."""
        from weightspace.symmetry import permute

        return permute(model_b, self.spec, self.permutations)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["groups"] = {g: int(n) for g, n in self.spec.groups.items()} if self.spec is not None else {}
        return out


@dataclass(frozen=True)
class MergeResult(Result):
    """A merge: the new model, its weights, the alignment and spec used, what was asked and what happened.

    ``model`` is a new module of model A's class (the inputs are untouched), ``None`` when only state
    dicts were given. ``state_dict`` holds every parameter and buffer. ``to_dict()`` leaves the
    module and the tensors out but lists every key with its shape.
    """

    model: Optional[torch.nn.Module]
    state_dict: Dict[str, torch.Tensor]
    alignment: Optional[Alignment]
    spec: Any
    settings: Dict[str, Any] = field(default_factory=dict)
    log: Dict[str, Any] = field(default_factory=dict, compare=False)

    _skip_in_dict = ("model", "state_dict", "spec")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        shapes = getattr(self.state_dict, "shapes", None)  # lazy mappings over a file answer without reading
        if callable(shapes):
            out["tensors"] = {k: list(v) for k, v in shapes().items()}
        else:
            out["tensors"] = {k: list(v.shape) for k, v in self.state_dict.items()}
        out["groups"] = {g: int(n) for g, n in self.spec.groups.items()} if self.spec is not None else {}
        return out

    def save(self, path: "os.PathLike | str", *, overwrite: bool = False) -> Any:
        """Write ``state_dict`` atomically (safetensors for ``.safetensors``); never overwrites unless asked."""
        from weightspace.io import save_state_dict

        return save_state_dict(
            self.state_dict, path, metadata={"method": str(self.settings.get("method", ""))}, overwrite=overwrite
        )
