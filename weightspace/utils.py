"""Shared helpers of every package: device resolution (:func:`resolve_device`, :func:`model_device`), batch
iteration over the data forms users pass (:func:`iter_batches`, :func:`shuffled_batches`), calling a model on
its inputs (:func:`call_model`) and switching train/eval mode for a block (:func:`module_mode`)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Iterator, Optional, Tuple, Union

import torch

log = logging.getLogger(__name__)

DeviceLike = Union[str, torch.device, None]


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn ``"auto"``, ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device into a ``torch.device``.

    ``"auto"`` (and ``None``) picks CUDA when available, then Apple MPS, else the CPU.
    Asking for CUDA on a machine without it raises with a next step instead of failing later.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was requested but CUDA is not available; pass device='cpu' or "
                           "'auto'")
    return dev


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, training: bool = False) -> Iterator[torch.nn.Module]:
    """Within the block every module of ``model`` has ``training`` set (eval by default); afterwards,
    also on error, each module gets back its own flag (a frozen-BN submodule of a train-mode model
    stays in eval, which ``model.train(was_training)`` would undo)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: torch.nn.Module, default: DeviceLike = None) -> torch.device:
    """The device of a module's first parameter (or buffer); ``default`` (CPU when ``None``) for a
    module without tensors.

    >>> model_device(torch.nn.Linear(2, 2)), model_device(torch.nn.ReLU())
    (device(type='cpu'), device(type='cpu'))
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default) if default is not None else torch.device("cpu")


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``:
    the one convention for the ``example_inputs`` and batches the toolkit passes to a model."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _to(obj: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return obj
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def iter_batches(data: Any, device: DeviceLike = None) -> Iterator[Tuple[Any, Any]]:
    """Yield ``(inputs, targets)`` batches from the data forms the toolkit accepts.

    ``data`` may be
      * a pair ``(X, Y)`` of tensors: one batch;
      * a ``torch.utils.data.DataLoader`` or any iterable of ``(inputs, targets)`` pairs;
      * an iterable of bare input tensors (targets are then ``None``).
    Batches are moved to ``device`` when one is given. An empty iterable raises ``ValueError``.
    """
    dev = None if device is None else resolve_device(device)
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        if data[0].shape[0] == 0:
            raise ValueError("data is empty: the input tensor has 0 rows")
        yield _to(data[0], dev), _to(data[1], dev)
        return
    if torch.is_tensor(data):
        raise TypeError("pass data as a pair (inputs, targets) or a DataLoader, not a bare tensor")
    n = 0
    for batch in data:
        n += 1
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            yield _to(batch[0], dev), _to(batch[1], dev)
        else:
            yield _to(batch, dev), None
    if n == 0:
        raise ValueError("data is empty: the iterable yielded no batch")


def shuffled_batches(data: Any, batch_size: Optional[int], generator: torch.Generator,
                     device: DeviceLike = None) -> Iterator[Tuple[Any, Any]]:
    """One epoch of mini-batches for training.

    A pair ``(X, Y)`` with a ``batch_size`` is shuffled with ``generator`` (seeded by the caller, so
    epochs are reproducible) and cut into batches of ``batch_size`` rows; anything else (a DataLoader,
    or ``batch_size=None`` for full batches) is iterated as :func:`iter_batches` does.
    """
    if not (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]) and batch_size):
        yield from iter_batches(data, device)
        return
    X, Y = data
    if X.shape[0] == 0:
        raise ValueError("data is empty: the input tensor has 0 rows")
    if not torch.is_tensor(Y) or Y.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0] if torch.is_tensor(Y) else type(Y).__name__}")
    dev = None if device is None else resolve_device(device)
    order = torch.randperm(X.shape[0], generator=generator)
    for i in range(0, X.shape[0], batch_size):
        idx = order[i:i + batch_size]
        yield _to(X[idx], dev), _to(Y[idx], dev)
