"""Disjoint-task merging on digits (0-4 vs 5-9, different initialisations): ZipIt! against the baselines.

Model A is trained on digits 0-4, model B on 5-9 (both with a 10-way head, labels kept; different
seeds). Every method merges A and B without training; the table gives, over several seeds:

* joint accuracy -- all 597 test digits, argmax over the 10 logits of the merged model;
* per-task accuracy -- on each task's test digits, argmax over that task's 5 classes, averaged over
  the two tasks (ZipIt!'s "per-task" column);
* multi-output models (the ensemble, partial ZipIt!) are read two ways: "own" -- model k's logits
  for its own task's classes, concatenated, then argmax (each head speaks for its task), and "mean"
  -- the mean of the models' 10 logits.

Methods: average; weight matching; ZipIt! with beta = 0 ("permute", exact LAP); ZipIt! with the
defaults; partial ZipIt! stopped after the first (and second) group, i.e. a multi-head model.
BatchNorm statistics are recomputed on the training data for every merge of the CNN (repair="bn_reset"
for the baselines; ZipIt! does it itself).

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_merging_tasks.py --seeds 0 1 2`` (``--grid`` adds
the zip_alpha x zip_beta grid used to choose ZipIt!'s defaults; ``--arch mlp`` or ``cnn`` for one).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merging  # noqa: E402
from weightspace import zoo  # noqa: E402

TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def make(arch: str, seed: int):
    if arch == "mlp":
        return zoo.MLP(64, (128, 128), 10, seed=seed)
    return zoo.VGG(cfg=(32, "M", 64, "M"), fc=(128,), seed=seed)


def data(arch: str):
    flat = arch == "mlp"
    Xtr, Ytr = zoo.load_digits("train", flat=flat)
    Xte, Yte = zoo.load_digits("test", flat=flat)
    return Xtr, Ytr, Xte, Yte


def task_split(X, Y, t):
    m = torch.isin(Y, torch.tensor(TASKS[t]))
    return X[m], Y[m]


@torch.no_grad()
def logits(model, X):
    model.eval()
    out = model(X)
    return out


def scores_single(lg, Yte):
    joint = (lg.argmax(1) == Yte).float().mean().item()
    per = []
    for t in (0, 1):
        m = torch.isin(Yte, torch.tensor(TASKS[t]))
        cls = torch.tensor(TASKS[t])
        pred = cls[lg[m][:, cls].argmax(1)]
        per.append((pred == Yte[m]).float().mean().item())
    return joint, sum(per) / 2


def own(outs):
    """Each model's logits for its own task's classes, side by side in class order."""
    lg = torch.empty_like(outs[0])
    for t, o in enumerate(outs):
        cls = torch.tensor(TASKS[t])
        lg[:, cls] = o[:, cls]
    return lg


def run(arch: str, seeds, grid: bool, epochs: int):
    Xtr, Ytr, Xte, Yte = data(arch)
    rows = {}
    times = {}

    def add(name, lg, t=None):
        rows.setdefault(name, []).append(scores_single(lg, Yte))
        if t is not None:
            times.setdefault(name, []).append(t)

    for s in seeds:
        a, b = make(arch, 2 * s), make(arch, 2 * s + 1)
        zoo.train(a, task_split(Xtr, Ytr, 0), epochs=epochs, seed=2 * s)
        zoo.train(b, task_split(Xtr, Ytr, 1), epochs=epochs, seed=2 * s + 1)
        la, lb = logits(a, Xte), logits(b, Xte)
        add("model A (0-4)", la)
        add("model B (5-9)", lb)
        add("ensemble, own classes", own([la, lb]))
        add("ensemble, mean logits", (la + lb) / 2)
        rep = "bn_reset" if arch == "cnn" else None
        common = dict(data=(Xtr, Ytr))
        for name, kw in [("average", dict(method="average", repair=rep)),
                         ("weight matching", dict(method="weight_matching", repair=rep)),
                         ("ZipIt! beta=0 (permute)", dict(method="zipit", zip_beta=0.0)),
                         ("ZipIt! (defaults)", dict(method="zipit"))]:
            t0 = time.perf_counter()
            r = merging.merge(a, b, **common, **kw)
            add(name, logits(r.model, Xte), time.perf_counter() - t0)
        spec = r.spec
        groups = list(spec.groups)
        for k in (1, 2):
            if k >= len(groups):
                continue
            t0 = time.perf_counter()
            r = merging.merge(a, b, method="zipit", stop=groups[k - 1], **common)
            dt = time.perf_counter() - t0
            outs = logits(r.model, Xte)
            add(f"partial ZipIt! {k}/{len(groups)} groups, own classes", own(outs), dt)
            add(f"partial ZipIt! {k}/{len(groups)} groups, mean logits", (outs[0] + outs[1]) / 2)
        if grid:
            for za in (0.1, 0.5, 1.0):
                for zb in (0.25, 0.5, 1.0):
                    r = merging.merge(a, b, method="zipit", zip_alpha=za, zip_beta=zb, **common)
                    add(f"grid: ZipIt! zip_alpha={za} zip_beta={zb}", logits(r.model, Xte))
        print(f"[{arch}] seed {s} done", file=sys.stderr, flush=True)
    return rows, times


def fmt(vals):
    m = statistics.mean(vals) * 100
    sd = statistics.stdev(vals) * 100 if len(vals) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arch", choices=["mlp", "cnn", "both"], default="both")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--grid", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    archs = ["mlp", "cnn"] if args.arch == "both" else [args.arch]
    for arch in archs:
        rows, times = run(arch, args.seeds, args.grid, args.epochs)
        desc = "MLP 64-128-128-10" if arch == "mlp" else "VGG conv32-pool-conv64-pool-fc128 (BatchNorm)"
        print(f"\n### {desc}, digits 0-4 vs 5-9, seeds {args.seeds}, {args.epochs} epochs (mean ± sd over seeds)\n")
        print("| model / method | joint acc. % | per-task acc. % | merge time (s) |")
        print("|---|---|---|---|")
        for name, v in rows.items():
            t = times.get(name)
            ts = f"{statistics.median(t):.2f}" if t else ""
            print(f"| {name} | {fmt([x[0] for x in v])} | {fmt([x[1] for x in v])} | {ts} |")


if __name__ == "__main__":
    main()
