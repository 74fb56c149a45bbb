"""Model zoos: a table of trained networks with their metadata, and a generated digits CNN zoo.

:class:`ModelZoo` holds one state dict and one metadata row (architecture, hyperparameters,
targets such as test accuracy) per network, and rebuilds each network as a module.

:func:`digits_cnn_zoo` generates a zoo for *generalization prediction* in the protocol of the Small
CNN Zoo (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights",
arXiv:2002.11448), reproduced offline on scikit-learn's 8x8 digits:

* architecture ``conv3x3 1->w, act, (conv3x3 w->w, act) x (depth-1), global average pool, dense
  w->10``; the **fixed-architecture part** (the first ``n_models`` nets) is w=8, depth 2, ReLU
  (754 parameters), which dense processors (NFN, UNF, DWS) need; the **mixed part** (``n_mixed``
  more nets) draws width from ``widths``, depth from ``depths`` and the activation from
  ``activations``, for graph processors, which accept any architecture;
* per net: AdamW learning rate ~ logU[5e-4, 5e-2], weight decay ~ logU[1e-6, 1e-2], initialisation
  scale ~ logU[0.3, 2] (PyTorch's default init times the scale), U{50..380} steps of batch 64 (2.7 to
  20 epochs of the 1,200 training digits), each net with its own mini-batch order;
* targets: accuracy and loss on the 597 held-out digits, and the final train loss/accuracy.

Every net's hyperparameters, initialisation and batch order come from its own seed
``SeedSequence([seed, index])``, and nets are trained in fixed chunks of one architecture (sorted
by training length so a chunk wastes little compute) as one grouped model: the convs of ``G`` nets
are one grouped convolution and the head one batched matmul, with a per-net AdamW (its own learning
rate, weight decay and stopping step); the maps are kept channels-last and pooled by a matmul so
that every backward kernel sees one memory layout. The chunks are fixed by the settings alone, so a sharded run
(``torch.distributed`` initialised, e.g. by ``torchrun``: chunk ``c`` goes to rank ``c % world``)
returns exactly the zoo of a single-process run. The result is cached (see
:mod:`weightspace.zoo._cache`); ``progress(done, total)`` is called after each chunk.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weightspace.results import Result, WeightspaceError, versions
from weightspace.utils import resolve_device
from weightspace.zoo._cache import atomic_save, cache_dir, load_tensors, settings_key
from weightspace.zoo.data import load_digits
from weightspace.zoo.models import _seeded

log = logging.getLogger(__name__)

__all__ = ["ModelZoo", "ZooError", "DigitsCNN", "digits_cnn_zoo"]

_ZOO_VERSION = 2  # 2: channels-last grouped convs, matmul pooling (round-off differs from 1)


class ZooError(WeightspaceError, ValueError):
    """A zoo (generated or loaded) is inconsistent or a request on it is invalid."""


class DigitsCNN(nn.Module):
    """``conv3x3(1->w), act, [conv3x3(w->w), act] x (depth-1), mean over H,W, Linear(w->10)``.

    Keys ``convs.{i}.weight`` (w, c_in, 3, 3), ``convs.{i}.bias`` (w,), ``head.weight`` (10, w),
    ``head.bias`` (10,). Input (N, 1, 8, 8) digits; output (N, 10) logits.
    """

    def __init__(
        self,
        width: int = 8,
        depth: int = 2,
        activation: str = "relu",
        in_channels: int = 1,
        num_classes: int = 10,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if int(width) < 1 or int(depth) < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
        self.width, self.depth, self.activation = int(width), int(depth), activation
        with _seeded(seed):
            chans = [int(in_channels)] + [self.width] * self.depth
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
            self.head = nn.Linear(self.width, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu if self.activation == "relu" else torch.tanh
        for conv in self.convs:
            x = act(conv(x))
        return self.head(x.mean(dim=(2, 3)))

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(int(batch), self.convs[0].in_channels, 8, 8, generator=g)


def _build_digits_cnn(row: Mapping[str, Any]) -> nn.Module:
    return DigitsCNN(int(row["width"]), int(row["depth"]), str(row["activation"]))


@dataclass(frozen=True)
class ModelZoo(Result):
    """Trained networks with one metadata row each.

    states : one state dict per network (CPU tensors).
    metadata : one dict per network (architecture, hyperparameters, targets; JSON-able values).
    settings : how the zoo was made or loaded (generator options, seed, versions).
    log : what happened (timings, cache hits, shards).
    builder : ``row -> nn.Module`` that makes an untrained module of a row's architecture, or None.
    """

    states: Tuple[Dict[str, torch.Tensor], ...]
    metadata: Tuple[Dict[str, Any], ...]
    settings: Dict[str, Any] = field(default_factory=dict)
    log: Tuple[str, ...] = field(default=(), compare=False)
    builder: Optional[Callable[[Mapping[str, Any]], nn.Module]] = None

    _skip_in_dict = ("states", "builder")

    def __post_init__(self) -> None:
        if len(self.states) != len(self.metadata):
            raise ZooError(
                f"a zoo needs one metadata row per state dict, got {len(self.states)} states and {len(self.metadata)} rows"  # noqa: E501
            )

    def __len__(self) -> int:
        return len(self.states)

    def column(self, name: str) -> List[Any]:
        """The metadata column ``name`` as a list (one value per network)."""
        missing = [i for i, r in enumerate(self.metadata) if name not in r]
        if missing:
            cols = sorted({k for r in self.metadata for k in r})
            raise ZooError(
                f"metadata column {name!r} is missing for {len(missing)} networks (first: {missing[0]}); columns: {cols}"  # noqa: E501
            )
        return [r[name] for r in self.metadata]

    def targets(self, name: str = "test_accuracy", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A numeric metadata column as a (N,) tensor."""
        vals = self.column(name)
        try:
            return torch.tensor([float(v) for v in vals], dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise ZooError(f"metadata column {name!r} is not numeric: {exc}") from exc

    def select(self, indices: Sequence[int]) -> "ModelZoo":
        """A zoo of the networks ``indices`` (in that order)."""
        idx = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        bad = [i for i in idx if not -len(self) <= i < len(self)]
        if bad:
            raise ZooError(f"indices {bad[:5]} are out of range for a zoo of {len(self)} networks")
        return ModelZoo(
            tuple(self.states[i] for i in idx),
            tuple(self.metadata[i] for i in idx),
            dict(self.settings),
            self.log + (f"select: {len(idx)} of {len(self)} networks",),
            self.builder,
        )

    def where(self, **conditions: Any) -> List[int]:
        """Indices of the networks whose metadata equals every ``column=value`` given."""
        for k in conditions:
            self.column(k)
        return [i for i, r in enumerate(self.metadata) if all(r[k] == v for k, v in conditions.items())]

    def architectures(self) -> Dict[str, int]:
        """Counts per value of the ``architecture`` column."""
        return dict(Counter(self.column("architecture")))

    def model(self, i: int) -> nn.Module:
        """Network ``i`` as a fresh module holding its weights (eval mode)."""
        if self.builder is None:
            raise ZooError(
                "this zoo has no builder: pass builder= (row -> nn.Module) when loading it to rebuild modules"
            )
        m = self.builder(self.metadata[i])
        m.load_state_dict(self.states[i])
        return m.eval()

    def graphs(self, indices: Optional[Sequence[int]] = None, example_inputs: Any = None) -> list:
        """``NeuralGraph`` of each network (traced once per architecture, then filled with each
        network's weights; equal to ``NeuralGraph.from_model`` of each network)."""
        from weightspace.nn import graphs_from_states

        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        out: List[Any] = [None] * len(idx)
        by_arch: Dict[str, List[int]] = {}
        for j, i in enumerate(idx):
            by_arch.setdefault(str(self.metadata[i].get("architecture", "?")), []).append(j)
        for _arch, js in by_arch.items():
            m = self.model(idx[js[0]])
            if example_inputs is None and not hasattr(m, "example_input"):
                raise ZooError(
                    f"{type(m).__name__} has no example_input(); pass example_inputs= (a batch the model accepts) to graphs()"  # noqa: E501
                )
            x = example_inputs if example_inputs is not None else m.example_input()
            gs = graphs_from_states(m, x, [self.states[idx[j]] for j in js])
            for j, g in zip(js, gs):
                out[j] = g
        return out


# -- generation -----------------------------------------------------------------------------------


def _net_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _log_uniform(g: torch.Generator, lo: float, hi: float) -> float:
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _net_config(seed: int, index: int, fixed: bool, o: Mapping[str, Any]) -> Dict[str, Any]:
    s = _net_seed(seed, index)
    g = torch.Generator().manual_seed(s)
    lr = _log_uniform(g, *o["lr"])
    wd = _log_uniform(g, *o["weight_decay"])
    scale = _log_uniform(g, *o["init_scale"])
    steps = int(torch.randint(o["steps"][0], o["steps"][1] + 1, (), generator=g))
    if fixed:
        width, depth, act = 8, 2, "relu"
    else:
        width = int(o["widths"][int(torch.randint(len(o["widths"]), (), generator=g))])
        depth = int(o["depths"][int(torch.randint(len(o["depths"]), (), generator=g))])
        act = str(o["activations"][int(torch.randint(len(o["activations"]), (), generator=g))])
    return {
        "index": index,
        "seed": s,
        "part": "fixed" if fixed else "mixed",
        "architecture": f"cnn-w{width}-d{depth}-{act}",
        "width": width,
        "depth": depth,
        "activation": act,
        "lr": lr,
        "weight_decay": wd,
        "init_scale": scale,
        "steps": steps,
        "batch_size": int(o["batch_size"]),
    }


def _chunks(configs: Sequence[Dict[str, Any]], group_size: int) -> List[List[int]]:
    """Fixed chunks: per architecture (in order of first appearance), nets sorted by (steps, index)."""
    by_arch: Dict[str, List[int]] = {}
    for c in configs:
        by_arch.setdefault(c["architecture"], []).append(c["index"])
    out = []
    for _arch, idx in by_arch.items():
        idx = sorted(idx, key=lambda i: (configs[i]["steps"], i))
        out += [idx[k : k + group_size] for k in range(0, len(idx), group_size)]
    return out


def _grouped_forward(params: List[torch.Tensor], x: torch.Tensor, depth: int, act: str) -> torch.Tensor:
    """``G`` CNNs at once. params: [conv_w (G,o,i,3,3), conv_b (G,o)] * depth + [head_w (G,10,w), head_b (G,10)];
    x: (G, B, C, H, W) -> logits (G, B, 10). One grouped conv per layer (net g's channels are block g),
    in channels-last memory format (oneDNN's fast path for many groups of few channels on the CPU);
    activations in place (autograd keeps their results, which their backward needs)."""
    G, B, C, H, W = x.shape
    h = x.transpose(0, 1).reshape(B, G * C, H, W).contiguous(memory_format=torch.channels_last)
    for l in range(depth):
        w, b = params[2 * l], params[2 * l + 1]
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=1, groups=G)
        h = h.relu_() if act == "relu" else h.tanh_()
    # global average pool as a matmul on the channels-last view, so that its backward is a dense
    # channels-last map too (a mean's or avg-pool's is not, and mixed layouts are slow in relu's backward)
    hv = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # a view: h is channels-last
    pool = torch.full((1, 1, H * W), 1.0 / (H * W), dtype=h.dtype, device=h.device).expand(B, 1, H * W)
    h = torch.bmm(pool, hv).reshape(B, G, -1).transpose(0, 1)  # (G, B, w)
    hw, hb = params[-2], params[-1]
    return torch.baddbmm(hb.unsqueeze(1), h, hw.transpose(1, 2))


