"""Permutation symmetry: discover a model's spec, draw, apply, invert, compose and check permutations.

A network's hidden units can be permuted without changing the function it computes: for an MLP,
``W_l -> P_l W_l P_{l-1}^T`` and ``b_l -> P_l b_l`` with ``P_0 = P_L = I`` (Hecht-Nielsen 1990;
the "HNP" group of Navon et al. 2023). :func:`permutation_spec` finds every such group of a model
automatically (see :mod:`weightspace.symmetry._trace`), :func:`permute` applies permutations to a module or a
state dict, and :func:`check_spec` verifies numerically that they leave the outputs unchanged.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from weightspace.results import Result
from weightspace.symmetry._spec import Axis, PermutationSpec, SpecError
from weightspace.symmetry._trace import TraceError, trace_dims
from weightspace.tracing import MHA_ARGS, TracingMode, flatten_tensors
from weightspace.utils import call_model

log = logging.getLogger(__name__)

__all__ = [
    "permutation_spec",
    "PermutationSpec",
    "Axis",
    "SpecError",
    "TraceError",
    "random_permutation",
    "identity_permutation",
    "invert_permutation",
    "compose_permutations",
    "permute",
    "check_spec",
    "SpecCheck",
]

Perms = Dict[str, torch.Tensor]


def permutation_spec(model: torch.nn.Module, example_inputs: Any, *, strict: bool = False) -> PermutationSpec:
    """Discover the permutation symmetries of ``model`` by following one forward run.

    Parameters
    ----------
    model : the module (left untouched; it runs once in eval mode without gradients).
    example_inputs : a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    strict : raise :class:`TraceError` when an operation without a symmetry rule fixed axes that
        could otherwise have moved (default: log a warning and record it in ``spec.info``).

    Returns
    -------
    PermutationSpec with one group per set of hidden units that can be permuted jointly. Residual
    additions join groups, a flatten of a conv map gives ``product(channels, fixed(H*W))``, attention
    gives heads x head-dim groups (query/key share one head-dim group, value/output another).

    Examples
    --------
    >>> import torch, weightspace as ws
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = ws.permutation_spec(net, torch.randn(1, 3))
    >>> dict(spec.groups)
    {'0': 4}
    """
    spec, trace, _ = trace_dims(model, example_inputs)
    blocked = spec.info.get("blocked_ops", ())
    if blocked:
        where = spec.info.get("blocked_where", {})
        msg = "; ".join(f"{op} (x{n}, first in {where.get(op, '?')})" for op, n in blocked)
        text = (
            f"operations without a symmetry rule fixed axes that might otherwise be permutable: {msg}. "
            "The spec is still sound. If such an operation is equivariant, patch the spec with "
            "spec.with_axes(...) and confirm with weightspace.check_spec"
        )
        if strict:
            raise TraceError(text)
        log.warning(text)
    return spec


# ---------------------------------------------------------------------------------------------
# permutations
# ---------------------------------------------------------------------------------------------
def _generator(seed: Union[int, torch.Generator, None]) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def random_permutation(spec: PermutationSpec, seed: Union[int, torch.Generator, None] = 0) -> Perms:
    """One uniformly random permutation per group: ``{group name: LongTensor of size n}`` (CPU)."""
    g = _generator(seed)
    return {name: torch.randperm(n, generator=g) for name, n in spec.groups.items()}


def identity_permutation(spec: PermutationSpec) -> Perms:
    return {name: torch.arange(n) for name, n in spec.groups.items()}


def invert_permutation(perms: Union[Perms, torch.Tensor]) -> Union[Perms, torch.Tensor]:
    """Inverse permutation(s): ``inv[p[i]] = i``, so permuting by ``p`` then ``inv`` is the identity."""
    if torch.is_tensor(perms):
        inv = torch.empty_like(perms)
        inv[perms] = torch.arange(perms.numel(), device=perms.device)
        return inv
    return {k: invert_permutation(v) for k, v in perms.items()}


def compose_permutations(first: Perms, second: Perms) -> Perms:
    """The permutation equal to applying ``first`` and then ``second``.

    With ``B'[i] = B[p[i]]``, applying ``p`` then ``q`` gives ``B''[i] = B[p[q[i]]]``, so the result is
    ``p[q]`` for every group; ``permute(permute(m, s, p), s, q) == permute(m, s, compose(p, q))``.
    """
    if set(first) != set(second):
        raise SpecError(f"cannot compose permutations over different groups: {sorted(set(first) ^ set(second))}")
    return {k: first[k][second[k].to(first[k].device)] for k in first}


def _check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    for name, n in spec.groups.items():
        if name not in perms:
            raise SpecError(f"no permutation given for group {name!r} (size {n}); pass one for every group of the spec")
        p = perms[name]
        if not torch.is_tensor(p) or p.dim() != 1 or p.numel() != n:
            raise SpecError(f"permutation for group {name!r} must be a 1-D LongTensor of size {n}, got "
                            f"{getattr(p, 'shape', type(p))}")
        if not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
            raise SpecError(f"the tensor given for group {name!r} is not a permutation of 0..{n - 1}")
    extra = set(perms) - set(spec.groups)
    if extra:
        raise SpecError(f"permutations given for unknown groups {sorted(extra)}; the spec has {list(spec.groups)}")


def _permute_tensor(t: torch.Tensor, layouts: Tuple[Optional[Axis], ...], perms: Perms, key: str) -> torch.Tensor:
    if t.dim() != len(layouts):
        raise SpecError(f"{key!r} has shape {tuple(t.shape)} but the spec expects {len(layouts)} axes")
    out = t
    for ax, lay in enumerate(layouts):
        if lay is None:
            continue
        if t.shape[ax] != lay.size:
            raise SpecError(f"{key!r} axis {ax} has size {t.shape[ax]} but the spec's layout {lay} has size {lay.size}")
        out = out.index_select(ax, lay.index(perms, device=t.device))
    return out


def permute(obj: Union[torch.nn.Module, Mapping[str, torch.Tensor]], spec: PermutationSpec, perms: Perms):
    """Apply ``perms`` to a module or a state dict; the input is never modified.

    A module gives a new module (a deep copy with permuted parameters and buffers); a state dict
    gives a new dict. Each permuted axis is gathered with ``B'[i] = B[perm[i]]`` (Git Re-Basin's
    convention), structured axes through their product/concat layouts.
    """
    _check_perms(spec, perms)
    if isinstance(obj, torch.nn.Module):
        new = copy.deepcopy(obj)
        done = set()
        with torch.no_grad():
            named = list(new.named_parameters(remove_duplicate=False)) + list(new.named_buffers(remove_duplicate=False))
            for key, t in named:
                if t is None or id(t) in done or key not in spec.axes:
                    continue
                done.add(id(t))
                t.copy_(_permute_tensor(t, spec.axes[key], perms, key))
        return new
    if not isinstance(obj, Mapping):
        raise TypeError(f"permute takes an nn.Module or a state dict, not {type(obj).__name__}")
    optional = set(spec.info.get("non_persistent", ()))
    missing = [k for k in spec.permuted_keys() if k not in obj and k not in optional]
    if missing:
        raise SpecError("the state dict lacks keys that the spec permutes: "
                        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {k: (_permute_tensor(v, spec.axes[k], perms,
                                k) if k in spec.axes and torch.is_tensor(v) else v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# numerical check
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecCheck(Result):
    """Outcome of :func:`check_spec`: the largest relative output change seen per mode."""

    max_rel_diff: Mapping[str, float]
    trials: int
    modes: Tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run


class _NoDropout(TracingMode):
    """Turns every dropout off, functional ones included (attention dropout inside SDPA/MHA)."""

    def handle(self, name, func, args, kwargs):
        kwargs = dict(kwargs)
        if "dropout" in name and name != "multi_head_attention_forward":
            return args[0]
        if name == "scaled_dot_product_attention":
            kwargs["dropout_p"] = 0.0
            args = args[:4]
        if name == "multi_head_attention_forward":
            args = tuple(0.0 if i == MHA_ARGS.index("dropout_p") else a for i, a in enumerate(args))
            if "dropout_p" in kwargs:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


def _outputs(model: torch.nn.Module, example_inputs: Any, train: bool) -> list:
    """Floating outputs in float64; train mode uses batch statistics with every dropout turned off.

    Train mode runs on a copy (it updates BatchNorm's running statistics); eval mode changes nothing
    and runs on ``model`` itself, which must be one of check_spec's own copies."""
    if train:
        model = copy.deepcopy(model)
    model.train(train)
    with torch.no_grad(), _NoDropout():
        outs = flatten_tensors(call_model(model, example_inputs))
        return [t.detach().double() for t in outs if torch.is_tensor(t) and t.is_floating_point()]


def _rel_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(x.abs().max().item(), 1e-12) if x.numel() else 1.0
        worst = max(worst, ((x - y).abs().max().item() / scale) if x.numel() else 0.0)
    return worst


def check_spec(
    model: torch.nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    *,
    trials: int = 3,
    seed: int = 0,
    rtol: float = 1e-5,
    modes: Tuple[str, ...] = ("eval", "train"),
) -> SpecCheck:
    """Check numerically that random permutations of ``spec`` leave the outputs of ``model`` unchanged.

    Runs ``trials`` random permutations in each mode (``"eval"``: running statistics; ``"train"``:
    batch statistics, dropout disabled) on copies of the model and compares every floating output
    with ``max|y - y_perm| <= rtol * max|y|``. On failure, each group is tried alone to find the
    culprits, and :class:`SpecError` names them with the keys and axes they act on.
    The user's model is not modified (copies are run).
    """
    unknown = (set(spec.axes) - {k for k, _ in model.named_parameters(remove_duplicate=False)}
               - {k for k, _ in model.named_buffers(remove_duplicate=False)})
    if unknown:
        raise SpecError(f"the spec names keys the model does not have: {sorted(unknown)[:5]}; was it made for another "
                        "architecture?")
    base = copy.deepcopy(model)
    worst: Dict[str, float] = {}
    ref = {}
    for mode in modes:
        try:
            ref[mode] = _outputs(base, example_inputs, mode == "train")
        except Exception as exc:  # e.g. BatchNorm in train mode on a batch of one
            log.warning("check_spec: skipping %s mode, the model does not run in it on these inputs (%s)", mode, exc)
    if not ref:
        raise TraceError("check_spec: the model runs in none of the requested modes on the example inputs")
    for t in range(trials):
        perms = random_permutation(spec, seed + t)
        mp = permute(base, spec, perms)
        for mode in ref:
            d = _rel_diff(ref[mode], _outputs(mp, example_inputs, mode == "train"))
            worst[mode] = max(worst.get(mode, 0.0), d)
    bad = {m: d for m, d in worst.items() if d > rtol}
    if bad:
        culprits = []
        p2a = spec.perm_to_axes
        for g in spec.groups:
            perms = identity_permutation(spec)
            perms[g] = random_permutation(spec, seed)[g]
            mp = permute(base, spec, perms)
            for mode in bad:
                d = _rel_diff(ref[mode], _outputs(mp, example_inputs, mode == "train"))
                if d > rtol:
                    axes = ", ".join(f"{k}[{a}]" for k, a, _ in p2a[g][:6])
                    culprits.append(f"group {g!r} (size {spec.groups[g]}, acting on {axes}) changes the {mode}-mode "
                                    f"outputs by {d:.3g} (relative)")
                    break
        detail = "; ".join(culprits) if culprits else "no single group fails alone; a combination of groups does"
        raise SpecError(f"the spec is not a symmetry of the model: {detail}. Fix those keys' layouts (spec.with_axes) "
                        "or drop the groups (spec.without)")
    return SpecCheck(max_rel_diff=dict(worst), trials=trials, modes=tuple(ref),
                     settings={"trials": trials, "seed": seed, "rtol": rtol, "modes": tuple(modes)})
