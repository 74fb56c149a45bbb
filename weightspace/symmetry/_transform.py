"""Non-permutation transforms applied through a spec's layouts (OT plans, ZipIt! merge/unmerge).

A permutation acts on every axis of a group by one gather, ``B'[i] = B[perm[i]]``. A general linear
change of basis of a group's features ``h (n_old) -> h' = M h (n_new)`` needs two matrices:

* producer axes -- the axis on which a layer *writes* the group's features (the output axis of a
  Linear / conv weight, biases, normalisation parameters and running statistics, the feature axis of
  an embedding) -- are mapped by the **merge** ``M`` ``(n_new, n_old)``:
  ``W'[..., i, ...] = sum_j M[i, j] W[..., j, ...]``;
* consumer axes -- the axis on which a layer *reads* them (the input axis of a Linear / conv weight)
  -- are mapped by the **unmerge** ``U`` ``(n_old, n_new)``: ``W' = W U`` along that axis, so that a
  consumer sees ``W U (M h) ~= W h`` whenever ``U M ~= I`` on the features that occur.

For a permutation matrix ``P`` (``P[i, perm[i]] = 1``) the merge is ``P`` and the unmerge ``P^T``;
both reduce to the gather of :func:`weightspace.permute`. ZipIt! (Stoica et al. 2024,
arXiv:2305.03053) uses an averaging merge and a 0/1 unmerge per model; OT fusion (Singh & Jaggi 2020,
arXiv:1910.05653) uses a transport plan ``T (n_old, n_new)`` rescaled by its marginals ``a = T 1``,
``b = T^T 1``: merge ``M = diag(1/b) T^T`` and unmerge ``U = diag(1/a) T`` (see ``merging.ot_fusion``).

Structured axes apply their parts' maps without forming dense Kronecker products: a product axis
``(a x b)`` is reshaped to ``a, b`` and each part mapped on its own sub-axis (``M_a kron M_b``), a
concat axis ``(q | k | v)`` is split into blocks and each block mapped by its own layout.

Roles come from the module types of ``reference`` when it is given (Linear, ConvNd,
ConvTransposeNd, Hugging Face's ``Conv1D`` (in, out), MultiheadAttention, RNN/LSTM/GRU; every other
parameter or buffer, embeddings included, is a producer), else from a heuristic that is right for Linear/conv/norm
layers: 1-D tensors and axis 0
are producers, axes >= 1 of tensors with two or more axes are consumers. An embedding table given
without ``reference`` would be misread: pass ``reference=`` or ``roles=``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from weightspace.symmetry._spec import Axis, PermutationSpec, SpecError

log = logging.getLogger(__name__)

__all__ = ["transform", "axis_roles", "GroupMap"]

GroupMap = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
PRODUCER, CONSUMER = "producer", "consumer"


# ------------------------------------------------------------------------------------------ roles
def _module_roles(reference: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """Per-parameter axis roles from module types: ``{key: (role of axis 0, role of axis 1, ...)}``."""
    out: Dict[str, Tuple[str, ...]] = {}
    for mname, mod in reference.named_modules():
        pre = f"{mname}." if mname else ""
        for pname, p in mod.named_parameters(recurse=False):
            if p is None:
                continue
            nd = p.dim()
            roles = [PRODUCER] * nd
            if isinstance(mod, nn.modules.conv._ConvTransposeNd) and pname == "weight":
                roles[0] = CONSUMER
            elif type(mod).__name__ == "Conv1D" and pname == "weight" and nd == 2:  # HF GPT-2: (in, out)
                roles[0] = CONSUMER
            elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)) and pname == "weight" and nd >= 2:
                roles[1:] = [CONSUMER] * (nd - 1)
            elif isinstance(mod, nn.MultiheadAttention) and pname.endswith("_weight") and nd == 2:
                roles[1] = CONSUMER
            elif isinstance(mod, nn.RNNBase) and pname.startswith("weight_") and nd == 2:
                roles[1] = CONSUMER
            out[pre + pname] = tuple(roles)
    return out


def _heuristic_roles(shape: Tuple[int, ...]) -> Tuple[str, ...]:
    return tuple(PRODUCER if (ax == 0 or len(shape) == 1) else CONSUMER for ax in range(len(shape)))


def axis_roles(
    spec: PermutationSpec, reference: Optional[nn.Module] = None, roles: Optional[Mapping[str, Tuple[str, ...]]] = None
) -> Dict[str, Tuple[Optional[str], ...]]:
    """``{key: (role or None per axis)}`` for every key of ``spec``: ``"producer"``, ``"consumer"``, or
    None where the axis is not acted on by any group. ``roles`` overrides single keys."""
    known = _module_roles(reference) if reference is not None else {}
    out = {}
    for key, layouts in spec.axes.items():
        if roles is not None and key in roles:
            r = tuple(roles[key])
            if len(r) != len(layouts) or any(x not in (PRODUCER, CONSUMER, None) for x in r):
                raise SpecError(
                    f"roles[{key!r}] must give 'producer'/'consumer'/None for each of its {len(layouts)} axes, got {r}"
                )
        else:
            shape = spec.shapes.get(key, (1,) * len(layouts))
            r = known.get(key, _heuristic_roles(tuple(shape)) if reference is None else (PRODUCER,) * len(layouts))
        out[key] = tuple(None if lay is None else r[ax] for ax, lay in enumerate(layouts))
    return out


# ------------------------------------------------------------------------------------------ maps
def _normalise_maps(spec: PermutationSpec, maps: Mapping[str, GroupMap]) -> Dict[str, Any]:
    """-> {group: LongTensor perm | (merge (n_new, n_old), unmerge^T (n_new, n_old))}."""
    unknown = [g for g in maps if g not in spec.groups]
    if unknown:
        raise SpecError(f"transform: maps name unknown groups {unknown}; the spec has {list(spec.groups)}")
    out: Dict[str, Any] = {}
    for g, m in maps.items():
        n = spec.groups[g]
        if torch.is_tensor(m) and not m.is_floating_point():
            if m.dim() != 1 or m.numel() != n or not torch.equal(torch.sort(m.cpu()).values, torch.arange(n)):
                raise SpecError(f"transform: the integer map for group {g!r} must be a permutation of 0..{n - 1}")
            out[g] = m
            continue
        if torch.is_tensor(m):
            merge, unmerge_t = m, m
        elif isinstance(m, (tuple, list)) and len(m) == 2 and all(torch.is_tensor(x) for x in m):
            merge, unmerge_t = m[0], m[1].transpose(0, 1)
        else:
            raise SpecError(
                f"transform: the map for group {g!r} must be a permutation, a matrix (n_new, n_old) "
                f"or a pair (merge (n_new, n_old), unmerge (n_old, n_new)), got {type(m).__name__}"
            )
        if merge.dim() != 2 or unmerge_t.dim() != 2:
            raise SpecError(f"transform: group {g!r} needs 2-D merge/unmerge matrices")
        if merge.shape[1] != n or unmerge_t.shape[1] != n:
            raise SpecError(
                f"transform: group {g!r} has size {n} but its merge is {tuple(merge.shape)} and its "
                f"unmerge {tuple(unmerge_t.T.shape)}; expected (n_new, {n}) and ({n}, n_new)"
            )
        if merge.shape[0] != unmerge_t.shape[0]:
            raise SpecError(
                f"transform: group {g!r}: merge gives {merge.shape[0]} features but the unmerge {unmerge_t.shape[0]}"
            )
        if not (bool(torch.isfinite(merge).all()) and bool(torch.isfinite(unmerge_t).all())):
            raise SpecError(f"transform: the map for group {g!r} holds NaN or inf")
        out[g] = (merge, unmerge_t)
    return out


def _apply(t: torch.Tensor, ax: int, lay: Optional[Axis], role: Optional[str], maps: Mapping[str, Any]) -> torch.Tensor:
    if lay is None or lay.kind == "fixed":
        return t
    if lay.kind == "group":
        m = maps.get(lay.name)
        if m is None:
            return t
        if torch.is_tensor(m):
            return t.index_select(ax, m.to(t.device))
        a = (m[0] if role == PRODUCER else m[1]).to(device=t.device, dtype=t.dtype)
        return torch.movedim(torch.tensordot(a, t, dims=([1], [ax])), 0, ax)
    if lay.kind == "concat":
        chunks = t.split([p.size for p in lay.parts], dim=ax)
        return torch.cat([_apply(c, ax, p, role, maps) for c, p in zip(chunks, lay.parts)], dim=ax)
    # product: row-major sub-axes, each mapped on its own
    shape = tuple(t.shape)
    sub = t.reshape(shape[:ax] + tuple(p.size for p in lay.parts) + shape[ax + 1 :])
    for i, p in enumerate(lay.parts):
        sub = _apply(sub, ax + i, p, role, maps)
    return sub.reshape(shape[:ax] + (-1,) + shape[ax + 1 :])


def transform(
    obj: Union[nn.Module, Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    maps: Mapping[str, GroupMap],
    *,
    reference: Optional[nn.Module] = None,
    roles: Optional[Mapping[str, Tuple[Optional[str], ...]]] = None,
) -> Dict[str, torch.Tensor]:
    """Apply per-group linear maps through ``spec``'s layouts; returns a new state dict.

    Parameters
    ----------
    obj : a module (its parameters and buffers are read, never written) or a state dict.
    spec : the permutation spec of ``obj``'s architecture.
    maps : ``{group: map}``; a group left out is not changed. A map is

        * a LongTensor permutation (exactly :func:`weightspace.permute`'s gather);
        * a float matrix ``T (n_new, n_old)``, used as merge and as transposed unmerge (right for
          permutation and orthogonal matrices: unmerge ``T^T``);
        * a pair ``(merge M (n_new, n_old), unmerge U (n_old, n_new))``.

    reference : a module of the architecture, to read axis roles from its layer types (a module
        ``obj`` is its own reference).
    roles : ``{key: ("producer" | "consumer" | None per axis)}`` overrides for single keys.

    Returns
    -------
    ``{key: tensor}`` in ``obj``'s key order; tensors of groups with ``n_new != n_old`` change shape
    (OT fusion of different widths, partial merges). Integer tensors are never mapped.

    >>> # permutation as a matrix == ws.permute:  transform(sd, spec, {g: torch.eye(n)[perm]})
    """
    if isinstance(obj, nn.Module):
        reference = obj if reference is None else reference
        state = {k: v.detach() for k, v in obj.state_dict(keep_vars=True).items()}
    elif isinstance(obj, Mapping):
        state = dict(obj)
    else:
        raise TypeError(f"transform takes an nn.Module or a state dict, not {type(obj).__name__}")
    nm = _normalise_maps(spec, maps)
    role_of = axis_roles(spec, reference, roles)
    out: Dict[str, torch.Tensor] = {}
    for key, t in state.items():
        layouts = spec.axes.get(key)
        if layouts is None or not torch.is_tensor(t) or not t.is_floating_point():
            out[key] = t
            continue
        if t.dim() != len(layouts):
            raise SpecError(f"{key!r} has shape {tuple(t.shape)} but the spec expects {len(layouts)} axes")
        new = t
        for ax, lay in enumerate(layouts):
            if lay is not None and t.shape[ax] != lay.size:
                raise SpecError(
                    f"{key!r} axis {ax} has size {t.shape[ax]} but the spec's layout {lay} has size {lay.size}"
                )
            new = _apply(new, ax, lay, role_of[key][ax], nm)
        out[key] = new
    return out