def _keys(depth: int) -> List[str]:
    return [k for l in range(depth) for k in (f"convs.{l}.weight", f"convs.{l}.bias")] + ["head.weight", "head.bias"]


def _train_chunk(
    cfgs: List[Dict[str, Any]], data, device: torch.device
) -> Tuple[List[Dict[str, torch.Tensor]], List[Dict[str, float]]]:
    Xtr, Ytr, Xte, Yte = data
    G = len(cfgs)
    width, depth, act, B = cfgs[0]["width"], cfgs[0]["depth"], cfgs[0]["activation"], cfgs[0]["batch_size"]
    keys = _keys(depth)
    inits = []
    for c in cfgs:
        sd = DigitsCNN(width, depth, act, seed=c["seed"]).state_dict()
        inits.append([sd[k] * (c["init_scale"] if k.endswith("weight") else 1.0) for k in keys])
    params = [torch.stack([p[j] for p in inits]).to(device).requires_grad_(True) for j in range(len(keys))]
    steps = torch.tensor([c["steps"] for c in cfgs], device=device)
    S = int(steps.max())
    n = Xtr.shape[0]
    idx = torch.empty(G, S, B, dtype=torch.long)
    for j, c in enumerate(cfgs):  # each net's own mini-batch order: shuffled epochs from its seed
        g = torch.Generator().manual_seed(c["seed"] + 1)
        need = S * B
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])[:need]
        idx[j] = order.view(S, B)
    idx = idx.to(device)
    lr = torch.tensor([c["lr"] for c in cfgs], device=device)
    wd = torch.tensor([c["weight_decay"] for c in cfgs], device=device)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(S):
        xb, yb = Xtr[idx[:, t]], Ytr[idx[:, t]]  # (G, B, 1, 8, 8), (G, B)
        logits = _grouped_forward(params, xb, depth, act)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum") / B
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            active = (t < steps).float()
            c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            for p, gr, mm, vv in zip(params, grads, m, v):
                shape = (G,) + (1,) * (p.dim() - 1)
                a = active.view(shape)
                mm.copy_(torch.where(a > 0, b1 * mm + (1 - b1) * gr, mm))
                vv.copy_(torch.where(a > 0, b2 * vv + (1 - b2) * gr * gr, vv))
                step = (lr.view(shape) * (mm / c1) / ((vv / c2).sqrt() + eps)) + lr.view(shape) * wd.view(shape) * p
                p.sub_(a * step)
    metrics = []
    with torch.no_grad():
        res = {}
        for name, X, Y in (("test", Xte, Yte), ("train", Xtr, Ytr)):
            logits = torch.cat(
                [
                    _grouped_forward(params, X[k : k + 300].unsqueeze(0).expand(G, *X[k : k + 300].shape), depth, act)
                    for k in range(0, X.shape[0], 300)
                ],
                dim=1,
            )
            loss = F.cross_entropy(logits.permute(0, 2, 1), Y.unsqueeze(0).expand(G, -1), reduction="none").mean(1)
            acc = (logits.argmax(-1) == Y).float().mean(1)
            res[name] = (loss.cpu(), acc.cpu())
        for j in range(G):
            metrics.append(
                {
                    "test_accuracy": float(res["test"][1][j]),
                    "test_loss": float(res["test"][0][j]),
                    "train_accuracy": float(res["train"][1][j]),
                    "train_loss": float(res["train"][0][j]),
                }
            )
    states = [{k: p[j].detach().cpu().clone() for k, p in zip(keys, params)} for j in range(G)]
    return states, metrics


