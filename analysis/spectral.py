"""Weight-spectrum metrics (WeightWatcher-style); the norm-based measures are in :mod:`analysis.norms`.

* :func:`fit_power_law` -- power-law fit of an eigenvalue tail by maximum likelihood with the xmin
  that minimises the Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman, SIAM Review 2009,
  arXiv:0706.1062), as used by WeightWatcher.
* :func:`spectral_metrics` -- per-layer empirical spectral densities (ESD) and the heavy-tailed
  self-regularisation metrics of Martin & Mahoney (JMLR 2021, arXiv:1810.01075; Nature Comm. 2021,
  arXiv:2002.06716).

Conventions (Jiang et al. 2020, ICLR, arXiv:1912.02178; Martin & Mahoney 2021, JMLR, arXiv:1810.01075): the ESD of an
``N x M`` matrix (``N >= M``) is the set
of eigenvalues of ``W^T W`` -- squared singular values, **not** divided by ``N`` and not halved (the
WeightWatcher 0.7.7 ``conv2d_norm`` default halves them). A Conv layer is split into one
``out x in`` matrix per kernel position (a 64->128 3x3 conv gives 9 x 64 = 576 eigenvalues). For the
norm measures a Conv is one ``(out, in*k*k)`` matrix and BatchNorm is folded into the preceding
Linear/Conv first (``W <- diag(gamma/sqrt(var+eps)) W``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from weightspace.checks import check_model
from weightspace.results import Result, records_time

log = logging.getLogger(__name__)

__all__ = ["fit_power_law", "spectral_metrics", "PowerLawFit", "LayerSpectrum", "SpectralMetrics"]


# ----------------------------------------------------------------------------------------------
# power-law fit
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit(Result):
    """Continuous power-law fit ``p(x) ~ x^-alpha`` for ``x >= xmin``.

    ``alpha = 1 + n / sum_i ln(x_i / xmin)`` over the ``n = n_tail`` values ``>= xmin``;
    ``D = sup_x |ECDF_tail(x) - (1 - (x/xmin)^(1-alpha))|`` (two-sided KS statistic);
    ``sigma = (alpha - 1)/sqrt(n)`` (asymptotic standard error of alpha).
    """

    alpha: float
    xmin: float
    D: float
    sigma: float
    n_tail: int
    n_total: int
    xmin_fixed: bool
    n_candidates: int
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

def _ks(tail: np.ndarray, xmin: float, alpha: float) -> float:
    n = tail.size
    cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


@records_time
def fit_power_law(eigenvalues, xmin: Optional[float] = None, *, min_tail: int = 5,
                  max_candidates: int = 2000) -> PowerLawFit:
    """Fit a power law to the tail of ``eigenvalues`` (MLE alpha, KS-optimal xmin).

    Parameters
    ----------
    eigenvalues : array-like of shape (n,)
        Positive values (values <= 0 are ignored: they carry no tail information).
    xmin : float, optional
        Fix the lower cut-off; then ``alpha`` is the closed-form MLE on ``x >= xmin``. By default every
        distinct value leaving at least ``min_tail`` points in the tail is tried (at most
        ``max_candidates`` of them, evenly spaced in rank) and the one with the smallest KS distance
        ``D`` is kept.
    min_tail : int
        Smallest tail size considered.

    Returns
    -------
    PowerLawFit
    """
    x = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("fit_power_law: no eigenvalues given")
    if not np.all(np.isfinite(x)):
        raise ValueError("fit_power_law: eigenvalues contain NaN or inf")
    x = np.sort(x[x > 0])
    if x.size < max(min_tail, 2):
        raise ValueError(f"fit_power_law: {x.size} positive values, need at least {max(min_tail, 2)}")
    if xmin is not None:
        if not xmin > 0:
            raise ValueError(f"xmin must be > 0, got {xmin}")
        tail = x[x >= xmin]
        if tail.size < 2:
            raise ValueError(f"only {tail.size} values >= xmin = {xmin}; lower xmin")
        s = float(np.sum(np.log(tail / xmin)))
        if s <= 0:
            raise ValueError("all tail values equal xmin; the power-law exponent is undefined")
        alpha = 1.0 + tail.size / s
        return PowerLawFit(alpha, float(xmin), _ks(tail, xmin, alpha), (alpha - 1) / math.sqrt(tail.size),
                           int(tail.size), int(x.size), True, 1,
                           settings={"xmin": float(xmin), "min_tail": min_tail, "estimator": "continuous MLE"})
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # sum_{j >= i} ln x_j
    n_all = x.size
    # first index of each distinct value (ties start their tail at the first occurrence)
    starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    starts = starts[(n_all - starts) >= max(min_tail, 2)]
    if starts.size == 0:
        raise ValueError("fit_power_law: no xmin candidate leaves enough tail points; lower min_tail")
    if starts.size > max_candidates:
        starts = starts[np.unique(np.linspace(0, starts.size - 1, max_candidates).round().astype(int))]
    best = None
    for i in starts:
        n = n_all - i
        s = suffix[i] - n * logs[i]
        if s <= 0:
            continue
        alpha = 1.0 + n / s
        D = _ks(x[i:], x[i], alpha)
        if best is None or D < best[0]:
            best = (D, alpha, float(x[i]), int(n))
    if best is None:
        raise ValueError("fit_power_law: the tail is degenerate (all values equal)")
    D, alpha, xm, n = best
    return PowerLawFit(float(alpha), xm, float(D), float((alpha - 1) / math.sqrt(n)), n, int(n_all), False,
                       int(starts.size), settings={"xmin": None, "min_tail": min_tail, "max_candidates": max_candidates,
                                                   "estimator": "continuous MLE, xmin by minimum KS distance"})


# ----------------------------------------------------------------------------------------------
# spectral metrics per layer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpectrum(Result):
    """ESD metrics of one layer (``skipped=True`` with a ``reason`` when not analysed).

    ``log_norm = log10 ||W||_F^2 = log10 sum(lambda)``, ``log_spectral_norm = log10 lambda_max``,
    ``alpha_weighted = alpha * log10 lambda_max``, ``log_alpha_norm = log10 sum(lambda^alpha)``,
    ``stable_rank = sum(lambda)/lambda_max``, ``entropy = -sum p ln p / ln(rank)`` with
    ``p = lambda / sum(lambda)`` over the nonzero eigenvalues.
    """

    name: str
    kind: str
    shape: Tuple[int, ...]
    N: int
    M: int
    n_slices: int
    skipped: bool = False
    reason: str = ""
    n_eigenvalues: int = 0
    lambda_max: float = math.nan
    log_spectral_norm: float = math.nan
    log_norm: float = math.nan
    stable_rank: float = math.nan
    entropy: float = math.nan
    alpha: float = math.nan
    alpha_weighted: float = math.nan
    log_alpha_norm: float = math.nan
    xmin: float = math.nan
    D: float = math.nan
    sigma: float = math.nan
    n_tail: int = 0

@dataclass(frozen=True)
class SpectralMetrics(Result):
    """Per-layer spectra; ``layers`` lists every weight matrix found, analysed or skipped."""

    layers: Tuple[LayerSpectrum, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    @property
    def analysed(self) -> Tuple[LayerSpectrum, ...]:
        return tuple(r for r in self.layers if not r.skipped)

    @property
    def skipped(self) -> Tuple[LayerSpectrum, ...]:
        return tuple(r for r in self.layers if r.skipped)

    def to_dicts(self) -> List[Dict[str, Any]]:
        """One JSON-ready dict per layer (``to_dict()["layers"]`` holds the same)."""
        return [r.to_dict() for r in self.layers]

    def summary(self) -> Dict[str, float]:
        """Means over the analysed layers (NaNs ignored)."""
        out = {}
        for key in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "entropy"):
            vals = [getattr(r, key) for r in self.analysed if math.isfinite(getattr(r, key))]
            out[key] = float(np.mean(vals)) if vals else math.nan
        return out


def _slices(m: nn.Module) -> Optional[torch.Tensor]:
    """(n_slices, out, in) matrices of a Linear / Conv layer, or None if not a supported layer."""
    W = m.weight.detach()
    if isinstance(m, nn.Linear):
        return W.unsqueeze(0)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        out_c, in_c = W.shape[:2]
        return W.reshape(out_c, in_c, -1).permute(2, 0, 1)
    return None


def _entropy(lam: np.ndarray) -> float:
    lam = lam[lam > lam.max() * 1e-12] if lam.size else lam
    if lam.size <= 1:
        return 0.0
    p = lam / lam.sum()
    return float(-(p * np.log(p)).sum() / math.log(lam.size))


@records_time
def spectral_metrics(model: nn.Module, min_size: int = 10, *, fit: bool = True, min_tail: int = 5) -> SpectralMetrics:
    """Empirical spectral densities and heavy-tail metrics of every Linear / Conv layer.

    Parameters
    ----------
    model : nn.Module
    min_size : int
        Layers whose matrices have ``M = min(out, in) < min_size`` are reported as skipped (reason
        given), never silently dropped. Other modules holding a weight of dimension >= 2 (embeddings,
        transposed convs, attention projections held as raw parameters, ...) are reported as skipped
        with their type.
    fit : bool
        Fit the power law (:func:`fit_power_law`) to each layer's pooled ESD.

    Returns
    -------
    SpectralMetrics
        One :class:`LayerSpectrum` per weight matrix (``to_dicts()`` gives plain dicts).
    """
    model = check_model(model, where="analysis.spectral_metrics")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    records = []
    for name, m in model.named_modules():
        W = getattr(m, "weight", None)
        if not isinstance(W, torch.Tensor) or W.dim() < 2:
            continue
        kind = type(m).__name__
        S = _slices(m)
        if S is None:
            records.append(LayerSpectrum(name, kind, tuple(W.shape), 0, 0, 0, True,
                                         f"module type {kind} is not analysed (Linear and Conv only)"))
            continue
        n_sl, o, i = S.shape
        N, M = max(o, i), min(o, i)
        if M < min_size:
            records.append(LayerSpectrum(name, kind, tuple(W.shape), N, M, n_sl, True,
                                         f"M = min(out, in) = {M} < min_size = {min_size}"))
            continue
        if not torch.isfinite(W).all():
            records.append(LayerSpectrum(name, kind, tuple(W.shape), N, M, n_sl, True, "weight has NaN/inf"))
            continue
        sv = torch.linalg.svdvals(S.to(torch.float64))
        lam = np.sort((sv ** 2).reshape(-1).cpu().numpy())
        lmax = float(lam[-1])
        rec = dict(n_eigenvalues=int(lam.size), lambda_max=lmax,
                   log_spectral_norm=math.log10(lmax) if lmax > 0 else -math.inf,
                   log_norm=math.log10(lam.sum()) if lam.sum() > 0 else -math.inf,
                   stable_rank=float(lam.sum() / lmax) if lmax > 0 else math.nan,
                   entropy=_entropy(lam))
        reason = ""
        if fit:
            try:
                pl = fit_power_law(lam, min_tail=min_tail)
                rec.update(alpha=pl.alpha, xmin=pl.xmin, D=pl.D, sigma=pl.sigma, n_tail=pl.n_tail,
                           alpha_weighted=pl.alpha * math.log10(lmax),
                           log_alpha_norm=math.log10(float(np.sum(lam[lam > 0] ** pl.alpha))))
            except ValueError as exc:
                reason = f"power-law fit failed: {exc}"
        records.append(LayerSpectrum(name, kind, tuple(W.shape), N, M, n_sl, False, reason, **rec))
    if not records:
        log.warning("spectral_metrics: no Linear/Conv weight found in %s", type(model).__name__)
    return SpectralMetrics(tuple(records), {"min_size": min_size, "fit": fit, "min_tail": min_tail,
                                           "esd": "eig(W^T W), not normalised by N, raw (no conv2d_norm)",
                                           "conv": "one out x in slice per kernel position"})
