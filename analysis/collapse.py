"""Neural collapse metrics NC1-NC4 of a classifier's last-layer features.

Papyan, Han & Donoho (2020), "Prevalence of neural collapse during the terminal phase of deep
learning training", PNAS 117(40), arXiv:2008.08186.  With ``h_i`` the input of the final
``nn.Linear`` (its features), ``y_i`` the labels, ``C`` classes and ``N`` samples:

* class means ``mu_c``, global mean ``mu_G`` (the sample mean, Papyan, or the mean of the class
  means, Han et al. 2022 / rhubarbwu: option ``global_mean``);
* ``Mdot`` = the ``(C, d)`` matrix of centred means ``mu_c - mu_G`` (rows; Papyan writes it as
  columns), ``Sigma_B = Mdot^T Mdot / C`` and ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(.)^T``.

NC1 (within-class variability collapse)
    ``Tr(Sigma_W Sigma_B^+) / C`` with a rank-``(C-1)`` pseudo-inverse (the original notebook omits
    the ``/C``); variants ``Tr Sigma_W / Tr Sigma_B`` (Tirer, Huang & Niles-Weed 2023,
    arXiv:2210.16658) and the class-distance normalised variance CDNV (Galanti, Gyorgy & Hutter
    2022, arXiv:2112.15121) ``(V_c + V_c') / (2 ||mu_c - mu_c'||^2)`` averaged over pairs.
NC2 (convergence to a simplex ETF)
    equinorm: unbiased coefficient of variation of ``||mu_c - mu_G||`` and of ``||w_c||``;
    equiangularity: std of the off-diagonal cosines and ``Avg |cos + 1/(C-1)|``; distance to the
    ETF ``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F`` with ``G = Mdot Mdot^T`` (or ``W W^T``).
NC3 (self-duality)
    Papyan's ``|| W^T/||W||_F - Mdot^T/||Mdot||_F ||_F^2`` (*squared*; nc-toolbox reports it
    unsquared), and Zhu et al. (2021, arXiv:2105.02375)'s ``|| W Mdot^T/||.||_F - ETF ||_F``.
    The means are centred, ``W`` is not.
NC4 (nearest-class-centre behaviour)
    fraction of samples with ``argmax_c (w_c^T h + b_c) != argmin_c ||h - mu_c||`` using the *train*
    means, on train and on test features (``nc4_bias`` says whether ``b`` is used: nc-toolbox keeps
    it, rhubarbwu drops it).

Everything is computed in float64 on the features' device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from weightspace.checks import check_data, check_model
from weightspace.results import Result, records_time
from weightspace.features import call_order, capture_labelled

log = logging.getLogger(__name__)

__all__ = ["neural_collapse", "NeuralCollapse", "CollapseTracker", "neural_collapse_of"]

ClassifierLike = Union[nn.Linear, torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]], None]


@dataclass(frozen=True)
class NeuralCollapse(Result):
    """NC1-NC4 of one set of features; ``None`` where a metric needs a classifier or test data.

    Metrics (lower is more collapsed, except the accuracies)
    --------------------------------------------------------
    nc1 : ``Tr(Sigma_W Sigma_B^+)/C``, rank-``pinv_rank`` pseudo-inverse (Papyan et al. 2020).
    nc1_quotient : ``Tr Sigma_W / Tr Sigma_B`` (Tirer et al. 2023).
    nc1_cdnv : CDNV averaged over the ``C(C-1)/2`` class pairs (Galanti et al. 2022).
    nc2_equinorm_means, nc2_equinorm_weights : unbiased CoV of the centred-mean / classifier-row norms.
    nc2_cos_std_means, nc2_cos_std_weights : std (``std_ddof``) of the off-diagonal cosines.
    nc2_cos_shift_means, nc2_cos_shift_weights : ``Avg_{c != c'} |cos + 1/(C-1)|``.
    nc2_etf_means, nc2_etf_weights : Frobenius distance of the normalised Gram to the simplex ETF.
    nc3 : Papyan's self-duality distance, squared (``nc3_variant``).
    nc3_zhu : Zhu et al.'s ``||W Mdot^T/||.||_F - ETF||_F``.
    nc4_train, nc4_test : fraction of classifier / nearest-class-centre *disagreement*.
    accuracy_train, accuracy_test : classifier accuracy (needs the classifier).
    ncc_accuracy_train, ncc_accuracy_test : nearest-class-centre accuracy (train means).
    """

    nc1: float
    nc1_quotient: float
    nc1_cdnv: float
    nc2_equinorm_means: float
    nc2_cos_std_means: float
    nc2_cos_shift_means: float
    nc2_etf_means: float
    nc2_equinorm_weights: Optional[float]
    nc2_cos_std_weights: Optional[float]
    nc2_cos_shift_weights: Optional[float]
    nc2_etf_weights: Optional[float]
    nc3: Optional[float]
    nc3_zhu: Optional[float]
    nc4_train: Optional[float]
    nc4_test: Optional[float]
    accuracy_train: Optional[float]
    accuracy_test: Optional[float]
    ncc_accuracy_train: float
    ncc_accuracy_test: Optional[float]
    # settings and sizes
    num_classes: int
    num_samples: int
    feature_dim: int
    global_mean: str
    pinv_rank: int
    nc4_bias: bool
    std_ddof: int
    nc1_variant: str = "papyan: Tr(Sigma_W pinv_{C-1}(Sigma_B))/C"
    nc3_variant: str = "papyan_squared: ||W^T/||W||_F - Mdot/||Mdot||_F||_F^2"
    nc4_variant: str = "disagreement: argmax(Wh+b) != argmin||h-mu_c|| (train means)"
    dtype: str = "float64"
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    @classmethod
    def metric_names(cls) -> Tuple[str, ...]:
        """The names of the numeric metric fields (the columns a tracker records)."""
        return tuple(f.name for f in fields(cls) if f.name.startswith(("nc", "accuracy", "ncc"))
                     and f.name not in ("nc1_variant", "nc3_variant", "nc4_variant", "nc4_bias"))


# ----------------------------------------------------------------------------------------- inputs
def _as_features(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor or numpy array of shape (N, d), got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, d) (trailing dims are flattened), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN/inf values (first bad rows {bad}); clean or clip the features first")
    return x


def _as_labels(y: Any, n: int, name: str, num_classes: Optional[int], device: torch.device) -> torch.Tensor:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if not torch.is_tensor(y):
        raise TypeError(f"{name} must be an integer tensor of shape (N,), got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}; use .long()")
    y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(y.shape)} but the features have {n} rows; pass one label per row")
    y = y.to(device=device, dtype=torch.long)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        raise ValueError(f"{name} out of range: min {lo}, max {hi}, but classes are "
                         f"0..{num_classes - 1 if num_classes else '?'}"
                         "; relabel to 0..C-1 or pass num_classes")
    return y


def _as_classifier(classifier: ClassifierLike, num_classes: int, dim: int, device: torch.device):
    if classifier is None:
        return None, None
    if isinstance(classifier, nn.Linear):
        w, b = classifier.weight, classifier.bias
    elif torch.is_tensor(classifier) or isinstance(classifier, np.ndarray):
        w, b = classifier, None
    elif isinstance(classifier, (tuple, list)) and 1 <= len(classifier) <= 2:
        w = classifier[0]
        b = classifier[1] if len(classifier) == 2 else None
    else:
        raise TypeError("classifier must be an nn.Linear, a weight tensor W of shape (C, d) or a pair (W, b), "
                        f"got {type(classifier).__name__}")
    w = torch.as_tensor(w).detach().to(device=device, dtype=torch.float64)
    if w.shape != (num_classes, dim):
        raise ValueError(f"classifier weight has shape {tuple(w.shape)} but the features imply (C, d) = "
                         f"({num_classes}, {dim}); pass the final layer whose input these features are")
    if b is not None:
        b = torch.as_tensor(b).detach().to(device=device, dtype=torch.float64).reshape(-1)
        if b.shape[0] != num_classes:
            raise ValueError(f"classifier bias has {b.shape[0]} entries, expected C = {num_classes}")
    if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        raise ValueError("classifier weight or bias contains NaN/inf")
    return w, b


# ------------------------------------------------------------------------------------- geometry
def _etf_distance(rows: torch.Tensor) -> float:
    """``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F`` with ``G = rows rows^T``."""
    c = rows.shape[0]
    g = rows @ rows.T
    gn = torch.linalg.matrix_norm(g)
    if gn == 0:
        return float("nan")
    etf = (torch.eye(c, dtype=g.dtype, device=g.device) - 1.0 / c) / math.sqrt(c - 1)
    return float(torch.linalg.matrix_norm(g / gn - etf))


def _norm_angle_stats(rows: torch.Tensor, ddof: int) -> Tuple[float, float, float]:
    """(CoV of row norms, std of off-diagonal cosines, Avg|cos + 1/(C-1)|)."""
    c = rows.shape[0]
    norms = rows.norm(dim=1)
    mean = norms.mean()
    cov = float(norms.std(correction=1) / mean) if mean > 0 else float("nan")
    unit = rows / norms.clamp_min(torch.finfo(rows.dtype).tiny)[:, None]
    cos = unit @ unit.T
    off = cos[~torch.eye(c, dtype=torch.bool, device=rows.device)]
    std = float(off.std(correction=ddof)) if off.numel() > ddof else 0.0
    shift = float((off + 1.0 / (c - 1)).abs().mean())
    return cov, std, shift


def _cdnv(means: torch.Tensor, var: torch.Tensor) -> float:
    """Mean over class pairs of ``(V_c + V_c')/(2 ||mu_c - mu_c'||^2)``; one row of pairs at a time
    (O(C) extra memory)."""
    c = means.shape[0]
    total = 0.0
    for i in range(c - 1):
        d2 = ((means[i + 1:] - means[i]) ** 2).sum(1)
        total += float(((var[i] + var[i + 1:]) / (2.0 * d2)).sum())
    return total / (c * (c - 1) / 2)


def _class_stats(h: torch.Tensor, y: torch.Tensor, c: int):
    counts = torch.bincount(y, minlength=c)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"classes {empty[:10]} have no samples (C = {c}); every class needs at least one sample "
                         "(relabel to 0..C-1 or pass the right num_classes)")
    sums = torch.zeros(c, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, y, h)
    return counts, sums / counts[:, None].to(h.dtype)


def _ncc(h: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    d2 = (h * h).sum(1, keepdim=True) - 2.0 * h @ means.T + (means * means).sum(1)[None, :]
    return d2.argmin(1)


@records_time
def neural_collapse(features: Any, labels: Any, classifier: ClassifierLike = None, *,
                    num_classes: Optional[int] = None, global_mean: str = "sample",
                    test_features: Any = None, test_labels: Any = None, nc4_bias: bool = True,
                    pinv_rank: Optional[int] = None, std_ddof: int = 1) -> NeuralCollapse:
    """Neural-collapse metrics NC1-NC4 (Papyan, Han & Donoho 2020, arXiv:2008.08186) and named variants.

    Parameters
    ----------
    features : Tensor or ndarray, shape (N, d)
        Last-layer features ``h_i`` (the input of the final linear layer) of the *train* set;
        trailing dims are flattened.
    labels : integer Tensor, shape (N,)
        Classes in ``0..C-1``; every class needs at least one sample.
    classifier : nn.Linear, Tensor ``W`` of shape (C, d), or pair ``(W, b)``, optional
        Enables the weight-side NC2, NC3 and NC4.
    num_classes : int, optional
        ``C``; default ``labels.max() + 1``.
    global_mean : {"sample", "class"}
        ``mu_G`` as the sample mean (Papyan) or the mean of the class means (Han et al.).
    test_features, test_labels : optional
        Test features for NC4 on test data (always against the *train* means); test labels add
        the test accuracies.
    nc4_bias : bool
        Whether the classifier's bias enters ``argmax_c (w_c^T h + b_c)`` in NC4.
    pinv_rank : int, optional
        Rank of the pseudo-inverse of ``Sigma_B`` (default ``min(C-1, d)``); directions with a
        singular value below ``1e-10`` of the largest are dropped with a warning.
    std_ddof : int
        Degrees-of-freedom correction of the cosine std (1 = unbiased, as Papyan's code).

    Returns
    -------
    NeuralCollapse
        Frozen record of every metric and the settings used.

    Notes
    -----
    NC1 is evaluated without forming ``d x d`` matrices: with ``Mdot = U S V^T``,
    ``Tr(Sigma_W Sigma_B^+)/C = sum_{k<r} ||Z v_k||^2 / (N s_k^2)`` where ``Z`` holds ``h_i - mu_{y_i}``.
    """
    if global_mean not in ("sample", "class"):
        raise ValueError(f"global_mean must be 'sample' (Papyan) or 'class' (mean of class means), got {global_mean!r}")
    h = _as_features(features, "features")
    n, d = h.shape
    y = _as_labels(labels, n, "labels", num_classes, h.device)
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if c < 2:
        raise ValueError(f"neural collapse needs at least 2 classes, got C = {c}")
    w, b = _as_classifier(classifier, c, d, h.device)
    counts, means = _class_stats(h, y, c)
    mu_g = h.mean(0) if global_mean == "sample" else means.mean(0)
    mdot = means - mu_g
    z = h - means[y]

    # NC1 and variants
    tr_w = float((z * z).sum() / n)
    tr_b = float((mdot * mdot).sum() / c)
    _, s, vh = torch.linalg.svd(mdot, full_matrices=False)
    rank = min(c - 1, d) if pinv_rank is None else int(pinv_rank)
    if not 1 <= rank <= min(c, d):
        raise ValueError(f"pinv_rank must be in 1..min(C, d) = {min(c, d)}, got {rank}")
    keep = s[:rank] > 1e-10 * s[0] if s[0] > 0 else torch.zeros(rank, dtype=torch.bool, device=s.device)
    if not bool(keep.all()):
        log.warning("Sigma_B has only %d of the requested %d non-zero directions (class means are degenerate); "
                    "NC1 uses the non-zero ones", int(keep.sum()), rank)
    if not bool(keep.any()):
        nc1 = float("inf")
    else:
        proj = z @ vh[:rank][keep].T
        nc1 = float(((proj * proj).sum(0) / (n * s[:rank][keep] ** 2)).sum())
    var = torch.zeros(c, dtype=h.dtype, device=h.device).index_add_(0, y, (z * z).sum(1)) / counts.to(h.dtype)
    quotient = tr_w / tr_b if tr_b > 0 else float("inf")
    cdnv = _cdnv(means, var)

    # NC2 on the means
    cov_m, std_m, shift_m = _norm_angle_stats(mdot, std_ddof)
    etf_m = _etf_distance(mdot)

    pred_ncc = _ncc(h, means)
    ncc_acc = float((pred_ncc == y).to(torch.float64).mean())
    ht = yt = None
    if test_features is not None:
        ht = _as_features(test_features, "test_features").to(h.device)
        if ht.shape[1] != d:
            raise ValueError(f"test_features have dimension {ht.shape[1]} but the train features have {d}")
        if test_labels is not None:
            yt = _as_labels(test_labels, ht.shape[0], "test_labels", c, h.device)
    elif test_labels is not None:
        raise ValueError("test_labels were given without test_features")
    ncc_acc_test = None
    pred_ncc_t = _ncc(ht, means) if ht is not None else None
    if yt is not None:
        ncc_acc_test = float((pred_ncc_t == yt).to(torch.float64).mean())

    wstats: Dict[str, Optional[float]] = dict.fromkeys(
        ["cov", "std", "shift", "etf", "nc3", "nc3_zhu", "nc4", "nc4_t", "acc", "acc_t"])
    if w is not None:
        wstats["cov"], wstats["std"], wstats["shift"] = _norm_angle_stats(w, std_ddof)
        wstats["etf"] = _etf_distance(w)
        wn, mn = torch.linalg.matrix_norm(w), torch.linalg.matrix_norm(mdot)
        wstats["nc3"] = float(torch.linalg.matrix_norm(w / wn - mdot / mn) ** 2) if wn > 0 and mn > 0 else float("nan")
        g = w @ mdot.T
        gn = torch.linalg.matrix_norm(g)
        etf = (torch.eye(c, dtype=g.dtype, device=g.device) - 1.0 / c) / math.sqrt(c - 1)
        wstats["nc3_zhu"] = float(torch.linalg.matrix_norm(g / gn - etf)) if gn > 0 else float("nan")
        bias = b if (nc4_bias and b is not None) else None

        def _pred(x):
            logits = x @ w.T
            return (logits + bias if bias is not None else logits).argmax(1)

        pred = _pred(h)
        wstats["nc4"] = float((pred != pred_ncc).to(torch.float64).mean())
        wstats["acc"] = float((pred == y).to(torch.float64).mean())
        if ht is not None:
            pred_t = _pred(ht)
            wstats["nc4_t"] = float((pred_t != pred_ncc_t).to(torch.float64).mean())
            if yt is not None:
                wstats["acc_t"] = float((pred_t == yt).to(torch.float64).mean())

    return NeuralCollapse(
        nc1=nc1, nc1_quotient=quotient, nc1_cdnv=cdnv,
        nc2_equinorm_means=cov_m, nc2_cos_std_means=std_m, nc2_cos_shift_means=shift_m, nc2_etf_means=etf_m,
        nc2_equinorm_weights=wstats["cov"], nc2_cos_std_weights=wstats["std"],
        nc2_cos_shift_weights=wstats["shift"], nc2_etf_weights=wstats["etf"],
        nc3=wstats["nc3"], nc3_zhu=wstats["nc3_zhu"], nc4_train=wstats["nc4"], nc4_test=wstats["nc4_t"],
        accuracy_train=wstats["acc"], accuracy_test=wstats["acc_t"],
        ncc_accuracy_train=ncc_acc, ncc_accuracy_test=ncc_acc_test,
        num_classes=c, num_samples=n, feature_dim=d, global_mean=global_mean, pinv_rank=rank,
        nc4_bias=bool(nc4_bias and b is not None), std_ddof=std_ddof,
        settings={"global_mean": global_mean, "nc4_bias": bool(nc4_bias), "std_ddof": std_ddof, "num_classes": c})


# -------------------------------------------------------------------------------- model capture
def _last_linear(model: nn.Module, data: Any) -> str:
    """Name of the last ``nn.Linear`` *called* in a forward pass over the first batch."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("layer='auto' needs an nn.Linear classifier in the model; pass layer=<module name>")
    order = call_order(model, data, linears)
    if not order:
        raise ValueError("no nn.Linear was called in the forward pass; pass layer=<module name>")
    return order[-1]


@records_time
def neural_collapse_of(model: nn.Module, data: Any, layer: str = "auto", *, at: str = "auto",
                       classifier: Any = "auto", test_data: Any = None, **options: Any) -> NeuralCollapse:
    """Capture features of ``model`` on ``data`` and return :func:`neural_collapse` of them.

    Parameters
    ----------
    model : nn.Module
        Evaluated in eval mode under ``torch.no_grad`` (its flags are restored); never modified.
    data : (X, Y) pair or iterable of ``(x, y)`` batches
        The train set (the means of NC1-NC4 are computed on it).
    layer : str
        ``"auto"``: the input of the last ``nn.Linear`` called in the forward (forward pre-hook),
        with that layer as the classifier.  Otherwise a module name from ``model.named_modules()``.
    at : {"auto", "input", "output"}
        Capture the module's input or output; ``"auto"`` is ``"input"`` for an ``nn.Linear`` and
        ``"output"`` for anything else.
    classifier : "auto", None, nn.Linear or (W, b)
        ``"auto"`` uses the captured ``nn.Linear`` when features are its input, else none.
    test_data : optional
        Test set for NC4 / test accuracy.
    **options
        Passed on to :func:`neural_collapse` (``global_mean``, ``nc4_bias``, ``num_classes``, ...).
    """
    model = check_model(model, where="analysis.neural_collapse_of")
    check_data(data, where="analysis.neural_collapse_of")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    name = _last_linear(model, data) if layer == "auto" else layer
    mod = dict(model.named_modules()).get(name)
    if mod is None:
        raise ValueError(f"no module named {name!r}; choose one of {[n for n, _ in model.named_modules()][:20]}")
    where = ("input" if isinstance(mod, nn.Linear) else "output") if at == "auto" else at
    if classifier == "auto":
        classifier = mod if (isinstance(mod, nn.Linear) and where == "input") else None
    feats, y, _ = capture_labelled(model, data, [name], where)
    tf = tl = None
    if test_data is not None:
        tfeats, tl, _ = capture_labelled(model, test_data, [name], where)
        tf = tfeats[name]
    return neural_collapse(feats[name], y, classifier, test_features=tf, test_labels=tl, **options)


class CollapseTracker:
    """Record :class:`NeuralCollapse` metrics over training epochs, column-wise, ready to plot.

    >>> tr = CollapseTracker(test_data=(Xt, Yt))           # doctest: +SKIP
    >>> for epoch in range(E): train(...); tr.update(epoch, model, (X, Y))   # doctest: +SKIP
    >>> tr.history["nc1"]                                   # doctest: +SKIP

    ``update(epoch, model, data)`` captures features with :func:`neural_collapse_of` (``layer``,
    ``test_data`` from the constructor); ``update(epoch, features, labels, classifier)`` takes
    features directly (``test_features`` / ``test_labels`` keywords).  Options given to the
    constructor are passed on to :func:`neural_collapse`.
    """

    def __init__(self, *, layer: str = "auto", test_data: Any = None, **options: Any) -> None:
        self.layer = layer
        self.test_data = test_data
        self.options = dict(options)
        self.epochs: List[Any] = []
        self.results: List[NeuralCollapse] = []

    def update(self, epoch: Any, model_or_features: Any, data_or_labels: Any = None,
               classifier: ClassifierLike = None, **kwargs: Any) -> NeuralCollapse:
        """Compute the metrics at ``epoch``, append them and return them."""
        if isinstance(model_or_features, nn.Module):
            if data_or_labels is None:
                raise ValueError("update(epoch, model, data) needs data")
            res = neural_collapse_of(model_or_features, data_or_labels, self.layer,
                                     test_data=kwargs.pop("test_data", self.test_data), **kwargs, **self.options)
        else:
            if data_or_labels is None:
                raise ValueError("update(epoch, features, labels, classifier) needs labels")
            res = neural_collapse(model_or_features, data_or_labels, classifier, **kwargs, **self.options)
        self.epochs.append(epoch)
        self.results.append(res)
        return res

    @property
    def history(self) -> Dict[str, List[Any]]:
        """``{"epoch": [...], "nc1": [...], ...}``: one column per metric, one row per update."""
        cols: Dict[str, List[Any]] = {"epoch": list(self.epochs)}
        for k in NeuralCollapse.metric_names():
            cols[k] = [getattr(r, k) for r in self.results]
        return cols

    def __len__(self) -> int:
        return len(self.results)
