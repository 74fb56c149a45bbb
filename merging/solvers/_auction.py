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

Speed-ups of ``schedule="fast"``, the default on CUDA (see :func:`auction_square`): Sinkhorn warm-start prices
(Cuturi 2013, arXiv:1306.0895) with a small starting ``eps``; ``block`` rounds between host checks on
a fixed-shape set of bidder slots (:func:`_bid_block`, no ``nonzero`` inside a block); certificates
tried after every phase below ``check_below`` with a few sweeps, so the schedule stops as soon as
every problem is proven optimal instead of always running down to ``eps_min``.

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
    syncs: int = 0  #: host synchronisations (tensor values read by Python control flow)
    schedule: str = "fast"  #: ``"fast"`` (block rounds, warm start, early checks) or ``"legacy"``


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


def _bid_block(Cn: torch.Tensor, pbuf: torch.Tensor, r2c: torch.Tensor, c2r: torch.Tensor,
               slots: torch.Tensor, eps: float, gen: torch.Generator, k_rounds: int) -> torch.Tensor:
    """Run ``k_rounds`` Jacobi auction rounds with no host synchronisation; returns the new ``slots``.

    ``slots`` (k,) holds the global ids ``b * n + i`` of the unassigned rows (``-1``: empty slot). In a
    Jacobi round the number of unassigned rows never grows (every column that receives bids takes
    exactly one bidder and frees at most one owner), so a winner's slot is simply handed to the owner
    it displaced (or emptied): the bidder set keeps a fixed shape and needs no ``nonzero``. Empty
    slots bid ``-inf`` into a trash column, so rounds on finished problems are no-ops. ``pbuf``,
    ``r2c``, ``c2r`` are flat ``(B * n + 1,)`` with the last entry as the trash target.
    """
    B, n, _ = Cn.shape
    trash = B * n
    flat_c = Cn.view(B * n, n)
    prices = pbuf[:trash].view(B, n)
    k = slots.numel()
    ar = torch.arange(k, device=Cn.device)
    neg_inf = torch.tensor(-math.inf, dtype=Cn.dtype, device=Cn.device)
    for _ in range(k_rounds):
        valid = slots >= 0
        rows = slots.clamp(min=0)
        b = torch.div(rows, n, rounding_mode="floor")
        vals = flat_c.index_select(0, rows) + prices.index_select(0, b)
        jit = torch.rand(vals.shape, generator=gen, dtype=vals.dtype, device=gen.device).to(Cn.device)
        w, j = torch.topk(vals + jit * (0.25 * eps), 2, dim=1, largest=False)
        j1 = j[:, 0]
        gcol = torch.where(valid, b * n + j1, trash)
        bid = torch.where(valid, pbuf.index_select(0, gcol) + (w[:, 1] - w[:, 0]) + eps, neg_inf)
        colmax = torch.full((trash + 1,), -math.inf, dtype=bid.dtype, device=Cn.device)
        colmax.scatter_reduce_(0, gcol, bid, reduce="amax")
        win = valid & (bid >= colmax.index_select(0, gcol))
        wslot = torch.full((trash + 1,), -1, dtype=torch.long, device=Cn.device)
        wslot.scatter_reduce_(0, gcol, torch.where(win, ar, -1), reduce="amax")
        win = win & (wslot.index_select(0, gcol) == ar)  # one winner per column
        old = c2r.index_select(0, gcol)  # displaced owner (or -1)
        r2c.index_fill_(0, torch.where(win & (old >= 0), old, trash), -1)
        tgt_c = torch.where(win, gcol, trash)
        c2r.index_copy_(0, tgt_c, torch.where(win, rows, -1))
        r2c.index_copy_(0, torch.where(win, rows, trash), torch.where(win, j1, -1))
        pbuf.index_copy_(0, tgt_c, torch.where(win, bid, pbuf[trash]))
        slots = torch.where(win, old, slots)
    return slots


