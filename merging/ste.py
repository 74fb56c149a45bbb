"""STE matching: learn the permutation through a straight-through estimator of the midpoint loss.

Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR, arXiv:2209.04836, Sec. 3.3 and Alg. 2.

A proxy ``Theta~`` (initialised at ``Theta_A``) is trained so that weight matching of the proxy to
``Theta_B`` yields a permutation whose merge has a low loss. Each mini-batch:

1. ``pi = WM(Theta~, Theta_B)`` by weight matching (:func:`merging.weight_matching.match_weights`),
   warm-started from the previous batch's permutation;
2. straight-through: ``ste = sg(pi(Theta_B)) + Theta~ - sg(Theta~)`` -- the forward value is
   ``pi(Theta_B)``, the gradient goes to the proxy;
3. loss of the merge ``(1 - alpha) Theta_A + alpha ste`` (alpha = model_b's weight, 1/2 by default) on
   the batch, and one optimiser step on ``Theta~``.

Optimiser (a named variant): the paper uses SGD (lr 1e-2, momentum 0.9) for 250 epochs of 60 steps;
``optimizer="sgd", lr=1e-2`` reproduces it. With the few steps of the default (3 epochs) that proxy
barely moves and STE returns weight matching's permutation, so the default is Adam with lr 1e-2:
on two digits MLPs 64-128-128-10 (seeds 0/1, 1,200 training images, batch 128) the merged training
loss went 0.1389 (weight matching) -> 0.1204 after one epoch with Adam 1e-2, vs 0.1387 after 12
epochs with SGD 1e-2 (0.1231 with SGD lr 0.3).

After every epoch the current permutation ``WM(Theta~, Theta_B)`` is scored by the merge's loss over
``data`` (BatchNorm statistics recomputed first when the model has BatchNorm); the best-loss
permutation is kept, with plain weight matching (the starting point, epoch 0) as a candidate, so the
result is never worse than weight matching on that loss. The paper trains 250 epochs with batch
1000 on MNIST and calls the method "very computationally expensive"; the default here is a few epochs.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from weightspace import iter_batches
from weightspace.results import versions
from weightspace.state import combine, evaluate, has_batchnorm, recalibrate_bn
from weightspace.symmetry import permute

from ._registry import MergeContext, MergeError, MethodOutput, register
from ._results import Alignment
from .weight_matching import match_weights

log = logging.getLogger(__name__)

__all__ = ["ste", "align_ste"]

PAPER = ("Git Re-Basin straight-through estimator (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836, "
         "Alg. 2): SGD on a proxy whose weight matching to B minimises the merged model's loss; best-loss "
         "permutation kept")


def _batches(data: Any, batch_size: Optional[int], gen: torch.Generator, device: torch.device) -> Iterator[Tuple[Any, Any]]:  # noqa: E501
    """A pair (X, Y) is shuffled with ``gen`` into mini-batches; other iterables are used as they are."""
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]) and batch_size:
        X, Y = data
        idx = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0], int(batch_size)):
            j = idx[i:i + int(batch_size)]
            yield X[j].to(device), (Y[j].to(device) if torch.is_tensor(Y) else Y)
        return
    yield from iter_batches(data, device)


def _call(model: nn.Module, params: Dict[str, torch.Tensor], x: Any) -> torch.Tensor:
    """The model's outputs (logits) on ``x``: a tensor, ``out.logits`` (Hugging Face heads) or ``out[0]``."""
    if isinstance(x, (tuple, list)):
        out = functional_call(model, params, tuple(x))
    elif isinstance(x, dict):
        out = functional_call(model, params, (), x)
    else:
        out = functional_call(model, params, (x,))
    if torch.is_tensor(out):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return out  # anything else goes to a user's loss_fn as it is (see _loss)


def _loss(loss_fn: Optional[Callable], out: Any, y: Any, model: nn.Module) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(out, y)
    if not torch.is_tensor(out):
        raise MergeError(
            f"ste trains on the merged model's loss, but {type(model).__name__} returns a {type(out).__name__} "
            "without logits; merge a model with a task head (e.g. BertForSequenceClassification) or pass "
            "loss_fn=(outputs, targets) -> scalar that reads these outputs"
        )
    return nn.functional.cross_entropy(out, y)


