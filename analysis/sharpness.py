"""Hessian sharpness: top eigenvalues (Lanczos or deflated power iteration) and Hutchinson's trace.

PyHessian-style estimators (Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural networks through the
lens of the Hessian", IEEE BigData 2020, arXiv:1912.07145), computed from Hessian-vector products of the
full-data loss

    L(theta) = (1/N) sum_i loss(f_theta(x_i), y_i),     H = d^2 L / d theta^2   (P x P, P = #parameters),

evaluated functionally at the model's parameters (``torch.func.functional_call`` on detached copies
and cloned buffers, double backward for ``H v``). The model is never modified; it is evaluated in eval
mode by default and every module's train/eval flag is restored afterwards.

Known pitfall (of PyHessian, Yao et al. 2020, arXiv:1912.07145): plain power iteration converges to the eigenvalue of
largest **magnitude**, so on a concave loss it returns a negative number that is not ``lambda_max``.
Here ``which="LA"`` (largest algebraic, the default) uses Lanczos, or power iteration on the shifted
operator ``H + |mu| I`` where ``mu`` is the largest-magnitude eigenvalue; ``which="LM"`` asks for the
largest magnitudes explicitly. Signs are always kept.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from weightspace.checks import check_data, check_model
from weightspace.results import Result, records_time
from weightspace.utils import iter_batches, module_mode

log = logging.getLogger(__name__)

__all__ = ["hessian_eigenvalues", "hessian_trace", "HessianEigen", "HessianTrace"]


@dataclass(frozen=True)
class HessianEigen(Result):
    """Top Hessian eigenpairs.

    Attributes
    ----------
    eigenvalues : tuple of float
        Ordered by ``which`` (descending value for "LA", descending magnitude for "LM", ascending for
        "SA"), with their signs.
    eigenvectors : tuple of dict
        One ``{parameter name: tensor}`` per eigenvalue (unit norm over all parameters together).
    residuals : tuple of float
        ``||H v - lambda v||`` estimates at exit.
    """

    eigenvalues: Tuple[float, ...]
    eigenvectors: Tuple[Dict[str, torch.Tensor], ...]
    residuals: Tuple[float, ...]
    converged: bool
    n_iter: int
    method: str
    which: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

@dataclass(frozen=True)
class HessianTrace(Result):
    """Hutchinson estimate ``tr H ~ mean_i v_i^T H v_i`` with Rademacher ``v_i``."""

    mean: float
    std_error: float
    samples: Tuple[float, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

# ----------------------------------------------------------------------------------------------
class _HVP:
    """Hessian-vector products of the mean loss over ``data`` at the model's current parameters."""

    def __init__(self, model: nn.Module, data, loss_fn: Optional[Callable], device, params: Optional[Sequence[str]]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if params is not None:
            wanted = list(params)
            lookup = dict(model.named_parameters())
            missing = [n for n in wanted if n not in lookup]
            if missing:
                raise ValueError(f"unknown parameter names {missing}; valid names: {sorted(lookup)}")
            named = [(n, lookup[n]) for n in wanted]
        if not named:
            raise ValueError("the model has no trainable parameters to differentiate")
        dev = torch.device(device) if device is not None else named[0][1].device
        self.device = dev
        self.names = [n for n, _ in named]
        self.base = [p.detach().to(dev).clone() for _, p in named]
        self.shapes = [p.shape for p in self.base]
        self.numels = [p.numel() for p in self.base]
        self.dtype = self.base[0].dtype
        self.n_params = sum(self.numels)
        self.buffers = {n: b.detach().to(dev).clone() for n, b in model.named_buffers()}
        self.model = model
        self.batches = []
        total = 0
        for x, y in iter_batches(data, dev):
            if torch.is_tensor(x) and x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError("data contains NaN or inf inputs")
            if torch.is_tensor(y) and y.is_floating_point() and not torch.isfinite(y).all():
                raise ValueError("data contains NaN or inf targets")
            self.batches.append((x, y))
            total += x.shape[0] if torch.is_tensor(x) else len(x)
        self.n_samples = total
        self.loss_fn, self.loss_name = self._resolve_loss(loss_fn)

    def _resolve_loss(self, loss_fn):
        if loss_fn is not None:
            return loss_fn, getattr(loss_fn, "__name__", type(loss_fn).__name__)
        y = self.batches[0][1]
        if y is None:
            raise ValueError("data has no targets; pass (X, Y) pairs or a loss_fn(outputs, targets)")
        if not y.is_floating_point():
            with torch.no_grad():
                out = functional_call(self.model, {**dict(zip(self.names, self.base)), **self.buffers},
                                      (self.batches[0][0],))
            c = out.shape[-1]
            for _, yb in self.batches:
                if (yb < 0).any() or (yb >= c).any():
                    raise ValueError(f"labels out of range [0, {c}) for cross-entropy: min {int(yb.min())}, "
                                     f"max {int(yb.max())}")
            return F.cross_entropy, "cross_entropy"
        return F.mse_loss, "mse"

    def flat(self, ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def unflat(self, v: torch.Tensor) -> List[torch.Tensor]:
        return [c.reshape(s) for c, s in zip(torch.split(v, self.numels), self.shapes)]

    def to_dict(self, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, [t.detach().clone() for t in self.unflat(v)]))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        vs = self.unflat(v)
        out = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        for x, y in self.batches:
            ps = [b.detach().requires_grad_(True) for b in self.base]
            buffers = {n: b.clone() for n, b in self.buffers.items()}
            pred = functional_call(self.model, {**dict(zip(self.names, ps)), **buffers}, (x,))
            n_b = x.shape[0] if torch.is_tensor(x) else len(x)
            loss = self.loss_fn(pred, y) * (n_b / self.n_samples)
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            dot = sum((g * vi).sum() for g, vi in zip(grads, vs) if g is not None)
            if not torch.is_tensor(dot) or not dot.requires_grad:
                continue  # loss is linear in the parameters on this batch
            hv = torch.autograd.grad(dot, ps, allow_unused=True)
            out += self.flat([torch.zeros_like(p) if h is None else h for h, p in zip(hv, ps)])
        return out


def _mode(model: nn.Module, mode: str):
    """Every module in eval (or train) mode for the block, each module's own flag restored after."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    return module_mode(model, mode == "train")


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-theta)[:k]
    if which == "SA":
        return np.argsort(theta)[:k]
    return np.argsort(-np.abs(theta))[:k]


def _lanczos(op, n, k, max_iter, tol, which, gen, dtype, device):
    m_max = min(max(max_iter, k), n)
    Q: List[torch.Tensor] = []
    alpha: List[float] = []
    beta: List[float] = []
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q = q / q.norm()
    converged, res = False, np.full(k, np.inf)
    theta = s = None
    for j in range(m_max):
        Q.append(q)
        w = op(q)
        a = float(w @ q)
        alpha.append(a)
        Qm = torch.stack(Q)
        for _ in range(2):  # full re-orthogonalisation, twice
            w = w - Qm.T @ (Qm @ w)
        b = float(w.norm())
        T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, s = np.linalg.eigh(T)
        idx = _select(theta, min(k, len(theta)), which)
        res = b * np.abs(s[-1, idx])
        scale = max(np.max(np.abs(theta)), 1e-30)
        if len(theta) >= k and np.all(res <= tol * np.maximum(np.abs(theta[idx]), 1e-12 * scale)):
            converged = True
            break
        if j + 1 >= m_max:
            break
        if b <= 1e-10 * scale:  # invariant subspace: restart orthogonally
            r = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(2):
                r = r - Qm.T @ (Qm @ r)
            if float(r.norm()) < 1e-8:
                converged = True
                break
            beta.append(0.0)
            q = r / r.norm()
        else:
            beta.append(b)
            q = w / b
    idx = _select(theta, min(k, len(theta)), which)
    Qm = torch.stack(Q)
    S = torch.as_tensor(s[:, idx], dtype=dtype, device=device)
    vecs = (Qm.T @ S).T
    return [float(theta[i]) for i in idx], list(vecs), [float(r) for r in res], converged, len(alpha)


def _power(op, n, k, max_iter, tol, gen, dtype, device, shift=0.0):
    vals, vecs, res, n_iter, all_conv = [], [], [], 0, True
    for _ in range(k):
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        for u in vecs:
            v = v - (u @ v) * u
        v = v / v.norm()
        lam, conv = None, False
        for _it in range(max_iter):
            n_iter += 1
            Hv = op(v) + shift * v
            lam_new = float(Hv @ v)
            for u in vecs:
                Hv = Hv - (u @ Hv) * u
            nrm = float(Hv.norm())
            if nrm == 0.0:
                lam, conv = lam_new, True
                break
            v = Hv / nrm
            if lam is not None and abs(lam_new - lam) / (abs(lam) + 1e-6) < tol:
                lam, conv = lam_new, True
                break
            lam = lam_new
        Hv = op(v)
        lam_final = float(Hv @ v)
        vals.append(lam_final)
        res.append(float((Hv - lam_final * v).norm()))
        vecs.append(v)
        all_conv &= conv
    return vals, vecs, res, all_conv, n_iter


@records_time
def hessian_eigenvalues(model: nn.Module, data, k: int = 1, loss_fn: Optional[Callable] = None,
                        method: str = "lanczos", max_iter: int = 100, tol: float = 1e-3, which: str = "LA",
                        seed: int = 0, *, mode: str = "eval", params: Optional[Sequence[str]] = None,
                        device=None) -> HessianEigen:
    """Top-``k`` eigenvalues (with their signs) and eigenvectors of the loss Hessian.

    Parameters
    ----------
    model : nn.Module
    data : (X, Y) or iterable of (x, y) batches
        The loss is the sample mean over all of ``data`` (each batch's mean-reduced loss weighted by
        its size).
    k : int
        Number of eigenpairs.
    loss_fn : callable(outputs, targets) -> scalar, optional
        Mean-reduced loss. Default: cross-entropy for integer targets, MSE for float targets.
    method : {"lanczos", "power"}
        Lanczos with full re-orthogonalisation (stops when every selected Ritz pair has relative
        residual ``beta_j |s_j| <= tol |theta|``), or PyHessian's deflated power iteration (stops when
        the eigenvalue changes by less than ``tol`` relatively).
    which : {"LA", "LM", "SA"}
        Largest algebraic (default), largest magnitude, or smallest algebraic (Lanczos only). With
        ``method="power"`` and ``"LA"`` the operator is shifted by ``|mu|`` (``mu`` = largest-magnitude
        eigenvalue) so that the largest algebraic eigenvalues come out, with their signs.
    seed : int
        Seeds the random start vectors (``torch.Generator``); equal seeds give equal results.
    mode : {"eval", "train"}
        Module mode during the evaluation (restored afterwards).
    params : sequence of str, optional
        Restrict the Hessian to these parameter names (default: all parameters requiring grad).

    Returns
    -------
    HessianEigen

    Examples
    --------
    >>> import torch, analysis
    >>> net = torch.nn.Linear(3, 1, bias=False)
    >>> X, Y = torch.randn(20, 3), torch.randn(20, 1)
    >>> analysis.hessian_eigenvalues(net, (X, Y), k=2).eigenvalues   # doctest: +SKIP
    """
    model = check_model(model, where="analysis.hessian_eigenvalues")
    check_data(data, where="analysis.hessian_eigenvalues")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if which not in ("LA", "LM", "SA"):
        raise ValueError(f"which must be 'LA', 'LM' or 'SA', got {which!r}")
    if which == "SA" and method == "power":
        raise ValueError("which='SA' needs method='lanczos'")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got {max_iter}, {tol}")
    with _mode(model, mode):
        op = _HVP(model, data, loss_fn, device, params)
        if k > op.n_params:
            raise ValueError(f"k = {k} exceeds the number of parameters ({op.n_params})")
        gen = torch.Generator().manual_seed(int(seed))
        if method == "lanczos":
            vals, vecs, res, conv, n_iter = _lanczos(op, op.n_params, k, max_iter, tol, which, gen, op.dtype, op.device)
        else:
            if which == "LM":
                vals, vecs, res, conv, n_iter = _power(op, op.n_params, k, max_iter, tol, gen, op.dtype, op.device)
            else:
                mu, _, _, conv0, it0 = _power(op, op.n_params, 1, max_iter, tol, gen, op.dtype, op.device)
                shift = abs(mu[0])
                vals, vecs, res, conv, n_iter = _power(op, op.n_params, k, max_iter, tol, gen, op.dtype, op.device,
                                                       shift=shift)
                conv, n_iter = conv and conv0, n_iter + it0
        if not conv:
            log.warning("hessian_eigenvalues (%s) did not converge to tol=%g in max_iter=%d; raise max_iter",
                        method, tol, max_iter)
        eigvecs = tuple(op.to_dict(v) for v in vecs)
    settings = {"k": k, "max_iter": max_iter, "tol": tol, "seed": seed, "mode": mode, "loss": op.loss_name,
                "n_params": op.n_params, "n_samples": op.n_samples}
    return HessianEigen(eigenvalues=tuple(vals), eigenvectors=eigvecs, residuals=tuple(res), converged=bool(conv),
                        n_iter=int(n_iter), method=method, which=which, settings=settings)


@records_time
def hessian_trace(model: nn.Module, data, n_samples: int = 100, seed: int = 0, loss_fn: Optional[Callable] = None,
                  *, mode: str = "eval", params: Optional[Sequence[str]] = None, device=None) -> HessianTrace:
    """Hutchinson's estimate of ``tr(H)`` with Rademacher probes (Hutchinson 1989; PyHessian).

    ``tr H = E[v^T H v]`` for ``v`` with i.i.d. +-1 entries; the estimate is the mean of ``n_samples``
    draws, its standard error ``std(samples, ddof=1)/sqrt(n_samples)``. Probes come from a
    ``torch.Generator`` seeded with ``seed``. Same ``data``/``loss_fn``/``mode`` conventions as
    :func:`hessian_eigenvalues`.
    """
    model = check_model(model, where="analysis.hessian_trace")
    check_data(data, where="analysis.hessian_trace")
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (for a standard error), got {n_samples!r}")
    with _mode(model, mode):
        op = _HVP(model, data, loss_fn, device, params)
        gen = torch.Generator().manual_seed(int(seed))
        samples = []
        for _ in range(n_samples):
            v = (torch.randint(0, 2, (op.n_params,), generator=gen) * 2 - 1).to(device=op.device, dtype=op.dtype)
            samples.append(float(v @ op(v)))
    arr = np.asarray(samples)
    settings = {"n_samples": n_samples, "seed": seed, "distribution": "rademacher", "mode": mode,
                "loss": op.loss_name, "n_params": op.n_params, "n_data": op.n_samples}
    return HessianTrace(mean=float(arr.mean()), std_error=float(arr.std(ddof=1) / math.sqrt(n_samples)),
                        samples=tuple(samples), settings=settings)
