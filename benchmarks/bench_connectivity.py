"""Benchmark: batched (vmap) vs looped interpolation, and a 41 x 41 landscape, on a digits MLP.

Two 64-128-128-10 ReLU MLPs are trained from different seeds on the scikit-learn digits (through
``weightspace.zoo`` when it is importable, else directly from ``sklearn.datasets.load_digits``,
standardised). Then, in one run and side by side:

* ``analysis.interpolate`` at 25 alphas on the train and test splits, ``batched=True`` (vmap over
  stacked weights) vs ``batched=False`` (one functional_call per alpha): wall time, ratio and the
  largest difference between the two curves — once with each split as one full batch, once through
  DataLoaders of 64 examples (where the loop pays Python overhead per batch and per point);
* ``analysis.landscape`` on a 41 x 41 filter-normalised grid (1,681 points) on the test split.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_connectivity.py [--threads 1] [--repeats 5] [--epochs 15]
    python benchmarks/bench_connectivity.py --device cuda   # the same on a GPU (models trained on CPU)

Prints a Markdown table (paste it into benchmarks/connectivity_results.md).
"""
from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import numpy as np
import torch
from torch import nn

import analysis


def digits():
    try:
        from weightspace import zoo
        tr = zoo.load_digits("train", flat=True)
        te = zoo.load_digits("test", flat=True)
        return tr, te, "weightspace.zoo.load_digits"
    except Exception:  # pragma: no cover - fallback when the zoo is not there
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        d = load_digits()
        Xtr, Xte, ytr, yte = train_test_split(d.data, d.target, test_size=597, random_state=0, stratify=d.target)
        m, s = Xtr.mean(), Xtr.std()
        f = lambda a: torch.tensor((a - m) / s, dtype=torch.float32)  # noqa: E731
        return (f(Xtr), torch.tensor(ytr)), (f(Xte), torch.tensor(yte)), "sklearn.datasets.load_digits"


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model, data, epochs, seed):
    X, Y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    return model.eval()


def interleaved(fns, repeats):
    """Run each callable ``repeats`` times, alternating between them (the CPU is shared and noisy)."""
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--alphas", type=int, default=25)
    ap.add_argument("--grid", type=int, default=41)
    ap.add_argument("--landscape-repeats", type=int, default=2)
    ap.add_argument("--device", default=None, help="where the points are evaluated (e.g. cuda); default: the models'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tr, te, source = digits()
    interp = functools.partial(analysis.interpolate, device=args.device)
    land_fn = functools.partial(analysis.landscape, device=args.device)
    a, b = train(mlp(0), tr, args.epochs, 0), train(mlp(1), tr, args.epochs, 1)
    splits = {"train": tr, "test": te}
    K = args.alphas
    interp(a, b, splits, alphas=3)  # warm-up (imports, first vmap trace)

    itimes, curves = interleaved({
        f"vmap, all {K} points in one pass": lambda: interp(a, b, splits, alphas=K, batched=True,
                                                                          batch_points=K),
        "vmap, 8 points per pass": lambda: interp(a, b, splits, alphas=K, batched=True, batch_points=8),
        "loop (one functional_call per point)": lambda: interp(a, b, splits, alphas=K, batched=False),
    }, args.repeats)
    from torch.utils.data import DataLoader, TensorDataset
    loaders = {s: DataLoader(TensorDataset(*d), batch_size=64) for s, d in splits.items()}
    btimes, bcurves = interleaved({
        f"vmap, all {K} points in one pass": lambda: interp(a, b, loaders, alphas=K, batched=True,
                                                                          batch_points=K),
        "loop (one functional_call per point)": lambda: interp(a, b, loaders, alphas=K, batched=False),
    }, args.repeats)
    ref = curves["loop (one functional_call per point)"]
    diff = max(float(np.abs(c.values[s][m] - ref.values[s][m]).max())
               for c in curves.values() for s in splits for m in ("loss", "accuracy"))
    G = args.grid
    ltimes, lands = interleaved({
        "vmap, 64 points per pass": lambda: land_fn(a, {"test": te}, grid=G, batch_points=64, seed=0),
        "vmap, 256 points per pass": lambda: land_fn(a, {"test": te}, grid=G, batch_points=256, seed=0),
        "loop": lambda: land_fn(a, {"test": te}, grid=G, batched=False, seed=0),
    }, args.landscape_repeats)
    land = lands["vmap, 64 points per pass"]
    ldiff = float(np.abs(land.values["test"]["loss"] - lands["loop"].values["test"]["loss"]).max())
    bar = ref.barrier("loss", "test")
    bar_e = ref.barrier("accuracy", "test", kind="mean_endpoint")

    print(f"data: {source}; train {len(tr[0])}, test {len(te[0])}; models 64-128-128-10 ReLU, Adam 1e-3, "
          f"{args.epochs} epochs, seeds 0 and 1")
    dev = args.device or "cpu"
    print(f"torch {torch.__version__}, {platform.machine()}, torch threads={args.threads}, device {dev}"
          f"{' (' + torch.cuda.get_device_name() + ')' if dev.startswith('cuda') else ''}; "
          f"min and median of {args.repeats} (interpolation) / {args.landscape_repeats} (landscape) "
          "interleaved runs\n")
    print("| task | mode | points | examples per point | min (s) | median (s) | ms per point (min) |")
    print("|---|---|---|---|---|---|---|")
    n_ex = len(tr[0]) + len(te[0])
    for k, (tmin, tmed) in itimes.items():
        print(f"| interpolate (train+test) | {k} | {K} | {n_ex} | {tmin:.3f} | {tmed:.3f} | {1e3 * tmin / K:.2f} |")
    for k, (tmin, tmed) in btimes.items():
        print(f"| interpolate (train+test, DataLoader batch 64) | {k} | {K} | {n_ex} | {tmin:.3f} | {tmed:.3f} | "
              f"{1e3 * tmin / K:.2f} |")
    for k, (tmin, tmed) in ltimes.items():
        print(f"| landscape {G}x{G}, filter-normalised (test) | {k} | {G * G} | {len(te[0])} | {tmin:.2f} | "
              f"{tmed:.2f} | {1e3 * tmin / G ** 2:.2f} |")
    loop_i = itimes["loop (one functional_call per point)"][0]
    best_v = min(v[0] for k, v in itimes.items() if k.startswith("vmap"))
    print(f"\ninterpolation loop / best vmap time ratio (min): {loop_i / best_v:.2f}x; "
          f"landscape loop / vmap-64 ratio (min): {ltimes['loop'][0] / ltimes['vmap, 64 points per pass'][0]:.2f}x")
    print(f"DataLoader (batch 64) interpolation loop / vmap ratio (min): "
          f"{btimes['loop (one functional_call per point)'][0] / btimes[f'vmap, all {K} points in one pass'][0]:.2f}x")
    print(f"max |vmap - loop|: interpolation {diff:.1e}, landscape {ldiff:.1e}")
    print(f"test loss chord barrier {bar.value:.4f} at alpha = {bar.alpha:.3f}; test error mean-endpoint barrier "
          f"{bar_e.value:.4f}; landscape centre test loss {land.center['test']['loss']:.4f}, "
          f"grid max {land.values['test']['loss'].max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
