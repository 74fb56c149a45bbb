"""Weight-matching engine: per-(key, axis) matrices, cost assembly, dirty tracking, batched LAPs.

Private to ``merging`` (used by :mod:`merging.weight_matching`, :mod:`merging.merge_many` and the
benchmarks). See :func:`merging.weight_matching.weight_matching` for the algorithm and its guarantees.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from merging.solvers import linear_assignment

log = logging.getLogger(__name__)

Perms = Dict[str, torch.Tensor]
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def isolate(t: torch.Tensor, ax: int, layout, path: Tuple[int, ...]) -> torch.Tensor:
    """The ``(n, m)`` matrix of ``t`` whose rows are the units of the group leaf at ``path`` of axis ``ax``.

    A product axis ``(a x b x ...)`` is reshaped row-major (part 0 most significant) and the leaf's
    sub-axis isolated; a concat axis ``(q | k | v)`` is narrowed to the leaf's block. Every other
    axis and sub-axis is flattened into the columns, in a fixed order (so two tensors of the same
    layout give matrices whose columns correspond).
    """
    t = t.movedim(ax, 0)
    size = t.shape[0]
    t = t.reshape(1, size, 1, -1)
    lay = layout
    for i in path:
        if lay.kind == "concat":
            off = sum(p.size for p in lay.parts[:i])
            t = t[:, off : off + lay.parts[i].size]
        elif lay.kind == "product":
            sizes = [p.size for p in lay.parts]
            a, b = math.prod(sizes[:i]), math.prod(sizes[i + 1 :])
            pre, _, post, r = t.shape
            t = t.reshape(pre * a, sizes[i], b * post, r)
        else:  # pragma: no cover - a path only goes through structured layouts
            raise ValueError(f"path {path} goes through a {lay.kind} layout")
        lay = lay.parts[i]
    return t.movedim(1, 0).reshape(t.shape[1], -1)


def permute_axes(t: torch.Tensor, layouts, perms: Perms, skip=None) -> torch.Tensor:
    """``t`` with every axis gathered by its layout under ``perms``; on axis ``skip[0]`` the group(s)
    ``skip[1]`` (a name or a collection of names) are held at the identity (other sub-axes still move).
    Axes whose gather is the identity are not copied (``t`` itself comes back when none moves)."""
    out = t
    for ax, lay in enumerate(layouts):
        if lay is None:
            continue
        if skip is not None and ax == skip[0]:
            p = dict(perms)
            for g in [skip[1]] if isinstance(skip[1], str) else skip[1]:
                p[g] = torch.arange(perms[g].numel(), device=perms[g].device)
            idx = lay.index(p, device=t.device)
        else:
            idx = lay.index(perms, device=t.device)
        if torch.equal(idx, torch.arange(idx.numel(), device=idx.device)):
            continue  # identity on this axis: no copy (a descent starts at the identity)
        out = out.index_select(ax, idx)
    return out


@dataclass
class Occ:
    """One place where a group acts: ``(key, axis, path)`` with A's isolated matrix."""

    key: str
    ax: int
    path: Tuple[int, ...]
    A: torch.Tensor
    deps: Tuple[str, ...]  # groups whose permutation changes this occurrence's B matrix
    cache: Optional[torch.Tensor] = None  # last A @ B^T
    cache_versions: Optional[Tuple[int, ...]] = None
    B_last: Optional[torch.Tensor] = None  # B's matrix behind ``cache`` (general path)
    n_updates: int = 0  # low-rank updates since the last full product
    Bm0: Optional[torch.Tensor] = None  # simple own axis: B's unpermuted matrix; columns gathered by ``col_last``
    col_last: Optional[torch.Tensor] = None
    parts: Tuple[Tuple[str, int], ...] = ()  # simple occurrences fused into this one: (key, axis), column blocks


