"""Batched log-domain Sinkhorn for entropic optimal transport, with epsilon annealing.

Problem (Cuturi 2013, "Sinkhorn distances", NeurIPS, arXiv:1306.0895)::

    min_T <T, M> - reg * H(T)   s.t.  T 1 = a,  T^T 1 = b,  T >= 0,   H(T) = -sum T_ij (log T_ij - 1)

Log-domain iterations (stable for small ``reg``; Peyre & Cuturi 2019, "Computational Optimal
Transport", arXiv:1803.00567, Sec. 4.4)::

    f_i <- reg * log a_i - reg * LSE_j((g_j - M_ij) / reg)
    g_j <- reg * log b_j - reg * LSE_i((f_i - M_ij) / reg)
    T_ij = exp((f_i + g_j - M_ij) / reg)

After a ``g`` update the column marginals hold exactly, so convergence is measured on the rows:
``err = ||T 1 - a||_1`` (the criterion of POT's ``sinkhorn_log``), checked every ``check_every``
iterations. Annealing (epsilon scaling; Schmitzer 2019, "Stabilized sparse scaling algorithms for
entropy regularized transport problems", SIAM J. Sci. Comput., arXiv:1610.06519) runs a decreasing
``reg`` schedule and warm-starts each stage with the previous potentials.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from ._common import as_cost, as_marginal, check_mass

log = logging.getLogger(__name__)

__all__ = ["SinkhornResult", "sinkhorn", "round_to_permutation"]


@dataclass(frozen=True)
class SinkhornResult:
    """Entropic OT solution(s), in the input's kind (float64).

    Attributes
    ----------
    plan : ``(n, m)`` or ``(B, n, m)`` transport plan ``T``.
    cost : scalar or ``(B,)``: the transport cost ``<T, M>`` (without the entropy term).
    f, g : ``(n,)``/``(m,)`` or batched: dual potentials (warm-start them via ``init=(f, g)``).
    converged : bool or ``(B,)``: ``err <= tol`` reached within ``max_iter`` (last stage).
    n_iter : int or ``(B,)``: iterations used (all stages summed).
    err : float or ``(B,)``: final ``||T 1 - a||_1``.
    reg : float: the final regularisation; ``reg_schedule``: the stages actually run.
    max_iter, tol : the settings used.
    """

    plan: Any
    cost: Any
    f: Any
    g: Any
    converged: Any
    n_iter: Any
    err: Any
    reg: float
    reg_schedule: tuple
    max_iter: int
    tol: float


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum exp`` along ``dim`` (max-shifted; ``-inf`` rows give ``-inf``).

    Shifted exponents are clamped at -700 before ``exp``: terms below ``exp(-700) ~ 1e-304`` next to
    the leading term ``1`` change nothing in float64, while subnormal results of ``exp`` (arguments
    below -708) made ``torch.logsumexp`` up to 100x slower on x86 CPUs at small ``reg`` (measured).
    """
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).clamp(min=-700.0).exp().sum(dim=dim).log() + m.squeeze(dim)


def _stage(M, loga, logb, f, g, reg, max_iter, tol, check_every):
    """Run one ``reg`` stage in place-free style; returns ``f, g, err, n_iter, converged``."""
    B = M.shape[0]
    dev = M.device
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    err = torch.full((B,), math.inf, dtype=M.dtype, device=dev)
    a = loga.exp()
    it = 0
    while it < max_iter:
        steps = min(check_every, max_iter - it)
        f0, g0 = f, g
        for _ in range(steps):
            f = reg * loga - reg * _lse((g[:, None, :] - M) / reg, dim=2)
            g = reg * logb - reg * _lse((f[:, :, None] - M) / reg, dim=1)
        it += steps
        live = ~done
        f = torch.where(live[:, None], f, f0)
        g = torch.where(live[:, None], g, g0)
        rows = _lse((f[:, :, None] + g[:, None, :] - M) / reg, dim=2).exp()
        e = (rows - a).abs().sum(1)
        err = torch.where(live, e, err)
        n_iter = torch.where(live, n_iter + steps, n_iter)
        done = done | (e <= tol)
        if bool(done.all()):
            break
    return f, g, err, n_iter, done


def _validate_reg(reg: float) -> float:
    if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a positive finite number, got {reg!r}; typical values 1e-3..1e-1 "
                         "for costs of order 1")
    return float(reg)


