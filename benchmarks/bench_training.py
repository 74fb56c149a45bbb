"""Training time and test accuracy of zoo models on the embedded digits (CPU).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py [--threads 1] [--seeds 0 1 2] [--quick | --only mlp vit ...]

Prints a Markdown table: model, parameters, optimiser settings, epochs, wall seconds of
``weightspace.zoo.train`` (mean over seeds) and the final test accuracy (mean and min over seeds)
on the fixed 597-image test split. Record the output in benchmarks/training_results.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from weightspace import zoo

CONFIGS = [
    # name, factory kwargs, flat inputs, train kwargs
    ("MLP 64-128-128-10", "mlp", dict(hidden=(128, 128)), True,
     dict(epochs=10, lr=1e-3, optimizer="adam", batch_size=64)),
    ("MLP 64-128-128-10", "mlp", dict(hidden=(128, 128)), True,
     dict(epochs=20, lr=1e-3, optimizer="adam", batch_size=64)),
    ("ResNet-20 w1 BN", "resnet20", dict(width=1, norm="batch"), False,
     dict(epochs=10, lr=2e-3, optimizer="adam", batch_size=64, schedule="cosine")),
    ("ResNet-20 w1 LN", "resnet20", dict(width=1, norm="layer"), False,
     dict(epochs=10, lr=2e-3, optimizer="adam", batch_size=64, schedule="cosine")),
    ("VGG 16-M-32-M BN", "vgg", dict(), False,
     dict(epochs=10, lr=3e-3, optimizer="adam", batch_size=64)),
    ("TinyViT d32 x2", "vit", dict(), False,
     dict(epochs=20, lr=2e-3, optimizer="adam", batch_size=64, schedule="cosine")),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these small models, and on a shared CPU)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="MLP rows only")
    ap.add_argument("--only", nargs="+", choices=sorted({c[1] for c in CONFIGS}), help="zoo names to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = {flat: (zoo.load_digits("train", flat=flat), zoo.load_digits("test", flat=flat)) for flat in (True, False)}
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"seeds {args.seeds}\n")
    print("| model | params | optimiser | epochs | train s (mean) | test acc mean | test acc min |")
    print("|---|---|---|---|---|---|---|")
    for label, name, mkw, flat, tkw in CONFIGS:
        if (args.quick and name != "mlp") or (args.only and name not in args.only):
            continue
        train_data, test_data = data[flat]
        secs, accs = [], []
        warm = zoo.make(name, seed=0, **mkw)  # one-time costs (kernel selection, allocator) out of the timing
        zoo.train(warm, (train_data[0][:128], train_data[1][:128]), seed=0, device="cpu", **{**tkw, "epochs": 1})
        for seed in args.seeds:
            model = zoo.make(name, seed=seed, **mkw)
            t0 = time.perf_counter()
            zoo.train(model, train_data, seed=seed, device="cpu", **tkw)
            secs.append(time.perf_counter() - t0)
            accs.append(zoo.evaluate(model, test_data)[1])
        n_params = sum(p.numel() for p in model.parameters())
        opt = f"{tkw['optimizer']} lr {tkw['lr']:g}, bs {tkw['batch_size']}" + (
            f", {tkw['schedule']}" if tkw.get("schedule") else "")
        print(f"| {label} | {n_params:,} | {opt} | {tkw['epochs']} | {statistics.mean(secs):.2f} | "
              f"{100 * statistics.mean(accs):.1f}% | {100 * min(accs):.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
