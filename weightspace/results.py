"""One convention for result objects and errors across the toolkit.

Every result the toolkit returns (a merge, an alignment, a barrier, a path-norm, ...) is a frozen
dataclass that

* carries ``settings`` — what was asked: the variant, options, seed, device and library versions —
  and ``log`` — what happened: iterations, objective values, timings;
* turns into plain JSON (``json.dumps(result.to_dict())`` works) through :func:`to_jsonable`,
  the one converter shared by every result: tensors and arrays become nested lists, NumPy scalars
  Python numbers, dataclasses dicts, non-finite floats stay floats (``json`` writes them as
  ``NaN``/``Infinity``), anything else its ``str``.

Write a result as::

    @dataclass(frozen=True)
    class MyResult(Result):
        value: float
        settings: dict = field(default_factory=dict)
        log: dict = field(default_factory=dict, compare=False)

and ``MyResult(...).to_dict()`` works (``compare=False``: two results with equal values are equal
whatever their timings). Fields listed in ``_skip_in_dict`` (for example a module or a
large state dict) are left out of ``to_dict()``.

Errors: :class:`WeightspaceError` is the base of every error the toolkit raises on purpose. Each
concrete error also keeps its natural built-in base (``ValueError`` for bad input, ``RuntimeError``
for a failure while running), so ``except ValueError`` in user code keeps working.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import platform
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, Tuple, TypeVar

__all__ = ["Result", "WeightspaceError", "to_jsonable", "versions", "records_time"]


class WeightspaceError(Exception):
    """Base class of every error weightspace, merging, analysis and viz raise on purpose."""


def to_jsonable(x: Any) -> Any:
    """``x`` as JSON-ready Python data (dicts with string keys, lists, numbers, strings, None).

    >>> import numpy as np
    >>> to_jsonable({"a": np.arange(3), 1: (np.float32(0.5), None)})
    {'a': [0, 1, 2], '1': [0.5, None]}
    """
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        if hasattr(x, "to_dict"):
            return x.to_dict()
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = sorted(x, key=str) if isinstance(x, (set, frozenset)) else x
        return [to_jsonable(v) for v in items]
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            return to_jsonable(x.detach().cpu().tolist())
        if isinstance(x, (torch.device, torch.dtype)):
            return str(x)
    if mod.startswith("numpy"):
        import numpy as np

        if isinstance(x, np.ndarray):
            return to_jsonable(x.tolist())
        if isinstance(x, np.bool_):
            return bool(x)
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.floating):
            return float(x)
    if isinstance(x, complex):
        return [x.real, x.imag] if not (math.isnan(x.real) or math.isnan(x.imag)) else str(x)
    return str(x)


class Result:
    """Mixin for frozen result dataclasses: ``to_dict()`` through :func:`to_jsonable`.

    Subclasses are ``@dataclass(frozen=True)`` and usually have ``settings`` and ``log`` fields;
    ``settings`` gets ``"versions"`` (:func:`versions`) added on construction. A subclass with its own
    ``__post_init__`` calls ``super().__post_init__()``.
    ``_skip_in_dict`` names fields left out of ``to_dict()`` (modules, big tensors).
    """

    _skip_in_dict: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Stamp library versions into ``settings`` (when the result has one and they are missing)."""
        settings = getattr(self, "settings", None)
        if isinstance(settings, Mapping) and "versions" not in settings:
            object.__setattr__(self, "settings", {**settings, "versions": versions()})

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in self._skip_in_dict:
                continue
            out[f.name] = to_jsonable(getattr(self, f.name))
        return out


@functools.lru_cache(maxsize=1)
def _versions() -> Tuple[Tuple[str, str], ...]:
    import numpy
    import scipy
    import torch

    from weightspace import __version__

    return (("python", platform.python_version()), ("torch", torch.__version__), ("numpy", numpy.__version__),
            ("scipy", scipy.__version__), ("weightspace", __version__))


def versions() -> Dict[str, str]:
    """Versions of Python, torch, NumPy, SciPy and weightspace, for ``settings`` of results."""
    return dict(_versions())


F = TypeVar("F", bound=Callable[..., Any])


def records_time(fn: F) -> F:
    """Decorator for functions that return a :class:`Result`: puts the wall time of the call into the
    result's ``log`` as ``"seconds"`` (an outer decorated call overwrites an inner one's).

    >>> from dataclasses import dataclass, field
    >>> @dataclass(frozen=True)
    ... class Out(Result):
    ...     log: dict = field(default_factory=dict)
    >>> @records_time
    ... def f():
    ...     return Out()
    >>> list(f().log)
    ['seconds']
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        res = fn(*args, **kwargs)
        log = getattr(res, "log", None)
        if isinstance(res, Result) and isinstance(log, Mapping):
            object.__setattr__(res, "log", {**log, "seconds": time.perf_counter() - t0})
        return res

    return wrapper  # type: ignore[return-value]