def sinkhorn(cost: Any, a: Any = None, b: Any = None, reg: float = 0.05, max_iter: int = 1000,
             tol: float = 1e-9, *, anneal: bool = False, reg_schedule: Optional[Sequence[float]] = None,
             reg_start: Optional[float] = None, anneal_factor: float = 0.5, init: Any = None,
             check_every: int = 10, warn: bool = True, pad: bool = False):
    """Entropic OT plan(s) by log-domain Sinkhorn, batched over problems of one size.

    Parameters
    ----------
    cost : ``(n, m)`` or ``(B, n, m)`` array/tensor, or a list of 2-D costs of different sizes
        A list (e.g. every layer of a fusion) is solved by grouping equal shapes into batched calls,
        or with ``pad=True`` in one call; a list of results comes back.
    a, b : ``(n,)`` / ``(m,)`` (shared by the batch) or ``(B, n)`` / ``(B, m)``; default uniform.
        Non-negative, equal total mass (relative 1e-6). Not used with a list ``cost`` (uniform).
    reg : float
        Final entropic regularisation ``reg > 0``, in the units of ``cost`` (POT's convention).
    max_iter : int
        Iteration cap per stage. tol : float
        Stop when ``||T 1 - a||_1 <= tol``.
    anneal : bool
        Epsilon annealing: stages ``reg_start, reg_start * anneal_factor, ...`` down to ``reg``, each
        warm-started from the previous potentials; ``reg_start`` defaults to the cost's range
        ``max(M) - min(M)`` (at least ``reg``). Intermediate stages stop at ``max(tol, 1e-4)``.
    reg_schedule : sequence of float, optional
        An explicit decreasing schedule (its last entry is used as ``reg``); implies annealing.
    init : ``(f, g)``, optional
        Initial potentials (e.g. ``(res.f, res.g)`` of a previous call).
    check_every : int
        Convergence is checked every ``check_every`` iterations.
    warn : bool
        Emit a ``RuntimeWarning`` naming the next step when a problem does not converge.
    pad : bool
        List ``cost`` only: solve all problems in one batch, padded to the largest ``(n, m)`` with
        zero-mass rows and columns (their plan entries are exactly 0, and converged problems are
        frozen, so each result is its own call's up to summation-order round-off; with ``anneal`` and
        no ``reg_start`` all problems share the largest cost range as the start). One batch means one sequence of
        kernels on a GPU instead of one per shape, at the price of the padded entries' work. The
        results take the kind and device of the first cost.

    Returns
    -------
    SinkhornResult (or a list of them for a list ``cost``), in the input's kind and device.
    """
    if isinstance(cost, list):
        return _sinkhorn_list(cost, a, b, pad, reg=reg, max_iter=max_iter, tol=tol, anneal=anneal,
                              reg_schedule=reg_schedule, reg_start=reg_start, anneal_factor=anneal_factor,
                              check_every=check_every, warn=warn)
    if pad:
        raise ValueError("pad=True applies to a list of costs of different sizes; a (B, n, m) batch is "
                         "solved in one call already")
    M, kind = as_cost(cost, "cost", allow_empty=False)
    B, n, m = M.shape
    dev = M.device
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    check_every = max(1, int(check_every))
    av = as_marginal(a, "a", B, n, "row (n)", dev, kind.batched)
    bv = as_marginal(b, "b", B, m, "column (m)", dev, kind.batched)
    check_mass(av, bv)
    bv = bv * (av.sum(-1, keepdim=True) / bv.sum(-1, keepdim=True))
    if reg_schedule is not None:
        sched = [_validate_reg(r) for r in reg_schedule]
        if not sched:
            raise ValueError("reg_schedule is empty; pass e.g. [1.0, 0.3, 0.1, reg]")
    elif anneal:
        reg = _validate_reg(reg)
        if not (0 < anneal_factor < 1):
            raise ValueError(f"anneal_factor must be in (0, 1), got {anneal_factor!r}")
        top = float((M.amax((1, 2)) - M.amin((1, 2))).max()) if reg_start is None else _validate_reg(reg_start)
        sched, r = [], max(top, reg)
        while r > reg * (1 + 1e-12):
            sched.append(r)
            r *= anneal_factor
        sched.append(reg)
    else:
        sched = [_validate_reg(reg)]
    loga, logb = av.log(), bv.log()
    if init is not None:
        f = torch.as_tensor(init[0], dtype=torch.float64).to(dev).reshape(B, n)
        g = torch.as_tensor(init[1], dtype=torch.float64).to(dev).reshape(B, m)
    else:
        f = torch.zeros(B, n, dtype=torch.float64, device=dev)
        g = torch.zeros(B, m, dtype=torch.float64, device=dev)
    total = torch.zeros(B, dtype=torch.long, device=dev)
    for s, r in enumerate(sched):
        last = s == len(sched) - 1
        f, g, err, it, conv = _stage(M, loga, logb, f, g, r, max_iter, tol if last else max(tol, 1e-4),
                                     check_every)
        total = total + it
    T = ((f[:, :, None] + g[:, None, :] - M) / sched[-1]).exp()
    value = (T * M).sum((1, 2))
    if warn and not bool(conv.all()):
        k = int((~conv).sum())
        warnings.warn(
            f"sinkhorn: {k} of {B} problem(s) did not reach ||T1 - a||_1 <= {tol:g} in max_iter={max_iter} "
            f"iterations (worst err {float(err.max()):.3g} at reg={sched[-1]:g}); raise max_iter or reg "
            "(or use anneal=True)", RuntimeWarning, stacklevel=2)
    scalar = (lambda t: t.item()) if not kind.batched else kind.out
    return SinkhornResult(
        plan=kind.out(T), cost=kind.out(value), f=kind.out(f), g=kind.out(g),
        converged=bool(conv[0]) if not kind.batched else kind.out(conv),
        n_iter=int(total[0]) if not kind.batched else kind.out(total),
        err=float(err[0]) if not kind.batched else scalar(err),
        reg=sched[-1], reg_schedule=tuple(sched), max_iter=max_iter, tol=tol)


