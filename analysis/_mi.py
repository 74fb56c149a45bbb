"""Mutual-information and entropy estimators behind :mod:`analysis.infoplane` (all internal units: nats).

Four families, each restated from its paper:

* **binning** (Shwartz-Ziv & Tishby 2017, arXiv:1703.00810): every coordinate is discretised,
  each row's binned pattern is one symbol, and plug-in entropies of the symbols are used.
* **kde** (Kolchinsky & Tracey 2017, arXiv:1706.02419; Saxe et al. 2018, ICLR): ``T + N(0, s2 I)``,
  the pairwise-distance upper (KL) or lower (Bhattacharyya) bound on the entropy of the mixture.
* **knn** (Kraskov, Stoegbauer & Grassberger 2004, arXiv:cond-mat/0305641, algorithm 1), max-norm,
  with Ross (2014, PLoS ONE 9(2) e87357) for a continuous variable against a discrete one.
* **renyi** (Giraldo, Rao & Principe 2015, arXiv:1211.2459): matrix-based alpha-entropy of
  trace-normalised Gram matrices; joint entropy via the Hadamard product.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

log = logging.getLogger(__name__)

BINNINGS = ("fixed", "adaptive", "quantile")


# ------------------------------------------------------------------------------------- inputs
def as_2d(a: Any, name: str) -> np.ndarray:
    """``(N,)`` or ``(N, ...)`` tensor/array -> ``(N, d)`` numpy array (dtype kept), checked finite and non-empty."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric tensor/array, got dtype {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{name} must have a sample axis (shape (N,) or (N, d)), got a scalar")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    a = a.reshape(a.shape[0], -1)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        rows = np.nonzero(~np.isfinite(a).all(1))[0][:5].tolist()
        raise ValueError(f"{name} contains NaN/inf (first bad rows {rows}); clean the data first")
    return a


def is_discrete(a: np.ndarray) -> bool:
    return a.dtype.kind in "biu"


def symbols(a: np.ndarray) -> np.ndarray:
    """One integer symbol per distinct row of ``a`` (shape ``(N,)``)."""
    if a.shape[1] == 1:
        return np.unique(a[:, 0], return_inverse=True)[1].reshape(-1)
    return np.unique(a, axis=0, return_inverse=True)[1].reshape(-1)  # reshape: NumPy 2 keeps a 2-D inverse


