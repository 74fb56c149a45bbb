"""OT fusion: transport each model's neurons onto a target model's, layer by layer, then average.

Singh & Jaggi 2020, "Model Fusion via Optimal Transport", NeurIPS, arXiv:1910.05653; for
transformers Imfeld, Graldi, Giordano, Hofmann, Anagnostidis & Singh 2024, "Transformer Fusion with
Optimal Transport", ICLR, arXiv:2310.05719.

For every group of the target's spec, in forward (discovery) order, and every source model ``s``:

1. Ground cost ``C (n_s, n_t)`` between the source's and the target's units:
   ``ground_cost="weights"``: squared Euclidean distance between the units' parameter rows -- every
   tensor the group is the output axis of (weight rows, bias, norm scale/shift), with the incoming
   axes already carried into the target's basis by the plans of the earlier groups (the "align incoming
   edges" step ``W' = W T_prev``); ``"activations"``: ``E||z_s,j - z_t,i||^2`` of the features at the
   group's activation point over ``data`` (streamed in float64). ``cost="cosine"`` uses ``1 - cos``.
2. Uniform marginals ``a = 1/n_s``, ``b = 1/n_t`` (so models of **different widths** are fused with
   proper marginals) and a plan ``T`` by exact OT (``solver="emd"``) or entropic OT
   (``solver="sinkhorn"``, ``reg`` relative to the mean cost).
3. The source's group is mapped into the target's basis with the merge ``M = diag(1/b) T^T``
   (each target unit receives the barycentre of the source units sent to it) and the unmerge
   ``unmerge="sum"``: ``U = diag(1/a) T`` (each source unit is read from the target units it went to,
   so a consumer sums the columns of units that were merged -- exact when a wide model holds duplicated
   units), or ``unmerge="otfusion"``: ``U = M^T = T diag(1/b)`` (the OTFusion code's correction, which
   averages them). Both apply through the spec's layouts with :func:`weightspace.transform` (biases
   and BatchNorm parameters and statistics are producers: they follow ``M``).
4. The fused model is ``sum_k w_k * model_k`` in the target's basis; BatchNorm statistics are
   recomputed on ``data`` when given (``reset_bn_stats``).

With exact OT, uniform marginals and equal widths, ``n T`` is a permutation matrix (a vertex of the
Birkhoff polytope), ``M = U^T`` is that permutation and OT fusion is a permutation merge: a single
forward pass of matching, each group solved once given the earlier ones (not Git Re-Basin's
coordinate descent). The alignment is then returned as permutations.

Widths: ``target="auto"`` fuses into model_a when all shapes agree, else into the model with the
fewest parameters (``merge(wide, narrow, method="ot_fusion")`` has ``narrow``'s shapes); an int
picks the target by position.
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
from weightspace.state import recalibrate_bn
from weightspace.symmetry import axis_roles, permutation_spec, transform

from ._registry import MergeContext, MergeError, MethodOutput, register
from ._results import Alignment

log = logging.getLogger(__name__)

__all__ = ["ot_fusion", "fuse_states"]

PAPER = ("Singh & Jaggi 2020, 'Model Fusion via Optimal Transport', NeurIPS, arXiv:1910.05653; transformer "
         "fusion: Imfeld et al. 2024, ICLR, arXiv:2310.05719 (layer-wise OT with weight or activation ground "
         "costs, exact or Sinkhorn plans, uniform marginals for different widths)")


# ------------------------------------------------------------------------------------------- costs
def _producer_rows(state: Dict[str, torch.Tensor], spec: Any, roles: Dict[str, Tuple], group: str) -> Dict[str, torch.Tensor]:  # noqa: E501
    """{key: (n, rest)} rows of every float tensor whose output (producer) axis is exactly ``group``."""
    out = {}
    for key, ax, path in spec.perm_to_axes[group]:
        if path != () or roles.get(key, (None,) * (ax + 1))[ax] != "producer":
            continue
        t = state.get(key)
        if t is None or not t.is_floating_point():
            continue
        out[key] = t.movedim(ax, 0).reshape(t.shape[ax], -1).to(torch.float64)
    return out


def _distance(X: torch.Tensor, Y: torch.Tensor, kind: str) -> torch.Tensor:
    """(n_s, n_t) ground cost between rows of X (source) and Y (target)."""
    if kind == "cosine":
        Xn = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
        Yn = Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 1.0 - Xn @ Yn.T
    d = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2.0 * X @ Y.T
    d = d.clamp_min(0)
    return d.sqrt() if kind == "euclidean" else d


def _weight_cost(src: Dict[str, torch.Tensor], tgt: Dict[str, torch.Tensor], kind: str, group: str,
                 hint: str = "") -> Tuple[torch.Tensor, List[str]]:
    keys = [k for k in tgt if k in src and src[k].shape[1] == tgt[k].shape[1]]
    if not keys:
        raise MergeError(f"ot_fusion: group {group!r} has no parameter rows comparable between the models "
                         f"(no tensor has this group alone as its output axis){hint}")
    X = torch.cat([src[k] for k in keys], 1)
    Y = torch.cat([tgt[k] for k in keys], 1)
    return _distance(X, Y, kind), keys


def _activation_costs(model_t: nn.Module, model_s: nn.Module, data: Any, points: Dict[str, Tuple[str, int]],
                      kind: str, device: torch.device, max_batches: Optional[int]) -> Dict[str, torch.Tensor]:
    """{group: (n_s, n_t)} cost from streamed second moments: E||z_s - z_t||^2 or 1 - cosine."""
    names = sorted({m for m, _ in points.values()})
    dims = {m: d for m, d in points.values()}
    cs = wsf.cross_stats(model_t, model_s, data, names, names, feature_dim=dims, device=device, max_batches=max_batches)
    out = {}
    for g, (m, _) in points.items():
        s = cs[m]
        e_tt = s.cov_a.diagonal() * ((s.count - s.ddof) / s.count) + s.mean_a ** 2
        e_ss = s.cov_b.diagonal() * ((s.count - s.ddof) / s.count) + s.mean_b ** 2
        e_ts = s.second_moment_ab  # (n_t, n_s)
        if kind == "cosine":
            out[g] = 1.0 - e_ts.T / torch.outer(e_ss.sqrt(), e_tt.sqrt()).clamp_min(1e-12)
        else:
            d = (e_ss[:, None] + e_tt[None, :] - 2.0 * e_ts.T).clamp_min(0)
            out[g] = d.sqrt() if kind == "euclidean" else d
    return out


# ------------------------------------------------------------------------------------------- plans
def _plan(C: torch.Tensor, solver: str, reg: float) -> Tuple[torch.Tensor, Dict[str, Any]]:
    from merging.solvers import emd, sinkhorn

    n_s, n_t = C.shape
    a = torch.full((n_s,), 1.0 / n_s, dtype=torch.float64)
    b = torch.full((n_t,), 1.0 / n_t, dtype=torch.float64)
    C = C.detach().cpu().to(torch.float64)
    if solver == "emd" and n_s == n_t:
        # uniform square problem: the exact plans' vertices are the permutations / n (Birkhoff), so the
        # LAP gives an optimal vertex of the same LP (faster than the network simplex)
        from merging.solvers import linear_assignment

        res = linear_assignment(C)
        T = torch.zeros(n_s, n_t, dtype=torch.float64)
        T[torch.as_tensor(res.row_ind).long(), torch.as_tensor(res.col_ind).long()] = 1.0 / n_s
        info = {"exact": "lap"}
    elif solver == "emd":
        # SciPy's HiGHS is quick on small layers and spares importing POT (seconds); POT above that
        out = emd(C, a, b, backend="linprog" if n_s * n_t <= 128 * 128 else "auto")
        T = out.plan
        info = {"exact": out.backend}
    else:
        scale = float(C.mean()) if float(C.mean()) > 0 else 1.0
        res = sinkhorn(C / scale, a, b, reg=float(reg), anneal=True, tol=1e-6, max_iter=2000, warn=False)
        T = res.plan
        info = {"converged": bool(res.converged), "n_iter": int(res.n_iter), "err": float(res.err)}
        if float(res.err) > 1e-4:
            log.warning("ot_fusion: Sinkhorn stopped at marginal error %.2g (reg=%g); raise reg", float(res.err), reg)
    info["marginal_err"] = float(max((T.sum(1) - a).abs().max(), (T.sum(0) - b).abs().max()))
    info["cost"] = float((T * C).sum())
    return T, info


def _maps(T: torch.Tensor, unmerge: str) -> Tuple[torch.Tensor, torch.Tensor]:
    a, b = T.sum(1), T.sum(0)
    M = T.T / b.clamp_min(1e-300)[:, None]                      # (n_t, n_s), rows sum to 1
    U = T / a.clamp_min(1e-300)[:, None] if unmerge == "sum" else M.T  # (n_s, n_t)
    return M, U


def fuse_states(states: List[Dict[str, torch.Tensor]], specs: List[Any], weights: List[float], target: int, *,
                modules: Optional[List[Optional[nn.Module]]] = None, ground_cost: str = "weights",
                cost: str = "sqeuclidean", solver: str = "emd", reg: float = 0.01, unmerge: str = "sum",
                data: Any = None, device: Any = "cpu", max_batches: Optional[int] = None):
    """Fuse ``states`` into the basis (and shapes) of ``states[target]``.

    Returns ``(fused_state, plans, info)``: ``plans[k][group]`` is the ``(n_k, n_target)`` plan of
    model ``k`` (absent for the target), ``info[k][group]`` its cost, marginal error and solver record.
    """
    modules = modules or [None] * len(states)
    spec_t = specs[target]
    order = list(spec_t.groups)
    roles = [axis_roles(sp, m) for sp, m in zip(specs, modules)]
    moved: List[Dict[str, torch.Tensor]] = []
    plans: List[Dict[str, torch.Tensor]] = []
    infos: List[Dict[str, Any]] = []
    pts_last = wsf.group_points(spec_t, "last")
    for k, (st, sp) in enumerate(zip(states, specs)):
        if k == target:
            moved.append(st)
            plans.append({})
            infos.append({})
            continue
        missing = [g for g in order if g not in sp.groups]
        if missing:
            raise MergeError(f"ot_fusion: model {k} has no groups {missing[:5]}; the models must share an architecture "
                             "family (same layer names)")
        act = None
        if ground_cost == "activations":
            pts = wsf.group_points(spec_t, "last")
            act = _activation_costs(modules[target], modules[k], data, {g: pts[g] for g in order if g in pts},
                                    cost, device, max_batches)
        maps: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        pk: Dict[str, torch.Tensor] = {}
        ik: Dict[str, Any] = {}
        tgt_rows_all = states[target]
        for g in order:
            if act is not None and g in act:
                C, used = act[g], ["activations"]
            else:
                keys = [key for key, ax, path in sp.perm_to_axes[g] if path == () and roles[k][key][ax] == "producer"]
                cur = transform({key: st[key] for key in keys}, sp, maps, reference=modules[k], roles=roles[k])
                src = _producer_rows(cur, sp, roles[k], g)
                tgt = _producer_rows(tgt_rows_all, spec_t, roles[target], g)
                if ground_cost == "weights" and g in pts_last:
                    hint = "; use ground_cost='activations' with data="
                else:  # e.g. attention heads x head dim: no unit-wise weight rows and no activation point
                    hint = ("; OT fusion cannot transport this group (for attention: heads x head dim, which no "
                            "module output exposes unit by unit); use method='weight_matching' or "
                            "'activation_matching', which match attention heads as blocks")
                C, used = _weight_cost(src, tgt, "sqeuclidean" if cost == "sqeuclidean" else cost, g, hint)
            T, info = _plan(C, solver, reg)
            info["cost_from"] = used
            maps[g] = _maps(T, unmerge)
            pk[g] = T
            ik[g] = info
        moved.append(transform(st, sp, maps, reference=modules[k], roles=roles[k]))
        plans.append(pk)
        infos.append(ik)
    fused: Dict[str, torch.Tensor] = OrderedDict()
    for key, v0 in states[target].items():
        if not torch.is_tensor(v0) or not v0.is_floating_point():
            fused[key] = v0
            continue
        acc = None
        for k, mv in enumerate(moved):
            if tuple(mv[key].shape) != tuple(v0.shape):
                raise MergeError(f"ot_fusion: {key!r} of model {k} has shape {tuple(mv[key].shape)} after transport, "
                                 f"not the target's {tuple(v0.shape)}; an axis without a permutation group differs "
                                 "in size (only hidden widths may differ)")
            term = float(weights[k]) * mv[key].to(torch.float64)
            acc = term if acc is None else acc + term
        fused[key] = acc.to(v0.dtype)
    return fused, plans, infos


# ------------------------------------------------------------------------------------------- method
def _n_params(state: Dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def _example(ctx: MergeContext) -> Any:
    if ctx.example_inputs is not None:
        return ctx.example_inputs
    if ctx.data is not None:
        for x, _ in iter_batches(ctx.data):
            return x[:2] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] > 2 else x
    return None


@register("ot_fusion", paper=PAPER, needs=("spec",), min_models=2, same_shapes=False)
def ot_fusion(ctx: MergeContext, ground_cost: str = "weights", cost: str = "sqeuclidean", solver: str = "emd",
              reg: float = 0.01, unmerge: str = "sum", target: Any = "auto", reset_bn_stats: bool = True,
              max_batches: Optional[int] = None) -> MethodOutput:
    """OT fusion (Singh & Jaggi 2020, arXiv:1910.05653): layer-wise optimal transport of neurons, then averaging.

    Options
    -------
    ground_cost : "weights" (parameter rows, incoming axes aligned first) | "activations" (needs data=).
    cost : "sqeuclidean" | "euclidean" | "cosine".
    solver : "emd" (exact OT) | "sinkhorn" (entropic, ``reg`` relative to the mean cost, annealed).
    reg : Sinkhorn regularisation (OTFusion uses 0.01; transformer fusion 0.06-0.08).
    unmerge : "sum" (``diag(1/a) T``, exact for duplicated units) | "otfusion" (``T diag(1/b)``).
    target : "auto" | int -- the model whose basis and shapes the result has (see the module doc).
    reset_bn_stats : recompute BatchNorm statistics on ``data`` after fusing (when data is given).
    max_batches : limit the data passes.
    """
    for name, val, ok in (("ground_cost", ground_cost, ("weights", "activations")),
                          ("cost", cost, ("sqeuclidean", "euclidean", "cosine")),
                          ("solver", solver, ("emd", "sinkhorn")), ("unmerge", unmerge, ("sum", "otfusion"))):
        if val not in ok:
            raise MergeError(f"ot_fusion: {name} must be one of {list(ok)}, got {val!r}")
    if solver == "sinkhorn" and not float(reg) > 0:
        raise MergeError(f"ot_fusion: reg must be > 0 for solver='sinkhorn', got {reg}")
    if ground_cost == "activations" and ctx.data is None:
        raise MergeError("ot_fusion with ground_cost='activations' measures features: pass data=")
    states = ctx.states
    same = all(set(s) == set(states[0]) and all(tuple(s[k].shape) == tuple(states[0][k].shape) for k in s) for s in states)  # noqa: E501
    n = len(states)
    if target == "auto":
        t = 0 if same else min(range(n), key=lambda i: (_n_params(states[i]), i))
    elif isinstance(target, int) and not isinstance(target, bool) and 0 <= target < n:
        t = target
    else:
        raise MergeError(f"ot_fusion: target must be 'auto' or a model index in 0..{n - 1}, got {target!r}")
    modules: List[Optional[nn.Module]] = []
    for k, st in enumerate(states):
        m = ctx.models[k]
        if m is None and same and ctx.reference is not None:
            m = copy.deepcopy(ctx.reference)
            m.load_state_dict({key: v for key, v in st.items()}, strict=False)
        modules.append(m)
    if same:
        specs = [ctx.spec] * n
    else:
        x = _example(ctx)
        if x is None or any(m is None for m in modules):
            raise MergeError("ot_fusion of models of different widths traces every model: pass them as nn.Modules "
                             "with example_inputs= or data=")
        specs = [permutation_spec(m, x) for m in modules]
    if ground_cost == "activations" and any(m is None for m in modules):
        raise MergeError("ot_fusion with ground_cost='activations' runs the models: pass nn.Modules")
    w = list(ctx.weights)
    fused, plans, infos = fuse_states(states, specs, w, t, modules=modules, ground_cost=ground_cost, cost=cost,
                                      solver=solver, reg=reg, unmerge=unmerge, data=ctx.data, device=ctx.device,
                                      max_batches=max_batches)
    log_: Dict[str, Any] = {"target": t, "groups": {k: v for k, v in enumerate(infos) if k != t},
                            "same_shapes": same}
    if reset_bn_stats and ctx.data is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                       for m in (modules[t].modules() if modules[t] is not None else ())):  # noqa: E501
        fused = OrderedDict(recalibrate_bn(modules[t], ctx.data, fused, num_batches=max_batches, device=ctx.device))
        log_["bn_reset"] = True
    alignment = None
    if same and n == 2 and solver == "emd":
        s = 1 - t
        perms = {}
        for g, T in plans[s].items():
            nT = T * T.shape[0]
            if bool(torch.allclose(nT, (nT > 0.5).to(nT.dtype), atol=1e-8)):
                perms[g] = nT.argmax(0)  # target unit i <- source unit perm[i]
        if len(perms) == len(plans[s]) and t == 0:
            obj = -sum(infos[s][g]["cost"] for g in perms)
            alignment = Alignment(spec=ctx.spec, permutations=perms, objective=float(obj),
                                  settings={"method": "ot_fusion", "ground_cost": ground_cost, "cost": cost},
                                  log={"note": "exact OT with uniform marginals and equal widths: each plan is a "
                                               "permutation; objective = -total transport cost"})
    model = None
    if not same and ctx.models[t] is not None:
        model = copy.deepcopy(ctx.models[t])
        with torch.no_grad():
            for key, p in list(model.named_parameters()) + list(model.named_buffers()):
                if key in fused:
                    p.copy_(fused[key].to(device=p.device, dtype=p.dtype))
    return MethodOutput(state_dict=fused, alignment=alignment, model=model, log=log_)