@dataclass
class Problem:
    """Weight matching of B onto A over a spec, with cached per-occurrence costs."""

    spec: object
    A: Dict[str, torch.Tensor]
    B: Dict[str, torch.Tensor]
    occs: Dict[str, List[Occ]]
    neighbours: Dict[str, Tuple[str, ...]]
    self_coupled: Tuple[str, ...]
    keys_of: Dict[str, Tuple[str, ...]]
    dtype: torch.dtype
    device: torch.device
    versions: Dict[str, int] = field(default_factory=dict)
    heads: Dict[str, List[Tuple[str, int, Tuple[int, ...], Optional[str]]]] = field(default_factory=dict)
    refresh: int = 8


def matched_keys(spec, state: Mapping[str, torch.Tensor], param_names: Optional[Sequence[str]] = None) -> List[str]:
    """Permuted floating-point keys entering the objective: parameters only (BatchNorm running statistics
    and other buffers are not weights; they follow the permutation but do not vote)."""
    names = set(param_names) if param_names is not None else None
    out = []
    for k in spec.permuted_keys():
        v = state.get(k)
        if v is None or not v.is_floating_point():
            continue
        if names is not None and k not in names:
            continue
        if names is None and k.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
            continue
        out.append(k)
    return out


def build_problem(spec, state_a, state_b, *, keys: Sequence[str], dtype=torch.float32, device=None) -> Problem:
    if getattr(state_a, "weightspace_lazy", False):  # safetensors streaming: matrices read from disk when used
        from ._stream_align import lazy_problem

        return lazy_problem(spec, state_a, state_b, keys=keys, dtype=dtype, device=device)
    device = torch.device(device) if device is not None else next(iter(state_a.values())).device
    A = {k: state_a[k].detach().to(device=device, dtype=dtype) for k in keys}
    B = {k: state_b[k].detach().to(device=device, dtype=dtype) for k in keys}
    occs: Dict[str, List[Occ]] = {g: [] for g in spec.groups}
    keys_of: Dict[str, set] = {g: set() for g in spec.groups}
    groups_in_key: Dict[str, List[str]] = {}
    axes_of: Dict[Tuple[str, str], set] = {}  # (key, group) -> the axes the group acts on
    for k in keys:
        gs = []
        for ax, lay in enumerate(spec.axes[k]):
            if lay is not None:
                for name, _ in lay.groups():
                    gs.append(name)
                    axes_of.setdefault((k, name), set()).add(ax)
        groups_in_key[k] = gs
    # a group acting on two axes of one tensor (recurrent W_hh) makes its cost depend on itself; several
    # blocks of one concatenated axis (packed q|k|v) do not: each occurrence sees only its own block
    self_coupled = {g for (k, g), axs in axes_of.items() if len(axs) > 1}
    for k in keys:
        for ax, lay in enumerate(spec.axes[k]):
            if lay is None:
                continue
            for g, path in lay.groups():
                others = [h for h in groups_in_key[k] if h != g]
                if len(axes_of[(k, g)]) > 1:
                    others = groups_in_key[k]
                occ = Occ(k, ax, path, isolate(A[k], ax, lay, path).contiguous(), tuple(sorted(set(others))))
                if not path:
                    occ.Bm0 = isolate(B[k], ax, lay, path).contiguous()
                occs[g].append(occ)
                keys_of[g].add(k)
    for g in spec.groups:  # one matrix per dependency set: [W | b | ...] side by side, one product instead of several
        simple: Dict[Tuple[str, ...], List[Occ]] = {}
        rest = []
        for occ in occs[g]:
            if occ.Bm0 is not None:
                simple.setdefault(occ.deps, []).append(occ)
            else:
                rest.append(occ)
        fused = []
        for deps, lst in simple.items():
            if len(lst) == 1:
                f = lst[0]
            else:
                f = Occ(lst[0].key, lst[0].ax, (), torch.cat([o.A for o in lst], 1), deps)
                f.Bm0 = torch.cat([o.Bm0 for o in lst], 1)
            f.parts = tuple((o.key, o.ax) for o in lst)
            fused.append(f)
        occs[g] = fused + rest
    neighbours = {}
    for g in spec.groups:
        nb = set()
        for k in keys_of[g]:
            nb.update(groups_in_key[k])
        if g not in self_coupled:
            nb.discard(g)
        neighbours[g] = tuple(sorted(nb))
    return Problem(
        spec=spec,
        A=A,
        B=B,
        occs=occs,
        neighbours=neighbours,
        self_coupled=tuple(sorted(self_coupled)),
        keys_of={g: tuple(sorted(v)) for g, v in keys_of.items()},
        dtype=dtype,
        device=device,
        versions={g: 0 for g in spec.groups},
        heads=find_heads(spec, keys, self_coupled),
    )