def entropy_of_symbols(s: np.ndarray) -> float:
    """Plug-in Shannon entropy (nats) of a 1-D array of symbols."""
    _, counts = np.unique(s, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def discrete_mi(a: np.ndarray, b: np.ndarray) -> float:
    """``H(A) + H(B) - H(A, B)`` (nats) of two aligned 1-D symbol arrays."""
    joint = symbols(np.stack([a, b], 1))
    return max(0.0, entropy_of_symbols(a) + entropy_of_symbols(b) - entropy_of_symbols(joint))


# ------------------------------------------------------------------------------------- binning
def bin_edges(values: np.ndarray, bins: int, binning: str, value_range: Tuple[float, float]) -> np.ndarray:
    """``bins + 1`` edges. ``fixed``: linspace over ``value_range``; ``adaptive``: linspace over the
    observed ``[min, max]`` of all values; ``quantile``: equal-mass edges (empirical quantiles)."""
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer (number of bins), got {bins!r}")
    if binning == "fixed":
        lo, hi = map(float, value_range)
        if not hi > lo:
            raise ValueError(f"range must be (low, high) with high > low, got {value_range}")
        edges = np.linspace(lo, hi, bins + 1)
        outside = (values < lo) | (values > hi)
        if outside.any():
            warnings.warn(f"{int(outside.sum())} of {values.size} values fall outside the fixed binning range "
                          f"[{lo}, {hi}] (observed [{values.min():.4g}, {values.max():.4g}]); they are put in the "
                          "first/last bin. Use binning='adaptive' or 'quantile' for unbounded activations (ReLU).",
                          RuntimeWarning, stacklevel=4)
        return edges
    if binning == "adaptive":
        return np.linspace(float(values.min()), float(values.max()), bins + 1)
    if binning == "quantile":
        return np.quantile(values.reshape(-1), np.linspace(0.0, 1.0, bins + 1))
    raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")


def digitize(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in ``0..len(edges)-2``: ``[e_k, e_{k+1})`` -> ``k``, the last bin closed on the right.

    Values below the first edge go to bin 0 and values at or above the last edge to the last bin:
    nothing wraps around and ``x >= high`` is not a bin of its own (bugs of the reference code of Shwartz-Ziv & Tishby
    2017, arXiv:1703.00810).
    """
    return np.searchsorted(edges[1:-1], values, side="right")


def binned_symbols(t: np.ndarray, bins: int = 30, binning: str = "adaptive",
                   value_range: Tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Each row's binned activation pattern as one integer symbol (Shwartz-Ziv & Tishby 2017)."""
    tf = t.astype(np.float64, copy=False)
    edges = bin_edges(tf, bins, binning, value_range)
    return symbols(digitize(tf, edges))


# ----------------------------------------------------------------------------------------- KDE
def _neg_mean_log_mean_exp(t: np.ndarray, var: float, chunk: int = 1024) -> float:
    """``-(1/N) sum_i log (1/N) sum_j exp(-||t_i - t_j||^2 / (2 var))`` in float64, by row chunks.

    A log-sum-exp whose largest term is known: ``D_ii = 0`` exactly, so every row sum is ``>= 1`` and
    ``log(sum exp)`` needs no max shift (no overflow, no underflow to ``log 0``)."""
    t = t.astype(np.float64, copy=False)
    n = t.shape[0]
    sq = (t * t).sum(1)
    total = 0.0
    for s in range(0, n, chunk):
        blk = t[s:s + chunk]
        d2 = np.maximum(sq[s:s + chunk, None] + sq[None, :] - 2.0 * blk @ t.T, 0.0)
        d2[np.arange(blk.shape[0]), np.arange(s, s + blk.shape[0])] = 0.0  # exact self-distance
        total += float(np.log(np.exp(d2 * (-0.5 / var)).sum(1)).sum()) - blk.shape[0] * math.log(n)
    return -total / n


def kde_entropy(t: np.ndarray, sigma2: float, bound: str = "upper") -> float:
    """Entropy (nats) of ``T + N(0, sigma2 I)`` with ``T`` uniform on the rows ``t`` (Kolchinsky & Tracey 2017).

    upper (KL):           ``d/2 + (d/2) log(2 pi sigma2) - (1/N) sum_i log (1/N) sum_j exp(-D_ij / (2 sigma2))``
    lower (Bhattacharyya): the same with ``4 sigma2`` in the kernel (the ``(d/2) log 4`` terms cancel).
    """
    if not sigma2 > 0:
        raise ValueError(f"sigma2 (noise variance) must be > 0, got {sigma2}")
    if bound not in ("upper", "lower"):
        raise ValueError(f"bound must be 'upper' or 'lower', got {bound!r}")
    d = t.shape[1]
    var = sigma2 if bound == "upper" else 4.0 * sigma2
    return d / 2.0 + (d / 2.0) * math.log(2.0 * math.pi * sigma2) + _neg_mean_log_mean_exp(t, var)


def kde_mi_xt(t: np.ndarray, sigma2: float, bound: str = "upper") -> float:
    """``I(X; T+noise) = H(T+noise) - H(noise)`` with ``H(noise) = (d/2)(log 2 pi sigma2 + 1)``; in ``[0, ln N]``."""
    d = t.shape[1]
    return kde_entropy(t, sigma2, bound) - (d / 2.0) * (math.log(2.0 * math.pi * sigma2) + 1.0)


def kde_mi_ty(t: np.ndarray, labels: np.ndarray, sigma2: float, bound: str = "upper",
              h_t: Optional[float] = None) -> float:
    """``I(T+noise; Y) = H(T) - sum_y p(y) H(T | Y=y)``, each term a KDE bound (Saxe et al. 2018);
    ``h_t`` = a precomputed ``kde_entropy(t, sigma2, bound)``."""
    h = kde_entropy(t, sigma2, bound) if h_t is None else h_t
    cond = 0.0
    for lab in np.unique(labels):
        m = labels == lab
        cond += m.mean() * kde_entropy(t[m], sigma2, bound)
    return h - cond


# ----------------------------------------------------------------------------------------- kNN
def _prepare_continuous(a: np.ndarray, standardize: bool, noise: float, rng: np.random.Generator) -> np.ndarray:
    a = a.astype(np.float64, copy=True)
    if standardize:
        sd = a.std(0)
        a /= np.where(sd > 0, sd, 1.0)
    if noise > 0:
        a += noise * max(1.0, float(np.abs(a).mean())) * rng.standard_normal(a.shape)
    return a


def _count_within(points: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Number of points strictly closer than ``radius`` (max-norm), the point itself included."""
    return np.asarray(cKDTree(points).query_ball_point(points, r=np.nextafter(radius, 0), p=np.inf,
                                                      return_length=True), dtype=np.float64)


def ksg_mi(x: np.ndarray, y: np.ndarray, k: int = 3, standardize: bool = True, noise: float = 1e-10,
           seed: int = 0, clip: bool = True) -> float:
    """KSG estimator, algorithm 1 (Kraskov et al. 2004), max-norm in the joint space (nats).

    ``I = psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >`` where ``eps_i`` is the distance to the
    ``k``-th neighbour of ``(x_i, y_i)`` and ``n_x(i)`` counts the ``j != i`` with ``||x_j - x_i|| < eps_i``.
    Columns are scaled to unit variance (``standardize``) and a ``noise``-sized jitter (seeded)
    breaks ties, as scikit-learn does; ``clip`` floors the estimate at 0.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..N-1 = {n - 1}, got {k}")
    rng = np.random.default_rng(seed)
    x = _prepare_continuous(x, standardize, noise, rng)
    y = _prepare_continuous(y, standardize, noise, rng)
    joint = np.hstack([x, y])
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf)[0][:, -1]
    nx = _count_within(x, eps)
    ny = _count_within(y, eps)
    mi = digamma(k) + digamma(n) - float(np.mean(digamma(nx)) + np.mean(digamma(ny)))
    return max(0.0, mi) if clip else float(mi)


def ksg_mi_discrete(x: np.ndarray, labels: np.ndarray, k: int = 3, standardize: bool = True,
                    noise: float = 1e-10, seed: int = 0, clip: bool = True) -> float:
    """Ross (2014) kNN estimator of ``I(X; Y)`` for continuous ``x`` and discrete labels (nats), max-norm.

    For sample ``i`` with class size ``N_{y_i}``: ``d_i`` = distance to its ``k``-th neighbour within its
    class, ``m_i`` = points of the whole set strictly closer than ``d_i`` (itself included);
    ``I = psi(N) + <psi(k)> - <psi(N_y)> - <psi(m_i)>``. Singleton classes are left out.
    """
    rng = np.random.default_rng(seed)
    x = _prepare_continuous(x, standardize, noise, rng)
    lab = symbols(labels.reshape(labels.shape[0], -1))
    n = x.shape[0]
    radius = np.zeros(n)
    k_all = np.zeros(n)
    counts = np.zeros(n)
    for c in np.unique(lab):
        m = lab == c
        nc = int(m.sum())
        counts[m] = nc
        if nc > 1:
            kc = min(k, nc - 1)
            radius[m] = cKDTree(x[m]).query(x[m], k=kc + 1, p=np.inf)[0][:, -1]
            k_all[m] = kc
    keep = counts > 1
    if keep.sum() < 2:
        raise ValueError("every class has a single sample; the kNN estimator needs repeated labels")
    x, radius, k_all, counts = x[keep], radius[keep], k_all[keep], counts[keep]
    m_all = _count_within(x, radius)
    mi = digamma(x.shape[0]) + np.mean(digamma(k_all)) - np.mean(digamma(counts)) - np.mean(digamma(m_all))
    return max(0.0, float(mi)) if clip else float(mi)


# --------------------------------------------------------------------------------------- Renyi
def renyi_sigma(a: np.ndarray, sigma: Union[str, float, Tuple[str, float]]) -> float:
    """Kernel width. ``"scott"``: ``s * n^(-1/(4+d))`` with ``s`` the RMS per-dimension std (Scott's rule,
    as used by Giraldo et al. 2015 / Yu et al. 2019); ``"median"``: median pairwise distance;
    ``("quantile", q)``: that quantile of the pairwise distances; a number: itself.
    A zero width (all rows equal) becomes 1 (the Gram matrix is all ones whatever the width)."""
    n, d = a.shape
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        return float(sigma)
    if sigma == "scott":
        s = float(np.sqrt(a.var(0).mean())) * n ** (-1.0 / (4 + d))
    elif sigma == "median" or (isinstance(sigma, tuple) and len(sigma) == 2 and sigma[0] == "quantile"):
        q = 0.5 if sigma == "median" else float(sigma[1])
        sq = (a * a).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)
        s = float(np.quantile(np.sqrt(d2[np.triu_indices(n, 1)]), q)) if n > 1 else 0.0
    else:
        raise ValueError(f"sigma must be 'scott', 'median', ('quantile', q) or a positive number, got {sigma!r}")
    return s if s > 0 else 1.0


def renyi_gram(a: np.ndarray, sigma: Union[str, float, Tuple[str, float]] = "scott",
               discrete: Optional[bool] = None) -> np.ndarray:
    """Trace-normalised Gram matrix ``A = K / tr K``: Gaussian ``K_ij = exp(-||a_i - a_j||^2 / (2 sigma^2))``
    for continuous rows, the delta kernel ``K_ij = [a_i == a_j]`` for discrete ones (then ``S_alpha(A)``
    is the Renyi entropy of the empirical label distribution)."""
    if discrete is None:
        discrete = is_discrete(a)
    if discrete:
        s = symbols(a)
        k = (s[:, None] == s[None, :]).astype(np.float64)
    else:
        a = a.astype(np.float64, copy=False)
        sg = renyi_sigma(a, sigma)
        sq = (a * a).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)
        np.fill_diagonal(d2, 0.0)
        k = np.exp(-d2 / (2.0 * sg * sg))
    return k / np.trace(k)


def renyi_entropy(a_norm: np.ndarray, alpha: float = 1.01) -> float:
    """``S_alpha(A) = log2(sum_i lambda_i^alpha) / (1 - alpha)`` in **bits**, float64 ``eigvalsh``, ``lambda >= 0``."""
    if not (alpha > 0 and alpha != 1):
        raise ValueError(f"alpha must be > 0 and != 1, got {alpha}")
    lam = np.clip(np.linalg.eigvalsh(a_norm.astype(np.float64, copy=False)), 0.0, None)
    return float(np.log2((lam ** alpha).sum()) / (1.0 - alpha))


def renyi_mi(a: np.ndarray, b: np.ndarray, alpha: float = 1.01) -> float:
    """``I = S(A) + S(B) - S(A o B / tr(A o B))`` (bits) from two trace-normalised Gram matrices."""
    ab = a * b
    return renyi_entropy(a, alpha) + renyi_entropy(b, alpha) - renyi_entropy(ab / np.trace(ab), alpha)
