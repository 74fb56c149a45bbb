"""The method registry: every merging method, the paper it comes from, what it needs, its options.

A method is a function ``fn(ctx: MergeContext, **options) -> MethodOutput`` registered with the
:func:`register` decorator, which records the paper, what the method needs (a permutation spec,
data, a base model), its options with their defaults (read from the function's signature unless
given) and whether it also aligns (``align_fn``) or works tensor by tensor (``elementwise``, so it
can stream checkpoints larger than memory: called on a context whose states hold a subset of the
keys, it returns the merged values of exactly those keys).

:func:`methods` imports every module listed in ``_METHOD_MODULES`` before answering, so the registry
is complete however the package was imported (no registration by import side effects elsewhere).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from weightspace.results import Result, WeightspaceError

log = logging.getLogger(__name__)

__all__ = ["MethodInfo", "MergeContext", "MethodOutput", "MergeError", "register", "methods", "get"]

# One line per method module; each helper adds the line of its own module when the file exists.
_METHOD_MODULES: Tuple[str, ...] = (
    "merging.average",
    "merging.weight_matching",
    "merging.activation_matching",
    "merging.merge_many",
    "merging.zipit",
    "merging.ot_fusion",
    "merging.ste",
    "merging.task_vectors",
)

_NEEDS = ("spec", "data", "base")
_REGISTRY: Dict[str, "MethodInfo"] = {}


class MergeError(WeightspaceError, ValueError):
    """Bad input to ``merging.merge``/``merging.align``: unknown method or option, missing data, ..."""


@dataclass(frozen=True)
class MethodInfo(Result):
    """One registered method.

    Attributes
    ----------
    name : the name passed as ``method=``.
    paper : the reference (authors, year, arXiv id) and the variant implemented.
    needs : subset of ``("spec", "data", "base")``.
    options : option name -> default (documented in the method's docstring).
    aligns : the method also implements ``align()`` (``align_fn``).
    elementwise : tensor-by-tensor, so streamable (average, task vectors).
    min_models : the fewest models the method accepts.
    same_shapes : the models must share every shape (False: e.g. OT fusion of different widths; merge()
        then checks each model on its own and the method returns ``MethodOutput.model`` when needed).
    doc : the first paragraph of the method's docstring.
    """

    name: str
    paper: str
    needs: Tuple[str, ...]
    options: Dict[str, Any]
    aligns: bool
    elementwise: bool
    min_models: int
    doc: str
    fn: Callable = field(repr=False, compare=False)
    align_fn: Optional[Callable] = field(default=None, repr=False, compare=False)
    align_options: Dict[str, Any] = field(default_factory=dict)
    same_shapes: bool = True

    _skip_in_dict = ("fn", "align_fn")


@dataclass
class MergeContext:
    """Everything a method receives, resolved and validated by ``merging.merge``/``merging.align``.

    ``states`` hold every parameter and buffer of each model (``named_parameters`` +
    ``named_buffers``) on ``device``; methods only read them (never write in place). ``weights`` sum to
    one. ``spec`` is set when the method needs one (or one was given).
    """

    states: List[Dict[str, torch.Tensor]]
    models: List[Optional[torch.nn.Module]]
    reference: Optional[torch.nn.Module]
    spec: Any
    weights: List[float]
    data: Any
    base: Optional[Dict[str, torch.Tensor]]
    seed: int
    device: torch.device
    generator: torch.Generator
    example_inputs: Any = None


@dataclass
class MethodOutput:
    """What a method returns.

    ``state_dict``: the merged weights (every key of ``states[0]``). ``alignment``: the
    :class:`~merging.Alignment` used (permutation methods). ``model``: a new module, only for methods
    that change the architecture. ``endpoints``: the models expressed in the merged basis (e.g. ``A``
    and ``pi(B)``) when they are not ``states`` permuted by ``alignment`` -- REPAIR reads their
    statistics. ``log``: anything the method wants recorded.
    """

    state_dict: Dict[str, torch.Tensor]
    alignment: Any = None
    model: Optional[torch.nn.Module] = None
    log: Dict[str, Any] = field(default_factory=dict)
    endpoints: Optional[List[Dict[str, torch.Tensor]]] = None


def _first_paragraph(doc: Optional[str]) -> str:
    if not doc:
        return ""
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()


def _signature_options(fn: Callable, what: str) -> Tuple[Dict[str, Any], bool]:
    """Keyword options of ``fn`` after the context argument, and whether it takes ``**kwargs``."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise TypeError(f"{what} must take the MergeContext as its first argument")
    opts: Dict[str, Any] = {}
    var_kw = False
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{what}: methods take keyword options only, not *{p.name}")
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"{what}: option {p.name!r} needs a default value")
        else:
            opts[p.name] = p.default
    return opts, var_kw


def register(
    name: str,
    *,
    paper: str,
    needs: Tuple[str, ...] = (),
    options: Optional[Dict[str, Any]] = None,
    aligns: bool = False,
    elementwise: bool = False,
    min_models: int = 2,
    align_fn: Optional[Callable] = None,
    same_shapes: bool = True,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn(ctx, **options) -> MethodOutput`` as method ``name``.

    ``options`` defaults to the keyword parameters of ``fn`` with their defaults. ``align_fn(ctx,
    **options) -> Alignment`` aligns ``states[1]`` to ``states[0]`` (required when ``aligns``).
    Returns ``fn`` unchanged.
    """
    bad = [n for n in needs if n not in _NEEDS]
    if bad:
        raise ValueError(f"register({name!r}): unknown needs {bad}; choose from {_NEEDS}")
    if aligns and align_fn is None:
        raise ValueError(f"register({name!r}): aligns=True needs align_fn")
    if min_models < 1:
        raise ValueError(f"register({name!r}): min_models must be >= 1")

    def deco(fn: Callable) -> Callable:
        sig_opts, var_kw = _signature_options(fn, f"method {name!r}")
        if options is None:
            opts = sig_opts
        else:
            unknown = [k for k in options if k not in sig_opts and not var_kw]
            if unknown:
                raise TypeError(f"register({name!r}): options {unknown} are not parameters of {fn.__qualname__}")
            opts = dict(options)
        a_opts: Dict[str, Any] = {}
        if align_fn is not None:
            a_opts, _ = _signature_options(align_fn, f"align_fn of {name!r}")
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"method {name!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}")
        _REGISTRY[name] = MethodInfo(
            name=name,
            paper=paper,
            needs=tuple(needs),
            options=opts,
            aligns=bool(aligns),
            elementwise=bool(elementwise),
            min_models=int(min_models),
            doc=_first_paragraph(fn.__doc__),
            fn=fn,
            align_fn=align_fn,
            align_options=a_opts,
            same_shapes=bool(same_shapes),
        )
        return fn

    return deco


def _load_all() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(mod)


def methods() -> Dict[str, MethodInfo]:
    """Every registered method: ``{name: MethodInfo}`` (paper, needs, options, aligns, ...)."""
    _load_all()
    return dict(_REGISTRY)


def get(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of ``name``; an unknown name raises listing the valid ones."""
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise MergeError(f"unknown merging method {name!r}; valid methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


get_method = get