def find_heads(spec, keys: Sequence[str], self_coupled=()) -> Dict[str, list]:
    """Head groups: groups ``H`` acting only as part 0 of two-part products ``(H x D)`` (attention heads x
    head dim), whose inner groups ``D`` act nowhere else. ``{H: [(key, axis, path to the product, D or
    None for a fixed head dim)]}``; these are matched as blocks (:func:`head_block_step`)."""
    where: Dict[str, list] = {}
    for k in keys:
        for ax, lay in enumerate(spec.axes[k]):
            if lay is not None:
                for g, path in lay.groups():
                    where.setdefault(g, []).append((k, ax, path, lay))
    heads = {}
    for H, occs in where.items():
        items, ok = [], H not in self_coupled
        for k, ax, path, lay in occs:
            if not ok or not path or path[-1] != 0:
                ok = False
                break
            node = lay
            for i in path[:-1]:
                node = node.parts[i]
            if node.kind != "product" or len(node.parts) != 2 or node.parts[1].kind not in ("group", "fixed"):
                ok = False
                break
            items.append((k, ax, tuple(path[:-1]), node.parts[1].name if node.parts[1].kind == "group" else None))
        inner = {d for *_, d in items if d is not None}
        if not ok or not items or H in inner:
            continue
        if any(d in self_coupled or len(where[d]) != sum(1 for *_, x in items if x == d) for d in inner):
            continue
        heads[H] = items
    return heads


def head_block_step(prob: Problem, H: str, perms: Perms, method: str = "auto"):
    """Block matching of head group ``H`` with its inner head-dim groups, all else fixed.

    ``T_D[i, j, a, b] = sum <A[head i, unit a], B[head j, unit b]>`` per inner group ``D``; heads are
    matched on ``V[i, j] = sum_D max_sigma sum_a T_D[i, j, a, sigma(a)]`` (the hierarchical
    assignment: every head pair with its best inner matching), then each ``D`` is re-solved on the
    matched heads. Returns ``(gain, {group: new perm})``; exact for the terms involving ``H`` and its
    inner groups (no other term depends on them).
    """
    nH = prob.spec.groups[H]
    T: Dict[str, torch.Tensor] = {}
    V_fixed = torch.zeros(nH, nH, dtype=torch.float64, device=prob.device)
    for k, ax, npath, D in prob.heads[H]:
        lay = prob.spec.axes[k]
        skip = (ax, (H,) if D is None else (H, D))
        Bp = permute_axes(prob.B[k], lay, perms, skip=skip)
        a = isolate(prob.A[k], ax, lay[ax], npath)
        b = isolate(Bp, ax, lay[ax], npath)
        d = a.shape[0] // nH
        a, b = a.reshape(nH, d, -1), b.reshape(nH, d, -1)
        if D is None:
            V_fixed += torch.einsum("iam,jam->ij", a, b).double()
        else:
            t = torch.einsum("iam,jbm->ijab", a, b).double()
            T[D] = T[D] + t if D in T else t
    V = V_fixed.clone()
    for _D, t in T.items():
        d = t.shape[-1]
        res = linear_assignment(t.reshape(nH * nH, d, d), maximize=True, method=method)
        V += torch.as_tensor(res.objective, dtype=torch.float64, device=V.device).reshape(nH, nH)
    h = linear_assignment(V, maximize=True, method=method).col_ind.to(torch.long)
    new = {H: h}
    for D, t in T.items():
        new[D] = linear_assignment(
            t[torch.arange(nH, device=t.device), h.to(t.device)].sum(0), maximize=True, method=method
        ).col_ind.to(torch.long)

    def joint(p: Perms) -> float:
        hh = p[H].to(V.device)
        tot = float(V_fixed[torch.arange(nH, device=V.device), hh].sum())
        for D, t in T.items():
            blk = t[torch.arange(nH, device=t.device), hh].sum(0)
            tot += float(blk.gather(1, p[D].to(t.device).view(-1, 1)).sum())
        return tot

    old = joint(perms)
    cand = dict(perms)
    cand.update({g: v.to(perms[g].device) for g, v in new.items()})
    nv = joint(cand)
    return nv - old, max(abs(old), abs(nv)), {g: cand[g] for g in new}


