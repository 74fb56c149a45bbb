"""Norm- and margin-based generalization measures of Jiang, Neyshabur, Mobahi, Krishnan & Bengio,
"Fantastic generalization measures and where to find them", ICLR 2020, arXiv:1912.02178.

A Conv is one ``(out, in*k*k)`` matrix and an eval BatchNorm directly after a Linear/Conv is folded
into it first (``W <- diag(gamma/sqrt(var+eps)) W``, :func:`weightspace.state.fold_batchnorm`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from weightspace.checks import check_data, check_model
from weightspace.results import Result, records_time
from weightspace.state import fold_batchnorm
from weightspace.utils import iter_batches, model_device, module_mode

log = logging.getLogger(__name__)

__all__ = ["norm_measures", "NormMeasures"]


# ----------------------------------------------------------------------------------------------
# norm-based measures (Jiang et al.)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormMeasures(Result):
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
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

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


@records_time
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