def _sinkhorn_list(costs: List[Any], a, b, pad: bool, **kw) -> List[SinkhornResult]:
    if a is not None or b is not None:
        raise ValueError("a and b are not supported with a list of costs (uniform marginals are used); "
                         "call sinkhorn per problem to pass marginals")
    if not costs:
        raise ValueError("cost is an empty list; pass at least one (n, m) cost")
    shapes = []
    for k, c in enumerate(costs):
        shape = tuple(c.shape) if hasattr(c, "shape") else None
        if shape is None or len(shape) != 2:
            raise ValueError(f"cost[{k}] must be a 2-D (n, m) array or tensor, got shape {shape}")
        shapes.append(shape)

    def pick(res: SinkhornResult, t: int, n: int, m: int) -> SinkhornResult:
        return SinkhornResult(
            plan=res.plan[t][:n, :m], cost=res.cost[t], f=res.f[t][:n], g=res.g[t][:m],
            converged=bool(res.converged[t]), n_iter=int(res.n_iter[t]), err=float(res.err[t]), reg=res.reg,
            reg_schedule=res.reg_schedule, max_iter=res.max_iter, tol=res.tol)

    if pad:
        Ms = [as_cost(c, f"cost[{k}]", allow_empty=False)[0][0] for k, c in enumerate(costs)]
        dev = Ms[0].device
        N, Mx = max(s[0] for s in shapes), max(s[1] for s in shapes)
        P = torch.empty(len(costs), N, Mx, dtype=torch.float64, device=dev)
        A = torch.zeros(len(costs), N, dtype=torch.float64, device=dev)
        Bv = torch.zeros(len(costs), Mx, dtype=torch.float64, device=dev)
        for k, (Mk, (n, m)) in enumerate(zip(Ms, shapes)):
            P[k] = Mk.min()  # padding inside the problem's own range: the default annealing start holds
            P[k, :n, :m] = Mk.to(dev)
            A[k, :n], Bv[k, :m] = 1.0 / n, 1.0 / m
        first_numpy = not isinstance(costs[0], torch.Tensor)
        res = sinkhorn(P.cpu().numpy() if first_numpy else P, A.cpu().numpy() if first_numpy else A,
                       Bv.cpu().numpy() if first_numpy else Bv, **kw)
        return [pick(res, k, n, m) for k, (n, m) in enumerate(shapes)]
    out: List[Optional[SinkhornResult]] = [None] * len(costs)
    for shape in dict.fromkeys(shapes):
        idx = [k for k, s in enumerate(shapes) if s == shape]
        group = [costs[k] for k in idx]
        stacked = torch.stack([torch.as_tensor(c) for c in group]) if isinstance(group[0], torch.Tensor) \
            else __import__("numpy").stack(group)
        res = sinkhorn(stacked, **kw)
        for t, k in enumerate(idx):
            out[k] = pick(res, t, *shape)
    return out  # type: ignore[return-value]


def round_to_permutation(plan: Any, method: str = "auto"):
    """Round a transport plan to a matching by a LAP on the plan: ``argmax_sigma sum_i T[i, sigma(i)]``.

    Parameters
    ----------
    plan : ``(n, m)`` or ``(B, n, m)`` with ``n <= m`` (a permutation when square).
    method : LAP backend, see :func:`merging.solvers.linear_assignment`.

    Returns
    -------
    int64 ``(n,)`` or ``(B, n)``: the column of each row, in the input's kind and device.
    """
    from ._lap import linear_assignment

    shape = tuple(plan.shape) if hasattr(plan, "shape") else None
    if shape is not None and len(shape) >= 2 and shape[-2] > shape[-1]:
        raise ValueError(f"round_to_permutation needs n <= m, got plan shape {shape}; round the transpose "
                         "and invert the matching")
    return linear_assignment(plan, maximize=True, method=method).col_ind
