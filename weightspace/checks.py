"""Shared argument checks for public entry points: one clear error instead of a silent wrong answer or
a raw library error deep inside.

* :func:`check_module` — an ``nn.Module`` *instance* (not its class, a factory function, a state dict
  or a path); the error says what was passed and what to pass instead.
* :func:`check_finite` — every floating parameter and buffer finite; :class:`NonFiniteError` names the
  first offending key and how many of its entries are NaN / inf. A NaN weight otherwise flows
  silently into a metric (a path-norm of 0.0, a NaN correlation) or surfaces as a raw library error
  (``LinAlgError`` from an eigensolver).
* :func:`check_model` — both of the above.
* :func:`check_inputs` / :func:`check_data` — example inputs (tensor, tuple, dict of tensors) and data
  sets (a pair ``(X, Y)``, a ``DataLoader``, an iterable of batches, or a dict of named splits);
  NumPy arrays, pandas frames and Python lists of numbers are refused with the conversion to use.

All errors subclass :class:`weightspace.results.WeightspaceError` and a built-in (``ValueError``; a
wrong type is also a ``TypeError``), so existing ``except`` clauses keep working.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from weightspace.results import WeightspaceError

__all__ = ["NonFiniteError", "InputTypeError", "check_module", "check_finite", "check_model", "check_inputs",
           "check_data"]


class NonFiniteError(WeightspaceError, ValueError):
    """A model (or data) holds NaN or inf where a finite value is required; the message names the key."""


class InputTypeError(WeightspaceError, TypeError, ValueError):
    """An argument has the wrong kind (a class or a function for a module, a NumPy array for data)."""


def _at(where: Optional[str]) -> str:
    return f"{where}: " if where else ""


def check_module(obj: Any, name: str = "model", *, where: Optional[str] = None, allow_state: bool = False,
                 expected: str = "an nn.Module") -> Any:
    """Return ``obj`` if it is an ``nn.Module`` instance (or, with ``allow_state``, a state dict); else
    raise :class:`InputTypeError` saying what was passed and what to pass (``where`` names the calling
    function in the message)."""
    if isinstance(obj, nn.Module) or (allow_state and isinstance(obj, Mapping)):
        return obj
    at = _at(where)
    if isinstance(obj, type):
        if issubclass(obj, nn.Module):
            raise InputTypeError(f"{at}{name} is the class {obj.__name__}, not a model; pass an instance, "
                                 f"e.g. {obj.__name__}(...)")
        raise InputTypeError(f"{at}{name} is the class {obj.__name__}; pass {expected} instance")
    if isinstance(obj, Mapping):
        raise InputTypeError(f"{at}{name} is a {type(obj).__name__} (a state dict?); pass {expected}, e.g. "
                             f"weightspace.io.load_into(build_model(), state_dict)")
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        raise InputTypeError(f"{at}{name} is a path or string ({obj!r}); load it into a module first with "
                             f"weightspace.io.load_into(model, path)")
    if callable(obj):
        what = "function" if inspect.isfunction(obj) or inspect.ismethod(obj) else "callable"
        label = getattr(obj, "__qualname__", getattr(obj, "__name__", type(obj).__name__))
        raise InputTypeError(f"{at}{name} is the {what} {label}, not a model; call it to build the nn.Module "
                             f"(e.g. {label}()) and pass the result")
    raise InputTypeError(f"{at}{name} must be {expected} instance, got {type(obj).__name__}")


def _nonfinite_message(key: str, v: torch.Tensor) -> str:
    nan = int(torch.isnan(v).sum())
    inf = int(torch.isinf(v).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return f"[{key!r}] holds {' and '.join(p for p in parts if p)} of its {v.numel()} entries"


def check_finite(obj: Any, name: str = "model", *, where: Optional[str] = None) -> None:
    """Raise :class:`NonFiniteError` naming the first floating (or complex) tensor of ``obj`` (a module:
    its parameters and buffers; or a state dict) that holds NaN or inf, and how many entries do."""
    if isinstance(obj, nn.Module):
        items = list(obj.named_parameters()) + list(obj.named_buffers())
    elif isinstance(obj, Mapping):
        items = list(obj.items())
    else:
        raise InputTypeError(f"{_at(where)}{name} must be an nn.Module or a state dict, got {type(obj).__name__}")
    for k, v in items:
        if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"{_at(where)}{name}{_nonfinite_message(k, v.detach())}; the result would be "
                                 f"meaningless (a NaN weight can even give 0.0). Find where it came from "
                                 f"(a diverged run?) or pass a finite checkpoint")


def check_model(obj: Any, name: str = "model", *, where: Optional[str] = None, finite: bool = True,
                expected: str = "an nn.Module") -> nn.Module:
    """:func:`check_module`, then (with ``finite``) :func:`check_finite`; returns the module."""
    m = check_module(obj, name, where=where, expected=expected)
    if finite:
        check_finite(m, name, where=where)
    return m


def _foreign(x: Any) -> Optional[str]:
    """A hint when ``x`` is array-like data from outside torch, else None."""
    mod = type(x).__module__ or ""
    if mod.startswith("numpy") and hasattr(x, "shape"):
        return f"a NumPy array of shape {tuple(x.shape)}; convert it with torch.from_numpy(x) (float32: .float())"
    if mod.startswith("pandas"):
        return f"a pandas {type(x).__name__}; convert it with torch.tensor(x.to_numpy())"
    if mod.startswith(("jax", "jaxlib", "tensorflow", "cupy")):
        return f"a {mod.split('.')[0]} array; convert it to a torch tensor first"
    if isinstance(x, list) and x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x[:8]):
        return "a Python list of numbers; wrap it in torch.tensor(...)"
    return None


def check_inputs(x: Any, name: str = "example_inputs", *, where: Optional[str] = None) -> Any:
    """Example inputs: a tensor, a tuple/list of inputs, or a dict of keyword inputs (nested, with
    non-tensor options allowed). NumPy arrays (and other foreign arrays) anywhere raise
    :class:`InputTypeError` with the conversion; ``None`` raises. Returns ``x``."""
    if x is None:
        raise InputTypeError(f"{_at(where)}{name} is None; pass a tensor, a tuple of inputs or a dict of keyword "
                             "inputs")
    hint = _foreign(x)
    if hint:
        raise InputTypeError(f"{_at(where)}{name} is {hint}")
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            if v is not None:
                check_inputs(v, f"{name}[{i}]", where=where)
    elif isinstance(x, Mapping):
        for k, v in x.items():
            if v is not None:
                check_inputs(v, f"{name}[{k!r}]", where=where)
    elif isinstance(x, nn.Module) or (isinstance(x, type) and issubclass(x, nn.Module)):
        raise InputTypeError(f"{_at(where)}{name} is a model; pass the inputs to run it on (check the argument order)")
    return x


def check_data(data: Any, name: str = "data", *, where: Optional[str] = None) -> Any:
    """A data set: a pair ``(X, Y)`` of tensors, a ``DataLoader`` or iterable of batches, or a dict of
    named splits of those. Refuses NumPy/pandas arrays (with the conversion), a bare tensor (no
    targets), a module and ``None``. Iterables are not consumed. Returns ``data``."""
    at = _at(where)
    if data is None:
        raise InputTypeError(f"{at}{name} is None; pass a pair (X, Y) of tensors, a DataLoader or a dict of named "
                             "splits")
    hint = _foreign(data)
    if hint:
        raise InputTypeError(f"{at}{name} is {hint}, inside a pair (X, Y)")
    if isinstance(data, nn.Module) or (isinstance(data, type) and issubclass(data, nn.Module)):
        raise InputTypeError(f"{at}{name} is a model; pass the data set (X, Y) here (check the argument order)")
    if isinstance(data, Mapping):
        for k, v in data.items():
            check_data(v, f"{name}[{k!r}]", where=where)
        return data
    pair = isinstance(data, (tuple, list)) and len(data) == 2
    if pair and not any(torch.is_tensor(b) and b.dim() == 0 for b in data):
        for part, v in zip(("X", "Y"), data):
            h = _foreign(v)
            if h:
                raise InputTypeError(f"{at}{name} {part} is {h}")
    if isinstance(data, (int, float, str, bytes)):
        raise InputTypeError(f"{at}{name} is a {type(data).__name__}; pass a pair (X, Y) of tensors or a DataLoader")
    return data
