"""Digits SIREN INRs: implicit neural representations of the 8x8 digits, for INR classification.

Each digit image is bilinearly upsampled to ``resolution x resolution`` (grey levels scaled to
[0, 1]) and fitted by a SIREN (Sitzmann et al. 2020, "Implicit Neural Representations with
Periodic Activation Functions", arXiv:2006.09661) ``2 -> 16 -> 16 -> 1`` with ``sin(w0 (W x + b))``
hidden units, ``w0 = 30`` (337 parameters), on pixel-centre coordinates in [-1, 1]^2. The module is
``weightspace.zoo.MLP(2, hidden, 1, activation="sine", w0=w0)`` (keys ``fc.{i}.weight/bias``,
``head.weight/bias``), so specs and neural graphs work on it unchanged. Initialisation follows the
SIREN paper: first layer ``U(-1/fan_in, 1/fan_in)``, later layers ``U(-sqrt(6/fan_in)/w0, ...)``,
biases PyTorch's default ``U(-1/sqrt(fan_in), ...)``. Fitting: Adam (lr 1e-3), full-batch MSE over
all pixels, ``steps`` steps, all INRs of a batch at once (Adam is elementwise and the loss is a sum
of per-INR losses, so every INR follows exactly its own optimisation).

Variants (the regimes of DWSNets, Navon et al. 2023, arXiv:2301.12780, and NFN,
Zhou et al. 2023, arXiv:2302.14040, use independent initialisations):

* ``"shared_permuted"`` -- one shared initialisation, then a random permutation of each hidden
  layer per INR (drawn from the INR's own seed; the function is unchanged). The clean test of
  equivariance: without the permutations a flat MLP classifies well, with them only a
  permutation-aware model can.
* ``"shared"`` -- one shared initialisation, no permutation (the flat-MLP ceiling, a control).
* ``"independent"`` -- every INR from its own initialisation (the anchors' protocol).

Splits follow :func:`weightspace.zoo.load_digits`: INRs of the 1,200 train digits are ``"train"``,
of the 597 test digits ``"test"``; ``views`` INRs per digit (different seeds) are possible.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from weightspace.results import versions
from weightspace.utils import resolve_device
from weightspace.zoo._cache import atomic_save, cache_dir, load_tensors, settings_key
from weightspace.zoo.data import load_digits
from weightspace.zoo.models import MLP
from weightspace.zoo.zoos import ModelZoo, ZooError, _dist

log = logging.getLogger(__name__)

__all__ = ["digits_inrs", "siren_init", "VARIANTS"]

VARIANTS = ("shared_permuted", "shared", "independent")
_INR_VERSION = 1


def _inr_seed(seed: int, index: Optional[int]) -> int:
    """INR ``index``'s seed; ``index=None``: the shared initialisation's seed."""
    tag = [7919, 1] if index is None else [7919, 0, int(index)]
    return int(np.random.SeedSequence([int(seed)] + tag).generate_state(1, dtype=np.uint64)[0] >> 1)


def siren_init(hidden: Sequence[int], w0: float, seed: int, in_features: int = 2) -> Dict[str, torch.Tensor]:
    """A SIREN state dict (keys of ``MLP(in_features, hidden, 1, activation='sine')``) drawn from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    widths = (int(in_features),) + tuple(int(h) for h in hidden) + (1,)
    sd: Dict[str, torch.Tensor] = {}
    for l, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        name = f"fc.{l}" if l < len(hidden) else "head"
        bound = 1.0 / a if l == 0 else math.sqrt(6.0 / a) / w0
        sd[f"{name}.weight"] = (torch.rand(b, a, generator=g) * 2 - 1) * bound
        sd[f"{name}.bias"] = (torch.rand(b, generator=g) * 2 - 1) / math.sqrt(a)
    return sd


def _keys(n_hidden: int) -> List[str]:
    return [f"fc.{l}.{p}" for l in range(n_hidden) for p in ("weight", "bias")] + ["head.weight", "head.bias"]


