"""Batched exact linear assignment in torch: epsilon-scaling auction plus a dual certificate.

Algorithm (Bertsekas 1988, "The auction algorithm: a distributed relaxation method for the
assignment problem", Ann. Oper. Res. 14; epsilon scaling: Bertsekas & Castanon 1991):

* costs ``C`` (B, n, n), minimisation; each problem is shifted and scaled to ``[0, 1]`` for the
  auction (this changes no optimal assignment);
* column prices ``p``; an unassigned row ``i`` bids for ``j1 = argmin_j C_ij + p_j`` and raises
  ``p_j1`` by ``w2 - w1 + eps`` (``w1, w2`` its best and second-best values); every column takes the
  highest bid (Jacobi auction: all unassigned rows of all problems bid in one vectorised round);
* on termination every row is ``eps``-happy (``eps``-complementary slackness), so the assignment is
  within ``n * eps`` of optimal; ``eps`` is divided by ``theta`` per phase, keeping the rows that stay
  ``eps``-happy;
* ties are broken by a random jitter below ``eps / 4`` in the bidders' choice (``generator``), which
  prevents price wars among identical rows (tied costs, dummy rows of rectangular problems).

Certificate (what makes the result exact): for the final permutation ``sigma`` the prices are
tightened by Bellman-Ford sweeps ``p_sigma(i) <- min_j (C_ij + p_j) - C_i,sigma(i)`` on the original
float64 costs. A problem is *certified* when a sweep changes no price by more than a round-off
tolerance ``tol_i = 64 * eps_mach * (|C_ij*| + |C_i,sigma(i)| + |p_j*| + |p_sigma(i)|)``; then
``(u, v) = (min_j C_ij + p_j, -p)`` is dual feasible up to ``tol`` and complementary slack with
``sigma``, so ``cost(sigma) <= OPT + sum_i tol_i`` (float64 round-off of the dual arithmetic; the
same order as SciPy's own). If ``sigma`` is not optimal there is a negative cycle and the sweeps never
settle, so a suboptimal answer is never certified. Uncertified problems are reported to the caller,
which solves them with SciPy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

_EPS64 = float(torch.finfo(torch.float64).eps)


@dataclass(frozen=True)
class AuctionStats:
    """Work done by :func:`auction_square` (for logs and benchmarks)."""

    phases: int
    rounds: int
    cert_sweeps: int
    n_certified: int
    n_problems: int


def _bid_rounds(Cn: torch.Tensor, prices: torch.Tensor, row2col: torch.Tensor, col2row: torch.Tensor,
                eps: float, live: torch.Tensor, gen: Optional[torch.Generator], max_rounds: int) -> int:
    """Run Jacobi auction rounds in place until every row of the live problems is assigned."""
    B, n, _ = Cn.shape
    flat_c = Cn.view(B * n, n)
    flat_p = prices.view(-1)
    r2c, c2r = row2col.view(-1), col2row.view(-1)
    dev = Cn.device
    rounds = 0
    while rounds < max_rounds:
        idx = ((row2col < 0) & live[:, None]).view(-1).nonzero().squeeze(1)
        k = idx.numel()
        if k == 0:
            break
        rounds += 1
        b = torch.div(idx, n, rounding_mode="floor")
        vals = flat_c.index_select(0, idx) + prices.index_select(0, b)
        jit = torch.rand(vals.shape, generator=gen, dtype=vals.dtype, device=gen.device).to(dev)
        w, j = torch.topk(vals + jit * (0.25 * eps), 2, dim=1, largest=False)
        j1 = j[:, 0]
        gcol = b * n + j1
        bid = flat_p.index_select(0, gcol) + (w[:, 1] - w[:, 0]) + eps
        colmax = torch.full((B * n,), -math.inf, dtype=bid.dtype, device=dev)
        colmax.scatter_reduce_(0, gcol, bid, reduce="amax")
        win = bid >= colmax.index_select(0, gcol)
        wrow = torch.full((B * n,), -1, dtype=torch.long, device=dev)
        wrow.scatter_reduce_(0, gcol[win], idx[win], reduce="amax")
        cols = (wrow >= 0).nonzero().squeeze(1)
        new_rows = wrow.index_select(0, cols)
        old_rows = c2r.index_select(0, cols)
        old_rows = old_rows[old_rows >= 0]
        r2c.index_fill_(0, old_rows, -1)
        c2r.index_copy_(0, cols, new_rows)
        r2c.index_copy_(0, new_rows, cols - torch.div(new_rows, n, rounding_mode="floor") * n)
        flat_p.index_copy_(0, cols, colmax.index_select(0, cols))
    return rounds


def _unassign_unhappy(Cn: torch.Tensor, prices: torch.Tensor, row2col: torch.Tensor,
                      col2row: torch.Tensor, eps: float, live: torch.Tensor) -> None:
    """Unassign rows that are not ``eps``-happy at the new ``eps`` (start of a scaling phase)."""
    B, n, _ = Cn.shape
    assigned = row2col >= 0
    if not bool(assigned.any()):
        return
    vals = Cn + prices[:, None, :]
    best = vals.min(-1).values
    cur = vals.gather(2, row2col.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    bad = assigned & live[:, None] & (cur - best > eps)
    if bool(bad.any()):
        bi, ri = bad.nonzero(as_tuple=True)
        ci = row2col[bi, ri]
        col2row[bi, ci] = -1
        row2col[bi, ri] = -1


def certify(C: torch.Tensor, sigma: torch.Tensor, p0: torch.Tensor, max_sweeps: int):
    """Bellman-Ford price tightening; returns ``(certified (B,), prices (B, n), sweeps)``.

    ``C`` (B, n, n) original costs (minimisation), ``sigma`` (B, n) a permutation per problem, ``p0``
    (B, n) starting prices. See the module docstring for the guarantee.
    """
    B, n, _ = C.shape
    p = p0.clone()
    c_sig = C.gather(2, sigma.unsqueeze(-1)).squeeze(-1)
    settled = torch.zeros(B, dtype=torch.bool, device=C.device)
    sweeps = 0
    for _ in range(max_sweeps):
        sweeps += 1
        best, jstar = (C + p[:, None, :]).min(-1)
        cand = best - c_sig
        cur = p.gather(1, sigma)
        tol = 64 * _EPS64 * (C.gather(2, jstar.unsqueeze(-1)).squeeze(-1).abs() + c_sig.abs()
                             + p.gather(1, jstar).abs() + cur.abs())
        improve = cand < cur - tol
        settled = ~improve.any(1)
        if bool(settled.all()):
            break
        p = p.scatter(1, sigma, torch.where(improve, cand, cur))
    return settled, p, sweeps


def auction_square(C: torch.Tensor, *, theta: float = 0.1, eps0: float = 0.05, eps_min: float = 1e-12,
                   check_below: Optional[float] = None, cert_sweeps: Optional[int] = None,
                   max_rounds: int = 200_000, seed: int = 0):
    """Solve a batch of square min-cost assignment problems ``C`` (B, n, n) float64.

    Costs are normalised to ``[0, 1]`` per problem; ``eps`` runs ``eps0, eps0 * theta, ...`` down to
    ``eps_min``; from ``check_below`` on, the uncertified problems are checked after each phase with
    up to ``cert_sweeps`` Bellman-Ford sweeps (default ``n + 2``, the Bellman-Ford bound).

    Returns ``(sigma (B, n) long, certified (B,) bool, stats)``; ``sigma[b, i]`` is the column of row
    ``i``. Rows of uncertified problems still hold a full permutation (the auction's best), but it is
    not guaranteed optimal: solve those exactly elsewhere.
    """
    B, n, n2 = C.shape
    assert n == n2
    dev = C.device
    cmin = C.amin((1, 2), keepdim=True)
    rng = C.amax((1, 2), keepdim=True) - cmin
    flat = (rng <= 0).view(B)
    Cn = (C - cmin) / torch.where(rng > 0, rng, torch.ones_like(rng))
    prices = torch.zeros(B, n, dtype=C.dtype, device=dev)
    row2col = torch.full((B, n), -1, dtype=torch.long, device=dev)
    col2row = torch.full((B, n), -1, dtype=torch.long, device=dev)
    ident = torch.arange(n, device=dev).expand(B, n)
    certified = flat.clone()
    if bool(flat.any()):  # all entries equal: every permutation is optimal
        row2col[flat] = ident[flat]
    if n == 1:
        return torch.zeros(B, 1, dtype=torch.long, device=dev), torch.ones(B, dtype=torch.bool, device=dev), \
            AuctionStats(0, 0, 0, B, B)
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)
    if check_below is None:
        check_below = eps_min
    if cert_sweeps is None:
        cert_sweeps = n + 2  # Bellman-Ford settles within n sweeps when sigma is optimal
    eps = eps0
    phases = rounds = sweeps = 0
    while True:
        live = ~certified
        if not bool(live.any()):
            break
        phases += 1
        _unassign_unhappy(Cn, prices, row2col, col2row, eps, live)
        rounds += _bid_rounds(Cn, prices, row2col, col2row, eps, live, gen, max_rounds)
        done = bool((row2col[live] >= 0).all())
        if not done:
            log.warning("auction hit max_rounds=%d at eps=%.3g; unfinished problems fall back", max_rounds, eps)
            break
        if eps <= check_below:
            idx = live.nonzero().squeeze(1)
            ok, _, s = certify(C[idx], row2col[idx], prices[idx] * rng.view(B, 1)[idx], cert_sweeps)
            sweeps += s
            certified[idx[ok]] = True
        if eps <= eps_min:
            break
        eps = max(eps * theta, eps_min)
    row2col = torch.where(row2col >= 0, row2col, ident)  # never reached for finished problems
    stats = AuctionStats(phases, rounds, sweeps, int(certified.sum()), B)
    log.debug("auction: %s", stats)
    return row2col, certified, stats
