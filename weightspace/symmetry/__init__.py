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
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from weightspace.checks import check_inputs, check_module
from weightspace.results import Result
from weightspace.symmetry._spec import Axis, PermutationSpec, SpecError
from weightspace.symmetry._trace import TraceError, trace_dims
from weightspace.tracing import MHA_ARGS, TracingMode, flatten_tensors
from weightspace.utils import call_model
from weightspace.symmetry._transform import axis_roles, transform

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
    "transform",
    "axis_roles",
    "DataDependentTraceWarning",
    "perturb_inputs",
]


class DataDependentTraceWarning(UserWarning):
    """The traced forward turned tensor values that depend on permuted dimensions into Python values
    (``if``, ``int``, ``.item()``, ``.tolist()``, ``.numpy()``): the spec follows one path only."""

Perms = Dict[str, torch.Tensor]


def permutation_spec(model: torch.nn.Module, example_inputs: Any, *, strict: bool = False) -> PermutationSpec:
    """Discover the permutation symmetries of ``model`` by following one forward run.

    Parameters
    ----------
    model : the module (left untouched; it runs once in eval mode without gradients).
    example_inputs : a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    strict : raise :class:`TraceError` when an operation without a symmetry rule fixed axes that
        could otherwise have moved, or when the forward's control flow may depend on the values of
        permuted dimensions (default: a logged warning for the first, a
        :class:`DataDependentTraceWarning` for the second; both are recorded in ``spec.info``).

    What is guaranteed
    ------------------
    Every group of the spec is a symmetry of **the operations this run executed**: each of them has a
    rule that keeps the permuted dimensions equivariant, and an operation without a rule fixes every
    dimension it touches (``spec.info["blocked_ops"]``). The spec is therefore sound for every input
    on which the forward executes the same operations. It is not guaranteed when the forward
    branches, loops or indexes on tensor values: those events (``bool``/``int``/``float``/``index``
    conversions, ``item``, ``tolist``, ``numpy``, ``equal``...) are recorded in
    ``spec.info["data_dependent"]`` when the value depends on a permuted dimension (events that depend
    only on the inputs' fixed dimensions are counted in ``spec.info["data_dependent_unflagged"]``).
    :func:`check_spec` verifies the spec numerically on the example inputs and on perturbed copies.

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
    check_module(model, where="permutation_spec")
    check_inputs(example_inputs, where="permutation_spec")
    spec, trace, _ = trace_dims(model, example_inputs)
    events = spec.info.get("data_dependent", ())
    if events:
        msg = "; ".join(f"{op} (x{n}, first in {where})" for op, where, n in events)
        text = (
            f"the forward turns tensor values that depend on permuted dimensions into Python values: {msg}. "
            "If control flow, loop counts or indices depend on them, other inputs may run operations this "
            "trace never saw, and the spec may change the function there. Verify with "
            "weightspace.check_spec(model, spec, inputs) on representative inputs (it also tries perturbed "
            "copies), or remove the data-dependent branch; strict=True raises instead"
        )
        if strict:
            raise TraceError(text)
        warnings.warn(text, DataDependentTraceWarning, stacklevel=2)
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
    if not isinstance(obj, Mapping):
        check_module(obj, "obj", where="permute", expected="an nn.Module or a state dict")
    _check_perms(spec, perms)
    if isinstance(obj, torch.nn.Module):
        own = ({k for k, _ in obj.named_parameters(remove_duplicate=False)}
               | {k for k, _ in obj.named_buffers(remove_duplicate=False)})
        unknown = [k for k in spec.axes if k not in own]
        if unknown:
            more = " ..." if len(unknown) > 5 else ""
            raise SpecError(f"the spec permutes keys the module does not have: {unknown[:5]}{more}; "
                            f"was it made for another architecture (or for a wrapper, with a key prefix)?")
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
    optional = spec.optional_keys()
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
    """Outcome of :func:`check_spec`: the largest relative output change seen per mode, over every
    input checked; ``inputs`` names those inputs and ``max_rel_diff_by_input`` gives each one's worst."""

    max_rel_diff: Mapping[str, float]
    trials: int
    modes: Tuple[str, ...]
    inputs: Tuple[str, ...] = ("example inputs",)
    max_rel_diff_by_input: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)
    log: Mapping[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run


def _perturb(x: Any, g: torch.Generator) -> Any:
    if torch.is_tensor(x):
        if x.is_floating_point() or x.is_complex():
            xd = x.detach()
            scale = float(xd.abs().std()) if xd.numel() > 1 else 0.0
            if not scale > 0:
                scale = float(xd.abs().mean()) if xd.numel() else 0.0
            scale = scale if scale > 0 else 1.0
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
            return xd + scale * noise
        if x.dtype == torch.bool or x.numel() == 0:
            return x
        lo, hi = int(x.min()), int(x.max())
        return torch.randint(lo, hi + 1, tuple(x.shape), generator=g).to(device=x.device, dtype=x.dtype)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_perturb(v, g) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_perturb(v, g) for v in x)
    if isinstance(x, dict):
        return {k: _perturb(v, g) for k, v in x.items()}
    return x