def _rows(x: Any) -> int:
    if torch.is_tensor(x):
        return int(x.shape[0])
    vals = list(x.values()) if isinstance(x, dict) else list(x)
    return next(int(v.shape[0]) for v in vals if torch.is_tensor(v))


def _merged_loss(ref: nn.Module, state: Dict[str, torch.Tensor], data: Any, device: torch.device,
                 loss_fn: Optional[Callable]) -> float:
    st = state
    if has_batchnorm(ref):
        st = recalibrate_bn(ref, data, st, device=device)
    batches = iter_batches(data, device)
    first = next(batches)
    if torch.is_tensor(first[0]):
        return float(evaluate(ref, data, st, metrics=("loss",), loss_fn=loss_fn, device=device)["loss"])
    # keyword inputs (Hugging Face): the same row-weighted mean loss, computed here batch by batch
    modes = {m: m.training for m in ref.modules()}
    ref.eval()  # scored in eval mode, as evaluate() does; the caller's train/eval flags are restored below
    total, rows = 0.0, 0
    try:
        with torch.no_grad():
            for x, y in (first, *batches):
                if y is None:
                    raise MergeError("ste needs targets: data must yield (inputs, targets) batches")
                n = _rows(x)
                total += float(_loss(loss_fn, _call(ref, st, x), y, ref)) * n
                rows += n
    finally:
        for m, flag in modes.items():
            m.training = flag
    return total / rows


