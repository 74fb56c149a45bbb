"""Training and prediction loops for weight-space processors, on one process or many (DDP).

:func:`fit_processor` trains any processor (graph processors on ``NeuralGraph`` batches, dense ones
on ``WeightSpaceBatch`` es) on a list of inputs with targets: each step draws a global mini-batch
from a seeded ``torch.Generator`` (the same order on every rank), collates it with ``collate``
(e.g. ``ws.NeuralGraph.batch``), and minimises the mean squared error (``task="regression"``) or
the cross-entropy (``task="classification"``) with AdamW. It **updates the processor it is given**
(that is its job).

Distributed data parallel. Under ``torch.distributed`` (``torchrun --nproc_per_node K``, gloo on CPU,
nccl on GPU) the processor is wrapped in ``DistributedDataParallel`` and every rank takes the slice
``rank::K`` of each global batch. Each rank's loss is its slice mean times ``K * n_rank / n_global``,
so DDP's gradient average equals the gradient of the global-batch mean even when the batch does not
split evenly: K processes compute what one process computes on the same global batches (up to the
order of floating-point sums).

Model selection. With validation data (``eval_inputs``/``eval_targets``, never the test split) and
``monitor="eval_accuracy"`` (or ``"eval_loss"``, ``"eval_kendall_tau"``) the processor's state after
the best epoch is kept and restored at the end (``ProcessorFit.best_epoch``): the number of epochs is
chosen on the validation split, as in the INR-classification protocols of Navon et al. 2023
(arXiv:2301.12780) and Zhou et al. 2023 (arXiv:2302.14040), which report the test accuracy of the
checkpoint with the best validation accuracy.

Input normalisation. :func:`weight_statistics` and :func:`standardize_states` divide every tensor of
a state dict by one standard deviation per key after subtracting one mean per key, both computed over
a training set. A scalar per key commutes with every permutation of the key's axes, so processors
keep their equivariance; a per-coordinate normalisation would not (it would tie each coordinate to
its position, which a hidden-unit permutation moves).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from weightspace.results import Result, WeightspaceError, versions
from weightspace.utils import resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "fit_processor",
    "predict",
    "ProcessorFit",
    "TrainingError",
    "kendall_tau",
    "weight_statistics",
    "standardize_states",
]

MONITORS = {"eval_loss": -1.0, "eval_accuracy": 1.0, "eval_kendall_tau": 1.0}  # sign: +1 higher is better


class TrainingError(WeightspaceError, ValueError):
    """Invalid training inputs (empty data, mismatched targets, bad options)."""


@dataclass(frozen=True)
class ProcessorFit(Result):
    """Outcome of :func:`fit_processor`.

    history : one dict per epoch: ``train_loss`` (mean over the epoch's global batches), and with
        eval data ``eval_loss`` plus ``eval_kendall_tau`` (regression) or ``eval_accuracy``.
    best_epoch : with ``monitor``: the (1-based) epoch whose state the processor holds at the end;
        ``None`` without ``monitor`` (the processor holds the last epoch's state).
    settings : every option used, world size, device, versions. log : what happened.
    """

    history: Tuple[Dict[str, float], ...]
    seconds: float
    best_epoch: Optional[int] = None
    settings: Dict[str, Any] = field(default_factory=dict)
    log: Tuple[str, ...] = field(default=(), compare=False)


def _dist() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if hasattr(batch, "to") and not isinstance(batch, tuple) else batch


def kendall_tau(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Kendall's tau-b (SciPy) between predictions and targets."""
    from scipy.stats import kendalltau

    return float(
        kendalltau(pred.detach().cpu().double().numpy().ravel(), target.detach().cpu().double().numpy().ravel())[0]
    )


def weight_statistics(
    states: Sequence[Mapping[str, torch.Tensor]], keys: Optional[Sequence[str]] = None, center: bool = True
) -> Dict[str, Tuple[float, float]]:
    """One ``(mean, std)`` per key over every coordinate of every state dict (float64 sums).

    ``states``: the *training* networks (statistics from the test split would leak it). ``keys``:
    default every floating-point tensor of the first state dict. ``center=False`` gives mean 0 (a
    scale only). A key whose std is 0 (e.g. one constant tensor) gets std 1 so it is only shifted.
    """
    states = list(states)
    if not states:
        raise TrainingError("weight_statistics: no state dicts given; pass the training networks")
    ref = states[0]
    if keys is None:
        keys = [k for k, v in ref.items() if torch.is_tensor(v) and v.is_floating_point()]
    out: Dict[str, Tuple[float, float]] = {}
    for k in keys:
        missing = [i for i, sd in enumerate(states) if k not in sd]
        if missing:
            raise TrainingError(f"weight_statistics: key {k!r} is missing from state dict {missing[0]}")
        t = torch.stack([sd[k].detach().to("cpu", torch.float64) for sd in states])
        mean = float(t.mean()) if center else 0.0
        std = float((t - mean).pow(2).mean().sqrt())
        out[k] = (mean, std if std > 0 and math.isfinite(std) else 1.0)
    return out


def standardize_states(
    states: Sequence[Mapping[str, torch.Tensor]], stats: Mapping[str, Tuple[float, float]]
) -> List[Dict[str, torch.Tensor]]:
    """New state dicts with ``(w - mean_k) / std_k`` for every key ``k`` of ``stats`` (from
    :func:`weight_statistics`); other entries are passed through. The inputs are not modified."""
    out = []
    for i, sd in enumerate(states):
        missing = [k for k in stats if k not in sd]
        if missing:
            raise TrainingError(f"standardize_states: state dict {i} lacks the key {missing[0]!r} of the statistics")
        out.append({k: (v - stats[k][0]) / stats[k][1] if k in stats else v for k, v in sd.items()})
    return out


def _improves(value: float, best: Optional[float], sign: float) -> bool:
    """Strictly better than ``best`` (NaN never is; the first finite value always is)."""
    if math.isnan(value):
        return False
    return best is None or sign * value > sign * best


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y.long(), reduction="sum")
    return F.mse_loss(out.reshape(y.shape[0], -1), y.reshape(y.shape[0], -1).to(out.dtype), reduction="sum") / max(
        1, out[0].numel()
    )


def predict(
    model: nn.Module,
    inputs: Sequence[Any],
    *,
    collate: Callable[[List[Any]], Any],
    batch_size: int = 256,
    device: Any = None,
) -> torch.Tensor:
    """Outputs of ``model`` on ``inputs`` (eval mode, no gradients; the mode is restored), concatenated."""
    if len(inputs) == 0:
        raise TrainingError("predict: inputs are empty")
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            outs = [
                model(_to(collate(list(inputs[i : i + batch_size])), dev))
                for i in range(0, len(inputs), int(batch_size))
            ]
    finally:
        model.train(was)
    return torch.cat(outs)


def fit_processor(
    model: nn.Module,
    inputs: Sequence[Any],
    targets: torch.Tensor,
    *,
    collate: Callable[[List[Any]], Any],
    task: str = "regression",
    epochs: int = 50,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: Any = "auto",
    grad_clip: Optional[float] = 10.0,
    eval_inputs: Optional[Sequence[Any]] = None,
    eval_targets: Optional[torch.Tensor] = None,
    monitor: Optional[str] = None,
    progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
) -> ProcessorFit:
    """Train ``model`` on ``(inputs[i], targets[i])`` (see the module docstring).

    Parameters
    ----------
    inputs : a sequence of items (graphs, state dicts, ...); ``collate(list_of_items)`` makes a batch.
    targets : (N,) or (N, k) regression targets, or (N,) class indices for classification.
    epochs, batch_size (global, over all ranks), lr, weight_decay (AdamW), grad_clip (global norm
        or None), seed (batch order), device ("auto" = CUDA if available; under DDP with CUDA each
        rank uses ``cuda:LOCAL_RANK``).
    eval_inputs, eval_targets : evaluated after every epoch (on every rank, not sharded); a
        validation split, not the test split, when ``monitor`` selects on them.
    monitor : ``None`` (keep the last epoch), or the history field whose best epoch is restored at
        the end: ``"eval_loss"`` (lowest), ``"eval_accuracy"`` (classification) or
        ``"eval_kendall_tau"`` (regression; both highest). Ties keep the earliest epoch.
    progress : ``progress(epoch, epochs, record)`` after every epoch.
    """
    if task not in ("regression", "classification"):
        raise TrainingError(f"task must be 'regression' or 'classification', got {task!r}")
    n = len(inputs)
    if n == 0:
        raise TrainingError("fit_processor: inputs are empty; pass at least one training item")
    targets = torch.as_tensor(targets)
    if targets.shape[0] != n:
        raise TrainingError(f"{n} inputs but {targets.shape[0]} targets; pass one target row per input")
    if task == "classification" and targets.is_floating_point():
        raise TrainingError("classification targets must be integer class indices")
    if int(epochs) < 1 or int(batch_size) < 1 or lr <= 0:
        raise TrainingError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    if (eval_inputs is None) != (eval_targets is None):
        raise TrainingError("pass both eval_inputs and eval_targets, or neither")
    if monitor is not None:
        valid = ["eval_loss", "eval_accuracy" if task == "classification" else "eval_kendall_tau"]
        if monitor not in valid:
            raise TrainingError(
                f"monitor={monitor!r} is not available for task={task!r}; choose one of {valid} or None"
            )
        if eval_inputs is None:
            raise TrainingError(f"monitor={monitor!r} needs validation data: pass eval_inputs and eval_targets")
    rank, world = _dist()
    import os

    if world > 1 and torch.cuda.is_available() and device in ("auto", "cuda", None):
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    else:
        dev = resolve_device(device)
    model.to(dev)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=float(lr), weight_decay=float(weight_decay))
    gen = torch.Generator().manual_seed(int(seed))
    B = int(batch_size)
    history: List[Dict[str, float]] = []
    best: Optional[Tuple[int, float, Dict[str, torch.Tensor]]] = None  # (epoch, value, state)
    t0 = time.perf_counter()
    model.train()
    for ep in range(int(epochs)):
        order = torch.randperm(n, generator=gen)
        tot, cnt = 0.0, 0
        for s in range(0, n, B):
            glob = order[s : s + B]
            mine = glob[rank::world]
            if mine.numel() == 0:  # a tiny last batch: this rank still joins the gradient all-reduce
                mine = glob[:1]
                weight = 0.0
            else:
                weight = world / glob.numel()
            batch = _to(collate([inputs[int(i)] for i in mine]), dev)
            y = targets[mine].to(dev)
            out = net(batch)
            loss_sum = _loss(out, y, task)
            loss = loss_sum * weight
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
            opt.step()
            tot += float(loss_sum.detach()) if weight > 0 else 0.0
            cnt += int(mine.numel()) if weight > 0 else 0
        rec: Dict[str, float] = {"epoch": ep + 1, "train_loss": tot / max(cnt, 1)}
        if world > 1:  # the epoch loss over all ranks' slices
            import torch.distributed as dist

            t = torch.tensor([tot, float(cnt)], dtype=torch.float64, device=dev if dev.type == "cuda" else "cpu")
            dist.all_reduce(t)
            rec["train_loss"] = float(t[0] / t[1].clamp(min=1))
        if eval_inputs is not None:
            pred = predict(model, eval_inputs, collate=collate, batch_size=max(B, 64), device=dev)
            yt = torch.as_tensor(eval_targets).to(pred.device)
            rec["eval_loss"] = float(_loss(pred, yt, task)) / len(eval_inputs)
            if task == "regression":
                rec["eval_kendall_tau"] = kendall_tau(
                    pred.reshape(len(eval_inputs), -1)[:, 0], yt.reshape(len(eval_inputs), -1)[:, 0]
                )
            else:
                rec["eval_accuracy"] = float((pred.argmax(-1) == yt).float().mean())
        history.append(rec)
        if monitor is not None and _improves(rec[monitor], None if best is None else best[1], MONITORS[monitor]):
            best = (ep + 1, rec[monitor], {k: v.detach().clone() for k, v in model.state_dict().items()})
        log.info("fit_processor: epoch %d/%d %s", ep + 1, epochs, rec)
        if progress is not None:
            progress(ep + 1, int(epochs), rec)
    logs = []
    if best is not None:
        model.load_state_dict(best[2])
        logs.append(f"restored epoch {best[0]} of {epochs} (best {monitor} {best[1]:.4g})")
        log.info("fit_processor: %s", logs[-1])
    model.eval()
    secs = time.perf_counter() - t0
    settings = {
        "task": task,
        "epochs": int(epochs),
        "batch_size": B,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "grad_clip": grad_clip,
        "monitor": monitor,
        "device": str(dev),
        "world_size": world,
        "num_inputs": n,
        "processor": type(model).__name__,
        "versions": versions(),
    }
    logs.insert(0, f"{epochs} epochs on {n} inputs in {secs:.1f} s (rank {rank} of {world})")
    return ProcessorFit(tuple(history), secs, None if best is None else best[0], settings, tuple(logs))
