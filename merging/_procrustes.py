"""Orthogonal (Procrustes) alignment within attention heads, on top of weight matching.

Rotation symmetry of attention (Zhang, Zheng, Chen & Li 2025, "Beyond the Permutation Symmetry of
Transformers: The Role of Rotation for Model Fusion", ICML, arXiv:2502.00264). In head ``h`` the
scores depend on queries and keys only through ``q_h^T k_h`` and the output on values only through
``W_O[:, h] v_h``; for any orthogonal ``R`` ``(d, d)`` (rotations and reflections, ``R^T R = I``)::

    q' = R q,  k' = R k            (rows of W_Q, W_K and b_Q, b_K of the head multiplied by R)
    v' = R v,  W_O'[:, h] = W_O[:, h] R^T

leave the function unchanged exactly. Permutations of the head dim are the special case
``R = P``. Rotary position embeddings (RoPE) break the q/k half of the symmetry: they act on fixed
pairs of head dims, so the tracer reports a *fixed* q/k head dim and ``attention="procrustes"``
refuses; the v/o half survives RoPE, and ``attention="procrustes_vo"`` rotates only value/output
(the within-head groups an output projection reads; told apart by the layer types of a module).

Alignment (``attention="procrustes"`` of weight matching). After the permutation descent of Git
Re-Basin (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836) has fixed every permutation, the
weight-matching objective ``sum_k <W_A[k], T(W_B)[k]>`` splits, for an attention block with heads
``H`` and within-head groups ``D`` (one for q/k, one for v/o), into independent terms per head and
group. Stack the head-``i`` rows of every tensor the group acts on (weights, biases; the output
projection's head-``i`` columns) as the ``(d, m)`` matrix ``A_i`` of model A and ``B_j`` of model B
(B under every other permutation); then

    X_D[i, j] = sum_(tensors of D) A_i B_j^T                                  (d, d), float64
    max_(R orthogonal) <A_i, R B_j> = max_R tr(R^T X) = ||X_D[i, j]||_*     (sum of singular values)
    R* = U V^T        for X = U S V^T    (orthogonal Procrustes, Schoenemann 1966)

Two steps, each exact and never decreasing the objective:

1. *head re-matching*: heads are matched again on the rotation-invariant score
   ``S[i, j] = sum_D ||X_D[i, j]||_*`` (plus the plain inner products of head dims not rotated;
   one maximising assignment; the descent's head matching is kept unless the new one scores higher);
2. *rotation*: each matched head ``(i, h(i))`` and group ``D`` gets ``R = U V^T``; a head whose gain
   ``||X||_* - tr(X)`` is below ``rtol`` times its scale keeps ``R = I`` (identical heads stay as
   they are).

So the returned objective is ``>=`` the permutation-only objective. B's aligned weights are
``rotate(permute(B, perms), R)``: :class:`RotatedAlignment` carries both and its ``apply`` does both.

Refused (``MergeError`` naming the module): a spec without attention heads; heads whose head dim is
fixed (RoPE) or whose head-dim group also acts elsewhere (e.g. a per-head QK-norm weight or a gate,
with which rotations do not commute); a 1-D tensor on a head dim that is not the bias of a weight on
the same dims. When a module and example inputs are available the rotated B is also run against B
(same outputs to float tolerance), and a mismatch is refused naming the offending attention modules.
Not implemented: the per-head rescaling symmetry of q/k (``q' = a q, k' = k / a``) of the same paper.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from weightspace.symmetry import axis_roles, permute

from . import _wm_core as core
from ._registry import MergeError
from ._results import Alignment
from .solvers import linear_assignment

log = logging.getLogger(__name__)

__all__ = [
    "ATTENTION",
    "RotatedAlignment",
    "check_attention",
    "attention_blocks",
    "heads_info",
    "solve_heads",
    "align_heads",
    "rotate_state",
    "function_check",
    "merge_log",
]

ATTENTION = ("permutation", "procrustes", "procrustes_vo")
Item = Tuple[str, int, Tuple[int, ...], Optional[str]]  # (key, axis, path to the (H x D) product, D or None)


def check_attention(attention: str) -> None:
    """Raise a clear error for an unknown ``attention=`` value (before any work)."""
    if attention not in ATTENTION:
        raise MergeError(
            f"attention must be one of {list(ATTENTION)}, got {attention!r}: 'permutation' matches heads and "
            "head dims by permutations only; 'procrustes' adds an orthogonal map per head to q/k and v/o "
            "(arXiv:2502.00264); 'procrustes_vo' to v/o only (models with RoPE)"
        )


# ------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class RotatedAlignment(Alignment):
    """An :class:`~merging.Alignment` whose B also gets an orthogonal map per attention head.

    ``rotations[D]`` (``(n_heads, d, d)``, float64, orthogonal) maps head ``i`` of B -- after the
    permutations -- on the dims of within-head group ``D``: rows ``x_i -> R_i x_i`` of the tensors
    that produce the head's features (q/k/v weights and biases), columns ``W[:, i] -> W[:, i] R_i^T``
    of the output projection (both are ``R_i`` acting on the head's isolated rows). ``heads[D]``
    names the head group and the tensors of ``D``. ``objective`` is ``sum_k <W_A[k], B'[k]>`` of the
    rotated B; ``log["procrustes"]`` has the permutation-only objective, per-head gains and which
    heads were rotated or re-matched.
    """

    rotations: Dict[str, torch.Tensor] = field(default_factory=dict)
    heads: Dict[str, Dict[str, Any]] = field(default_factory=dict, compare=False)

    _skip_in_dict = ("spec", "rotations")

    def apply(self, model_b: Any) -> Any:
        """``model_b`` (a module or a state dict, not modified) permuted and rotated into A's basis."""
        permuted = permute(model_b, self.spec, self.permutations)
        if isinstance(permuted, nn.Module):
            state = {k: v.detach() for k, v in permuted.state_dict(keep_vars=True).items()}
            new = rotate_state(state, self)
            with torch.no_grad():
                for k, t in list(permuted.named_parameters(remove_duplicate=False)) + list(
                    permuted.named_buffers(remove_duplicate=False)
                ):
                    if k in new and new[k] is not state[k]:
                        t.copy_(new[k])
            return permuted
        return rotate_state(permuted, self)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["rotations"] = {d: list(r.shape) for d, r in self.rotations.items()}
        return out


# ------------------------------------------------------------------------------------------ layouts
def _map_node(t: torch.Tensor, ax: int, lay, path: Tuple[int, ...], fn) -> torch.Tensor:
    """``t`` with ``fn(sub, ax)`` applied to the slice/sub-axis of axis ``ax`` that ``path`` leads to
    through concat (blocks) and product (row-major sub-axes) layouts."""
    if not path:
        return fn(t, ax)
    i = path[0]
    if lay.kind == "concat":
        chunks = list(t.split([p.size for p in lay.parts], dim=ax))
        chunks[i] = _map_node(chunks[i], ax, lay.parts[i], path[1:], fn)
        return torch.cat(chunks, dim=ax)
    if lay.kind == "product":
        shape = tuple(t.shape)
        sub = t.reshape(shape[:ax] + tuple(p.size for p in lay.parts) + shape[ax + 1 :])
        sub = _map_node(sub, ax + i, lay.parts[i], path[1:], fn)
        return sub.reshape(shape)
    raise ValueError(f"path {path} goes through a {lay.kind} layout")  # pragma: no cover


def _read_heads(t: torch.Tensor, ax: int, lay, path: Tuple[int, ...], n_heads: int) -> torch.Tensor:
    """The ``(n_heads, d, m)`` head-major rows of the ``(H x D)`` node at ``path`` of axis ``ax``."""
    got: List[torch.Tensor] = []

    def grab(sub: torch.Tensor, a: int) -> torch.Tensor:
        got.append(sub.movedim(a, 0).reshape(n_heads, sub.shape[a] // n_heads, -1))
        return sub

    _map_node(t, ax, lay, path, grab)
    return got[0]


def _rotate_node(t: torch.Tensor, ax: int, lay, path: Tuple[int, ...], R: torch.Tensor) -> torch.Tensor:
    """``t`` with head ``i``'s rows of the ``(H x D)`` node multiplied by ``R[i]`` (``(n_heads, d, d)``)."""

    def rot(sub: torch.Tensor, a: int) -> torch.Tensor:
        x = sub.movedim(a, 0)
        rest = x.shape[1:]
        y = torch.einsum("hab,hbm->ham", R.to(device=x.device, dtype=x.dtype), x.reshape(R.shape[0], R.shape[1], -1))
        return y.reshape((x.shape[0],) + tuple(rest)).movedim(0, a)

    return _map_node(t, ax, lay, path, rot)


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def _block_name(items: Sequence[Item]) -> str:
    """The attention module of a head block: the longest common dotted prefix of its projections."""
    parts = [_module(k).split(".") for k, *_ in items]
    common = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common) if common else ", ".join(sorted({_module(k) for k, *_ in items}))


# ------------------------------------------------------------------------------------------ structure
def _candidate_heads(spec) -> Dict[str, List[str]]:
    """Attention-like head groups -> their keys: groups ``H`` acting as part 0 of a two-part product
    ``(H x D)`` of which at least one has a permutable head dim ``D`` (products whose inner part is always
    fixed, such as the ``(channels x spatial)`` flatten of a CNN, are not attention and are left alone)."""
    out: Dict[str, List[str]] = {}
    free: set = set()

    def walk(lay, key):
        if lay is None or lay.kind in ("group", "fixed"):
            return
        if lay.kind == "product" and len(lay.parts) == 2 and lay.parts[0].kind == "group":
            out.setdefault(lay.parts[0].name, []).append(key)
            if lay.parts[1].kind == "group":
                free.add(lay.parts[0].name)
        for p in lay.parts:
            walk(p, key)

    for key, layouts in spec.axes.items():
        for lay in layouts:
            walk(lay, key)
    return {H: keys for H, keys in out.items() if H in free}


def attention_blocks(
    spec,
    keys: Sequence[str],
    attention: str = "procrustes",
    roles: Optional[Mapping[str, Tuple[Optional[str], ...]]] = None,
) -> Tuple[Dict[str, List[Item]], List[str]]:
    """The head groups of ``spec`` with their tensors, and the within-head groups to rotate.

    ``attention="procrustes"``: every within-head group (q/k and v/o); ``"procrustes_vo"``: only the
    groups read by an output projection (a *consumer* axis in ``roles``, :func:`weightspace.axis_roles`
    of a module of the architecture), which RoPE leaves free. Returns ``({H: items}, [D, ...])``.
    Raises :class:`~merging.MergeError` naming the module where the symmetry does not hold (see the
    module docstring)."""
    keys = list(keys)
    what = f"attention={attention!r}"
    cands = _candidate_heads(spec)
    heads = {H: items for H, items in core.find_heads(spec, keys).items() if H in cands}
    if not cands:
        raise MergeError(
            f"{what} rotates within attention heads, but the spec has no head-structured axis "
            "(heads x head dim); use attention='permutation' for this model"
        )
    rotate: List[str] = []
    for H, where in cands.items():
        if H not in heads:
            raise MergeError(
                f"{what}: the heads of {_module(where[0])} (group {H!r}) cannot be rotated: their "
                "head dims are coupled to something other than the q/k/v/output projections (a per-head norm, a "
                "gate, a shared key/value head, a buffer); use attention='permutation'"
            )
        inner = sorted({D for *_, D in heads[H] if D is not None})
        if attention == "procrustes_vo":
            mine = [D for D in inner if any(roles[k][ax] == "consumer" for k, ax, _p, d in heads[H] if d == D)]
            if not mine:
                raise MergeError(
                    f"{what}: no value/output head dim of {_block_name(heads[H])} is free to rotate (no "
                    "output projection reads a permutable head dim); use attention='permutation'"
                )
            rotate += mine
            continue
        fixed = ", ".join(sorted({_module(k) for k, _ax, _p, D in heads[H] if D is None}))
        if fixed:
            raise MergeError(
                f"{what}: the head dim of {fixed} is fixed by the model (rotary position embeddings, RoPE, act "
                "on fixed pairs of head dims), so q/k admit no rotation there; use attention='procrustes_vo' "
                "(value/output heads only, which RoPE leaves free) or attention='permutation'"
            )
        rotate += inner
    inner_keys: Dict[str, set] = {}
    owner: Dict[str, str] = {}  # within-head group -> the attention module it belongs to
    for items in heads.values():
        for k, ax, p, D in items:
            if D in rotate:
                inner_keys.setdefault(D, set()).add((k, ax, p))
                owner.setdefault(D, _block_name(items))
    # a within-head group on any tensor outside its head block (a buffer, a non-parameter) is refused
    for key, layouts in spec.axes.items():
        for lay in layouts:
            if lay is None:
                continue
            for g, _path in lay.groups():
                if g in inner_keys and key not in {k for k, _, _ in inner_keys[g]}:
                    raise MergeError(
                        f"{what}: {key!r} also carries the head dims of {owner[g]} (group "
                        f"{g!r}) but is not a weight or bias of the attention projections; rotations would not "
                        "commute with it; use attention='permutation'"
                    )
    keyset = set(keys)
    for D, occ in inner_keys.items():
        for k, _ax, p in occ:
            if k not in keyset:
                continue
            shape = spec.shapes.get(k)
            if shape is not None and len(shape) == 1:  # only biases of a weight on the same dims
                w = k[: -len("bias")] + "weight" if k.endswith("bias") else None
                if w is None or not any(kk == w and pp == p for kk, _a, pp in occ):
                    raise MergeError(
                        f"{what}: {k!r} is a vector on the head dims of {owner[D]} that is not "
                        "the bias of a projection (a per-head scale or norm weight); orthogonal maps do not "
                        "commute with elementwise scaling; use attention='permutation'"
                    )
    return heads, rotate


def heads_info(blocks: Mapping[str, List[Item]], rotate: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """``{D: {"head_group": H, "module": name, "where": [(key, axis, path to the (H x D) node)]}}`` for
    the within-head groups ``rotate`` (default: all) of ``blocks`` (what :class:`RotatedAlignment` needs
    to apply rotations)."""
    out: Dict[str, Dict[str, Any]] = {}
    for H, items in blocks.items():
        for D in sorted({d for *_, d in items if d is not None}):
            if rotate is not None and D not in rotate:
                continue
            out[D] = {
                "head_group": H,
                "module": _block_name(items),
                "where": [(k, ax, list(p)) for k, ax, p, d in items if d == D],
            }
    return out


# ------------------------------------------------------------------------------------------ solving
def _polar(X: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(U V^T, sum of singular values)`` of ``X = U S V^T`` (batched, float64)."""
    U, S, Vh = torch.linalg.svd(X)
    return U @ Vh, S.sum(-1)


def solve_heads(
    spec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    perms: Dict[str, torch.Tensor],
    blocks: Dict[str, List[Item]],
    *,
    rotate: Optional[Sequence[str]] = None,
    rtol: float = 1e-6,
    rematch: bool = True,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, Any]]:
    """Head re-matching and per-head Procrustes for every block (see the module docstring).

    ``rotate`` names the within-head groups that get orthogonal maps (default: all); the others
    (and fixed head dims) keep their permutations and enter the head scores as plain inner products.
    Returns ``(permutations, rotations {D: (n_heads, d, d)}, log per head group)``.
    """
    perms_noH = dict(perms)
    for H in blocks:
        perms_noH[H] = torch.arange(spec.groups[H])
    Bp = permute(dict(state_b), spec, perms_noH)  # every permutation but the heads'
    new_perms = dict(perms)
    rotations: Dict[str, torch.Tensor] = {}
    logs: Dict[str, Any] = {}
    for H, items in blocks.items():
        nH = spec.groups[H]
        X: Dict[str, torch.Tensor] = {}
        dev = state_a[items[0][0]].device
        plain = torch.zeros(nH, nH, dtype=torch.float64, device=dev)  # unrotated terms: <A_i, B_j>
        for k, ax, path, D in items:
            lay = spec.axes[k][ax]
            a = _read_heads(state_a[k].detach().double(), ax, lay, path, nH)
            b = _read_heads(Bp[k].detach().double().to(a.device), ax, lay, path, nH)
            if D is None or (rotate is not None and D not in rotate):
                plain += torch.einsum("iam,jam->ij", a, b)
                continue
            x = torch.einsum("iam,jbm->ijab", a, b)
            X[D] = X[D] + x if D in X else x
        nuc = plain.clone()  # head score: best rotation of every rotated group, the rest as it is
        for x in X.values():
            nuc += torch.linalg.svdvals(x).sum(-1)
        h_old = perms[H].to(dev)
        ar = torch.arange(nH, device=dev)
        h = h_old
        if rematch and nH > 1:
            h_new = linear_assignment(nuc, maximize=True).col_ind.to(device=dev, dtype=torch.long)
            v_old, v_new = float(nuc[ar, h_old].sum()), float(nuc[ar, h_new].sum())
            if v_new > v_old + rtol * max(abs(v_old), 1e-30) and not torch.equal(h_new, h_old):
                h = h_new
        new_perms[H] = h.cpu()
        per_group = {}
        rotated_any = torch.zeros(nH, dtype=torch.bool)
        for D, x in X.items():
            xm = x[ar, h]  # (nH, d, d): A's head i against B's matched head
            R, s = _polar(xm)
            tr = xm.diagonal(dim1=-2, dim2=-1).sum(-1)  # <A_i, B_i> at R = I (the permutation objective)
            gain = s - tr
            scale = torch.maximum(s.abs(), tr.abs()).clamp_min(1e-30)
            keep = gain <= rtol * scale
            eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
            R = torch.where(keep[:, None, None], eye, R)
            rotations[D] = R.cpu()
            rotated_any |= ~keep.cpu()
            per_group[D] = {
                "keys": sorted({k for k, _a, _p, d in items if d == D}),
                "head_dim": int(R.shape[-1]),
                "objective_unrotated": float(tr.sum()),
                "objective_rotated": float(torch.where(keep, tr, s).sum()),
                "gain_per_head": [float(g) for g in torch.where(keep, torch.zeros_like(gain), gain)],
                "rotated_heads": [int(i) for i in torch.nonzero(~keep).view(-1)],
            }
        logs[H] = {
            "module": _block_name(items),
            "n_heads": nH,
            "rematched": not torch.equal(h.cpu(), h_old.cpu()),
            "head_permutation_descent": [int(i) for i in h_old.cpu()],
            "head_permutation": [int(i) for i in h.cpu()],
            "rotated_heads": [int(i) for i in torch.nonzero(rotated_any).view(-1)],
            "groups": per_group,
        }
    return new_perms, rotations, logs


def rotate_state(state: Mapping[str, torch.Tensor], aln: "RotatedAlignment") -> Dict[str, torch.Tensor]:
    """``state`` (already permuted by ``aln.permutations``) with the head rotations applied (float64
    products, each tensor back in its own dtype); tensors without a rotated head dim are returned as is."""
    out = dict(state)
    for D, info in aln.heads.items():
        R = aln.rotations[D]
        if torch.equal(R, torch.eye(R.shape[-1], dtype=R.dtype).expand_as(R)):
            continue
        for k, ax, path in info["where"]:
            if k not in out:
                continue
            t = out[k]
            lay = aln.spec.axes[k][ax]
            out[k] = _rotate_node(t.double(), ax, lay, tuple(path), R.to(t.device)).to(t.dtype)
    return out


# ------------------------------------------------------------------------------------------ checks
def _float_tensors(out: Any) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _float_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _float_tensors(v)]
    return []


def _skeleton(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with empty (meta) parameters and buffers: never touches the user's."""
    memo: Dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    try:
        skel = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 -- exotic modules: a full copy
        skel = copy.deepcopy(model)
    return skel.eval()


def _run(skel: nn.Module, state: Mapping[str, torch.Tensor], x: Any) -> List[torch.Tensor]:
    from torch.func import functional_call

    with torch.no_grad():
        if isinstance(x, Mapping):
            out = functional_call(skel, dict(state), (), dict(x))
        else:
            out = functional_call(skel, dict(state), x if isinstance(x, tuple) else (x,))
    return [t.detach().double() for t in _float_tensors(out)]


def _mismatch(ref: List[torch.Tensor], got: List[torch.Tensor]) -> float:
    """Largest output difference relative to the largest output magnitude."""
    scale = max((float(t.abs().max()) for t in ref if t.numel()), default=0.0)
    diff = max((float((a - b).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
    return diff / max(scale, 1e-12)


def function_check(
    reference: nn.Module,
    state_b: Mapping[str, torch.Tensor],
    aln: "RotatedAlignment",
    example_inputs: Any,
    *,
    tol: float = 1e-4,
) -> Dict[str, Any]:
    """Run B and the permuted + rotated B on ``example_inputs``: the outputs must agree to ``tol``
    (relative to the output scale). On a mismatch each head group is tried alone and the error names
    the attention modules whose rotation changes the function."""
    skel = _skeleton(reference)
    first = next(v for v in state_b.values() if v.is_floating_point())
    # half precision: the rotated weights are rounded to it, so the tolerance follows its epsilon and the
    # check runs in float32 (weights and floating inputs)
    low = first.element_size() < 4
    tol = max(tol, 8 * float(torch.finfo(first.dtype).eps))
    x = _to_device(example_inputs, first.device, torch.float32 if low else None)

    def run(state: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        if low:
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        return _run(skel, state, x)

    ref = run(state_b)
    permuted = permute(dict(state_b), aln.spec, aln.permutations)
    err = _mismatch(ref, run(rotate_state(permuted, aln)))
    if err <= tol:
        return {"checked": True, "relative_error": err, "tol": tol}
    bad = []
    for H in {info["head_group"] for info in aln.heads.values()}:
        only = {D: info for D, info in aln.heads.items() if info["head_group"] == H}
        sub = RotatedAlignment(
            spec=aln.spec,
            permutations=aln.permutations,
            objective=aln.objective,
            rotations={D: aln.rotations[D] for D in only},
            heads=only,
        )
        if _mismatch(ref, run(rotate_state(permuted, sub))) > tol:
            bad.append(next(iter(only.values()))["module"])
    raise MergeError(
        f"attention='procrustes': rotating the heads of {sorted(bad) or 'the attention modules'} changes the "
        f"outputs of model_b (relative error {err:.2e} > {tol:g}); the model computes something from these heads "
        "other than q^T k and W_O v (a per-head norm, RoPE applied outside the traced graph, ...). "
        "Use attention='permutation'"
    )


def _to_device(x: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    if torch.is_tensor(x):
        return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device, dtype) for v in x)
    return x


# ------------------------------------------------------------------------------------------ entry points
def align_heads(ctx: Any, aln: Alignment, attention: str, *, param_names: Optional[Sequence[str]] = None) -> Alignment:
    """``aln`` (weight matching of ``ctx.states[1]`` onto ``ctx.states[0]``) extended by head
    re-matching and per-head orthogonal Procrustes (``attention="procrustes"``)."""
    check_attention(attention)
    if attention == "permutation":
        return aln
    t0 = time.perf_counter()
    spec, sa, sb = ctx.spec, ctx.states[0], ctx.states[1]
    keys = core.matched_keys(spec, sa, param_names)
    roles = None
    if attention == "procrustes_vo":
        if ctx.reference is None:
            raise MergeError(
                "attention='procrustes_vo' tells value/output heads from query/key heads by the layer types: "
                "pass model_a or model_b as an nn.Module (state dicts alone do not say which axis is an input)"
            )
        roles = axis_roles(spec, ctx.reference)
    blocks, rotate = attention_blocks(spec, keys, attention, roles)
    perms, rotations, logs = solve_heads(spec, sa, sb, aln.permutations, blocks, rotate=rotate)
    out = RotatedAlignment(
        spec=spec,
        permutations=perms,
        objective=float("nan"),
        settings={**aln.settings, "attention": attention},
        rotations=rotations,
        heads=heads_info(blocks, rotate),
    )
    # objectives in float64 over the matched keys: permutation-only (the descent's) and rotated
    b_perm = permute(dict(sb), spec, aln.permutations)
    b_rot = out.apply(sb)
    obj_perm = sum(float((sa[k].double() * b_perm[k].double()).sum()) for k in keys)
    obj_rot = sum(float((sa[k].double() * b_rot[k].double()).sum()) for k in keys)
    check: Dict[str, Any] = {"checked": False, "reason": "no module or no example inputs (pass example_inputs=)"}
    x = getattr(ctx, "example_inputs", None)
    if x is None and getattr(ctx, "data", None) is not None:
        from weightspace.utils import iter_batches

        x = next(iter(iter_batches(ctx.data)))[0]
        if torch.is_tensor(x) and x.dim() > 0:
            x = x[:8]
    if ctx.reference is not None and x is not None:
        check = function_check(ctx.reference, sb, out, x)
    else:
        log.warning("attention='procrustes': the function of the rotated model was not checked (%s)", check["reason"])
    n_rot = sum(len(v["rotated_heads"]) for v in logs.values())
    log.info(
        "procrustes: %d head groups, %d heads rotated, objective %.6g -> %.6g", len(blocks), n_rot, obj_perm, obj_rot
    )
    plog = {
        "objective_permutation": obj_perm,
        "objective": obj_rot,
        "heads_rotated": n_rot,
        "heads_rematched": [H for H, v in logs.items() if v["rematched"]],
        "blocks": logs,
        "function_check": check,
        "seconds": time.perf_counter() - t0,
    }
    return dataclasses.replace(out, objective=obj_rot, log={**aln.log, "procrustes": plog})


def merge_log(aln: Alignment) -> Dict[str, Any]:
    """The summary a merge records: objective before/after and the rotated heads per attention module."""
    p = aln.log.get("procrustes") if isinstance(aln.log, Mapping) else None
    if not p:
        return {}
    return {
        "attention": aln.settings.get("attention", "procrustes"),
        "objective_permutation": p["objective_permutation"],
        "objective_procrustes": p["objective"],
        "rotated_heads": {v["module"]: v["rotated_heads"] for v in p["blocks"].values()},
        "rematched_heads": p["heads_rematched"],
    }