def group_cost(prob: Problem, g: str, perms: Perms, use_cache: bool = True) -> torch.Tensor:
    """``C_g = sum_(key, axis) mat(W_A) mat(pi_not_g(W_B))^T`` (n, n), cached per occurrence.

    A cached term is reused while the groups it depends on keep their versions; when they changed,
    B's matrix is gathered again and, if only a few of its columns moved (a neighbour swapped a few
    units), the term is updated with a low-rank correction ``A[:, S] (B_new[:, S] - B_old[:, S])^T``
    instead of the full product (recomputed in full every ``prob.refresh`` updates against drift).
    """
    terms = []
    for occ in prob.occs[g]:
        ver = tuple(prob.versions[h] for h in occ.deps)
        if use_cache and occ.cache is not None and occ.cache_versions == ver:
            c = occ.cache
        elif occ.Bm0 is not None:
            c = _simple_term(prob, occ, perms, use_cache)
        else:
            c = _general_term(prob, occ, g, perms, use_cache)
        if use_cache:
            occ.cache, occ.cache_versions = c, ver
        terms.append(c)
    if not terms:
        n = prob.spec.groups[g]
        return torch.zeros(n, n, dtype=prob.dtype, device=prob.device)
    C = terms[0] + terms[1] if len(terms) > 1 else terms[0]
    for c in terms[2:]:
        C += c
    return C


def column_index(prob: Problem, occ: Occ, perms: Perms) -> torch.Tensor:
    """Columns of ``occ.Bm0`` that form B's matrix under ``perms`` (every axis but the occurrence's own):
    per fused tensor, the row-major ravel of its other axes' gather indices, offset by its column block."""
    cols, off = [], 0
    for key, ax in occ.parts:
        layouts = prob.spec.axes[key]
        shape = prob.B[key].shape
        col = torch.zeros((), dtype=torch.long, device=prob.device)
        for d, lay in enumerate(layouts):
            if d == ax:
                continue
            idx = (
                lay.index(perms, device=prob.device) if lay is not None else torch.arange(shape[d], device=prob.device)
            )
            col = (col.unsqueeze(-1) * shape[d] + idx).reshape(-1)
        col = col.reshape(-1)
        cols.append(col + off)
        off += col.numel()
    return cols[0] if len(cols) == 1 else torch.cat(cols)


def _simple_term(prob: Problem, occ: Occ, perms: Perms, use_cache: bool) -> torch.Tensor:
    """``A B^T`` for an occurrence on a simple axis: full product, or a low-rank update on moved columns."""
    col = column_index(prob, occ, perms)
    if use_cache and occ.cache is not None and occ.col_last is not None and occ.n_updates < prob.refresh:
        moved = (col != occ.col_last).nonzero().view(-1)
        if moved.numel() * 3 < col.numel():
            delta = occ.Bm0.index_select(1, col[moved]) - occ.Bm0.index_select(1, occ.col_last[moved])
            c = occ.cache + occ.A.index_select(1, moved) @ delta.T
            occ.n_updates += 1
            occ.col_last = col
            return c
    c = occ.A @ occ.Bm0.index_select(1, col).T
    occ.n_updates = 0
    if use_cache:
        occ.col_last = col
    return c


