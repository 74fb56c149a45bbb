"""Layer-wise barriers: interpolate one group of layers at a time (Adilova, Andriushchenko, Kamp,
Fischer & Jaggi, "Layer-wise linear mode connectivity", ICLR 2024, arXiv:2307.06966); the full-model
interpolation and barriers are in :mod:`analysis.connectivity`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from weightspace.checks import check_data, check_module
from weightspace.results import Result, records_time, to_jsonable
from weightspace import state as _eval
from analysis.connectivity import _as_loss_like, _endpoints, _fn_name, _metric_names

log = logging.getLogger(__name__)

__all__ = ["layerwise_barriers", "LayerwiseBarriers"]


# --------------------------------------------------------------------------------------------------
# layer-wise barriers (Adilova et al., ICLR 2024)
# --------------------------------------------------------------------------------------------------
def _module_groups(model: nn.Module, state: Mapping) -> "OrderedDict[str, List[str]]":
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for name, mod in model.named_modules():
        p = f"{name}." if name else ""
        keys = [p + k for k, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                if t is not None and t.is_floating_point() and (p + k) in state]
        if keys:
            groups[name or "<root>"] = keys
    return groups


def _prefix_keys(prefix: str, state: Mapping) -> List[str]:
    if prefix == "":
        return [k for k in state if state[k].is_floating_point()]
    if prefix == "<root>":
        return [k for k in state if "." not in k and state[k].is_floating_point()]
    return [k for k in state if (k == prefix or k.startswith(prefix + ".")) and state[k].is_floating_point()]


def _resolve_groups(groups, model: nn.Module, state: Mapping) -> "OrderedDict[str, List[str]]":
    if isinstance(groups, str):
        if groups != "module":
            raise ValueError(f"groups={groups!r}: use 'module', a list of module prefixes or a dict "
                             "{name: prefix or [prefixes]}")
        return _module_groups(model, state)
    if isinstance(groups, Mapping):
        items = [(str(n), [p] if isinstance(p, str) else list(p)) for n, p in groups.items()]
    else:
        items = [(str(p), [p]) for p in groups]
    out: "OrderedDict[str, List[str]]" = OrderedDict()
    owner: Dict[str, str] = {}
    available = list(_module_groups(model, state))
    for name, prefixes in items:
        keys: List[str] = []
        for p in prefixes:
            ks = _prefix_keys(p, state)
            if not ks:
                more = " ..." if len(available) > 12 else ""
                raise ValueError(f"group {name!r}: prefix {p!r} matches no floating parameter or buffer; "
                                 f"module prefixes with weights: {available[:12]}{more}")
            keys += [k for k in ks if k not in keys]
        for k in keys:
            if k in owner:
                raise ValueError(f"key {k!r} is in two groups ({owner[k]!r} and {name!r}); groups must not overlap")
            owner[k] = name
        out[name] = keys
    if not out:
        raise ValueError("groups is empty")
    return out


@dataclass(frozen=True, eq=False)
class LayerwiseBarriers(Result):
    """Barriers when only one group of layers (or groups 0..l, cumulative) is interpolated.

    For a group ``l`` and base ``X`` in {A, B}, ``theta^{X,l}(alpha)`` is ``theta_X`` with the keys of
    group ``l`` replaced by ``(1 - alpha) theta_A + alpha theta_B``. The barrier is measured against
    the **full-model** endpoints (Adilova et al., ICLR 2024, arXiv:2307.06966)::

        barrier[X][l] = L(theta^{X,l}(alpha)) - ((1 - alpha) L(theta_A) + alpha L(theta_B))

    which at ``alpha = 1/2`` is ``L(theta^{X,l}(1/2)) - (L_A + L_B)/2``. For accuracy the barrier is on
    the error ``1 - accuracy``.

    Attributes
    ----------
    groups : tuple of str — row names, in network order.
    keys : tuple of tuple of str — the state keys of each group (BN buffers included).
    alpha : float
    cumulative : bool — if True row ``l`` interpolates groups ``0..l`` together.
    barriers : ``{"A" | "B": {split: {metric: (G,) array}}}``
    values : ``{"A" | "B": {split: {metric: (G,) array}}}`` — the raw metric at each point.
    endpoints : ``{split: {metric: (L_A, L_B)}}`` (raw metric; accuracy stays accuracy).
    settings : dict
    """

    groups: Tuple[str, ...]
    keys: Tuple[Tuple[str, ...], ...]
    alpha: float
    cumulative: bool
    barriers: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]
    values: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]
    endpoints: Mapping[str, Mapping[str, Tuple[float, float]]]
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run

    def _pick(self, metric: str, base: str, split: Optional[str]) -> np.ndarray:
        b = base.upper()
        if b not in self.barriers:
            raise ValueError(f"base {base!r} not computed; available: {list(self.barriers)}")
        d = self.barriers[b]
        split = next(iter(d)) if split is None else split
        if split not in d:
            raise ValueError(f"split {split!r} not computed; available: {list(d)}")
        if metric == "error" and "error" not in d[split]:
            metric = "accuracy"
        if metric not in d[split]:
            raise ValueError(f"metric {metric!r} not computed; available: {list(d[split])}")
        return np.asarray(d[split][metric], dtype=np.float64)

    def as_matrix(self, metric: str = "loss", base: str = "A", split: Optional[str] = None) -> np.ndarray:
        """Barriers as a (G, 1) column (rows = ``groups``), ready to stack over epochs.

        ``base`` is ``"A"``, ``"B"`` or ``"mean"`` (the average of the two). See :meth:`stack`.
        """
        if base.lower() == "mean":
            v = 0.5 * (self._pick(metric, "A", split) + self._pick(metric, "B", split))
        else:
            v = self._pick(metric, base, split)
        return v[:, None]

    @staticmethod
    def stack(results: Sequence["LayerwiseBarriers"], metric: str = "loss", base: str = "A",
              split: Optional[str] = None) -> np.ndarray:
        """A (G, E) layer x epoch matrix from E results that share their groups (a heatmap's z)."""
        results = list(results)
        if not results:
            raise ValueError("no results to stack")
        g0 = results[0].groups
        for i, r in enumerate(results):
            if r.groups != g0:
                raise ValueError(f"results[{i}] has groups {r.groups[:4]}... but results[0] has {g0[:4]}...; "
                                 "stack only results computed with the same groups")
        return np.concatenate([r.as_matrix(metric, base, split) for r in results], axis=1)

    def to_dict(self) -> Dict[str, Any]:
        return to_jsonable({"groups": list(self.groups), "keys": [list(k) for k in self.keys], "alpha": self.alpha,
                          "cumulative": self.cumulative, "barriers": self.barriers, "values": self.values,
                          "endpoints": self.endpoints, "settings": self.settings})


@records_time
def layerwise_barriers(model_a: nn.Module, model_b: nn.Module, data: Any,
                       groups: Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]] = "module",
                       alpha: float = 0.5, cumulative: bool = False, base: str = "both", *,
                       splits=None, metrics=("loss", "accuracy"), loss_fn: Optional[Callable] = None,
                       recalibrate_bn: Union[bool, str] = "auto", bn_data: Any = None,
                       bn_batches: Optional[int] = None, batched: Union[bool, str] = "auto", batch_points: int = 64,
                       device=None, progress=None) -> LayerwiseBarriers:
    """Layer-wise linear mode connectivity (Adilova et al., ICLR 2024, arXiv:2307.06966).

    Parameters
    ----------
    model_a, model_b : nn.Module of one architecture (never modified).
    data : as in :func:`interpolate` (one dataset or a dict of named splits).
    groups : ``"module"`` (one group per module that owns weights, in network order, BN buffers
        included), a list of module prefixes (``["features.0", "classifier"]``) or a dict
        ``{name: prefix or [prefixes]}``. A prefix covers its key and every key below it (``""`` covers
        every key, ``"<root>"`` the model's own direct parameters). Keys in no
        group stay at the base model's value; groups must not overlap.
    alpha : float — interpolation weight of the group (0.5 in the paper).
    cumulative : bool — row ``l`` interpolates groups ``0..l`` (the paper's cumulative variant).
    base : ``"A"``, ``"B"`` or ``"both"`` — which endpoint the other groups come from; the measure is
        asymmetric, so the paper reports both.
    recalibrate_bn, bn_data, bn_batches, batched, batch_points, metrics, loss_fn, device, progress :
        as in :func:`interpolate`. With BN recalibration every point, the full endpoints included, gets
        fresh statistics.

    Returns
    -------
    LayerwiseBarriers — ``barriers[base][split][metric]`` of shape (G,); ``as_matrix()``, ``stack()``.

    Notes
    -----
    Integer buffers (``num_batches_tracked``) are never interpolated, and metrics are sums over
    examples, not means of batch means — two pitfalls of the reference implementation (Adilova et al. 2024).
    With every key in one group and ``alpha = 1/2`` the value equals the full-model midpoint barrier.
    """
    check_module(model_a, "model_a", where="analysis.layerwise_barriers")
    check_module(model_b, "model_b", where="analysis.layerwise_barriers", allow_state=True)
    check_data(data, where="analysis.layerwise_barriers")
    sa, sb = _endpoints(model_a, model_b)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    b = base.upper() if isinstance(base, str) else base
    if b not in ("A", "B", "BOTH"):
        raise ValueError(f"base must be 'A', 'B' or 'both', got {base!r}")
    bases = ["A", "B"] if b == "BOTH" else [b]
    grp = _resolve_groups(groups, model_a, sa)
    names = list(grp)
    key_sets: List[List[str]] = []
    acc: List[str] = []
    for n in names:
        if cumulative:
            acc = acc + [k for k in grp[n] if k not in acc]
            key_sets.append(list(acc))
        else:
            key_sets.append(list(grp[n]))
    a = float(alpha)
    states: List[Dict[str, torch.Tensor]] = [dict(sa), dict(sb)]
    for bb in bases:
        src = sa if bb == "A" else sb
        for keys in key_sets:
            st = dict(src)
            for k in keys:
                st[k] = sa[k] * (1.0 - a) + sb[k] * a
            states.append(st)
    split_map = _eval.normalize_splits(data, splits)
    rec = _eval.resolve_recalibration(recalibrate_bn, model_a)
    vals, info = _eval.evaluate_states(model_a, states, split_map, metrics=metrics, loss_fn=loss_fn,
                                       recalibrate_bn=rec, bn_data=bn_data, bn_batches=bn_batches, batched=batched,
                                       batch_points=batch_points, device=device, progress=progress, return_info=True)
    G = len(names)
    barriers: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {bb: {} for bb in bases}
    raw: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {bb: {} for bb in bases}
    endpoints: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for s, d in vals.items():
        endpoints[s] = {}
        for bb in bases:
            barriers[bb][s], raw[bb][s] = {}, {}
        for m, v in d.items():
            endpoints[s][m] = (float(v[0]), float(v[1]))
            ll, _ = _as_loss_like(v, m)
            ref = (1.0 - a) * ll[0] + a * ll[1]
            for i, bb in enumerate(bases):
                seg = slice(2 + i * G, 2 + (i + 1) * G)
                raw[bb][s][m] = v[seg].copy()
                barriers[bb][s][m] = ll[seg] - ref
    settings = {"groups": groups if isinstance(groups, str) else "custom", "metrics": _metric_names(metrics),
                "loss_fn": _fn_name(loss_fn) or "cross_entropy", "recalibrate_bn": info["recalibrate_bn"],
                "bn_batches": bn_batches, "mode": info["mode"], "examples": info["examples"], "base": bases,
                "reference": "full-model endpoints: (1 - alpha) L_A + alpha L_B",
                "accuracy_barrier_on": "error = 1 - accuracy"}
    return LayerwiseBarriers(groups=tuple(names), keys=tuple(tuple(k) for k in key_sets), alpha=a,
                             cumulative=bool(cumulative), barriers=barriers, values=raw, endpoints=endpoints,
                             settings=settings)