def align_ste(ctx: MergeContext, epochs: int = 3, batch_size: int = 128, lr: float = 1e-2, momentum: float = 0.9,
              optimizer: str = "adam", max_sweeps: int = 100, loss_fn: Optional[Callable] = None) -> Alignment:
    """Align ``states[1]`` to ``states[0]`` with the straight-through estimator (options as :func:`ste`)."""
    if ctx.data is None:
        raise MergeError("ste trains on data: pass data= (an (inputs, targets) pair or a DataLoader)")
    if ctx.reference is None:
        raise MergeError("ste runs the model: pass at least one model as an nn.Module, not only state dicts")
    if int(epochs) < 0 or int(batch_size) < 1 or not lr > 0:
        raise MergeError(f"ste: epochs must be >= 0, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}")
    spec, dev = ctx.spec, ctx.device
    sa, sb = ctx.states[0], ctx.states[1]
    w_a, w_b = float(ctx.weights[0]), float(ctx.weights[1])
    ref = copy.deepcopy(ctx.reference).to(dev)
    pkeys = [k for k, p in ref.named_parameters() if p.is_floating_point()]
    t0 = time.perf_counter()

    def wm(proxy_state: Dict[str, torch.Tensor], init: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return match_weights(spec, proxy_state, sb, seed=ctx.seed, max_sweeps=max_sweeps, init=init, device=dev,
                             param_names=pkeys).permutations

    def score(perm: Dict[str, torch.Tensor]) -> float:
        pb = permute(sb, spec, {g: p.to(dev) for g, p in perm.items()})
        return _merged_loss(ref, combine([sa, pb], [w_a, w_b]), ctx.data, dev, loss_fn)

    perm = wm(sa, None)
    best_loss, best_perm, best_epoch = score(perm), perm, 0
    history: List[Dict[str, Any]] = [{"epoch": 0, "loss": best_loss, "note": "weight matching (start)"}]
    proxy = {k: sa[k].detach().clone().requires_grad_(True) for k in pkeys}
    if optimizer == "sgd":
        opt = torch.optim.SGD(list(proxy.values()), lr=float(lr), momentum=float(momentum))
    elif optimizer == "adam":
        opt = torch.optim.Adam(list(proxy.values()), lr=float(lr))
    else:
        raise MergeError(f"ste: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    ref.train(has_batchnorm(ref))  # batch statistics for BatchNorm models; no dropout change otherwise
    for m in ref.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    for epoch in range(1, int(epochs) + 1):
        losses, changed = [], 0
        for x, y in _batches(ctx.data, batch_size, ctx.generator, dev):
            if y is None:
                raise MergeError("ste needs targets: data must yield (inputs, targets) batches")
            cur = dict(sa)
            cur.update({k: v.detach() for k, v in proxy.items()})
            new = wm(cur, perm)
            changed += int(any(not torch.equal(new[g], perm[g]) for g in new))
            perm = new
            pb = permute(sb, spec, {g: p.to(dev) for g, p in perm.items()})
            params = {}
            for k, v in sa.items():
                if k in proxy:
                    ste_k = pb[k].detach() + proxy[k] - proxy[k].detach()
                    params[k] = w_a * v + w_b * ste_k
                elif torch.is_tensor(v) and v.is_floating_point():
                    params[k] = (w_a * v + w_b * pb[k]).detach().clone()
                else:
                    params[k] = v.clone()
            loss = _loss(loss_fn, _call(ref, params, x), y, ref)
            if not torch.isfinite(loss):
                raise MergeError(f"ste: the merged loss became {float(loss)} at epoch {epoch}; lower lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        cur = dict(sa)
        cur.update({k: v.detach() for k, v in proxy.items()})
        perm = wm(cur, perm)
        ep_loss = score(perm)
        history.append({"epoch": epoch, "loss": ep_loss, "train_batch_loss": sum(losses) / max(len(losses), 1),
                        "batches_with_new_perm": changed})
        log.info("ste epoch %d: merged loss %.4f", epoch, ep_loss)
        if ep_loss < best_loss:
            best_loss, best_perm, best_epoch = ep_loss, {g: p.clone() for g, p in perm.items()}, epoch
    settings = {"method": "ste", "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
                "optimizer": optimizer,
                "momentum": float(momentum), "max_sweeps": int(max_sweeps), "weights": [w_a, w_b],
                "seed": ctx.seed, "device": str(dev), "versions": versions()}
    return Alignment(spec=spec, permutations={g: p.cpu() for g, p in best_perm.items()}, objective=-best_loss,
                     settings=settings,
                     log={"epochs": history, "best_epoch": best_epoch, "best_loss": best_loss,
                          "seconds": time.perf_counter() - t0,
                          "note": "objective = -(merged loss over data) of the kept permutation"})


@register("ste", paper=PAPER, needs=("spec", "data"), aligns=True, align_fn=align_ste)
def ste(ctx: MergeContext, epochs: int = 3, batch_size: int = 128, lr: float = 1e-2, momentum: float = 0.9,
        optimizer: str = "adam", max_sweeps: int = 100, loss_fn: Optional[Callable] = None) -> MethodOutput:
    """Permute model_b by the straight-through estimator (Git Re-Basin Alg. 2), then take the weighted average.

    Options: ``epochs`` (3; the paper: 250) passes over ``data``; ``batch_size`` (128) for an
    ``(inputs, targets)`` pair (a DataLoader is used as it is); ``lr`` (1e-2), ``momentum`` (0.9)
    (SGD only) and ``optimizer`` ("adam", default; "sgd" with lr 1e-2 is the paper's, see the module doc);
    ``max_sweeps`` (100) of each weight matching; ``loss_fn(outputs, targets)``
    (default cross-entropy; ``outputs`` is the model's output tensor, ``.logits`` of a Hugging Face
    head, or the first element of a tuple; keyword inputs such as ``{"input_ids": ...}`` are passed as
    keywords). The kept permutation has the lowest merged loss over ``data`` among
    weight matching (epoch 0) and the end of every epoch (``alignment.log["epochs"]``).
    """
    aln = align_ste(ctx, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, optimizer=optimizer,
                    max_sweeps=max_sweeps, loss_fn=loss_fn)
    pb = permute(ctx.states[1], ctx.spec, {g: p.to(ctx.device) for g, p in aln.permutations.items()})
    merged = combine([ctx.states[0], pb], ctx.weights)
    return MethodOutput(state_dict=merged, alignment=aln, endpoints=[ctx.states[0], pb],
                        log={"best_epoch": aln.log["best_epoch"], "best_loss": aln.log["best_loss"],
                             "epochs": aln.log["epochs"]})
