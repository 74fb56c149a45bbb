"""Weight-spectrum metrics (WeightWatcher-style) and norm-based generalization measures.

* :func:`fit_power_law` -- power-law fit of an eigenvalue tail by maximum likelihood with the xmin
  that minimises the Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman, SIAM Review 2009,
  arXiv:0706.1062), as used by WeightWatcher.
* :func:`spectral_metrics` -- per-layer empirical spectral densities (ESD) and the heavy-tailed
  self-regularisation metrics of Martin & Mahoney (JMLR 2021, arXiv:1810.01075; Nature Comm. 2021,
  arXiv:2002.06716).
* :func:`norm_measures` -- norm and margin based complexity measures from Jiang, Neyshabur, Mobahi,
  Krishnan & Bengio, "Fantastic generalization measures and where to find them", ICLR 2020,
  arXiv:1912.02178.

Conventions (REFERENCES.md sections 4.12-4.13): the ESD of an ``N x M`` matrix (``N >= M``) is the set
of eigenvalues of ``W^T W`` -- squared singular values, **not** divided by ``N`` and not halved (the
WeightWatcher 0.7.7 ``conv2d_norm`` default halves them). A Conv layer is split into one
``out x in`` matrix per kernel position (a 64->128 3x3 conv gives 9 x 64 = 576 eigenvalues). For the
norm measures a Conv is one ``(out, in*k*k)`` matrix and BatchNorm is folded into the preceding
Linear/Conv first (``W <- diag(gamma/sqrt(var+eps)) W``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from weightspace.checks import check_data, check_model
from weightspace.state import fold_batchnorm
from weightspace.utils import iter_batches, model_device, module_mode

log = logging.getLogger(__name__)

__all__ = ["fit_power_law", "spectral_metrics", "norm_measures", "PowerLawFit", "LayerSpectrum",
           "SpectralMetrics", "NormMeasures"]


# ----------------------------------------------------------------------------------------------
# power-law fit
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
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

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _ks(tail: np.ndarray, xmin: float, alpha: float) -> float:
    n = tail.size
    cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))


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
                           int(tail.size), int(x.size), True, 1)
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
                       int(starts.size))


# ----------------------------------------------------------------------------------------------
# spectral metrics per layer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpectrum:
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

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpectralMetrics:
    """Per-layer spectra; ``layers`` lists every weight matrix found, analysed or skipped."""

    layers: Tuple[LayerSpectrum, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def analysed(self) -> Tuple[LayerSpectrum, ...]:
        return tuple(r for r in self.layers if not r.skipped)

    @property
    def skipped(self) -> Tuple[LayerSpectrum, ...]:
        return tuple(r for r in self.layers if r.skipped)

    def as_dicts(self) -> List[Dict[str, Any]]:
        return [r.as_dict() for r in self.layers]

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
        One :class:`LayerSpectrum` per weight matrix (``as_dicts()`` gives plain dicts).
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


# ----------------------------------------------------------------------------------------------
# norm-based measures (Jiang et al.)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormMeasures:
    """Norm / margin measures of Jiang et al. (2020). Logs are natural logs; squared norms throughout.

    Attributes
    ----------
    log_prod_spectral : sum_l log ||W_l||_2^2        (log of the product of squared spectral norms)
    sum_spectral : sum_l ||W_l||_2^2
    log_prod_frobenius : sum_l log ||W_l||_F^2
    sum_frobenius : sum_l ||W_l||_F^2
    frobenius_over_spectral : sum_l ||W_l||_F^2 / ||W_l||_2^2
    dist_from_init : sum_l ||W_l - W_l^0||_F^2 (None without ``init_model``)
    margin : 10th percentile (``margin_quantile``) of ``f_y(x) - max_{c != y} f_c(x)`` (None without data)
    log_prod_spectral_over_margin : log_prod_spectral - 2 log|margin|
    path_norm_sq : ||Phi||_2^2 (L2 path-norm squared) when the model is a supported ReLU DAG
    path_norm_sq_over_margin : path_norm_sq / margin^2
    """

    n_layers: int
    log_prod_spectral: float
    sum_spectral: float
    log_prod_frobenius: float
    sum_frobenius: float
    frobenius_over_spectral: float
    dist_from_init: Optional[float]
    margin: Optional[float]
    log_prod_spectral_over_margin: Optional[float]
    path_norm_sq: Optional[float]
    path_norm_sq_over_margin: Optional[float]
    layers: Tuple[Mapping[str, Any], ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["layers"] = [dict(x) for x in self.layers]
        d["settings"] = dict(self.settings)
        return d


def _folded(model: nn.Module, example=None) -> Tuple[Dict[str, torch.Tensor], str]:
    """Layer name -> its weight with the BatchNorm after it folded in, and a note for the result."""
    try:
        folded = fold_batchnorm(model, example)
    except RuntimeError as exc:
        return {}, f"not folded: {exc}"
    return ({k: W for k, (W, _) in folded.items()},
            f"folded {len(folded)} BatchNorm layer(s) into the preceding Linear/Conv")


def _matrices(model: nn.Module, fold_bn: bool, example=None):
    folded, note = _folded(model, example) if fold_bn else ({}, "not folded (fold_bn=False)")
    mats = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            W = folded[name] if name in folded else m.weight.detach().double()
            mats[name] = W.reshape(W.shape[0], -1)
    return mats, note


def _margins(model, data, device) -> np.ndarray:
    out = []
    with module_mode(model), torch.no_grad():
        for x, y in iter_batches(data, device):
            if y is None:
                raise ValueError("norm_measures needs labelled data (X, Y) for the margin")
            if torch.is_tensor(x) and x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError("data contains NaN or inf inputs")
            f = model(x)
            if f.dim() != 2 or f.shape[1] < 2:
                raise ValueError(f"the margin needs (batch, classes >= 2) outputs, got {tuple(f.shape)}")
            y = y.long().reshape(-1)
            if (y < 0).any() or (y >= f.shape[1]).any():
                raise ValueError(f"labels out of range [0, {f.shape[1]}): min {int(y.min())}, max {int(y.max())}")
            fy = f.gather(1, y[:, None]).squeeze(1)
            other = f.double().clone()
            other[torch.arange(len(y)), y] = -math.inf
            out.append((fy.double() - other.max(1).values).cpu().numpy())
    return np.concatenate(out)


def norm_measures(model: nn.Module, data=None, *, init_model: Optional[nn.Module] = None,
                  margin_quantile: float = 0.1, fold_bn: bool = True, path_norm: bool = True,
                  device=None) -> NormMeasures:
    """Norm-based generalization measures of Jiang et al. (ICLR 2020, arXiv:1912.02178).

    Every Linear / Conv weight is a matrix ``W_l`` (a Conv as ``(out, in*k*k)``); BatchNorm directly
    after a layer is folded into it first (``W <- diag(gamma/sqrt(var+eps)) W``; ``fold_bn=False``
    disables this; the result records what was folded). Measures: see :class:`NormMeasures`.

    Parameters
    ----------
    model : nn.Module
    data : (X, Y) or iterable of (x, y), optional
        Labelled data for the margin ``gamma`` = ``margin_quantile`` quantile (numpy linear
        interpolation) of ``f_y - max_{c != y} f_c``; the margin-normalised measures use ``|gamma|``.
    init_model : nn.Module, optional
        The same architecture at initialisation, for ``dist_from_init`` (layers matched by name,
        BN folded the same way).
    path_norm : bool
        Also compute ``||Phi||_2^2`` with :func:`analysis.path_norm` (needs ``data`` for the input
        shape; skipped with the reason in ``settings`` for unsupported models).
    """
    model = check_model(model, where="analysis.norm_measures")
    if init_model is not None:
        check_model(init_model, "init_model", where="analysis.norm_measures")
    if data is not None:
        check_data(data, where="analysis.norm_measures")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 <= margin_quantile <= 1.0:
        raise ValueError(f"margin_quantile must lie in [0, 1], got {margin_quantile}")
    example = None
    if data is not None and fold_bn:
        example = next(iter_batches(data, model_device(model)))[0]  # BN pairs are found on the model's device
    mats, note = _matrices(model, fold_bn, example)
    if not mats:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layer to measure")
    layers, spec, frob = [], [], []
    for name, W in mats.items():
        if not torch.isfinite(W).all():
            raise ValueError(f"weight of layer {name!r} contains NaN or inf")
        s2 = float(torch.linalg.matrix_norm(W, ord=2)) ** 2
        f2 = float((W ** 2).sum())
        spec.append(s2)
        frob.append(f2)
        layers.append({"name": name, "shape": tuple(W.shape), "spectral_sq": s2, "frobenius_sq": f2})
    settings: Dict[str, Any] = {"bn": note, "conv_matrix": "(out, in*k*k)", "margin_quantile": margin_quantile,
                                "log": "natural"}
    dist = None
    if init_model is not None:
        mats0, _ = _matrices(init_model, fold_bn, example)
        missing = [n for n in mats if n not in mats0 or mats0[n].shape != mats[n].shape]
        if missing:
            raise ValueError(f"init_model does not match the model at layers {missing} (names or shapes differ)")
        dist = float(sum(float(((mats[n] - mats0[n].to(mats[n].device)) ** 2).sum()) for n in mats))
    margin = log_over = pn = pn_over = None
    if data is not None:
        M = _margins(model, data, device)
        margin = float(np.percentile(M, 100 * margin_quantile))
        if margin != 0:
            log_over = float(sum(math.log(s) for s in spec) - 2 * math.log(abs(margin)))
        if path_norm:
            from analysis.pathnorm import UnsupportedOperationError, path_norm as _pn
            try:
                x0 = next(iter(iter_batches(data, device)))[0][:1]
                pn = _pn(model, x0, q=2, device=device).value_q
                pn_over = pn / margin ** 2 if margin != 0 else None
            except UnsupportedOperationError as exc:
                settings["path_norm"] = f"skipped: {exc}"
    logsum = (lambda v: float(sum(math.log(x) if x > 0 else -math.inf for x in v)))
    return NormMeasures(n_layers=len(mats), log_prod_spectral=logsum(spec), sum_spectral=float(sum(spec)),
                        log_prod_frobenius=logsum(frob), sum_frobenius=float(sum(frob)),
                        frobenius_over_spectral=float(sum(f / s if s > 0 else math.nan for f, s in zip(frob, spec))),
                        dist_from_init=dist, margin=margin, log_prod_spectral_over_margin=log_over,
                        path_norm_sq=pn, path_norm_sq_over_margin=pn_over, layers=tuple(layers),
                        settings=settings)
