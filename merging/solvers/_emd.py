"""Exact optimal transport (earth mover's distance) for unequal sizes and non-uniform marginals.

``min_T <T, M>  s.t.  T 1 = a,  T^T 1 = b,  T >= 0`` (the Kantorovich LP). Backends:

``"pot"``      POT's network simplex ``ot.emd`` (Bonneel, van de Panne, Paris & Heidrich 2011,
               "Displacement interpolation using Lagrangian mass transport", SIGGRAPH Asia;
               Flamary et al. 2021, "POT: Python Optimal Transport", JMLR 22), imported lazily.
``"linprog"``  ``scipy.optimize.linprog(method="highs-ds")`` (dual simplex) on the sparse transport
               LP; needs nothing beyond SciPy.
``"auto"``     POT when installed, else linprog.

Both return a vertex of the transport polytope (solver tolerances 1e-10 or tighter). The marginals are
then made to hold to float precision by three alternating row/column rescalings on the plan's
support (the solver's residual is round-off, so this moves the cost by round-off only and never
changes the support); the column sums are exact after the last step, the row sums to ~1e-16. OT fusion
(Singh & Jaggi 2020, "Model Fusion via Optimal Transport", NeurIPS, arXiv:1910.05653) uses this plan
with proper marginals for layers of different widths; for uniform square problems ``n * T`` is a
permutation matrix (a Birkhoff vertex), i.e. exact OT reduces to a LAP.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ._common import as_cost, as_marginal, check_mass
from ._threads import check_workers, run_batch

log = logging.getLogger(__name__)

__all__ = ["EMDResult", "emd"]


@dataclass(frozen=True)
class EMDResult:
    """Exact OT plan(s), in the input's kind (float64).

    Attributes
    ----------
    plan : ``(n, m)`` or ``(B, n, m)``; ``plan.sum(-1) == a`` and ``plan.sum(-2) == b`` to float precision.
    cost : scalar or ``(B,)``: ``<T, M>``.
    backend : ``"pot"`` or ``"linprog"`` (after resolving ``"auto"``).
    """

    plan: Any
    cost: Any
    backend: str


def _pot_available() -> bool:
    try:
        import ot  # noqa: F401
    except ImportError:
        return False
    return True


def _solve_pot(M: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import ot

    n, m = M.shape
    T, info = ot.emd(a, b, M, numItermax=max(100_000, 20 * n * m), log=True)
    if info.get("warning"):
        raise RuntimeError(f"ot.emd did not solve the {n}x{m} problem: {info['warning']}; "
                           "try backend='linprog'")
    return np.asarray(T, dtype=np.float64)


def _solve_linprog(M: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, vstack, kron, identity

    n, m = M.shape
    # x = vec(T) row-major; rows: (I_n kron 1_m^T) x = a; columns: (1_n^T kron I_m) x = b
    A_rows = kron(identity(n, format="csr"), csr_matrix(np.ones((1, m))), format="csr")
    A_cols = kron(csr_matrix(np.ones((1, n))), identity(m, format="csr"), format="csr")
    # drop one (redundant) column constraint: the totals are equal
    A = vstack([A_rows, A_cols[:-1]], format="csr")
    rhs = np.concatenate([a, b[:-1]])
    res = linprog(M.reshape(-1), A_eq=A, b_eq=rhs, bounds=(0, None), method="highs-ds",
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})
    if res.status != 0:
        raise RuntimeError(f"linprog could not solve the {n}x{m} transport LP: {res.message}")
    return np.clip(res.x.reshape(n, m), 0.0, None)


def _polish(T: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Remove round-off from the marginals without moving mass between cells (support kept)."""
    for _ in range(3):
        rs = T.sum(1)
        scale = np.divide(a, rs, out=np.ones_like(a), where=rs > 0)
        T = T * scale[:, None]
        cs = T.sum(0)
        scale = np.divide(b, cs, out=np.ones_like(b), where=cs > 0)
        T = T * scale[None, :]
    return T


def emd(cost: Any, a: Any = None, b: Any = None, backend: str = "auto", *,
        workers: Optional[int] = None) -> EMDResult:
    """Exact optimal transport plan(s) between ``a`` and ``b`` for cost ``M``, batched over CPU threads.

    Parameters
    ----------
    cost : ``(n, m)`` or ``(B, n, m)`` array or tensor (any device; solved on CPU).
    a, b : ``(n,)`` / ``(m,)`` or ``(B, n)`` / ``(B, m)``; default uniform ``1/n``, ``1/m``. Non-negative
        with equal totals (relative 1e-6; ``b`` is then rescaled to ``a``'s total exactly).
    backend : {"auto", "pot", "linprog"}
        See the module docstring; ``"linprog"`` is the SciPy fallback used without POT.
    workers : int, optional
        CPU threads for a batch (both backends release the GIL while they solve): ``None`` picks by
        size as :func:`merging.solvers.linear_assignment` does (``merging.solvers._threads``), ``-1``
        uses all cores, ``1`` is a plain loop. The plans do not depend on it.

    Returns
    -------
    EMDResult in the input's kind and device.
    """
    if backend not in ("auto", "pot", "linprog"):
        raise ValueError(f"backend must be 'auto', 'pot' or 'linprog', got {backend!r}")
    check_workers(workers)
    M, kind = as_cost(cost, "cost", allow_empty=False)
    B, n, m = M.shape
    av = as_marginal(a, "a", B, n, "row (n)", torch.device("cpu"), kind.batched)
    bv = as_marginal(b, "b", B, m, "column (m)", torch.device("cpu"), kind.batched)
    check_mass(av, bv)
    if backend == "auto":
        backend = "pot" if _pot_available() else "linprog"
    elif backend == "pot" and not _pot_available():
        raise ImportError("backend='pot' needs POT: pip install pot (or use backend='linprog')")
    solve = _solve_pot if backend == "pot" else _solve_linprog
    Mn = M.cpu().numpy()
    A, Bm = av.numpy(), bv.numpy()
    plans = np.empty((B, n, m), dtype=np.float64)

    def solve_one(k: int) -> None:
        ak = A[k].copy()
        bk = Bm[k] * (ak.sum() / Bm[k].sum())
        plans[k] = _polish(solve(np.ascontiguousarray(Mn[k]), ak, bk), ak, bk)

    run_batch(solve_one, B, n * m, workers)
    T = torch.from_numpy(plans)
    value = (T * M.cpu()).sum((1, 2))
    return EMDResult(plan=kind.out(T), cost=kind.out(value), backend=backend)