def _siren_forward(params: List[torch.Tensor], coords: torch.Tensor, w0: float) -> torch.Tensor:
    """params: [W (N,o,i), b (N,o)] per layer; coords (P, 2) -> (N, P) values."""
    N = params[0].shape[0]
    h = coords.unsqueeze(0).expand(N, -1, -1)
    L = len(params) // 2
    for l in range(L):
        w, b = params[2 * l], params[2 * l + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if l < L - 1:
            h = torch.sin(w0 * h)
    return h.squeeze(-1)


def permute_hidden(sd: Dict[str, torch.Tensor], perms: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Permute hidden layer ``l`` of an MLP-layout SIREN by ``perms[l]`` (rows of ``fc.l``, its bias,
    columns of the next layer); the function is unchanged."""
    out = dict(sd)
    L = len(perms)
    for l, p in enumerate(perms):
        out[f"fc.{l}.weight"] = out[f"fc.{l}.weight"][p]
        out[f"fc.{l}.bias"] = out[f"fc.{l}.bias"][p]
        nxt = f"fc.{l + 1}.weight" if l + 1 < L else "head.weight"
        out[nxt] = out[nxt][:, p]
    return {k: v.contiguous() for k, v in out.items()}


def _targets(resolution: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    Xtr, Ytr = load_digits("train", flat=False, standardize=False)
    Xte, Yte = load_digits("test", flat=False, standardize=False)
    X = torch.cat([Xtr, Xte]) / 16.0
    Y = torch.cat([Ytr, Yte])
    split = torch.cat([torch.zeros(len(Ytr), dtype=torch.bool), torch.ones(len(Yte), dtype=torch.bool)])
    img = F.interpolate(X, size=(resolution, resolution), mode="bilinear", align_corners=False).reshape(len(Y), -1)
    t = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    coords = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    return img, Y, split, coords


def digits_inrs(
    variant: str = "shared_permuted",
    *,
    views: int = 1,
    hidden: Sequence[int] = (16, 16),
    w0: float = 30.0,
    steps: int = 300,
    lr: float = 1e-3,
    resolution: int = 16,
    seed: int = 0,
    limit: Optional[int] = None,
    batch_size: int = 2048,
    device: Any = "auto",
    cache: bool = True,
    cache_root: Any = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ModelZoo:
    """Fit SIREN INRs of the digits (see the module docstring) and return them as a :class:`ModelZoo`.

    Metadata per INR: ``image`` (row of ``load_digits("all")``), ``label`` (the digit), ``split``
    ("train"/"test"), ``view``, ``seed``, ``psnr`` (dB, peak 1), ``mse``, ``variant``,
    ``architecture``; for ``shared_permuted`` also ``perm_seed``. ``limit`` keeps the first
    ``limit`` digits of each split (tests). Sharded under ``torch.distributed`` like
    :func:`weightspace.zoo.digits_cnn_zoo` (batch ``k`` on rank ``k % world``).
    """
    if variant not in VARIANTS:
        raise ZooError(f"unknown INR variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if int(views) < 1 or int(steps) < 1 or int(resolution) < 2 or int(batch_size) < 1:
        raise ZooError(
            f"views, steps, batch_size must be >= 1 and resolution >= 2, got {views}, {steps}, {batch_size}, {resolution}"  # noqa: E501
        )
    hidden = tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise ZooError(f"hidden must list at least one width >= 1, got {hidden}")
    opts = {
        "variant": variant,
        "views": int(views),
        "hidden": list(hidden),
        "w0": float(w0),
        "steps": int(steps),
        "lr": float(lr),
        "resolution": int(resolution),
        "seed": int(seed),
        "limit": None if limit is None else int(limit),
        "batch_size": int(batch_size),
        "version": _INR_VERSION,
    }
    dev = resolve_device(device)
    rank, world = _dist()
    settings = {"generator": "digits_inrs", **opts, "device": str(dev), "world_size": world, "versions": versions()}
    arch = "siren-" + "-".join(map(str, (2,) + hidden + (1,)))
    builder = _siren_builder(hidden, float(w0))
    path = cache_dir("inrs", cache_root) / f"digits_siren-{settings_key(opts)}.pt" if cache else None
    if path is not None:
        blob = load_tensors(path)
        if blob is not None and blob.get("options") == opts:
            log.info("digits_inrs: loaded %d INRs from the cache %s", len(blob["metadata"]), path)
            if progress is not None:
                progress(len(blob["metadata"]), len(blob["metadata"]))
            return ModelZoo(tuple(blob["states"]), tuple(blob["metadata"]), settings, (f"cache hit: {path}",), builder)
    t0 = time.perf_counter()
    img, Y, is_test, coords = _targets(int(resolution))
    rows = torch.arange(len(Y))
    if limit is not None:
        rows = torch.cat([rows[~is_test][: int(limit)], rows[is_test][: int(limit)]])
    jobs = [(int(r), v) for v in range(int(views)) for r in rows.tolist()]
    keys = _keys(len(hidden))
    shared = siren_init(hidden, w0, _inr_seed(seed, None)) if variant != "independent" else None
    batches = [jobs[k : k + int(batch_size)] for k in range(0, len(jobs), int(batch_size))]
    coords_d = coords.to(dev)
    results: Dict[int, Tuple[Dict[str, torch.Tensor], Dict[str, Any]]] = {}
    done = 0
    for bi, batch in enumerate(batches):
        if bi % world != rank:
            continue
        inits = []
        for r, v in batch:
            s = _inr_seed(seed, r + v * len(Y))
            inits.append(shared if shared is not None else siren_init(hidden, w0, s))
        params = [torch.stack([sd[k] for sd in inits]).to(dev).requires_grad_(True) for k in keys]
        target = img[[r for r, _ in batch]].to(dev)
        opt = torch.optim.Adam(params, lr=float(lr))
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss = ((_siren_forward(params, coords_d, float(w0)) - target) ** 2).mean(1).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mse = ((_siren_forward(params, coords_d, float(w0)) - target) ** 2).mean(1).cpu()
        for j, (r, v) in enumerate(batch):
            s = _inr_seed(seed, r + v * len(Y))
            sd = {k: p[j].detach().cpu().clone() for k, p in zip(keys, params)}
            row = {
                "index": None,
                "image": r,
                "label": int(Y[r]),
                "split": "test" if bool(is_test[r]) else "train",
                "view": v,
                "seed": s,
                "mse": float(mse[j]),
                "psnr": float(10 * math.log10(1.0 / max(float(mse[j]), 1e-20))),
                "variant": variant,
                "architecture": arch,
            }
            if variant == "shared_permuted":
                g = torch.Generator().manual_seed(s)
                sd = permute_hidden(sd, [torch.randperm(h, generator=g) for h in hidden])
                row["perm_seed"] = s
            results[bi * int(batch_size) + j] = (sd, row)
        done += len(batch)
        log.info("digits_inrs: rank %d fitted batch %d/%d", rank, bi + 1, len(batches))
        if progress is not None:
            progress(min(done * world, len(jobs)), len(jobs))
    if world > 1:
        import torch.distributed as dist

        parts: List[Any] = [None] * world
        dist.all_gather_object(parts, results)
        for p in parts:
            results.update(p)
    if len(results) != len(jobs):
        raise ZooError(f"INR generation lost {len(jobs) - len(results)} INRs: a rank did not contribute its shard")
    states, meta = [], []
    for i in range(len(jobs)):
        sd, row = results[i]
        row = dict(row, index=i)
        states.append(sd)
        meta.append(row)
    secs = time.perf_counter() - t0
    med = float(np.median([m["psnr"] for m in meta]))
    logs = (f"fitted {len(jobs)} INRs ({variant}) in {secs:.1f} s on {dev}; median PSNR {med:.1f} dB",)
    log.info("digits_inrs: %s", logs[0])
    if path is not None and rank == 0:
        atomic_save({"options": opts, "states": states, "metadata": meta}, path)
    return ModelZoo(tuple(states), tuple(meta), settings, logs, builder)


class _siren_builder:
    """Picklable ``row -> MLP`` builder for SIREN zoos."""

    def __init__(self, hidden: Tuple[int, ...], w0: float) -> None:
        self.hidden, self.w0 = hidden, w0

    def __call__(self, row: Any) -> MLP:
        return MLP(2, self.hidden, 1, activation="sine", w0=self.w0)
