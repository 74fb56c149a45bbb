"""Digits CNN zoo generation speed: the grouped trainer of ``weightspace.zoo.zoos`` against its
version-1 forward pass (NCHW grouped convs, mean pooling, out-of-place activations), side by side.

Both variants train the same nets (the zoo's fixed architecture, protocol hyperparameters) with the
same per-net AdamW loop (``zoos._train_chunk``); only the forward pass and the group size differ.
Rounds alternate the variants so that a shared machine's load hits them alike; the table gives the
best and the median round.

    OMP_NUM_THREADS=1 python benchmarks/bench_zoo.py                  # 128 nets, 50-80 steps, 2 rounds
    OMP_NUM_THREADS=1 python benchmarks/bench_zoo.py --nets 64 --rounds 1 --variants v1:256 v2:32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from weightspace.zoo import zoos  # noqa: E402
from weightspace.zoo.data import load_digits  # noqa: E402


def forward_v1(params, x, depth, act):
    """The version-1 forward pass (``_ZOO_VERSION = 1``), kept here as the baseline."""
    G, B, C, H, W = x.shape
    h = x.transpose(0, 1).reshape(B, G * C, H, W)
    f = torch.relu if act == "relu" else torch.tanh
    for l in range(depth):
        w, b = params[2 * l], params[2 * l + 1]
        h = f(F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=1, groups=G))
    h = h.mean(dim=(2, 3)).reshape(B, G, -1).transpose(0, 1)
    hw, hb = params[-2], params[-1]
    return torch.baddbmm(hb.unsqueeze(1), h, hw.transpose(1, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs=2, default=(50, 80))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["v1:256", "v1:32", "v2:128", "v2:32", "v2:16"])
    args = ap.parse_args()
    opts = dict(
        lr=(5e-4, 5e-2),
        weight_decay=(1e-6, 1e-2),
        init_scale=(0.3, 2.0),
        steps=tuple(args.steps),
        widths=(8,),
        depths=(2,),
        activations=("relu",),
        batch_size=64,
    )
    cfgs = [zoos._net_config(0, i, True, opts) for i in range(args.nets)]
    net_steps = sum(c["steps"] for c in cfgs)
    data = (*load_digits("train", flat=False), *load_digits("test", flat=False))
    current = zoos._grouped_forward
    times = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            kind, g = v.split(":")
            zoos._grouped_forward = forward_v1 if kind == "v1" else current
            t = time.perf_counter()
            for chunk in zoos._chunks(cfgs, int(g)):
                zoos._train_chunk([cfgs[i] for i in chunk], data, torch.device("cpu"))
            times[v].append(time.perf_counter() - t)
            print(f"  {v}: {times[v][-1]:.1f} s", flush=True)
    zoos._grouped_forward = current
    base = min(times[args.variants[0]])
    lo, hi = args.steps
    print(f"\n{args.nets} nets, {lo}-{hi} steps ({net_steps} net-steps), batch 64, training + evaluation")
    print("| variant:group | best s | median s | nets/s (best) | ms per net-step | speed-up vs first row |")
    print("|---|---|---|---|---|---|")
    for v, ts in times.items():
        b = min(ts)
        print(
            f"| {v} | {b:.1f} | {statistics.median(ts):.1f} | {args.nets / b:.2f} | {1000 * b / net_steps:.2f} | {base / b:.2f}x |"  # noqa: E501
        )
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
