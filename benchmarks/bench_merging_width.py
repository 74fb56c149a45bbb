"""MLP width sweep on digits: test-loss barrier of naive averaging vs weight matching vs activation
matching, with and without REPAIR (Git Re-Basin Fig. 4 / REPAIR Fig. 1 in miniature).

Per width w (3 hidden layers 64-w-w-w-10) and seed pair, two MLPs are trained from different
initialisations and data orders (Adam 1e-3), then B is aligned to A and the chord barrier of the
test loss is measured on alpha in {0, .25, .5, .75, 1} (``analysis.interpolate``). REPAIR variants
repair every interior alpha on the training data (``merging.merge(..., alpha=a, repair="repair")``).

    OMP_NUM_THREADS=2 python -m benchmarks.bench_merging_width --widths 32,128,512,1024 --pairs 2 --epochs 20

``--pair-start k`` starts at seed pair k (seeds 2k, 2k+1), so pairs can be added to an earlier run; the
per-pair lines it prints are what the tables in ``RESULTS.md`` combine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import analysis
import merging
import weightspace as ws
from weightspace import zoo
from weightspace.state import evaluate

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _train(width, seed, train, test, epochs):
    m = zoo.make("mlp", hidden=(width,) * 3, seed=seed)
    zoo.train(m, train, epochs=epochs, lr=1e-3, seed=seed, device="cpu")
    return m.eval()


def _chord(losses):
    l0, l1 = losses[0], losses[-1]
    return max(l - ((1 - a) * l0 + a * l1) for a, l in zip(ALPHAS, losses))


def _barrier_plain(a, b, test):
    curve = analysis.interpolate(a, b, test, alphas=ALPHAS, device="cpu")
    return curve.barrier("loss", kind="chord").value


def _barrier_repair(a, b, spec, aln, train, test):
    bp = aln.apply(b) if aln is not None else b
    losses = []
    for al in ALPHAS:
        if al in (0.0, 1.0):
            m = a if al == 0.0 else bp
        else:
            m = merging.merge(a, bp, alpha=al, data=train, repair="repair", device="cpu").model
        losses.append(evaluate(m, test)["loss"])
    return _chord(losses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="32,128,512,1024")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument(
        "--pair-start",
        type=int,
        default=0,
        help="index of the first seed pair (pair p trains seeds 2p and 2p+1), to add pairs to an earlier run",
    )
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    train, test = zoo.load_digits("train"), zoo.load_digits("test")
    table = {}
    for w in [int(x) for x in args.widths.split(",")]:
        rows = []
        for p in range(args.pair_start, args.pair_start + args.pairs):
            t0 = time.perf_counter()
            a = _train(w, 2 * p, train, test, args.epochs)
            b = _train(w, 2 * p + 1, train, test, args.epochs)
            spec = ws.permutation_spec(a, train[0][:2])
            wm = merging.align(a, b, "weight_matching", spec=spec, seed=p, device="cpu")
            am = merging.align(a, b, "activation_matching", spec=spec, data=train, device="cpu")
            r = {
                "naive": _barrier_plain(a, b, test),
                "wm": _barrier_plain(a, wm.apply(b), test),
                "am": _barrier_plain(a, am.apply(b), test),
                "naive+repair": _barrier_repair(a, b, spec, None, train, test),
                "wm+repair": _barrier_repair(a, b, spec, wm, train, test),
                "am+repair": _barrier_repair(a, b, spec, am, train, test),
                "acc_a": evaluate(a, test)["accuracy"],
            }
            rows.append(r)
            print(
                f"width {w} pair {p}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in r.items())
                + f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        table[w] = {
            k: (statistics.mean([r[k] for r in rows]), (np.std([r[k] for r in rows]) if len(rows) > 1 else 0.0))
            for k in rows[0]
        }
    keys = ["naive", "wm", "am", "naive+repair", "wm+repair", "am+repair"]
    print()
    print("| width | " + " | ".join(keys) + " | wm / naive | test acc (A) |")
    print("|---" * (len(keys) + 3) + "|")
    for w, t in table.items():
        cells = [f"{t[k][0]:.3f} ± {t[k][1]:.3f}" for k in keys]
        print(f"| {w} | " + " | ".join(cells) + f" | {t['wm'][0] / t['naive'][0]:.2f} | {t['acc_a'][0] * 100:.1f}% |")


if __name__ == "__main__":
    main()
