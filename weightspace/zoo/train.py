"""Small, deterministic training and evaluation loops for the zoo models.

:func:`train` **updates the model it is given** (that is its job); everything else in the toolkit
leaves models untouched. Given one ``seed`` it is deterministic: mini-batch shuffling of an
``(X, Y)`` pair draws from a ``torch.Generator`` seeded with ``seed``, and stochastic layers
(dropout) draw from a forked global RNG seeded with ``seed``, so the caller's RNG state is kept.
:func:`evaluate` computes mean cross-entropy and accuracy without changing anything.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from weightspace.checks import check_data, check_module
from weightspace.results import Result
from weightspace.utils import iter_batches, model_device, module_mode, resolve_device, shuffled_batches

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "TrainResult", "EpochRecord"]


@dataclass(frozen=True)
class EpochRecord(Result):
    """One epoch: mean train loss/accuracy over the epoch's batches, and eval loss/accuracy if any."""

    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: Optional[float] = None
    test_accuracy: Optional[float] = None


@dataclass(frozen=True)
class TrainResult(Result):
    """Outcome of :func:`train`.

    ``train_loss`` is the mean loss of the last epoch (measured during it, in train mode);
    ``test_loss`` / ``test_accuracy`` come from :func:`evaluate` on ``eval_data`` after the last
    epoch (None without ``eval_data``); ``history`` has one :class:`EpochRecord` per epoch;
    ``seconds`` is the wall time; ``settings`` records every option used.
    """

    train_loss: float
    test_loss: Optional[float]
    test_accuracy: Optional[float]
    history: Tuple[EpochRecord, ...]
    seconds: float
    settings: Dict[str, Any] = field(default_factory=dict)
    log: Dict[str, Any] = field(default_factory=dict, compare=False)  # timings differ run to run




def _check_targets(logits: torch.Tensor, y: Optional[torch.Tensor]) -> None:
    if y is None:
        raise ValueError("data gave no targets; pass (X, Y) or batches of (inputs, labels)")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {y.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"model output must be (batch, classes) logits, got shape {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match logits of shape {tuple(logits.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels range over [{int(y.min())}, {int(y.max())}] but the model has "
                         f"{logits.shape[1]} outputs; labels must lie in [0, {logits.shape[1] - 1}]")


