"""Linear assignment (LAP): one problem or a batch, square or rectangular, NumPy or torch, any device.

``min_sigma sum_i C[i, sigma(i)]`` over injective ``sigma`` (rows into columns when ``n <= m``,
columns into rows when ``n > m``), or ``max`` with ``maximize=True``.

Backends
--------
``"scipy"``  ``scipy.optimize.linear_sum_assignment`` (Crouse 2016, "On implementing 2D rectangular
             assignment algorithms", IEEE TAES 52(4); shortest augmenting path, Jonker & Volgenant
             1987 family), exact, CPU. The problems of a batch are split over ``workers`` threads
             (SciPy releases the GIL while it solves), each solved exactly as in a plain loop.
``"torch"``  batched epsilon-scaling auction (Bertsekas 1988; Bertsekas & Castanon 1991) on the
             input's device with a Bellman-Ford dual certificate (see ``merging.solvers._auction``);
             problems that the certificate does not prove optimal are re-solved with SciPy, so the
             answer is always exact (up to float64 round-off of the order of SciPy's own).
             Rectangular problems are padded to square with constant-cost dummy rows/columns.
``"auto"``   SciPy, threaded for batches large enough to gain (``merging.solvers._threads``).
             Measured on a 2-core CPU (``benchmarks/RESULTS.md``) the torch auction is 18-500x slower than the SciPy
             loop for every size merging uses (n = 64..1024,
             B = 1..128), so ``auto`` never picks it on CPU. On CUDA it is picked only for batches of
             at least ``AUTO_CUDA_MIN_BATCH`` problems of size at most ``AUTO_CUDA_MAX_N`` (unmeasured:
             no GPU was available, so it is off; the benchmark prints the CUDA ratio so the thresholds
             can be set from a measurement).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ._auction import auction_square
from ._common import as_cost, as_cost_numpy
from ._threads import check_workers, run_batch

log = logging.getLogger(__name__)

__all__ = ["LinearAssignmentResult", "linear_assignment", "HierarchicalAssignmentResult",
           "hierarchical_assignment"]

#: ``method="auto"`` uses the torch auction on CUDA only for at least this many problems ...
AUTO_CUDA_MIN_BATCH = 1 << 30  # disabled until a GPU measurement shows a win (see module docstring)
#: ... of at most this size.
AUTO_CUDA_MAX_N = 256


@dataclass(frozen=True)
class LinearAssignmentResult:
    """Solution of one LAP or a batch, in the input's kind (NumPy or torch on the input's device).

    Like ``scipy.optimize.linear_sum_assignment``, the matched pairs are ``(row_ind[k], col_ind[k])``
    for ``k < min(n, m)``, sorted by row. For ``n <= m`` that is ``row_ind = arange(n)`` and
    ``col_ind[i]`` = the column of row ``i`` (a permutation when ``n == m``); for ``n > m`` only
    ``m`` rows are matched and ``row_ind`` lists them in increasing order.

    Attributes
    ----------
    row_ind, col_ind : int64, shape ``(k,)`` or ``(B, k)`` with ``k = min(n, m)``
    objective : float64, scalar (0-d) or ``(B,)``: ``sum_k cost[row_ind[k], col_ind[k]]``
    maximize : bool
    method : str
        The backend that ran (``"scipy"`` or ``"torch"``), after resolving ``"auto"``.
    n_fallback : int
        Problems of the batch the torch backend could not certify and re-solved with SciPy.
    stats : AuctionStats or None
        Torch backend only: phases, bidding rounds, certificate sweeps and host synchronisations of
        the auction (``merging.solvers._auction.AuctionStats``); ``None`` for SciPy.
    """

    row_ind: Any
    col_ind: Any
    objective: Any
    maximize: bool
    method: str
    n_fallback: int = 0
    stats: Any = None


def _choose(method: str, C: torch.Tensor, device: torch.device) -> str:
    if method not in ("auto", "scipy", "torch"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'torch', got {method!r}")
    if method != "auto":
        return method
    B, n, m = C.shape
    if device.type == "cuda" and B >= AUTO_CUDA_MIN_BATCH and max(n, m) <= AUTO_CUDA_MAX_N:
        return "torch"
    return "scipy"


def _scipy_batch(C: np.ndarray, maximize: bool, workers: Optional[int] = None):
    """Rows/cols ``(B, k)`` of ``B`` SciPy solves, split over threads in contiguous chunks.

    ``scipy.optimize.linear_sum_assignment`` releases the GIL, so threads scale with cores (1.9x on
    2 cores at n = 256; ``benchmarks/RESULTS.md``); each problem is solved exactly as in a plain loop,
    so the answer does not depend on ``workers``.
    """
    from scipy.optimize import linear_sum_assignment

    B, n, m = C.shape
    if B == 1:  # the common single-problem call: no buffers, no thread bookkeeping
        r, c = linear_sum_assignment(C[0], maximize=maximize)
        return r[None].astype(np.int64, copy=False), c[None].astype(np.int64, copy=False)
    k = min(n, m)
    rows = np.empty((B, k), dtype=np.int64)
    cols = np.empty((B, k), dtype=np.int64)

    def solve(b: int) -> None:
        rows[b], cols[b] = linear_sum_assignment(C[b], maximize=maximize)

    run_batch(solve, B, n * m, workers)
    return rows, cols


def _torch_batch(C: torch.Tensor, maximize: bool, seed: int, options: Optional[dict] = None,
                 workers: Optional[int] = None):
    """Rows/cols (B, k) via the certified auction; uncertified problems re-solved with SciPy."""
    B, n, m = C.shape
    transposed = n > m
    S = C.transpose(1, 2) if transposed else C
    S = -S if maximize else S
    nr, nc = S.shape[1], S.shape[2]  # nr <= nc
    if nr < nc:  # dummy rows of cost 0: optimal square solutions restrict to optimal ones
        S = torch.cat([S, S.new_zeros(B, nc - nr, nc)], dim=1)
    sigma, certified, stats = auction_square(S.contiguous(), seed=seed, **(options or {}))
    sigma = sigma[:, :nr]
    n_fb = int((~certified).sum())
    if n_fb:
        bad = (~certified).nonzero().squeeze(1)
        log.info("torch LAP: %d of %d problems not certified; solving them with SciPy", n_fb, B)
        _, c = _scipy_batch(S[bad, :nr].cpu().numpy(), False, workers)
        sigma[bad] = torch.as_tensor(c, device=sigma.device)
    if not transposed:
        rows = torch.arange(nr, device=C.device).expand(B, nr)
        return rows, sigma, n_fb, stats
    # sigma maps each column of C (row of S) to a row of C; sort pairs by row like SciPy does
    order = sigma.argsort(dim=1)
    rows = sigma.gather(1, order)
    cols = torch.arange(nr, device=C.device).expand(B, nr).gather(1, order)
    return rows, cols, n_fb, stats


def linear_assignment(cost: Any, maximize: bool = False, method: str = "auto", *, seed: int = 0,
                      workers: Optional[int] = None,
                      auction_options: Optional[dict] = None) -> LinearAssignmentResult:
    """Solve ``min`` (or ``max``) ``sum_k cost[row_ind[k], col_ind[k]]`` over one-to-one matchings.

    Parameters
    ----------
    cost : array or tensor, shape ``(n, m)`` or ``(B, n, m)``
        Real, finite costs (NumPy array or torch tensor on any device). Rectangular is fine.
    maximize : bool
        Maximise instead (e.g. ``cost = W_A @ W_B.T`` in weight matching, Ainsworth et al. 2023).
    method : {"auto", "scipy", "torch"}
        See the module docstring. Every backend returns an optimal matching: the torch backend is
        certified by dual feasibility + complementary slackness (Bellman-Ford price tightening) and
        falls back to SciPy for any problem it cannot certify.
    seed : int
        Seed of the torch auction's tie-breaking jitter (the objective does not depend on it; with
        ties, which optimal matching is returned may).
    workers : int, optional
        CPU threads for the SciPy backend (SciPy releases the GIL, so a batch's problems run in
        parallel). ``None`` (default): ``torch.get_num_threads()`` threads (set by
        ``OMP_NUM_THREADS`` or ``torch.set_num_threads``) for batches of at least 2^15 cost entries
        with 2^11 per problem (n, m ~ 45 and up; ``merging.solvers._threads``), one thread below
        that; ``-1``: all CPU cores; ``1``: a plain loop in the calling thread. The result does not
        depend on it.
    auction_options : dict, optional
        Torch backend only: keyword settings of ``merging.solvers._auction.auction_square``, e.g.
        ``{"schedule": "legacy"}`` for the previous schedule or ``{"warm": "none"}``. They change
        speed, never the optimum (every answer is still certified or re-solved with SciPy).

    Returns
    -------
    LinearAssignmentResult
        In the input's kind: NumPy in -> NumPy out; torch in -> torch out on the input's device.

    Raises
    ------
    TypeError, ValueError
        Non-numeric input, ndim not 2 or 3, NaN/inf costs, unknown ``method``, bad ``workers``.
    """
    if auction_options is not None and not isinstance(auction_options, dict):
        raise TypeError(f"auction_options must be a dict or None, got {type(auction_options).__name__}")
    check_workers(workers)
    if method in ("auto", "scipy") and isinstance(cost, (np.ndarray, list, tuple)):
        # NumPy in, SciPy on the CPU: no torch on this path (a few microseconds over bare SciPy)
        Cn, batched = as_cost_numpy(cost, "cost")
        r, c = _scipy_batch(Cn, maximize, workers)
        if not batched:
            r, c = r[0], c[0]
            obj = Cn[0][r, c].sum()
        else:
            obj = Cn[np.arange(len(Cn))[:, None], r, c].sum(-1)
        return LinearAssignmentResult(row_ind=r, col_ind=c, objective=obj, maximize=bool(maximize),
                                      method="scipy")
    C, kind = as_cost(cost, "cost")
    meth = _choose(method, C, kind.device)
    B, n, m = C.shape
    k = min(n, m)
    n_fb, stats = 0, None
    if k == 0 or B == 0:
        rows = torch.zeros(B, 0, dtype=torch.long)
        cols = torch.zeros(B, 0, dtype=torch.long)
    elif meth == "scipy":
        r, c = _scipy_batch(C.cpu().numpy(), maximize, workers)
        rows, cols = torch.from_numpy(r), torch.from_numpy(c)
    else:
        if kind.is_numpy:
            C = C.to(kind.device)
        rows, cols, n_fb, stats = _torch_batch(C, maximize, seed, auction_options, workers)
    Cd = C.to(rows.device)
    obj = Cd[torch.arange(B, device=rows.device)[:, None], rows, cols].sum(-1) if k else \
        torch.zeros(B, dtype=torch.float64, device=rows.device)
    return LinearAssignmentResult(row_ind=kind.out(rows), col_ind=kind.out(cols), objective=kind.out(obj),
                                  maximize=bool(maximize), method=meth, n_fallback=n_fb, stats=stats)


@dataclass(frozen=True)
class HierarchicalAssignmentResult:
    """Two-level assignment (e.g. attention heads, then units inside the matched heads).

    Attributes
    ----------
    head_rows, head_cols : int64 ``(k,)``, ``k = min(H, H')``: head ``head_rows[t]`` of the first model
        is matched to head ``head_cols[t]`` of the second (``head_rows = arange(H)`` when ``H <= H'``).
    inner_rows, inner_cols : int64 ``(k, min(d, e))``: inside matched pair ``t``, unit
        ``inner_rows[t, s]`` goes to unit ``inner_cols[t, s]`` (SciPy convention, as in
        :class:`LinearAssignmentResult`).
    inner_objective : float64 ``(H, H')``: optimal inner LAP value of every head pair.
    objective : float64 scalar: ``sum_t inner_objective[head_rows[t], head_cols[t]]``, the optimum of
        the nested problem.
    maximize, method : as in :class:`LinearAssignmentResult` (``method`` of the batched inner solve).
    """

    head_rows: Any
    head_cols: Any
    inner_rows: Any
    inner_cols: Any
    inner_objective: Any
    objective: Any
    maximize: bool
    method: str


def hierarchical_assignment(cost4d: Any, maximize: bool = False, method: str = "auto", *, seed: int = 0,
                            workers: Optional[int] = None) -> HierarchicalAssignmentResult:
    """Nested LAP: ``opt_pi sum_h opt_sigma_h sum_i cost4d[h, pi(h), i, sigma_h(i)]``.

    All ``H * H'`` inner problems ``cost4d[h, g]`` (``d x e``) are solved in one batched
    :func:`linear_assignment` call, then the outer ``H x H'`` LAP runs on their optimal values. This is
    the exact optimum of the nested problem, because the inner problems of different head pairs share
    no variables. It serves multi-head attention, where heads permute as blocks and units permute
    inside heads (e.g. Verma & Elbayad 2024, arXiv:2403.00986, "Merging Text Transformer Models from
    Different Initializations").

    Parameters
    ----------
    cost4d : array or tensor, shape ``(H, H', d, e)``
        ``cost4d[h, g, i, j]``: cost of matching unit ``i`` of head ``h`` to unit ``j`` of head ``g``.
    maximize, method, seed, workers : as in :func:`linear_assignment` (``method`` and ``workers``
        apply to the inner batch; the small outer problem always uses SciPy).

    Returns
    -------
    HierarchicalAssignmentResult, in the input's kind and on its device.
    """
    if not hasattr(cost4d, "shape"):
        cost4d = np.asarray(cost4d)
    shape = tuple(cost4d.shape)
    if len(shape) != 4:
        raise ValueError(f"cost4d must have shape (H, H', d, e), got shape {shape}; for a single level "
                         "use linear_assignment")
    if 0 in shape:
        raise ValueError(f"cost4d has an empty axis: shape {shape}; every head needs >= 1 unit")
    H, H2, d, e = shape
    C, kind = as_cost(cost4d.reshape(H * H2, d, e), "cost4d")
    inner = linear_assignment(C if not kind.is_numpy else C.numpy(), maximize=maximize, method=method,
                              seed=seed, workers=workers)
    dev = C.device
    vals = torch.as_tensor(inner.objective).to(dev).reshape(H, H2)
    irow = torch.as_tensor(inner.row_ind).to(dev).reshape(H, H2, -1)
    icol = torch.as_tensor(inner.col_ind).to(dev).reshape(H, H2, -1)
    outer = linear_assignment(vals.cpu().numpy(), maximize=maximize, method="scipy")
    orow = torch.as_tensor(outer.row_ind, device=dev)
    ocol = torch.as_tensor(outer.col_ind, device=dev)
    one = _Kind1(kind)
    return HierarchicalAssignmentResult(
        head_rows=one(orow), head_cols=one(ocol), inner_rows=one(irow[orow, ocol]),
        inner_cols=one(icol[orow, ocol]), inner_objective=one(vals),
        objective=one(torch.as_tensor(float(outer.objective), dtype=torch.float64, device=dev)),
        maximize=bool(maximize), method=inner.method)


class _Kind1:
    """Return unbatched tensors in the caller's kind."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, t: torch.Tensor):
        return t.detach().cpu().numpy() if self.kind.is_numpy else t.to(self.kind.device)