def perturb_inputs(example_inputs: Any, n: int = 3, seed: int = 0) -> List[Any]:
    """``n`` seeded random variations of ``example_inputs`` (same structure, shapes and dtypes).

    Floating tensors get Gaussian noise of their own scale (``x + std(|x|) * N(0, 1)``, so the
    perturbation is as large as the data); integer tensors (token ids, labels, masks) are redrawn
    uniformly between their own minimum and maximum, so ids stay valid; boolean tensors and
    non-tensor values are kept.
    """
    g = torch.Generator().manual_seed(int(seed))
    return [_perturb(example_inputs, g) for _ in range(int(n))]


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
    perturbed: int = 3,
    inputs: Optional[Sequence[Any]] = None,
) -> SpecCheck:
    """Check numerically that random permutations of ``spec`` leave the outputs of ``model`` unchanged.

    Runs ``trials`` random permutations in each mode (``"eval"``: running statistics; ``"train"``:
    batch statistics, dropout disabled) on copies of the model and compares every floating output
    with ``max|y - y_perm| <= rtol * max|y|``, first on ``example_inputs``, then on ``perturbed``
    seeded variations of them (:func:`perturb_inputs`: Gaussian noise of the inputs' own scale,
    random valid ids for integer inputs) and on every entry of ``inputs`` (your own representative
    batches), each with one of the ``trials`` permutations. A spec traced on one input can be wrong on
    others when the forward branches on tensor values; this is where that shows. On failure, each
    group is tried alone on the failing input to find the culprits, and :class:`SpecError` names the
    input and the groups with the keys and axes they act on. The user's model is not modified.
    """
    check_module(model, where="check_spec")
    check_inputs(example_inputs, where="check_spec")
    if int(trials) < 1:
        raise SpecError(f"trials must be >= 1, got {trials}: with no permutation nothing would be checked")
    if int(perturbed) < 0:
        raise SpecError(f"perturbed must be >= 0, got {perturbed}")
    unknown = (set(spec.axes) - {k for k, _ in model.named_parameters(remove_duplicate=False)}
               - {k for k, _ in model.named_buffers(remove_duplicate=False)})
    if unknown:
        raise SpecError(f"the spec names keys the model does not have: {sorted(unknown)[:5]}; was it made for another "
                        "architecture?")
    cases: List[Tuple[str, Any]] = [("the example inputs", example_inputs)]
    cases += [(f"perturbed input #{i + 1} (perturb_inputs(example_inputs, seed={seed})[{i}])", x)
              for i, x in enumerate(perturb_inputs(example_inputs, int(perturbed), seed))]
    for i, x in enumerate(inputs or ()):
        check_inputs(x, f"inputs[{i}]", where="check_spec")
        cases.append((f"inputs[{i}]", x))
    base = copy.deepcopy(model)
    worst: Dict[str, float] = {}
    by_input: Dict[str, float] = {}
    refs: List[Tuple[int, str, Any, Dict[str, list]]] = []
    for ci, (label, x) in enumerate(cases):
        ref = {}
        for mode in modes:
            try:
                ref[mode] = _outputs(base, x, mode == "train")
            except Exception as exc:  # e.g. BatchNorm in train mode on a batch of one
                log.warning("check_spec: skipping %s mode on %s, the model does not run in it there (%s)",
                            mode, label, exc)
        if ref:
            refs.append((ci, label, x, ref))
        elif ci == 0:
            raise TraceError("check_spec: the model runs in none of the requested modes on the example inputs")
    n = int(trials)
    for t in range(n):  # one permuted copy alive at a time
        mp = permute(base, spec, random_permutation(spec, seed + t))
        # every permutation on the example inputs; one permutation (in turn) on each other input
        for ci, label, x, ref in refs:
            if ci > 0 and (ci - 1) % n != t:
                continue
            for mode in ref:
                d = _rel_diff(ref[mode], _outputs(mp, x, mode == "train"))
                worst[mode] = max(worst.get(mode, 0.0), d)
                by_input[label] = max(by_input.get(label, 0.0), d)
                if d > rtol:
                    _fail(base, spec, x, label, ref, mode, d, seed + t, rtol, ci)
        del mp
    checked = [label for _, label, _, _ in refs]
    return SpecCheck(max_rel_diff=dict(worst), trials=int(trials), modes=tuple(m for m in modes if m in worst),
                     inputs=tuple(checked), max_rel_diff_by_input=by_input, seed=int(seed),
                     settings={"trials": int(trials), "seed": int(seed), "rtol": rtol, "modes": tuple(modes),
                               "perturbed": int(perturbed), "extra_inputs": len(inputs or ())})


def _fail(base, spec, x, label: str, ref, mode: str, d: float, seed: int, rtol: float, case: int) -> None:
    """Raise SpecError naming the failing input and the groups that fail alone on it."""
    culprits = []
    p2a = spec.perm_to_axes
    for g in spec.groups:
        perms = identity_permutation(spec)
        perms[g] = random_permutation(spec, seed)[g]
        dg = _rel_diff(ref[mode], _outputs(permute(base, spec, perms), x, mode == "train"))
        if dg > rtol:
            axes = ", ".join(f"{k}[{a}]" for k, a, _ in p2a[g][:6])
            culprits.append(f"group {g!r} (size {spec.groups[g]}, acting on {axes}) changes the {mode}-mode outputs "
                            f"by {dg:.3g} (relative)")
    detail = "; ".join(culprits) if culprits else "no single group fails alone; a combination of groups does"
    hint = ""
    if case > 0:
        hint = (" The spec holds on the example inputs but not here: the forward probably takes a different path on "
                "other inputs (control flow on tensor values; see spec.info['data_dependent']). Trace and check on "
                "representative inputs, or make the forward's operations independent of the values.")
    raise SpecError(f"the spec is not a symmetry of the model on {label}: relative output change {d:.3g} in "
                    f"{mode} mode; {detail}. Fix those keys' layouts (spec.with_axes) or drop the groups "
                    f"(spec.without).{hint}")
