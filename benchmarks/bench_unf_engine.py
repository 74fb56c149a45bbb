"""UNF basis engine: basis sizes of the zoo models, and the fast path against a plain-einsum reference.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/bench_unf_engine.py [--batch 4] [--channels 8] [--repeats 3]

1. For each zoo model (traced spec, BatchNorm buffers excluded): number of pieces and basis terms
   per channel pair for ``fixed_axes`` dense / io / permuted (the table in ``weightspace/nn/_unf.py``).
2. One :class:`weightspace.nn.UNFLayer` forward + backward, timed side by side with a reference that
   evaluates every term of the same :class:`BasisPlan` with ``torch.einsum`` (diagonals, means,
   delta/ones operands for broadcasts) and sums them; the two outputs are compared (max abs diff).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import weightspace as ws  # noqa: E402
from weightspace import nn as wsnn  # noqa: E402
from weightspace import zoo  # noqa: E402


def reference(layer, xs):
    """Every term through einsum, no fast paths (the definition of the layer)."""
    plan, pieces = layer.plan, layer.layout.pieces
    B = xs[0].shape[0]
    flat = [x.reshape(*x.shape[:-2], -1) for x in xs]
    ys = [[] for _ in pieces]
    for s, theta in zip(plan.signatures, layer.matrices()):
        zs = [torch.einsum(t.equation, flat[t.piece]) / t.divisor for t in plan.in_terms[s]]
        if s == () and plan.bias:
            zs.append(torch.ones(B, 1, dtype=flat[0].dtype))
        h = torch.cat(zs, -1) @ theta
        off = 0
        for t in plan.out_terms[s]:
            w = pieces[t.piece].F * layer.out_channels
            ops = []
            for n, m in t.deltas:
                d = torch.zeros((n,) * m, dtype=h.dtype)
                d[(torch.arange(n),) * m] = 1
                ops.append(d)
            ys[t.piece].append(torch.einsum(t.equation, h[..., off : off + w], *ops))
            off += w
    return [
        torch.stack(torch.broadcast_tensors(*y)).sum(0).reshape(B, *p.slot_sizes, p.F, layer.out_channels)
        for p, y in zip(pieces, ys)
    ]


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {
        "mlp": zoo.MLP(seed=0),
        "vgg": zoo.make("vgg", seed=0),
        "resnet20": zoo.make("resnet20", seed=0),
        "vit": zoo.make("vit", seed=0),
    }
    print("model      params  pieces   dense      io  permuted")
    specs = {}
    for name, m in models.items():
        spec = ws.permutation_spec(m, zoo.example_inputs(m))
        specs[name] = spec
        keys = wsnn.default_keys(spec)
        counts = []
        for mode in ("dense", "io", "permuted"):
            lay = wsnn.SpaceLayout(spec, keys, mode)
            counts.append(wsnn.BasisPlan(lay).num_terms())
        print(
            f"{name:<9} {sum(p.numel() for p in m.parameters()):>7} {len(lay.pieces):>7} {counts[0]:>7} {counts[1]:>7} {counts[2]:>9}"  # noqa: E501
        )
    print(
        f"\nUNFLayer forward+backward, batch {args.batch}, {args.channels} -> {args.channels} channels, best of {args.repeats}"  # noqa: E501
    )
    print("model     mode        fast (s)  einsum (s)  ratio  max |diff|")
    for name, mode in (("mlp", "permuted"), ("vgg", "dense"), ("vit", "permuted"), ("resnet20", "permuted")):
        spec = specs[name]
        sds = [zoo.make(name if name != "mlp" else "mlp", seed=i).state_dict() for i in range(args.batch)]
        batch = wsnn.WeightSpaceBatch.from_state_dicts(sds, spec)
        batch = batch.map(lambda t: t.expand(*t.shape[:-1], args.channels).contiguous())
        layer = wsnn.UNFLayer(spec, args.channels, args.channels, fixed_axes=mode)
        xs = [x.requires_grad_(True) for x in layer.layout.extract(batch.tensors)]

        def run(f):
            return lambda: sum(y.square().sum() for y in f(xs)).backward()

        fast = timed(run(layer.apply_pieces), args.repeats)
        ref = timed(run(lambda v: reference(layer, v)), args.repeats)
        with torch.no_grad():
            diff = max((a - b).abs().max().item() for a, b in zip(layer.apply_pieces(xs), reference(layer, xs)))
        print(f"{name:<9} {mode:<9} {fast:>10.3f} {ref:>11.3f} {ref / fast:>6.1f}  {diff:.1e}")


if __name__ == "__main__":
    main()