def _sinkhorn_prices(Cn: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """Column prices ``p = -g`` from ``iters`` log-domain Sinkhorn iterations at regulariser ``reg``.

    ``f_i = -reg LSE_j((g_j - Cn_ij) / reg)``, ``g_j = -reg LSE_i((f_i - Cn_ij) / reg)`` (uniform
    marginals; constants dropped), Cuturi 2013, arXiv:1306.0895. ``f_i + g_j <= Cn_ij`` holds up to
    ``O(reg log n)``, so ``-g`` are near-optimal auction prices (the auction bids on ``Cn_ij + p_j``).
    """
    g = torch.zeros(Cn.shape[0], 1, Cn.shape[2], dtype=Cn.dtype, device=Cn.device)
    K = -Cn / reg
    for _ in range(iters):
        f = -reg * torch.logsumexp(K + g / reg, dim=2, keepdim=True)
        g = -reg * torch.logsumexp(K + f / reg, dim=1, keepdim=True)
    return -g.squeeze(1)


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


def certify(C: torch.Tensor, sigma: torch.Tensor, p0: torch.Tensor, max_sweeps: int, check_every: int = 1):
    """Bellman-Ford price tightening; returns ``(certified (B,), prices (B, n), sweeps, syncs)``.

    ``C`` (B, n, n) original costs (minimisation), ``sigma`` (B, n) a permutation per problem, ``p0``
    (B, n) starting prices. See the module docstring for the guarantee. A problem is certified when
    the *last* sweep run changed none of its prices; the host reads the flags only every
    ``check_every`` sweeps (a sweep on a settled problem changes nothing, so the extra sweeps are
    no-ops and the verdict is the same as with ``check_every=1``).
    """
    B, n, _ = C.shape
    p = p0.clone()
    c_sig = C.gather(2, sigma.unsqueeze(-1)).squeeze(-1)
    settled = torch.zeros(B, dtype=torch.bool, device=C.device)
    sweeps = syncs = 0
    for _ in range(max_sweeps):
        sweeps += 1
        best, jstar = (C + p[:, None, :]).min(-1)
        cand = best - c_sig
        cur = p.gather(1, sigma)
        tol = 64 * _EPS64 * (C.gather(2, jstar.unsqueeze(-1)).squeeze(-1).abs() + c_sig.abs()
                             + p.gather(1, jstar).abs() + cur.abs())
        improve = cand < cur - tol
        settled = ~improve.any(1)
        if sweeps % check_every == 0 or sweeps == max_sweeps:
            syncs += 1
            if bool(settled.all()):
                break
        p = p.scatter(1, sigma, torch.where(improve, cand, cur))
    return settled, p, sweeps, syncs


def _normalise(C: torch.Tensor):
    """Shift and scale each problem to ``[0, 1]`` (no optimal assignment changes). Returns the scaled
    costs, each problem's range (B, 1, 1) (prices times it are prices of the original costs) and
    ``flat`` (B,), marking problems whose entries are all equal (every permutation is optimal)."""
    cmin = C.amin((1, 2), keepdim=True)
    rng = C.amax((1, 2), keepdim=True) - cmin
    flat = (rng <= 0).view(C.shape[0])
    return (C - cmin) / torch.where(rng > 0, rng, torch.ones_like(rng)), rng, flat


_FAST_DEFAULTS = {"warm": None, "block": 16, "early_sweeps": 64, "sinkhorn_reg": 3e-3, "sinkhorn_iters": 100}


def auction_square(C: torch.Tensor, *, schedule: str = "auto", theta: Optional[float] = None,
                   eps0: Optional[float] = None, eps_min: float = 1e-12, check_below: Optional[float] = None,
                   cert_sweeps: Optional[int] = None, early_sweeps: int = 64, block: int = 16,
                   warm: Optional[str] = None, sinkhorn_reg: float = 3e-3, sinkhorn_iters: int = 100,
                   max_rounds: int = 200_000, seed: int = 0):
    """Solve a batch of square min-cost assignment problems ``C`` (B, n, n) float64.

    Costs are normalised to ``[0, 1]`` per problem; ``eps`` runs ``eps0, eps0 * theta, ...`` down to
    ``eps_min``. Returns ``(sigma (B, n) long, certified (B,) bool, stats)``; ``sigma[b, i]`` is the
    column of row ``i``. Rows of uncertified problems still hold a full permutation (the auction's
    best), but it is not guaranteed optimal: solve those exactly elsewhere.

    ``schedule="auto"`` (default) picks ``"fast"`` on CUDA, where host synchronisations and rounds
    dominate, and ``"legacy"`` on the CPU, where the fast schedule's dense warm start and early
    certificate sweeps cost more than the rounds they save (``benchmarks/solvers_results.md``);
    passing any option of the fast schedule selects it.

    ``schedule="fast"``:

    * warm start ``warm="sinkhorn"`` (default): initial prices ``p = -g`` from ``sinkhorn_iters``
      log-domain Sinkhorn iterations at ``sinkhorn_reg`` on the normalised costs
      (:func:`_sinkhorn_prices`), and then ``eps0 = 1e-4`` instead of ``0.05`` (defaults chosen by
      the work counts in ``benchmarks/solvers_results.md``: with ``sinkhorn_reg=3e-3``,
      ``sinkhorn_iters=100`` and ``eps0=1e-4`` together, rounds + sweeps + syncs weighted by their
      kernel launches drop 27-36% against ``1e-2, 30, 1e-3``, on every seed tried); ``warm="colmin"``:
      ``p_j = -min_i Cn_ij``, the column reduction of the Hungarian method (Kuhn 1955);
      ``warm="none"``: zero prices;
    * ``block`` Jacobi rounds between host checks (:func:`_bid_block`: fixed-shape bidder slots, no
      ``nonzero`` or boolean masks inside the block), and sync-free unassignment of unhappy rows;
    * early certificates: after every phase with ``eps <= check_below`` (default ``1e-4``) the
      uncertified problems get up to ``early_sweeps`` Bellman-Ford sweeps (checked every 4) of the same
      certificate as the final one (:func:`certify`); certified problems stop bidding, and the loop
      ends when all are certified. The final phase (``eps_min``) gets the full ``cert_sweeps``
      (default ``n + 2``). ``theta = 0.1``. The certificate is the same test as before (same
      tolerance); only *when* it is tried changed, so nothing uncertifiable is ever accepted.

    ``schedule="legacy"``: the previous solver (one vectorised round per host check with
    ``nonzero`` compaction, zero initial prices, certificate only at ``eps_min``), kept for comparison.
    """
    given = {"warm": warm, "block": block, "early_sweeps": early_sweeps, "sinkhorn_reg": sinkhorn_reg,
             "sinkhorn_iters": sinkhorn_iters}
    fast_only = sorted(k for k, v in given.items() if v != _FAST_DEFAULTS[k])
    if schedule == "auto":
        schedule = "fast" if C.is_cuda or fast_only else "legacy"
    if schedule == "legacy" and fast_only:
        raise ValueError(f"options {fast_only} apply to schedule='fast' only; drop them or use schedule='fast'")
    if schedule == "legacy":
        return _auction_legacy(C, theta=0.1 if theta is None else theta, eps0=0.05 if eps0 is None else eps0,
                               eps_min=eps_min, check_below=check_below, cert_sweeps=cert_sweeps,
                               max_rounds=max_rounds, seed=seed)
    if schedule != "fast":
        raise ValueError(f"schedule must be 'auto', 'fast' or 'legacy', got {schedule!r}")
    theta = 0.1 if theta is None else theta
    warm = "sinkhorn" if warm is None else warm
    eps0 = (1e-4 if warm == "sinkhorn" else 0.05) if eps0 is None else eps0
    if warm not in ("colmin", "sinkhorn", "none"):
        raise ValueError(f"warm must be 'colmin', 'sinkhorn' or 'none', got {warm!r}")
    check_below = 1e-4 if check_below is None else check_below
    B, n, n2 = C.shape
    assert n == n2
    dev = C.device
    Cn, rng, flat = _normalise(C)
    ident = torch.arange(n, device=dev).expand(B, n)
    if n == 1:
        return torch.zeros(B, 1, dtype=torch.long, device=dev), torch.ones(B, dtype=torch.bool, device=dev), \
            AuctionStats(0, 0, 0, B, B, 0, "fast")
    T = B * n
    pbuf = torch.zeros(T + 1, dtype=C.dtype, device=dev)
    if warm == "colmin":
        pbuf[:T] = (-Cn.amin(1)).reshape(-1)
    elif warm == "sinkhorn":
        pbuf[:T] = _sinkhorn_prices(Cn, sinkhorn_reg, sinkhorn_iters).reshape(-1)
    prices = pbuf[:T].view(B, n)
    r2c = torch.full((T + 1,), -1, dtype=torch.long, device=dev)
    c2r = torch.full((T + 1,), -1, dtype=torch.long, device=dev)
    row2col = r2c[:T].view(B, n)
    # all entries equal: every permutation is optimal (no sync: where on the flags)
    row2col.copy_(torch.where(flat[:, None], ident, row2col))
    c2r[:T] = torch.where(flat[:, None], ident + torch.arange(B, device=dev)[:, None] * n, -1).reshape(-1)
    certified = flat.clone()
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)
    if cert_sweeps is None:
        cert_sweeps = n + 2  # Bellman-Ford settles within n sweeps when sigma is optimal
    base = torch.arange(B, device=dev)[:, None] * n
    eps = eps0
    phases = rounds = sweeps = syncs = 0
    while True:
        syncs += 1
        if bool(certified.all()):
            break
        phases += 1
        live = ~certified
        # unassign rows that are not eps-happy at the new eps (sync-free)
        vals = Cn + prices[:, None, :]
        best = vals.amin(-1)
        cur = vals.gather(2, row2col.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        bad = (row2col >= 0) & live[:, None] & (cur - best > eps)
        c2r.index_fill_(0, torch.where(bad, base + row2col, T).reshape(-1), -1)
        row2col.copy_(torch.where(bad, -1, row2col))
        syncs += 1
        slots = ((row2col < 0) & live[:, None]).reshape(-1).nonzero().squeeze(1)
        phase_rounds = 0
        while slots.numel() > 0 and phase_rounds < max_rounds:
            slots = _bid_block(Cn, pbuf, r2c, c2r, slots, eps, gen, block)
            phase_rounds += block
            syncs += 1
            slots = slots[slots >= 0]
        rounds += phase_rounds
        if slots.numel() > 0:
            log.warning("auction hit max_rounds=%d at eps=%.3g; unfinished problems fall back", max_rounds, eps)
            break
        if eps <= check_below:
            syncs += 1
            idx = live.nonzero().squeeze(1)
            last = eps <= eps_min
            ok, _, s, sy = certify(C[idx], row2col[idx], prices[idx] * rng.view(B, 1)[idx],
                                   cert_sweeps if last else min(early_sweeps, cert_sweeps), check_every=4)
            sweeps += s
            syncs += sy
            certified[idx] = certified[idx] | ok
        if eps <= eps_min:
            break
        eps = max(eps * theta, eps_min)
    row2col = torch.where(row2col >= 0, row2col, ident)  # never reached for finished problems
    stats = AuctionStats(phases, rounds, sweeps, int(certified.sum()), B, syncs + 1, "fast")
    log.debug("auction: %s", stats)
    return row2col.clone(), certified, stats


def _auction_legacy(C: torch.Tensor, *, theta: float = 0.1, eps0: float = 0.05, eps_min: float = 1e-12,
                    check_below: Optional[float] = None, cert_sweeps: Optional[int] = None,
                    max_rounds: int = 200_000, seed: int = 0):
    """The previous solver (``schedule="legacy"`` of :func:`auction_square`).

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
    Cn, rng, flat = _normalise(C)
    prices = torch.zeros(B, n, dtype=C.dtype, device=dev)
    row2col = torch.full((B, n), -1, dtype=torch.long, device=dev)
    col2row = torch.full((B, n), -1, dtype=torch.long, device=dev)
    ident = torch.arange(n, device=dev).expand(B, n)
    certified = flat.clone()
    if bool(flat.any()):  # all entries equal: every permutation is optimal
        row2col[flat] = ident[flat]
    if n == 1:
        return torch.zeros(B, 1, dtype=torch.long, device=dev), torch.ones(B, dtype=torch.bool, device=dev), \
            AuctionStats(0, 0, 0, B, B, 0, "legacy")
    gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu").manual_seed(seed)
    if check_below is None:
        check_below = eps_min
    if cert_sweeps is None:
        cert_sweeps = n + 2  # Bellman-Ford settles within n sweeps when sigma is optimal
    eps = eps0
    phases = rounds = sweeps = 0
    syncs = 1  # host reads counted as in the code below: flat.any(), live.any(), ...
    while True:
        live = ~certified
        syncs += 1
        if not bool(live.any()):
            break
        phases += 1
        _unassign_unhappy(Cn, prices, row2col, col2row, eps, live)
        r = _bid_rounds(Cn, prices, row2col, col2row, eps, live, gen, max_rounds)
        rounds += r
        syncs += 3 + 4 * r + 1 + 1  # unassign (any, any, nonzero); per round 2 nonzero + 2 masks; done
        done = bool((row2col[live] >= 0).all())
        if not done:
            log.warning("auction hit max_rounds=%d at eps=%.3g; unfinished problems fall back", max_rounds, eps)
            break
        if eps <= check_below:
            idx = live.nonzero().squeeze(1)
            ok, _, s, sy = certify(C[idx], row2col[idx], prices[idx] * rng.view(B, 1)[idx], cert_sweeps)
            sweeps += s
            syncs += 2 + sy
            certified[idx[ok]] = True
        if eps <= eps_min:
            break
        eps = max(eps * theta, eps_min)
    row2col = torch.where(row2col >= 0, row2col, ident)  # never reached for finished problems
    stats = AuctionStats(phases, rounds, sweeps, int(certified.sum()), B, syncs + 1, "legacy")
    log.debug("auction: %s", stats)
    return row2col, certified, stats
