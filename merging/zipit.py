"""ZipIt!: merge models trained on different tasks by zipping features across and within models.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman 2024, "ZipIt! Merging Models from Different Tasks
without Training", ICLR, arXiv:2305.03053.

For every permutation group of the spec (in the forward order of its activation points) the
features of all ``N`` models are observed on ``data`` at the group's last activation point (after
the nonlinearity), their joint correlation is streamed in float64 (:func:`weightspace.features.
cross_stats`, pairwise for ``N > 2``), and the greedy zip (:mod:`merging._zipit_match`) reduces the
``N d`` features to ``d`` with a merge ``M = [M_1 ... M_N]`` (averages) and an unmerge
``U = [U_1; ...; U_N]`` (0/1). The weights follow ``W* = sum_k M_k W_k U_{k,prev}``, applied through the
spec's layouts by :func:`weightspace.transform` (BatchNorm weight, bias, running mean *and running
variance* go through ``M`` like any producer, the variance not squared, as in the paper); tensors with
no zipped output axis (e.g. the classifier) are averaged with the model weights. BatchNorm statistics
are then recomputed on ``data`` (``reset_bn``), as the paper resets them after merging.

Partial zipping (``stop=``): only the groups observed at or before module ``stop`` (in forward order)
are zipped; the result is a :class:`~merging._zipit_heads.MultiHeadModel` sharing the zipped trunk
and running each model's own tail (``MethodOutput.model``; its output format is documented there:
a list of the tails' outputs, or their concatenation with ``output="concat"``). ``state_dict`` is
then the trunk's: the whole architecture, of which only the layers up to ``stop`` are used.

Variants and defaults. ``zip_alpha`` (the paper's alpha; ``alpha=`` of merge() is the model
weight) damps repeated merges of a merged feature (0: never merge again; with ``N > 2`` models every
merged feature needs ``N - 1`` merges, so use ``zip_alpha`` near 1 there); ``zip_beta`` (beta) is
the within-model budget fraction (0: only cross-model merges; for two models this is
"permute" solved exactly by a LAP, ``matcher="auto"``). The paper's best shipped CIFAR-50+50 config
is ``alpha=1e-4, beta=0.075``; the reference code's defaults are ``0.3/0.125``; ours, ``zip_alpha=0.5,
zip_beta=1.0`` (the paper finds beta > 0.8 best on CIFAR), were the best of that grid on the digits
0-4/5-9 benchmark (``benchmarks/bench_merging_tasks.py``, RESULTS.md).
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from weightspace import features as wsf
from weightspace import iter_batches
from weightspace.state import state_of
from weightspace.symmetry import axis_roles, transform

from ._registry import MergeContext, MergeError, MethodOutput, register
from ._zipit_heads import MultiHeadModel, check_cut, reset_bn
from ._zipit_match import ZipMatch, zip_features, zipit_correlation

log = logging.getLogger(__name__)

__all__ = ["zipit", "zip_states"]

PAPER = ("Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman 2024, 'ZipIt! Merging Models from Different Tasks "
         "without Training', ICLR, arXiv:2305.03053 (greedy zip with alpha/beta, merge/unmerge, partial zip)")


# ------------------------------------------------------------------------------------------- models
def _modules(ctx: MergeContext) -> List[nn.Module]:
    out = []
    for k, st in enumerate(ctx.states):
        m = ctx.models[k]
        if m is None:
            if ctx.reference is None:
                raise MergeError("zipit runs the models on data: pass at least one model as an nn.Module "
                                 "(state dicts alone cannot be run)")
            m = copy.deepcopy(ctx.reference)
            with torch.no_grad():
                for key, t in list(m.named_parameters()) + list(m.named_buffers()):
                    if key in st:
                        t.copy_(st[key])
        out.append(m)
    return out


def _first_inputs(data: Any, device: torch.device) -> Any:
    for x, _ in iter_batches(data, device):
        return x
    raise MergeError("data= yielded no batch")


def _forward_order(model: nn.Module, x: Any) -> Dict[str, int]:
    """Module name -> index of its first completed forward call."""
    order: Dict[str, int] = {}

    def seen(name: str) -> None:
        order.setdefault(name, len(order))

    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: seen(n)) for n, m in model.named_modules() if n]
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(x, (tuple, list)):
                model(*x)
            elif isinstance(x, dict):
                model(**x)
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in was.items():
            m.train(t)
    return order


# ------------------------------------------------------------------------------------------- stats
def _joint_covariances(models: List[nn.Module], data: Any, points: Dict[str, Tuple[str, int]], device: torch.device,
                       max_batches: Optional[int]) -> Dict[str, torch.Tensor]:
    """{group: joint covariance (N d, N d)} of the models' features at each group's point."""
    N = len(models)
    # one pass per set of points without conflicting feature dims on one module
    passes: List[Dict[str, int]] = []
    for _g, (mod, dim) in points.items():
        for p in passes:
            if p.get(mod, dim) == dim:
                p[mod] = dim
                break
        else:
            passes.append({mod: dim})
    blocks: Dict[Tuple[str, int], Dict[Tuple[int, int], torch.Tensor]] = {}
    for p in passes:
        names = list(p)
        for i in range(N):
            for j in range(i + 1, N):
                cs = wsf.cross_stats(models[i], models[j], data, names, feature_dim=dict(p), device=device,
                                     max_batches=max_batches)
                for n in names:
                    b = blocks.setdefault((n, p[n]), {})
                    b[(i, i)] = cs[n].cov_a
                    b[(j, j)] = cs[n].cov_b
                    b[(i, j)] = cs[n].cov_ab
    out = {}
    for g, (mod, dim) in points.items():
        b = blocks[(mod, dim)]
        rows = []
        for i in range(N):
            rows.append(torch.cat([b[(i, j)] if i <= j else b[(j, i)].T for j in range(N)], 1))
        out[g] = torch.cat(rows, 0)
    return out


# ------------------------------------------------------------------------------------------- merging
def zip_states(states: List[Dict[str, torch.Tensor]], spec: Any, matches: Dict[str, ZipMatch], weights: List[float],
               reference: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """``W* = sum_k M_k W_k U_{k,prev}`` for every key; keys without a zipped producer axis are averaged
    with ``weights``; integer tensors come from ``states[0]``."""
    N = len(states)
    roles = axis_roles(spec, reference)
    per_model = []
    for k in range(N):
        maps = {g: m.split([spec.groups[g]] * N)[k] for g, m in matches.items()}
        per_model.append(transform(states[k], spec, maps, reference=reference))

    def zipped_output(key: str) -> bool:
        for lay, role in zip(spec.axes.get(key, ()), roles.get(key, ())):
            if lay is not None and role == "producer" and any(g in matches for g, _ in lay.groups()):
                return True
        return False

    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, v0 in states[0].items():
        if not torch.is_tensor(v0) or not v0.is_floating_point():
            out[key] = v0
            continue
        if zipped_output(key):
            acc = sum(per_model[k][key].to(torch.float64) for k in range(N))
        else:
            acc = sum(float(weights[k]) * per_model[k][key].to(torch.float64) for k in range(N))
        out[key] = acc.to(v0.dtype)
    return out


@register("zipit", paper=PAPER, needs=("spec", "data"), min_models=2)
def zipit(ctx: MergeContext, zip_alpha: float = 0.5, zip_beta: float = 1.0, stop: Optional[str] = None,
          matcher: str = "auto", output: str = "list", reset_bn_stats: bool = True,
          max_batches: Optional[int] = None) -> MethodOutput:
    """ZipIt! (Stoica et al. 2024, arXiv:2305.03053): zip features across and within models, optionally partially.

    Options
    -------
    zip_alpha : float, default 0.5 -- the paper's alpha: similarity damping of merged features,
        ``alpha * min(s_r, s_c)`` (named ``zip_alpha`` because ``alpha=`` is merge()'s model weight).
    zip_beta : float in [0, 1], default 1.0 -- the paper's beta: fraction of ``(O - d) // N`` each
        model may spend on within-model merges (0: cross-model only, "permute").
    stop : module name or group name, default None (zip everything) -- partial zip up to the output
        of that module (a group name stands for its last activation point); returns a multi-head model.
    matcher : "auto" | "greedy" | "lap" -- see :func:`merging._zipit_match.zip_features`.
    output : "list" | "concat" -- output format of the multi-head model (partial zip only).
    reset_bn_stats : recompute BatchNorm statistics on ``data`` after merging (the paper does).
    max_batches : limit the data passes for statistics and BN reset.
    """
    spec = ctx.spec
    alpha, beta = zip_alpha, zip_beta
    if not 0.0 <= float(beta) <= 1.0:
        raise MergeError(f"zipit: zip_beta must be in [0, 1], got {beta}")
    if output not in ("list", "concat"):
        raise MergeError(f"zipit: output must be 'list' or 'concat', got {output!r}")
    try:
        points = wsf.group_points(spec, "last")
    except Exception as exc:  # a hand-written spec has no activation points
        raise MergeError(f"zipit observes features at the spec's activation points, but this spec has none ({exc}); "
                         "let merge() trace the models (pass example_inputs= or data=) instead of spec=") from exc
    models = _modules(ctx)
    x0 = _first_inputs(ctx.data, ctx.device)
    ref = models[0]
    order = _forward_order(copy.deepcopy(ref).to(ctx.device), x0)
    groups = [g for g in spec.groups if g in points]
    missing = [g for g in spec.groups if g not in points]
    if missing:
        log.warning("zipit: groups %s have no activation point and stay unaligned (averaged as they are)", missing)
    first_seen = {g: min(order.get(m, 10 ** 9) for m, _ in spec.activation_points(g)) for g in groups}
    stop_mod, stop_dim, stop_group = None, None, None
    if stop is not None:
        if stop in points:
            stop_group = stop
            stop_mod, stop_dim = points[stop]
        else:
            cands = [(g, d) for g in groups for m, d in spec.activation_points(g) if m == stop]
            if not cands:
                valid = sorted({m for g in groups for m, _ in spec.activation_points(g)}, key=lambda m: order.get(m, 0))
                raise MergeError(f"zipit: stop={stop!r} is neither a group nor an activation point; valid module "
                                 f"names (forward order): {valid}")
            stop_group, stop_dim = cands[0]
            stop_mod = stop
        if stop_mod not in order:
            raise MergeError(f"zipit: module {stop_mod!r} is not reached by the forward pass")
        groups = [g for g in groups if first_seen[g] <= order[stop_mod]]
    groups.sort(key=lambda g: first_seen[g])
    pts = {g: points[g] for g in groups}
    N = len(models)
    covs = _joint_covariances(models, ctx.data, pts, ctx.device, max_batches)
    matches: Dict[str, ZipMatch] = {}
    glog = {}
    for g in groups:
        d = spec.groups[g]
        if covs[g].shape[0] != N * d:
            raise MergeError(f"zipit: group {g!r} (size {d}) is observed at {pts[g][0]!r} with "
                             f"{covs[g].shape[0] // N} features; zipit needs points whose feature axis is the group")
        m = zip_features(zipit_correlation(covs[g]), N, alpha=alpha, beta=beta, weights=ctx.weights, matcher=matcher)
        matches[g] = m
        glog[g] = {"point": pts[g][0], "within": m.within, "solver": m.solver,
                   "cross_pairs": sum(1 for mem in m.members if len({i // d for i in mem}) > 1)}
    merged = zip_states(ctx.states, spec, matches, ctx.weights, ctx.reference)
    log_: Dict[str, Any] = {"groups": glog, "zipped": groups, "zip_alpha": alpha, "zip_beta": beta}
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.modules())
    if stop is None:
        if reset_bn_stats and has_bn:
            trunk = _load(copy.deepcopy(ref).to(ctx.device), merged)
            log_["bn_reset_batches"] = reset_bn(trunk, ctx.data, ctx.device, max_batches)
            merged = OrderedDict((k, v.clone()) for k, v in state_of(trunk).items())
        return MethodOutput(state_dict=merged, log=log_)
    # partial zip: shared trunk + one tail per model
    check_cut(copy.deepcopy(ref).to(ctx.device), stop_mod, x0)
    trunk = _load(copy.deepcopy(ref).to(ctx.device), merged)
    tails = [copy.deepcopy(m).to(ctx.device) for m in models]
    unmerges = [matches[stop_group].split([spec.groups[stop_group]] * N)[k][1] for k in range(N)]
    mh = MultiHeadModel(trunk, tails, unmerges, stop_mod, stop_dim, output=output).to(ctx.device)
    if reset_bn_stats and has_bn:
        log_["bn_reset_batches"] = reset_bn(mh, ctx.data, ctx.device, max_batches)
    mh.eval()
    log_["stop"] = {"module": stop_mod, "group": stop_group, "feature_dim": stop_dim}
    trunk_state = OrderedDict((k, v.clone()) for k, v in state_of(mh.trunk).items())
    return MethodOutput(state_dict=trunk_state, model=mh, log=log_)


def _load(module: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for key, t in list(module.named_parameters()) + list(module.named_buffers()):
            if key in state:
                t.copy_(state[key].to(device=t.device, dtype=t.dtype))
    return module