def train(model: nn.Module, data: Any, *, epochs: int = 10, lr: float = 1e-3, optimizer: str = "adam",
          weight_decay: float = 0.0, momentum: float = 0.9, batch_size: int = 64, schedule: str = "constant",
          seed: int = 0, device: Any = "auto", eval_data: Any = None,
          loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> TrainResult:
    """Train ``model`` in place with cross-entropy; **the given model's parameters are updated**.

    Parameters
    ----------
    model : a classifier returning (batch, classes) logits.
    data : a pair ``(X, Y)`` (shuffled into mini-batches of ``batch_size`` with a generator seeded
        by ``seed``) or a re-iterable of ``(x, y)`` batches such as a DataLoader (used as is; build
        it with a seeded generator, e.g. :func:`weightspace.zoo.digits_loaders`, for determinism).
    epochs, lr, weight_decay : the usual.
    optimizer : "adam", "adamw" or "sgd" (with ``momentum``, Nesterov off).
    schedule : "constant" or "cosine" (per-step cosine decay of the learning rate to 0).
    seed : seeds shuffling and stochastic layers; the caller's global RNG state is restored.
    device : where to train ("auto" = CUDA if available). The model is moved there for training
        and moved back to its original device afterwards; its train/eval mode is restored too.
    eval_data : optional held-out data, evaluated after every epoch with :func:`evaluate`.
    loss_fn : optional ``loss_fn(logits, labels) -> scalar``; defaults to mean cross-entropy.

    Returns
    -------
    TrainResult
    """
    model = check_module(model, where="zoo.train")
    check_data(data, where="zoo.train")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0])):
        if torch.is_tensor(data):
            raise TypeError("pass data as a pair (X, Y) or a DataLoader, not a bare tensor")
        if iter(data) is data:
            raise TypeError("data is a one-shot iterator; pass (X, Y) or a re-iterable DataLoader so "
                            "that every epoch sees the data")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    opt_name = optimizer.lower()
    if opt_name not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {optimizer!r}")

    dev = resolve_device(device)
    home = model_device(model)
    loss_fn = loss_fn or F.cross_entropy
    settings = dict(epochs=int(epochs), lr=float(lr), optimizer=opt_name, weight_decay=float(weight_decay),
                    momentum=float(momentum) if opt_name == "sgd" else None, batch_size=int(batch_size),
                    schedule=schedule, seed=int(seed), device=str(dev),
                    loss="cross_entropy" if loss_fn is F.cross_entropy else getattr(loss_fn, "__name__", "custom"))
    history = []
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    try:
        with module_mode(model, training=True), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(int(seed))
            model.to(dev)
            if opt_name == "sgd":
                opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
            elif opt_name == "adamw":
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            else:
                opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
            total_steps = None
            step = 0
            for epoch in range(int(epochs)):
                model.train()
                tot_loss, tot_correct, tot_n, n_batches = 0.0, 0, 0, 0
                for x, y in shuffled_batches(data, int(batch_size), gen, dev):
                    if schedule == "cosine":
                        if total_steps is None:  # steps per epoch are known after the first epoch
                            total_steps = _count_steps(data, int(batch_size)) * int(epochs)
                        for group in opt.param_groups:
                            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
                    logits = model(x)
                    _check_targets(logits, y)
                    loss = loss_fn(logits, y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}, "
                                                 f"batch {n_batches}; lower lr (now {lr}) or check the inputs")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    n = y.shape[0]
                    n_batches += 1
                    tot_n += n
                    tot_loss += float(loss.detach()) * n
                    tot_correct += int((logits.detach().argmax(1) == y).sum())
                te_loss = te_acc = None
                if eval_data is not None:
                    te_loss, te_acc = evaluate(model, eval_data, loss_fn=loss_fn)
                rec = EpochRecord(epoch, tot_loss / tot_n, tot_correct / tot_n, te_loss, te_acc)
                history.append(rec)
                log.debug("epoch %d: %s", epoch, rec)
    finally:
        model.to(home)  # module_mode has restored every submodule's train/eval flag
    last = history[-1]
    return TrainResult(train_loss=last.train_loss, test_loss=last.test_loss, test_accuracy=last.test_accuracy,
                       history=tuple(history), seconds=time.perf_counter() - t0, settings=settings)


def _count_steps(data: Any, batch_size: int) -> int:
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        return max(1, math.ceil(data[0].shape[0] / batch_size))
    try:
        return max(1, len(data))
    except TypeError:
        return max(1, sum(1 for _ in data))


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, device: Any = None, batch_size: int = 1024,
             loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> Tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``data``, in eval mode; the model is left as it was.

    ``data`` is ``(X, Y)`` (split into chunks of ``batch_size``) or an iterable of batches.
    The loss is the sample-weighted mean of ``loss_fn`` (cross-entropy by default) over batches.
    Batches go to ``device`` (default: the model's device); the model itself is never moved, and
    its train/eval mode (per submodule) is restored on exit.
    """
    model = check_module(model, where="zoo.evaluate")
    check_data(data, where="zoo.evaluate")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    dev = model_device(model) if device is None else resolve_device(device)
    if dev != model_device(model):
        raise ValueError(f"model is on {model_device(model)} but device={dev}; move the model or omit device")
    loss_fn = loss_fn or F.cross_entropy
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        X, Y = data
        if X.shape[0] == 0:
            raise ValueError("data is empty: the input tensor has 0 rows")
        data = [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    tot_loss, tot_correct, tot_n = 0.0, 0, 0
    with module_mode(model):
        for x, y in iter_batches(data, dev):
            logits = model(x)
            _check_targets(logits, y)
            n = y.shape[0]
            tot_loss += float(loss_fn(logits, y)) * n
            tot_correct += int((logits.argmax(1) == y).sum())
            tot_n += n
    if tot_n == 0:
        raise ValueError("data is empty: no labelled samples to evaluate")
    return tot_loss / tot_n, tot_correct / tot_n
