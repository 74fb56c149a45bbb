"""ResNet-20 with BatchNorm on digits (8x8 images) at widths x1, x2, x4: midpoint test accuracy of the
weight-matched merge without BN reset, with BN reset and with REPAIR (Jordan et al. 2023, REPAIR;
Git Re-Basin Fig. 5), next to the naive average and the endpoints.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_merging_resnet --widths 1,2,4 --pairs 2 --epochs 15

``--pair-start k`` starts at seed pair k (seeds 2k, 2k+1), so pairs can be added to an earlier run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import merging
import weightspace as ws
from weightspace import zoo
from weightspace.state import evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="1,2,4")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument(
        "--pair-start",
        type=int,
        default=0,
        help="index of the first seed pair (pair p trains seeds 2p and 2p+1), to add pairs to an earlier run",
    )
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    train, test = zoo.load_digits("train", flat=False), zoo.load_digits("test", flat=False)
    keys = ["endpoints", "naive", "naive+bn_reset", "wm", "wm+bn_reset", "wm+repair"]
    table = {}
    for w in [int(x) for x in args.widths.split(",")]:
        rows = []
        for p in range(args.pair_start, args.pair_start + args.pairs):
            t0 = time.perf_counter()
            ms = []
            for s in (2 * p, 2 * p + 1):
                m = zoo.make("resnet20", width=w, norm="batch", seed=s)
                zoo.train(m, train, epochs=args.epochs, lr=1e-3, seed=s, device="cpu")
                ms.append(m.eval())
            a, b = ms
            spec = ws.permutation_spec(a, train[0][:2])
            acc = lambda m: evaluate(m, test)["accuracy"] * 100  # noqa: E731
            r = {
                "endpoints": (acc(a) + acc(b)) / 2,
                "naive": acc(merging.merge(a, b, device="cpu").model),
                "naive+bn_reset": acc(merging.merge(a, b, data=train, repair="bn_reset", device="cpu").model),
            }
            wm = merging.merge(a, b, method="weight_matching", spec=spec, seed=p, device="cpu")
            r["wm"] = acc(wm.model)
            init = {"init": wm.alignment.permutations}  # same alignment for the repaired variants
            r["wm+bn_reset"] = acc(
                merging.merge(
                    a,
                    b,
                    method="weight_matching",
                    spec=spec,
                    seed=p,
                    data=train,
                    repair="bn_reset",
                    device="cpu",
                    **init,
                ).model
            )
            r["wm+repair"] = acc(
                merging.merge(
                    a, b, method="weight_matching", spec=spec, seed=p, data=train, repair="repair", device="cpu", **init
                ).model
            )
            rows.append(r)
            print(
                f"width x{w} pair {p}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in r.items())
                + f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        table[w] = {k: (statistics.mean([r[k] for r in rows]), float(np.std([r[k] for r in rows]))) for k in keys}
    print()
    print("| width | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for w, t in table.items():
        print(f"| x{w} | " + " | ".join(f"{t[k][0]:.1f} ± {t[k][1]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
