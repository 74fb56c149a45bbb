"""ZipIt!'s feature matching: the greedy zip with alpha/beta, and its merge/unmerge matrices.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman 2024, "ZipIt! Merging Models from Different Tasks
without Training", ICLR, arXiv:2305.03053.

The features of ``N`` models at one group (``d`` each) are stacked into ``O = N d`` features with
correlation ``C`` (``O x O``). Zipping reduces them to ``d`` merged features:

1. ``sims = C`` with ``-inf`` on the diagonal. Each model ``m`` may spend
   ``floor(((O - d) // N) * beta)`` *within-model* merges; a model whose budget is spent (or zero)
   has its own block of ``sims`` set to ``-inf``.
2. While more than ``d`` features remain: take the most similar pair ``(r, c)``, ``r < c``; the merged
   feature keeps ``r``'s slot (and its model of origin for the budget); its similarity to every other
   feature ``j`` becomes ``alpha * min(sims[r, j], sims[c, j])`` (``alpha <= 0``: it cannot merge
   again).
3. The membership matrix ``P`` (``O x d``, 0/1) gives the **merge** ``M = (P / colsum)^T`` -- each
   merged feature is the (weighted) average of its members -- and the **unmerge** ``U = P``: every
   original feature reads its merged feature.

``beta = 0`` allows only cross-model merges, so for two models the zip is a bipartite matching and
ZipIt! "reduces to permute": with ``matcher="auto"`` it is then solved exactly as a linear assignment
on ``C[:d, d:]`` (the greedy pass only approximates that optimum); ``matcher="greedy"`` forces the
greedy pass.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = ["ZipMatch", "zip_features", "zipit_correlation"]


@dataclass(frozen=True)
class ZipMatch:
    """One group's zip: ``merge`` (d, O), ``unmerge`` (O, d), ``members`` per merged feature,
    ``within`` (within-model merges per model), ``solver`` ("lap" or "greedy")."""

    merge: torch.Tensor
    unmerge: torch.Tensor
    members: List[List[int]]
    within: List[int]
    solver: str

    def split(self, sizes: Sequence[int]):
        """Per-model ``(M_k (d, d_k), U_k (d_k, d))`` blocks."""
        out, off = [], 0
        for n in sizes:
            out.append((self.merge[:, off:off + n], self.unmerge[off:off + n, :]))
            off += n
        return out


def zipit_correlation(cov: torch.Tensor, floor: float = 1e-7) -> torch.Tensor:
    """ZipIt!'s correlation ``cov / clamp(sqrt(diag) sqrt(diag)^T, floor)`` (dead units give 0)."""
    std = torch.diagonal(cov).clamp_min(0).sqrt()
    return cov / torch.outer(std, std).clamp_min(floor)


def _matrices(members: List[List[int]], O: int, origin_model: torch.Tensor, weights: torch.Tensor):
    d = len(members)
    P = torch.zeros(O, d, dtype=torch.float64)
    Mw = torch.zeros(d, O, dtype=torch.float64)
    for j, mem in enumerate(members):
        idx = torch.tensor(mem)
        P[idx, j] = 1.0
        w = weights[origin_model[idx]]
        Mw[j, idx] = w / w.sum()
    return Mw, P


def zip_features(corr: torch.Tensor, n_models: int, *, alpha: float = 0.5, beta: float = 0.5,
                 weights: Optional[Sequence[float]] = None, matcher: str = "auto") -> ZipMatch:
    """Zip ``N`` models' stacked features (``corr``: ``(N d, N d)``) down to ``d`` merged features.

    ``weights`` (one per model, default uniform) weight each member in its merged feature's average;
    ``matcher``: ``"auto"`` (exact LAP when ``beta == 0`` and two models, else greedy), ``"greedy"``,
    or ``"lap"`` (requires ``beta == 0`` and two models).
    """
    C = torch.as_tensor(corr, dtype=torch.float64).detach().cpu()
    O = C.shape[0]
    N = int(n_models)
    if C.dim() != 2 or C.shape[1] != O or N < 1 or O % N:
        raise ValueError(f"corr must be square (N d, N d) with N={N} equal blocks, got {tuple(C.shape)}")
    if not bool(torch.isfinite(C).all()):
        raise ValueError("the feature correlation holds NaN or inf; check the data and the models")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if matcher not in ("auto", "greedy", "lap"):
        raise ValueError(f"matcher must be 'auto', 'greedy' or 'lap', got {matcher!r}")
    d = O // N
    w = torch.ones(N, dtype=torch.float64) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != N or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {N} non-negative numbers with a positive sum, got {list(w.tolist())}")
    origin_model = torch.arange(O) // d
    use_lap = matcher == "lap" or (matcher == "auto" and float(beta) == 0.0 and N == 2)
    if use_lap:
        if N != 2 or float(beta) != 0.0:
            raise ValueError("matcher='lap' is the beta = 0 case of two models (ZipIt! reduces to permute)")
        from merging.solvers import linear_assignment

        res = linear_assignment(C[:d, d:], maximize=True)
        cols = torch.as_tensor(res.col_ind).long()
        rows = torch.as_tensor(res.row_ind).long()
        members = [[int(r), d + int(c)] for r, c in zip(rows, cols)]
        M, P = _matrices(members, O, origin_model, w)
        return ZipMatch(M, P, members, [0] * N, "lap")

    budget = [int(((O - d) // N) * float(beta)) for _ in range(N)]
    within = [0] * N
    sims = C.clone()
    sims.fill_diagonal_(float("-inf"))
    origin = origin_model.clone()  # model whose budget a feature's within-model merges spend
    alive = torch.ones(O, dtype=torch.bool)
    members: List[List[int]] = [[i] for i in range(O)]
    ninf = float("-inf")

    def block(m: int) -> None:
        idx = torch.nonzero(alive & (origin == m)).flatten()
        sims[idx.unsqueeze(1), idx.unsqueeze(0)] = ninf

    for m in range(N):
        if budget[m] <= 0:
            block(m)
    upper = torch.ones(O, O, dtype=torch.bool).triu(1)
    sims[~upper] = ninf  # keep r < c only; updates below write the upper triangle
    remaining = O
    while remaining > d:
        flat = int(torch.argmax(sims))
        r, c = divmod(flat, O)
        if sims[r, c] == ninf:
            raise RuntimeError(f"ZipIt!: no admissible pair left with {remaining} features for a target of {d}; "
                               "raise beta (within-model merges) or check the correlation")
        same = int(origin[r]) == int(origin[c])
        members[r] = members[r] + members[c]
        members[c] = []
        alive[c] = False
        # similarities of the merged feature (slot r) to every other feature, kept in the upper triangle
        # symmetric rows (each pair lives in one triangle, the other entry is -inf)
        full_r = torch.maximum(sims[r], sims[:, r])
        full_c = torch.maximum(sims[c], sims[:, c])
        if float(alpha) > 0:
            new = float(alpha) * torch.minimum(full_r, full_c)
        else:
            new = torch.full((O,), ninf, dtype=torch.float64)
        new[~alive] = ninf
        new[r] = ninf
        sims[c, :] = ninf
        sims[:, c] = ninf
        sims[r, r + 1:] = new[r + 1:]
        sims[:r, r] = new[:r]
        remaining -= 1
        if same:
            m = int(origin[r])
            within[m] += 1
            budget[m] -= 1
            if budget[m] <= 0:
                block(m)
    kept = [mem for mem in members if mem]
    M, P = _matrices(kept, O, origin_model, w)
    return ZipMatch(M, P, kept, within, "greedy")