def _dist() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def digits_cnn_zoo(
    n_models: int = 2000,
    n_mixed: int = 0,
    *,
    seed: int = 0,
    group_size: int = 32,
    lr: Tuple[float, float] = (5e-4, 5e-2),
    weight_decay: Tuple[float, float] = (1e-6, 1e-2),
    init_scale: Tuple[float, float] = (0.3, 2.0),
    steps: Tuple[int, int] = (50, 380),
    widths: Sequence[int] = (4, 8, 16),
    depths: Sequence[int] = (2, 3, 4),
    activations: Sequence[str] = ("relu", "tanh"),
    batch_size: int = 64,
    device: Any = "auto",
    cache: bool = True,
    cache_root: Any = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ModelZoo:
    """Generate (or load from the cache) the digits CNN zoo described in the module docstring.

    Parameters
    ----------
    n_models : size of the fixed-architecture part (w=8, depth 2, ReLU; 754 parameters each).
    n_mixed : size of the mixed-architecture part (width, depth, activation drawn per net).
    seed : the zoo seed; net ``i`` uses ``SeedSequence([seed, i])``.
    group_size : nets trained at once as one grouped model (a speed knob: nets never interact, so it
        changes the weights only by float round-off; it is part of the cache key). On the CPU small
        groups are fastest, since a chunk's activations then stay in cache (32: about 2.3x the nets/s of
        the previous 256 with NCHW convs, see benchmarks/RESULTS.md); on a GPU use a few hundred.
    lr, weight_decay, init_scale : log-uniform ranges; steps : inclusive integer range.
    device : "auto" (CUDA if available), "cpu", "cuda", ...; cache / cache_root : see
        :func:`weightspace.zoo._cache.cache_dir`; progress : ``progress(nets_done, nets_total)``.

    Under ``torch.distributed`` (e.g. ``torchrun --nproc_per_node 2``) every rank trains its share of
    the chunks, the shards are gathered on every rank, and rank 0 writes the cache.
    """
    n_models, n_mixed = int(n_models), int(n_mixed)
    if n_models < 0 or n_mixed < 0 or n_models + n_mixed < 1:
        raise ZooError(f"n_models and n_mixed must be >= 0 with at least one net, got {n_models} and {n_mixed}")
    if int(group_size) < 1:
        raise ZooError(f"group_size must be >= 1, got {group_size}")
    for name, (lo, hi) in (("lr", lr), ("weight_decay", weight_decay), ("init_scale", init_scale)):
        if not 0 < lo <= hi:
            raise ZooError(f"{name} range must satisfy 0 < low <= high, got {(lo, hi)}")
    if not 1 <= steps[0] <= steps[1]:
        raise ZooError(f"steps range must satisfy 1 <= low <= high, got {steps}")
    bad = [a for a in activations if a not in ("relu", "tanh")]
    if bad or not widths or not depths or not activations:
        raise ZooError(f"widths, depths and activations must be non-empty; activations must be relu/tanh (got {bad})")
    opts = {
        "n_models": n_models,
        "n_mixed": n_mixed,
        "seed": int(seed),
        "lr": tuple(lr),
        "weight_decay": tuple(weight_decay),
        "init_scale": tuple(init_scale),
        "steps": (int(steps[0]), int(steps[1])),
        "widths": tuple(int(w) for w in widths),
        "depths": tuple(int(d) for d in depths),
        "activations": tuple(activations),
        "batch_size": int(batch_size),
        "group_size": int(group_size),
        "version": _ZOO_VERSION,
    }
    dev = resolve_device(device)
    rank, world = _dist()
    settings = {"generator": "digits_cnn_zoo", **opts, "device": str(dev), "world_size": world, "versions": versions()}
    path = cache_dir("zoos", cache_root) / f"digits_cnn-{settings_key(opts)}.pt" if cache else None
    if path is not None:
        blob = load_tensors(path)
        if blob is not None and blob.get("options") == _jsonable_opts(opts):
            log.info("digits_cnn_zoo: loaded %d nets from the cache %s", len(blob["metadata"]), path)
            if progress is not None:
                progress(len(blob["metadata"]), len(blob["metadata"]))
            return ModelZoo(
                tuple(blob["states"]), tuple(blob["metadata"]), settings, (f"cache hit: {path}",), _build_digits_cnn
            )
    t0 = time.perf_counter()
    configs = [_net_config(seed, i, i < n_models, opts) for i in range(n_models + n_mixed)]
    chunks = _chunks(configs, int(group_size))
    Xtr, Ytr = load_digits("train", flat=False)
    Xte, Yte = load_digits("test", flat=False)
    data = tuple(t.to(dev) for t in (Xtr, Ytr, Xte, Yte))
    states: Dict[int, Dict[str, torch.Tensor]] = {}
    metrics: Dict[int, Dict[str, float]] = {}
    done, total = 0, len(configs)
    mine = [(k, c) for k, c in enumerate(chunks) if k % world == rank]
    # finished chunks are kept in a partial file, so an interrupted generation resumes where it stopped
    part = path.with_name(path.stem + f".part{rank}of{world}.pt") if path is not None else None
    finished: Dict[int, Any] = {}
    if part is not None:
        blob = load_tensors(part)
        if blob is not None and blob.get("options") == _jsonable_opts(opts):
            finished = dict(blob["chunks"])
            log.info("digits_cnn_zoo: resuming; %d chunks found in %s", len(finished), part)
    for k, chunk in mine:
        if k in finished:
            s, mt = finished[k]
        else:
            s, mt = _train_chunk([configs[i] for i in chunk], data, dev)
            finished[k] = (s, mt)
            if part is not None:
                atomic_save({"options": _jsonable_opts(opts), "chunks": finished}, part)
        for i, si, mi in zip(chunk, s, mt):
            states[i], metrics[i] = si, mi
        done += len(chunk)
        log.info(
            "digits_cnn_zoo: rank %d trained %d/%d of its nets (%s)",
            rank,
            done,
            sum(len(c) for _, c in mine),
            configs[chunk[0]]["architecture"],
        )
        if progress is not None:
            progress(done * world if world > 1 else done, total)
    if world > 1:
        import torch.distributed as dist

        parts: List[Any] = [None] * world
        dist.all_gather_object(parts, (states, metrics))
        for s, mt in parts:
            states.update(s)
            metrics.update(mt)
    missing = [i for i in range(total) if i not in states]
    if missing:
        raise ZooError(f"zoo generation lost nets {missing[:5]}: a rank did not contribute its shard")
    meta = tuple(
        {**configs[i], **metrics[i], "num_params": sum(t.numel() for t in states[i].values())} for i in range(total)
    )
    sts = tuple(states[i] for i in range(total))
    secs = time.perf_counter() - t0
    logs = (f"trained {total} nets in {len(chunks)} chunks in {secs:.1f} s on {dev} (rank {rank} of {world})",)
    log.info("digits_cnn_zoo: %s", logs[0])
    if path is not None and rank == 0:
        atomic_save({"options": _jsonable_opts(opts), "states": list(sts), "metadata": list(meta)}, path)
    if part is not None and part.exists():
        part.unlink()
    return ModelZoo(sts, meta, settings, logs, _build_digits_cnn)


def _jsonable_opts(opts: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
