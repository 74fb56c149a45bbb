"""``merging.merge`` and ``merging.align``: input normalisation, validation, dispatch, result building.

Both functions accept models as modules, state dicts or checkpoint paths (read safely through
``weightspace.io``), check that they share one architecture and hold finite weights, resolve the
permutation spec, weights, seed and device, validate the method's options against the registry and
call the method. Nothing the user passes is modified; bad input raises before anything is written.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from weightspace.results import versions
from weightspace.state import as_state, check_compatible, check_finite, state_of

from ._registry import MergeContext, MergeError, MethodInfo, MethodOutput, get, methods
from ._results import Alignment, MergeResult

log = logging.getLogger(__name__)

__all__ = ["merge", "align"]

_REPAIRS = (None, "bn_reset", "repair")
_COMMON = ("weights", "alpha", "base", "data", "spec", "example_inputs", "repair", "seed", "device", "out", "overwrite")


def _model_name(i: int) -> str:
    return f"model_{chr(ord('a') + i)}" if i < 26 else f"model_{i}"


class _Inputs:
    """Models normalised to full states, with the reference module and provenance."""

    def __init__(self, models: Sequence[Any], names: Sequence[str], same_shapes: bool = True):
        from weightspace.io import load_state_dict

        self.names = list(names)
        self.modules: List[Optional[nn.Module]] = []
        self.paths: List[Optional[Path]] = []
        raw: List[Mapping] = []
        for obj, name in zip(models, names):
            if isinstance(obj, nn.Module):
                self.modules.append(obj)
                self.paths.append(None)
                raw.append(state_of(obj))
            elif isinstance(obj, (str, os.PathLike)):
                p = Path(obj)
                self.modules.append(None)
                self.paths.append(p)
                raw.append(load_state_dict(p))
            elif isinstance(obj, Mapping):
                bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
                if bad:
                    raise MergeError(f"{name} is a mapping whose entries {bad[:5]} are not tensors; pass a state dict")
                self.modules.append(None)
                self.paths.append(None)
                raw.append(obj)
            else:
                raise MergeError(
                    f"{name} is a {type(obj).__name__}; pass an nn.Module, a state dict or a checkpoint path"
                )
        self.reference = next((m for m in self.modules if m is not None), None)
        if self.reference is not None and same_shapes:
            self.states = [as_state(s, self.reference, name) for s, name in zip(raw, names)]
        elif self.reference is not None:
            self.states = [
                as_state(s, m, name) if m is not None else OrderedDict((k, v.detach()) for k, v in s.items())
                for s, m, name in zip(raw, self.modules, names)
            ]
        else:
            self.states = [OrderedDict((k, v.detach()) for k, v in s.items()) for s in raw]

    def describe(self) -> List[str]:
        out = []
        for m, p in zip(self.modules, self.paths):
            out.append(type(m).__name__ if m is not None else (str(p) if p is not None else "state_dict"))
        return out


def _state_device(state: Mapping) -> torch.device:
    for v in state.values():
        return v.device
    return torch.device("cpu")


def _resolve_weights(n: int, weights: Optional[Sequence[float]], alpha: Optional[float]) -> List[float]:
    if alpha is not None:
        if weights is not None:
            raise MergeError("pass either alpha= (two models) or weights= (one per model), not both")
        if n != 2:
            raise MergeError(f"alpha= is for two models, but {n} were given; pass weights= (one per model)")
        a = float(alpha)
        if not (0.0 <= a <= 1.0):
            raise MergeError(f"alpha must lie in [0, 1] (the weight of model_b), got {alpha}")
        return [1.0 - a, a]
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeError(f"weights= has {len(w)} entries but {n} models were given; pass one weight per model")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise MergeError(f"weights must be finite and non-negative, got {w}")
    if abs(sum(w) - 1.0) > 1e-6:
        raise MergeError(f"weights must sum to 1, got {w} (sum {sum(w):.6g}); divide them by their sum")
    return w


def _first_inputs(data: Any) -> Any:
    from weightspace.utils import iter_batches

    x, _ = next(iter(iter_batches(data)))
    return x


def _check_spec_fits(spec: Any, state: Mapping, name: str) -> None:
    from weightspace.symmetry import PermutationSpec

    if not isinstance(spec, PermutationSpec):
        raise MergeError(f"spec= must be a weightspace.PermutationSpec, not {type(spec).__name__}")
    optional = spec.optional_keys()
    for key in spec.permuted_keys():
        if key not in state:
            if key in optional:
                continue
            raise MergeError(
                f"the spec permutes {key!r}, which {name} does not have; was the spec made for another model?"
            )
        want = spec.shapes.get(key)
        if want is not None and tuple(state[key].shape) != tuple(want):
            raise MergeError(
                f"the spec expects {key!r} of shape {tuple(want)} but {name} has {tuple(state[key].shape)}"
            )


def _resolve_spec(spec: Any, example_inputs: Any, data: Any, inputs: _Inputs, method: str) -> Tuple[Any, str]:
    if spec is not None:
        _check_spec_fits(spec, inputs.states[0], inputs.names[0])
        return spec, "given"
    if example_inputs is None and data is None:
        raise MergeError(
            f"method {method!r} permutes hidden units and needs a permutation spec: pass spec=..., "
            "or example_inputs= (one input batch) or data= to discover it by tracing model_a"
        )
    if inputs.reference is None:
        raise MergeError(
            f"method {method!r} needs a permutation spec, and state dicts cannot be traced: pass spec= "
            "(weightspace.permutation_spec(model, x) on a module of this architecture) or pass model_a as a module"
        )
    from weightspace.symmetry import permutation_spec

    source = "traced from example_inputs"
    x = example_inputs
    if x is None:
        x = _first_inputs(data)
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] > 2:
            x = x[:2]
        source = "traced from the first batch of data"
    try:
        found = permutation_spec(inputs.reference, x)
    except Exception as e:  # noqa: BLE001 -- any tracing failure gets the same next step
        raise MergeError(
            f"could not discover the permutation spec of {type(inputs.reference).__name__} by tracing "
            f"({type(e).__name__}: {e}); write the spec by hand with "
            "weightspace.PermutationSpec.from_axes_to_perm(...) and pass spec="
        ) from e
    return found, source


def _check_options(info: MethodInfo, options: Dict[str, Any], valid: Dict[str, Any], what: str) -> Dict[str, Any]:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MergeError(
            f"{what} {info.name!r} has no option(s) {unknown}; its options are {sorted(valid) or 'none'} "
            f"(common to all: {', '.join(_COMMON)})"
        )
    return {**valid, **options}


def _prepare(
    models: Sequence[Any],
    info: MethodInfo,
    *,
    base: Any,
    weights: Any,
    alpha: Any,
    data: Any,
    spec: Any,
    example_inputs: Any,
    seed: Any,
    device: Any,
    need_spec: bool,
    timings: Dict[str, float],
):
    from weightspace.utils import resolve_device

    t0 = time.perf_counter()
    n = len(models)
    if n < info.min_models:
        raise MergeError(f"method {info.name!r} needs at least {info.min_models} models, got {n}")
    names = [_model_name(i) for i in range(n)]
    inputs = _Inputs(models, names, info.same_shapes)
    for i in range(1, n):
        if info.same_shapes:
            check_compatible(inputs.states[0], inputs.states[i], (names[0], names[i]))
        elif set(inputs.states[0]) != set(inputs.states[i]):
            check_compatible(inputs.states[0], inputs.states[i], (names[0], names[i]))  # raises naming the keys
    for st, name in zip(inputs.states, names):
        check_finite(st, name)
    w = _resolve_weights(n, weights, alpha)
    if "data" in info.needs and data is None:
        raise MergeError(f"method {info.name!r} is data-driven: pass data= (an (inputs, targets) pair or a DataLoader)")
    base_state = None
    if base is not None:
        if "base" not in info.needs:
            raise MergeError(
                f"method {info.name!r} does not use base=; methods that do: "
                f"{sorted(k for k, v in methods().items() if 'base' in v.needs)}"
            )
        b = _Inputs([base], ["base"])
        base_state = as_state(b.states[0], inputs.reference, "base") if inputs.reference is not None else b.states[0]
        check_compatible(base_state, inputs.states[0], ("base", names[0]))
        check_finite(base_state, "base")
    elif "base" in info.needs:
        raise MergeError(f"method {info.name!r} works on task vectors and needs base= (the pretrained model)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"seed must be an int, got {seed!r}")
    dev = resolve_device(device)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec_source = None
    if need_spec or spec is not None:
        spec, spec_source = _resolve_spec(spec, example_inputs, data, inputs, info.name)
    timings["spec"] = time.perf_counter() - t0
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    to = lambda s: None if s is None else OrderedDict((k, v.to(dev)) for k, v in s.items())  # noqa: E731
    ctx = MergeContext(
        states=[to(s) for s in inputs.states],
        models=list(inputs.modules),
        reference=inputs.reference,
        spec=spec,
        weights=w,
        data=data,
        base=to(base_state),
        seed=int(seed),
        device=dev,
        generator=gen,
        example_inputs=example_inputs,
    )
    return ctx, inputs, spec_source


def _build_model(reference: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    new = copy.deepcopy(reference)
    with torch.no_grad():
        for k, t in list(new.named_parameters()) + list(new.named_buffers()):
            if k in state:
                t.copy_(state[k].to(device=t.device, dtype=t.dtype))
    return new


def _target_module(inputs: "_Inputs", sd: Mapping[str, torch.Tensor]) -> Optional[nn.Module]:
    """The first given module whose state has the merged shapes (model_a's unless widths differ)."""
    for m, st in zip(inputs.modules, inputs.states):
        if m is not None and all(k in st and tuple(st[k].shape) == tuple(v.shape) for k, v in sd.items()):
            return m
    return None


def _finish_state(
    out: MethodOutput, ref_state: Mapping[str, torch.Tensor], info: MethodInfo
) -> Dict[str, torch.Tensor]:
    sd = out.state_dict
    if not isinstance(sd, Mapping):
        raise RuntimeError(f"method {info.name!r} returned {type(sd).__name__} instead of a state dict")
    if out.model is None and info.same_shapes:
        missing = [k for k in ref_state if k not in sd]
        if missing:
            raise RuntimeError(f"method {info.name!r} returned no value for {missing[:5]}")
    res: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        r = ref_state.get(k)
        res[k] = (
            v.detach().to(device=r.device, dtype=r.dtype)
            if r is not None and tuple(r.shape) == tuple(v.shape)
            else v.detach()
        )
    return res


def merge(
    *models: Any,
    method: str = "average",
    weights: Optional[Sequence[float]] = None,
    alpha: Optional[float] = None,
    base: Any = None,
    data: Any = None,
    spec: Any = None,
    example_inputs: Any = None,
    repair: Optional[str] = None,
    seed: int = 0,
    device: Any = "auto",
    out: Any = None,
    overwrite: bool = False,
    **options: Any,
) -> MergeResult:
    """Merge two or more models of one architecture with a registered method.

    Parameters
    ----------
    *models : nn.Module, state dict or checkpoint path (safetensors or a plain ``torch.save`` dict; pickles
        of other objects are refused). Never modified.
    method : a name from :func:`merging.methods` (default ``"average"``).
    weights : one non-negative weight per model, summing to one (default uniform); or
    alpha : for two models, the weight of model_b: ``weights = [1 - alpha, alpha]``.
    base : the pretrained model, for task-vector methods (same keys and shapes).
    data : ``(inputs, targets)`` or an iterable of batches: for data-driven methods, spec discovery (first
        batch) and ``repair``.
    spec : a :class:`weightspace.PermutationSpec`; else discovered from ``example_inputs`` or ``data``.
    repair : ``None``, ``"bn_reset"`` (recompute BatchNorm statistics on ``data``) or ``"repair"``
        (REPAIR, Jordan et al. 2023, arXiv:2211.08403: rescale merged pre-activations to the interpolated
        endpoint statistics).
    seed : seeds every random choice (a ``torch.Generator``). device : ``"auto"`` (CUDA if available),
        ``"cpu"``, ``"cuda"``, ...; where the method computes. The merged weights come back on model_a's
        device and in its dtypes.
    out : optional path to write the merged state dict to (atomically; refuses an existing file unless
        ``overwrite=True`` and any path equal to an input).
    **options : the method's own options (see ``merging.methods()[method].options``).

    Returns
    -------
    MergeResult with ``model`` (a new module of model_a's class, or None for state dicts), ``state_dict``,
    ``alignment``, ``spec``, ``settings`` and ``log`` (the method's log and per-stage timings).

    Three or more models with an aligning method run MergeMany (Ainsworth et al. 2023, Alg. 3).
    """
    info = get(method)
    if len(models) == 1 and isinstance(models[0], (list, tuple)) and not isinstance(models[0], str):
        models = tuple(models[0])
    if len(models) == 0:
        raise MergeError("merge() needs the models to merge as positional arguments")
    if repair not in _REPAIRS:
        raise MergeError(f"repair must be one of {list(_REPAIRS)}, got {repair!r}")
    if repair is not None and data is None:
        raise MergeError(f"repair={repair!r} measures activations: pass data= (training data without augmentation)")
    run_info, run_options = info, dict(options)
    if len(models) >= 3 and info.aligns:
        run_info = get("merge_many")
        run_options = {"inner": method, **options}
    if run_info.name == "merge_many":  # its own options plus the inner method's alignment options
        inner = get(run_options.get("inner", "weight_matching"))
        _check_options(run_info, run_options, {**run_info.options, **inner.align_options}, "method")
        opts = dict(run_options)
    else:
        opts = _check_options(run_info, run_options, run_info.options, "method")
    out_path = _check_out(out, models, overwrite)
    stream = _maybe_stream(info, models, base, out_path, repair)
    if stream is not None:
        extra = {"base": base} if info.elementwise else {"spec": spec}
        return stream(
            info=info,
            paths=[Path(m) for m in models],
            weights=weights,
            alpha=alpha,
            options=opts,
            seed=seed,
            device=device,
            out=out_path,
            overwrite=overwrite,
            **extra,
        )
    timings: Dict[str, float] = {}
    need_spec = "spec" in run_info.needs or run_info.aligns or run_info.name == "merge_many"
    ctx, inputs, spec_source = _prepare(
        models,
        run_info,
        base=base,
        weights=weights,
        alpha=alpha,
        data=data,
        spec=spec,
        example_inputs=example_inputs,
        seed=seed,
        device=device,
        need_spec=need_spec,
        timings=timings,
    )
    if repair is not None and inputs.reference is None:
        raise MergeError(
            f"repair={repair!r} runs the model: pass at least one model as an nn.Module, not only state dicts"
        )
    t0 = time.perf_counter()
    res_out = run_info.fn(ctx, **opts)
    if not isinstance(res_out, MethodOutput):
        raise RuntimeError(f"method {run_info.name!r} returned {type(res_out).__name__}, not a MethodOutput")
    timings["method"] = time.perf_counter() - t0
    merged = res_out.state_dict
    repair_log: Dict[str, Any] = {}
    if repair is not None:
        from .repair import apply_repair

        t0 = time.perf_counter()
        merged, repair_log = apply_repair(repair, ctx, res_out)
        res_out = MethodOutput(
            state_dict=merged,
            alignment=res_out.alignment,
            model=res_out.model,
            log=res_out.log,
            endpoints=res_out.endpoints,
        )
        timings["repair"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = _finish_state(res_out, inputs.states[0], run_info)
    model = res_out.model
    if model is None and inputs.reference is not None:
        target = _target_module(inputs, sd)
        model = None if target is None else _build_model(target, sd)
    timings["build"] = time.perf_counter() - t0
    settings = {
        "method": method,
        "options": opts,
        "weights": ctx.weights,
        "seed": ctx.seed,
        "device": str(ctx.device),
        "repair": repair,
        "n_models": len(models),
        "inputs": inputs.describe(),
        "versions": versions(),
    }
    if run_info is not info:
        settings["runner"] = run_info.name
    log_ = {"method": res_out.log, "timings": timings, "spec_source": spec_source}
    if repair_log:
        log_["repair"] = repair_log
    result = MergeResult(
        model=model, state_dict=sd, alignment=res_out.alignment, spec=ctx.spec, settings=settings, log=log_
    )
    if out_path is not None:
        result.save(out_path, overwrite=overwrite)
        log_["out"] = str(out_path)
    return result


def _check_out(out: Any, models: Sequence[Any], overwrite: bool) -> Optional[Path]:
    if out is None:
        return None
    p = Path(out)
    for m in models:
        if isinstance(m, (str, os.PathLike)) and Path(m).resolve() == p.resolve():
            raise MergeError(f"out={str(p)!r} is one of the input checkpoints; write the merge to a new file")
    if p.exists() and not overwrite:
        raise MergeError(f"out={str(p)!r} already exists; pass overwrite=True to replace it")
    if not p.parent.exists():
        raise MergeError(f"the directory of out={str(p)!r} does not exist; create it first")
    return p


def _maybe_stream(info: MethodInfo, models: Sequence[Any], base: Any, out: Optional[Path], repair: Any):
    """The streaming merger when every input is a safetensors file and ``out=`` ends in ``.safetensors``:
    ``merging._stream.stream_merge`` for elementwise methods, ``merging._stream_align.stream_align_merge``
    for weight matching of two models; else None (the models are loaded in memory, with a logged warning
    saying why when the inputs were files that could have streamed)."""
    files = list(models) + ([base] if base is not None else [])
    if out is None or out.suffix != ".safetensors":
        return None
    if not all(isinstance(m, (str, os.PathLike)) and str(m).endswith(".safetensors") for m in files):
        return None
    from ._stream_align import STREAMABLE_ALIGNERS

    why = None
    if repair is not None:
        why = f"repair={repair!r} runs the model on data"
    elif info.elementwise:
        from ._stream import stream_merge

        return stream_merge
    elif info.name in STREAMABLE_ALIGNERS and len(models) == 2:
        from ._stream_align import stream_align_merge

        return stream_align_merge
    elif info.name in STREAMABLE_ALIGNERS:
        why = f"{len(models)} models run MergeMany, which holds every model"
    else:
        why = (
            f"method {info.name!r} needs the models (or data) in memory; the streaming methods are the "
            f"elementwise ones and {list(STREAMABLE_ALIGNERS)}"
        )
    log.warning("merging safetensors files in memory, not streamed: %s", why)
    return None


def align(
    model_a: Any,
    model_b: Any,
    method: str = "weight_matching",
    *,
    spec: Any = None,
    example_inputs: Any = None,
    data: Any = None,
    seed: int = 0,
    device: Any = "auto",
    **options: Any,
) -> Alignment:
    """Permutations taking model_b into model_a's basis (``ws.permute(model_b, aln.spec, aln.permutations)``).

    ``method`` is an aligning method of :func:`merging.methods` (``weight_matching``,
    ``activation_matching``, ...); ``spec``/``example_inputs``/``data``/``seed``/``device`` as in
    :func:`merge`; ``**options`` are the method's alignment options. Neither model is modified.
    """
    info = get(method)
    if not info.aligns:
        raise MergeError(
            f"method {method!r} does not align models; aligning methods: "
            f"{sorted(k for k, v in methods().items() if v.aligns)}"
        )
    opts = _check_options(info, options, info.align_options, "alignment by")
    pair = (model_a, model_b)
    if all(isinstance(m, (str, os.PathLike)) and str(m).endswith(".safetensors") for m in pair):
        from ._stream_align import STREAMABLE_ALIGNERS, stream_align

        if info.name in STREAMABLE_ALIGNERS:  # two files: aligned without loading either
            if example_inputs is not None or data is not None:
                log.info("align on safetensors files uses spec=; example_inputs/data are not used")
            return stream_align(info=info, paths=[Path(m) for m in pair], spec=spec, options=opts, seed=seed,
                                device=device)
        log.warning("aligning safetensors files in memory, not streamed: method %r needs the models", info.name)
    timings: Dict[str, float] = {}
    ctx, _, spec_source = _prepare(
        (model_a, model_b),
        info,
        base=None,
        weights=None,
        alpha=None,
        data=data,
        spec=spec,
        example_inputs=example_inputs,
        seed=seed,
        device=device,
        need_spec=True,
        timings=timings,
    )
    t0 = time.perf_counter()
    aln = info.align_fn(ctx, **opts)
    timings["align"] = time.perf_counter() - t0
    aln.log.setdefault("timings", {}).update(timings)
    aln.log.setdefault("spec_source", spec_source)
    return aln
