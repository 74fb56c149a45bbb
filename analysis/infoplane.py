"""The information plane: ``I(X; T)`` and ``I(T; Y)`` of each hidden layer ``T`` over training.

Shwartz-Ziv & Tishby (2017, "Opening the black box of deep neural networks via information",
arXiv:1703.00810) plot, per layer, the mutual information of its representation ``T`` with the
input ``X`` and with the label ``Y``; Saxe et al. (2018, "On the information bottleneck theory of
deep learning", ICLR) show that the "compression phase" they report depends on the estimator and
on tanh saturation, and disappears with ReLU.

**Read the numbers with care.** For a deterministic network and continuous inputs ``I(X; T)`` is
infinite (or ``H(X)`` for a finite data set of distinct inputs): every estimator here measures its
*own* discretisation or noise model, so the result always records the estimator and its
hyperparameters and must be reported with them.

Estimators (``estimator=``; details and papers in :mod:`analysis._mi`)

=========  ==========================================================================================
binning    ``bins`` equal-width bins per unit (default 30 bins = 31 edges; the IDNNs code uses 30 edges =
           29 bins) over a fixed ``range`` (``binning="fixed"``), the observed data range
           (``"adaptive"``) or empirical quantiles (``"quantile"``); in :func:`information_plane`,
           ``"auto"`` uses ``[-1, 1]`` for Tanh/Hardtanh/Softsign, ``[0, 1]`` for Sigmoid/Softmax and
           ``"adaptive"`` for every other layer. Each row's pattern is one symbol; plug-in entropies.
kde        ``T + N(0, sigma2 I)``, ``sigma2 = 0.1`` by default, ``bound="upper"`` (KL) or ``"lower"``
           (Bhattacharyya); ``I(X;T) = H(T) - (d/2)(log 2 pi sigma2 + 1)``, ``I(T;Y)`` from the
           class-conditional entropies.
knn        KSG algorithm 1 (``k=3``, max-norm) between continuous variables; Ross (2014) between a
           continuous and a discrete one.
renyi      matrix-based Renyi ``alpha``-entropy (``alpha=1.01``, ``sigma="scott"``); labels use the
           delta kernel.
=========  ==========================================================================================
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from weightspace.results import Result, records_time
from analysis import _mi
from weightspace.checks import check_data, check_model
from weightspace.features import capture_labelled

log = logging.getLogger(__name__)

__all__ = ["mutual_information", "entropy", "information_plane", "InformationPlane", "InformationPlaneTracker"]

ESTIMATORS = ("binning", "kde", "knn", "renyi")
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "binning": {"bins": 30, "binning": "adaptive", "range": (-1.0, 1.0)},
    "kde": {"sigma2": 0.1, "bound": "upper"},
    "knn": {"k": 3, "standardize": True, "noise": 1e-10, "seed": 0, "clip": True},
    "renyi": {"alpha": 1.01, "sigma": "scott"},
}
_ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid,
                nn.Hardswish, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax)
_RANGE_PM1 = (nn.Tanh, nn.Softsign)
_RANGE_01 = (nn.Sigmoid, nn.Softmax)


def _options(estimator: str, options: Dict[str, Any]) -> Dict[str, Any]:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    allowed = _DEFAULTS[estimator]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for estimator {estimator!r}; allowed: {sorted(allowed)}")
    return {**allowed, **options}


def _scale(units: str) -> float:
    if units == "nats":
        return 1.0
    if units == "bits":
        return 1.0 / math.log(2.0)
    raise ValueError(f"units must be 'bits' or 'nats', got {units!r}")


def _discrete_flag(a: np.ndarray, flag: Optional[bool]) -> bool:
    return _mi.is_discrete(a) if flag is None else bool(flag)


def _mi_nats(x: np.ndarray, y: np.ndarray, estimator: str, opts: Dict[str, Any],
             dx: bool, dy: bool) -> float:
    if estimator == "binning":
        bo = {"bins": opts["bins"], "binning": opts["binning"], "value_range": opts["range"]}
        sx = _mi.symbols(x) if dx else _mi.binned_symbols(x, **bo)
        sy = _mi.symbols(y) if dy else _mi.binned_symbols(y, **bo)
        return _mi.discrete_mi(sx, sy)
    if estimator == "kde":
        if dx and dy:
            raise ValueError("the kde estimator needs at least one continuous variable; use estimator='binning'")
        if dx:  # make x the continuous one
            x, y, dx, dy = y, x, dy, dx
        if dy:
            return _mi.kde_mi_ty(x.astype(np.float64), _mi.symbols(y), opts["sigma2"], opts["bound"])
        return _mi.kde_mi_xt(y.astype(np.float64), opts["sigma2"], opts["bound"])
    if estimator == "knn":
        if dx and dy:
            return _mi.discrete_mi(_mi.symbols(x), _mi.symbols(y))
        if dx:
            x, y, dx, dy = y, x, dy, dx
        if dy:
            return _mi.ksg_mi_discrete(x, y, **opts)
        return _mi.ksg_mi(x, y, **opts)
    a = _mi.renyi_gram(x, opts["sigma"], dx)
    b = _mi.renyi_gram(y, opts["sigma"], dy)
    return _mi.renyi_mi(a, b, opts["alpha"]) * math.log(2.0)


def mutual_information(x: Any, y: Any, estimator: str = "knn", *, units: str = "bits",
                       x_discrete: Optional[bool] = None, y_discrete: Optional[bool] = None,
                       **options: Any) -> float:
    """Estimate ``I(X; Y)`` from aligned samples ``x`` (N, dx) and ``y`` (N, dy) with a named estimator.

    Parameters
    ----------
    x, y : Tensor or ndarray with N rows
        Integer (or bool) arrays are treated as discrete symbols (one per distinct row) unless
        ``x_discrete`` / ``y_discrete`` say otherwise; float arrays as continuous.
    estimator : {"knn", "binning", "kde", "renyi"}
        ``"knn"``: KSG algorithm 1 (Kraskov et al. 2004; ``k=3``, max-norm, ``standardize=True``,
        tie-breaking ``noise=1e-10`` with ``seed``, ``clip=True``), or Ross (2014) when one side is
        discrete (plug-in if both are).
        ``"binning"``: plug-in MI of binned row patterns (``bins=30``, ``binning="adaptive"`` |
        ``"fixed"`` (with ``range=(lo, hi)``) | ``"quantile"``).
        ``"kde"``: Kolchinsky-Tracey bound (``sigma2=0.1``, ``bound="upper"|"lower"``). With discrete
        ``y``: ``H(X+noise) - sum_y p(y) H(X+noise | y)``. With both continuous it assumes ``y`` is
        a *deterministic function of* ``x`` and returns ``I(X; Y + noise) = H(Y + noise) - H(noise)``.
        ``"renyi"``: matrix-based Renyi MI (Giraldo et al. 2015; ``alpha=1.01``, ``sigma="scott"``).
    units : {"bits", "nats"}

    Returns
    -------
    float
    """
    xa, ya = _mi.as_2d(x, "x"), _mi.as_2d(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x has {xa.shape[0]} rows but y has {ya.shape[0]}; pass aligned samples")
    opts = _options(estimator, options)
    return _mi_nats(xa, ya, estimator, opts, _discrete_flag(xa, x_discrete),
                    _discrete_flag(ya, y_discrete)) * _scale(units)


def entropy(x: Any, estimator: str = "binning", *, units: str = "bits", discrete: Optional[bool] = None,
            **options: Any) -> float:
    """Entropy of the rows of ``x`` under an estimator's model of it.

    ``"binning"``: plug-in entropy of the (binned) row symbols; ``"kde"``: differential entropy bound of
    ``X + N(0, sigma2 I)``; ``"renyi"``: matrix-based ``S_alpha`` of the Gram matrix.  (No kNN entropy.)
    """
    xa = _mi.as_2d(x, "x")
    opts = _options(estimator, options)
    disc = _discrete_flag(xa, discrete)
    if estimator == "binning":
        s = _mi.symbols(xa) if disc else _mi.binned_symbols(xa, opts["bins"], opts["binning"], opts["range"])
        h = _mi.entropy_of_symbols(s)
    elif estimator == "kde":
        h = _mi.kde_entropy(xa.astype(np.float64), opts["sigma2"], opts["bound"])
    elif estimator == "renyi":
        h = _mi.renyi_entropy(_mi.renyi_gram(xa, opts["sigma"], disc), opts["alpha"]) * math.log(2.0)
    else:
        raise ValueError("entropy() has no 'knn' estimator; use 'binning', 'kde' or 'renyi'")
    return h * _scale(units)


@dataclass(frozen=True)
class InformationPlane(Result):
    """One point of the information plane per layer, with the estimator and its settings.

    Attributes
    ----------
    layers : module names (each called exactly once per forward).
    i_xt, i_ty : ``I(X; T)`` and ``I(T; Y)`` per layer, in ``units``.
    estimator, options : the estimator and every hyperparameter used (defaults filled in).
    layer_settings : per-layer settings the estimator chose (e.g. the binning range).
    h_x, h_y : plug-in entropies of the inputs (distinct rows) and of the labels, the ceilings of
        the binning estimates.
    """

    layers: Tuple[str, ...]
    i_xt: Tuple[float, ...]
    i_ty: Tuple[float, ...]
    estimator: str
    options: Dict[str, Any]
    units: str
    num_samples: int
    h_x: float
    h_y: float
    layer_settings: Tuple[Dict[str, Any], ...] = field(default=())
    settings: Dict[str, Any] = field(default_factory=dict)
    log: Dict[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    def __getitem__(self, layer: str) -> Tuple[float, float]:
        i = self.layers.index(layer)
        return self.i_xt[i], self.i_ty[i]

    def rows(self) -> List[Dict[str, Any]]:
        """One ``{"layer", "i_xt", "i_ty"}`` dict per layer."""
        return [{"layer": l, "i_xt": a, "i_ty": b} for l, a, b in zip(self.layers, self.i_xt, self.i_ty)]


def _default_layers(model: nn.Module) -> List[str]:
    acts = [n for n, m in model.named_modules() if isinstance(m, _ACTIVATIONS)]
    if acts:
        return acts
    lins = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise ValueError("the model has no activation-function modules and no nn.Linear; pass layers=[names]")
    return lins


def _bin_setting(module: Optional[nn.Module], opts: Dict[str, Any]) -> Dict[str, Any]:
    mode = opts["binning"]
    if mode != "auto":
        return {"binning": mode, "range": tuple(opts["range"]) if mode == "fixed" else None}
    if isinstance(module, _RANGE_PM1):
        return {"binning": "fixed", "range": (-1.0, 1.0)}
    if isinstance(module, nn.Hardtanh):
        return {"binning": "fixed", "range": (float(module.min_val), float(module.max_val))}
    if isinstance(module, _RANGE_01):
        return {"binning": "fixed", "range": (0.0, 1.0)}
    return {"binning": "adaptive", "range": None}


@records_time
def information_plane(model: nn.Module, data: Any, layers: Optional[Sequence[str]] = None,
                      estimator: str = "binning", *, units: str = "bits", **options: Any) -> InformationPlane:
    """``I(X; T)`` and ``I(T; Y)`` of each chosen layer of ``model`` on ``data``.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode under ``torch.no_grad`` (flags restored, never modified), on its own device.
    data : (X, Y) pair or iterable of ``(x, y)`` batches
        ``X`` are the inputs (each distinct input row is one value of the variable ``X``) and ``Y``
        the labels.
    layers : list of module names, optional
        Default: the output of every activation-function module (``nn.Tanh``, ``nn.ReLU``,
        ``nn.Sigmoid``, ``nn.Softmax``, ...), in ``model.named_modules()`` order; if the model has none,
        the output of every ``nn.Linear``.  Named layers are captured at their output.  Each layer must
        be called exactly once per forward (a reused activation module raises ``ValueError``).
    estimator : {"binning", "kde", "knn", "renyi"}
        See :func:`mutual_information`.  For ``"binning"`` the default ``binning="auto"`` picks the
        range per layer type (module docstring); ``I(X;T) = H(T_bin)`` when inputs are distinct.
        For ``"kde"`` ``I(X;T) = H(T + noise) - H(noise)``; ``"knn"`` and ``"renyi"`` compare ``T``
        with the flattened inputs.
    units : {"bits", "nats"}
    **options
        Estimator hyperparameters (recorded in the result).
    """
    model = check_model(model, where="analysis.information_plane")
    check_data(data, where="analysis.information_plane")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if estimator == "binning":
        options = {"binning": "auto", **options}
        if options["binning"] not in _mi.BINNINGS + ("auto",):
            raise ValueError(f"binning must be one of {_mi.BINNINGS + ('auto',)}, got {options['binning']!r}")
        allowed = dict(_DEFAULTS["binning"])
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for estimator 'binning'; allowed: {sorted(allowed)}")
        opts = {**allowed, **options}
    else:
        opts = _options(estimator, options)
    scale = _scale(units)
    points = _default_layers(model) if layers is None else [str(n) for n in layers]
    feats, y, x = capture_labelled(model, data, points, "output", need_inputs=True)
    modules = dict(model.named_modules())
    xa = _mi.as_2d(x, "inputs")
    ya = _mi.as_2d(y, "labels")
    n = xa.shape[0]
    sx, sy = _mi.symbols(xa), _mi.symbols(ya)
    h_x, h_y = _mi.entropy_of_symbols(sx), _mi.entropy_of_symbols(sy)
    dy = _mi.is_discrete(ya)
    gram_x = gram_y = None
    names, ixt, ity, settings = [], [], [], []
    for name, t in feats.items():
        ta = _mi.as_2d(t.to(torch.float64), f"activations of {name!r}")
        setting: Dict[str, Any] = {}
        if estimator == "binning":
            setting = _bin_setting(modules.get(name), opts)
            st = _mi.binned_symbols(ta, opts["bins"], setting["binning"], setting["range"] or (-1.0, 1.0))
            a, b = _mi.discrete_mi(sx, st), _mi.discrete_mi(st, sy if dy else _mi.binned_symbols(
                ya, opts["bins"], "adaptive"))
        elif estimator == "kde":
            h_t = _mi.kde_entropy(ta, opts["sigma2"], opts["bound"])
            a = h_t - (ta.shape[1] / 2.0) * (math.log(2.0 * math.pi * opts["sigma2"]) + 1.0)
            b = _mi.kde_mi_ty(ta, sy, opts["sigma2"], opts["bound"], h_t) if dy else _mi_nats(ta, ya, "kde", opts,
                                                                                              False, False)
        elif estimator == "knn":
            a = _mi_nats(xa.astype(np.float64), ta, "knn", opts, False, False)
            b = _mi_nats(ta, ya, "knn", opts, False, dy)
        else:
            if gram_x is None:
                gram_x = _mi.renyi_gram(xa, opts["sigma"], False)
                gram_y = _mi.renyi_gram(ya, opts["sigma"], dy)
            gt = _mi.renyi_gram(ta, opts["sigma"], False)
            setting = {"sigma": _mi.renyi_sigma(ta, opts["sigma"])}
            a = _mi.renyi_mi(gram_x, gt, opts["alpha"]) * math.log(2.0)
            b = _mi.renyi_mi(gt, gram_y, opts["alpha"]) * math.log(2.0)
        names.append(name)
        ixt.append(float(a) * scale)
        ity.append(float(b) * scale)
        settings.append(setting)
        log.debug("information plane %s [%s]: I(X;T)=%.4g I(T;Y)=%.4g %s", name, estimator, ixt[-1], ity[-1], units)
    return InformationPlane(layers=tuple(names), i_xt=tuple(ixt), i_ty=tuple(ity), estimator=estimator,
                            options=opts, units=units, num_samples=n, h_x=h_x * scale, h_y=h_y * scale,
                            layer_settings=tuple(settings),
                            settings={"estimator": estimator, "options": opts, "units": units, "layers": list(names)})


class InformationPlaneTracker:
    """Record :func:`information_plane` over training: one trajectory per layer.

    >>> tr = InformationPlaneTracker(estimator="kde", sigma2=0.1)      # doctest: +SKIP
    >>> for epoch in ...: train(...); tr.update(epoch, model, (X, Y))  # doctest: +SKIP
    >>> tr.trajectories["2"]["i_xt"]; tr.compression()                  # doctest: +SKIP
    """

    def __init__(self, layers: Optional[Sequence[str]] = None, estimator: str = "binning", *,
                 units: str = "bits", **options: Any) -> None:
        self.layers = None if layers is None else list(layers)
        self.estimator = estimator
        self.units = units
        self.options = dict(options)
        self.epochs: List[Any] = []
        self.planes: List[InformationPlane] = []

    def update(self, epoch: Any, model: nn.Module, data: Any) -> InformationPlane:
        """Compute the information plane at ``epoch``, append it and return it."""
        p = information_plane(model, data, self.layers, self.estimator, units=self.units, **self.options)
        self.epochs.append(epoch)
        self.planes.append(p)
        return p

    def __len__(self) -> int:
        return len(self.planes)

    @property
    def history(self) -> Dict[str, List[Any]]:
        """Long-format columns ``{"epoch", "layer", "i_xt", "i_ty"}``, one row per (update, layer)."""
        cols: Dict[str, List[Any]] = {"epoch": [], "layer": [], "i_xt": [], "i_ty": []}
        for e, p in zip(self.epochs, self.planes):
            for r in p.rows():
                cols["epoch"].append(e)
                for k in ("layer", "i_xt", "i_ty"):
                    cols[k].append(r[k])
        return cols

    @property
    def trajectories(self) -> Dict[str, Dict[str, List[Any]]]:
        """``{layer: {"epoch": [...], "i_xt": [...], "i_ty": [...]}}``."""
        out: Dict[str, Dict[str, List[Any]]] = {}
        for e, p in zip(self.epochs, self.planes):
            for r in p.rows():
                tr = out.setdefault(r["layer"], {"epoch": [], "i_xt": [], "i_ty": []})
                tr["epoch"].append(e)
                tr["i_xt"].append(r["i_xt"])
                tr["i_ty"].append(r["i_ty"])
        return out

    def compression(self, rel_threshold: float = 0.05, abs_threshold: float = 0.0,
                    final_fraction: float = 0.1) -> Dict[str, Dict[str, Any]]:
        """Per layer, whether ``I(X;T)`` shows a compression phase.

        Definition: ``peak = max_e I(X;T)(e)``; ``final`` = mean of the last ``ceil(final_fraction * M)``
        of the ``M`` records; ``drop = peak - final``.  A layer *compresses* when the peak lies before
        that final window and ``drop > max(abs_threshold, rel_threshold * peak)``.
        """
        if not 0 < final_fraction <= 1:
            raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction}")
        out = {}
        for layer, tr in self.trajectories.items():
            v = np.asarray(tr["i_xt"], dtype=np.float64)
            m = len(v)
            w = max(1, math.ceil(final_fraction * m))
            ip = int(np.argmax(v))
            final = float(v[m - w:].mean())
            drop = float(v[ip] - final)
            out[layer] = {"peak": float(v[ip]), "peak_epoch": tr["epoch"][ip], "final": final, "drop": drop,
                          "compressed": bool(ip < m - w and drop > max(abs_threshold, rel_threshold * v[ip]))}
        return out