def _general_term(prob: Problem, occ: Occ, g: str, perms: Perms, use_cache: bool) -> torch.Tensor:
    """``A B^T`` for an occurrence inside a structured axis (gather, isolate, product)."""
    lay = prob.spec.axes[occ.key]
    Bp = permute_axes(prob.B[occ.key], lay, perms, skip=(occ.ax, g))
    Bm = isolate(Bp, occ.ax, lay[occ.ax], occ.path)
    if use_cache and occ.cache is not None and occ.B_last is not None and occ.n_updates < prob.refresh:
        moved = (Bm != occ.B_last).any(0).nonzero().view(-1)
        if moved.numel() * 3 < Bm.shape[1]:
            c = (
                occ.cache
                + occ.A.index_select(1, moved) @ (Bm.index_select(1, moved) - occ.B_last.index_select(1, moved)).T
            )
            occ.n_updates += 1
            occ.B_last = Bm
            return c
    occ.n_updates = 0
    if use_cache:
        occ.B_last = Bm
    return occ.A @ Bm.T


def objective(prob: Problem, perms: Perms, keys: Optional[Sequence[str]] = None) -> float:
    """``sum_k <A_k, pi(B_k)>`` in float64 over the matched keys (or ``keys``)."""
    tot = 0.0
    for k in prob.A if keys is None else keys:
        Bp = permute_axes(prob.B[k], prob.spec.axes[k], perms)
        tot += float((prob.A[k] * Bp).sum(dtype=torch.float64))  # products in the cost dtype, float64 sums
    return tot


def _classes(color: Dict[str, int], order: Sequence[str]) -> List[List[str]]:
    """The groups of each colour, colours in increasing order, groups in ``order``."""
    classes: Dict[int, List[str]] = {}
    for g in order:
        classes.setdefault(color[g], []).append(g)
    return [classes[c] for c in sorted(classes)]


def color_classes(prob: Problem, order: Sequence[str]) -> List[List[str]]:
    """Greedy colouring of the group graph (edge = the groups share a tensor): groups of one class are
    independent, so their assignments can be solved in one batch."""
    color: Dict[str, int] = {}
    for g in order:
        used = {color[h] for h in prob.neighbours[g] if h in color and h != g}
        c = 0
        while c in used:
            c += 1
        color[g] = c
    return _classes(color, order)


def color_classes_dsatur(prob: Problem, order: Sequence[str]) -> List[List[str]]:
    """DSatur colouring (Brelaz 1979) of the group graph, ties broken by ``order``: never more colours than
    :func:`color_classes` on chains and trees (a chain gets 2), so batches are larger."""
    rank = {g: i for i, g in enumerate(order)}
    color: Dict[str, int] = {}
    nbrs = {g: [h for h in prob.neighbours[g] if h != g] for g in order}
    while len(color) < len(order):
        g = max(
            (g for g in order if g not in color),
            key=lambda g: (len({color[h] for h in nbrs[g] if h in color}), len(nbrs[g]), -rank[g]),
        )
        used = {color[h] for h in nbrs[g] if h in color}
        c = 0
        while c in used:
            c += 1
        color[g] = c
    return _classes(color, order)


def _local_np(M: np.ndarray, p: np.ndarray, k: int):
    """One :func:`local_step` on the NumPy matrix ``M``; returns ``(perm, gain, |S|)``."""
    n = M.shape[0]
    ar = np.arange(n)
    inv = np.empty_like(p)
    inv[p] = ar
    diag = M[ar, p]
    rarg = M.argmax(1)
    rgap = M[ar, rarg] - diag  # >= 0: how far row i is below its best column
    cgap = M.max(0) - diag[inv]  # >= 0: how far column j's current row is below column j's best row
    if k < n:
        rtop = np.argpartition(-rgap, k - 1)[:k]
        ctop = np.argpartition(-cgap, k - 1)[:k]
    else:
        rtop = ctop = ar
    # best rows of the chosen columns only: a column argmax over all of M is a slow strided scan
    carg = np.ascontiguousarray(M[:, ctop].T).argmax(1)
    S = np.unique(np.concatenate([rtop, inv[rarg[rtop]], inv[ctop], carg]))
    cols = p[S]
    sub = M[np.ix_(S, cols)].astype(np.float64)
    res = linear_assignment(sub, maximize=True, workers=1)  # NumPy in: SciPy, no torch round trip
    gain = float(res.objective) - float(sub.trace())
    new = p.copy()
    new[S] = cols[res.col_ind]
    return new, gain, int(S.size)


def local_step(C: torch.Tensor, perm: torch.Tensor, k: int):
    """Best re-assignment of a subset ``S`` of rows among their own current columns (maximisation).

    ``S`` = the ``k`` rows whose current value ``C[i, perm[i]]`` is furthest below their row maximum, the
    ``k`` columns furthest below their column maximum (through their current rows), and the rows holding
    the columns these prefer. The LAP on ``C[S, perm[S]]`` (size ``|S|``, usually far below ``n``) is
    solved exactly, so the step is the optimum over all permutations that agree with ``perm`` outside
    ``S``: its gain is ``>= 0`` and ``perm`` itself is feasible. It is *not* a full coordinate step (a
    better assignment may move rows outside ``S``), so the descent certifies every group with a full LAP
    before it stops. Returns ``(new perm, gain in float64, |S|)``.
    """
    M = C.detach().cpu().numpy()
    new, gain, size = _local_np(M, perm.cpu().numpy(), min(int(k), M.shape[0]))
    return torch.from_numpy(new).to(perm.device), gain, size


def local_descent(C: torch.Tensor, perm: torch.Tensor, k: int, rtol: float, max_steps: int = 64):
    """:func:`local_step` repeated on one cost until a step gains at most ``rtol * |value|`` (every accepted
    step gains more, so the value increases strictly). Returns ``(perm, total gain, steps)``."""
    M = C.detach().cpu().numpy()
    p = perm.cpu().numpy()
    k = min(int(k), M.shape[0])
    val = float(M[np.arange(M.shape[0]), p].sum(dtype=np.float64))
    total, steps = 0.0, 0
    while steps < max_steps:
        new, gain, _ = _local_np(M, p, k)
        steps += 1
        if gain <= rtol * max(abs(val), abs(val + gain), 1e-30) or np.array_equal(new, p):
            break
        p, val, total = new, val + gain, total + gain
    return torch.from_numpy(p).to(perm.device), total, steps


def local_batch(
    costs: Dict[str, torch.Tensor], perms: Perms, k: Dict[str, int], rtol: float, max_steps: int = 1, workers=None
):
    """:func:`local_descent` (``max_steps`` local steps at most) for independent groups, on solver threads
    (SciPy and NumPy release the GIL)."""
    from merging.solvers._threads import run_batch

    names = list(costs)
    out: Dict[str, tuple] = {}

    def one(b: int) -> None:
        g = names[b]
        out[g] = local_descent(costs[g], perms[g], k[g], rtol, max_steps)

    entries = max((c.numel() for c in costs.values()), default=0)
    run_batch(one, len(names), entries, workers)
    return out


def solve_batch(costs: Dict[str, torch.Tensor], method: str = "auto", workers=None) -> Dict[str, torch.Tensor]:
    """Maximising LAP of every cost, same-size problems stacked into one batched call."""
    by_size: Dict[int, List[str]] = {}
    for g, C in costs.items():
        by_size.setdefault(C.shape[0], []).append(g)
    out = {}
    for _n, gs in by_size.items():
        first = costs[gs[0]]
        stack = torch.empty((len(gs),) + tuple(first.shape), dtype=torch.float64, device=first.device)
        for i, g in enumerate(gs):  # one float64 copy per cost (no float32 stack first)
            stack[i].copy_(costs[g])
        res = linear_assignment(stack, maximize=True, method=method, workers=workers)
        cols = res.col_ind
        for i, g in enumerate(gs):
            out[g] = cols[i].to(torch.long)
    return out


def value(C: torch.Tensor, perm: torch.Tensor) -> float:
    """``sum_i C[i, perm[i]]`` accumulated in float64."""
    return float(C.gather(1, perm.to(C.device).view(-1, 1)).double().sum())
