"""OT fusion against averaging and weight matching on digits, and fusion of two different widths.

Part 1 (same widths): two models trained on all ten digits from different seeds are merged at the
midpoint; test accuracy and loss over several seeds. Methods: average, weight matching (Git Re-Basin),
OT fusion with weight and activation ground costs (exact OT) and with Sinkhorn (weights, reg 0.05
of the mean cost). The CNN has
BatchNorm: every merge gets its statistics recomputed on the training data (``repair="bn_reset"`` for
the baselines; OT fusion does it itself when given data).

Part 2 (different widths, MLP): a wide model (hidden 256, 256) is fused into a narrow one (128, 128);
the result has the narrow model's shapes. Against: the narrow model alone, and the naive merge that
truncates the wide model to its first 128 units per layer and averages. "wide alone -> narrow"
transports only the wide model (weights 1, 0): compression by OT vs by truncation.

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_ot_fusion.py --seeds 0 1 2``.
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
from weightspace.state import evaluate  # noqa: E402


def make(arch: str, seed: int, width: int = 128):
    if arch == "mlp":
        return zoo.MLP(64, (width, width), 10, seed=seed)
    return zoo.VGG(cfg=(32, "M", 64, "M"), fc=(128,), seed=seed)


def fmt(vals, scale=100.0, nd=1):
    m = statistics.mean(vals) * scale
    sd = statistics.stdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{m:.{nd}f} ± {sd:.{nd}f}"


def print_same(arch, rows, times, seeds, epochs):
    desc = "MLP 64-128-128-10" if arch == "mlp" else "VGG conv32-pool-conv64-pool-fc128 (BatchNorm)"
    print(f"\n### Same task (all digits), {desc}, seeds {seeds}, {epochs} epochs (mean ± sd)\n")
    print("| model / method | test acc. % | test loss | merge time (s, median) |")
    print("|---|---|---|---|")
    for name, v in rows.items():
        t = times.get(name)
        ts = f"{statistics.median(t):.2f}" if t else ""
        print(f"| {name} | {fmt([x['accuracy'] for x in v])} | {fmt([x['loss'] for x in v], 1.0, 3)} | {ts} |")
    sys.stdout.flush()


def print_widths(rows, seeds):
    print(f"\n### Different widths: MLP 64-256-256-10 fused into 64-128-128-10, seeds {seeds} (mean ± sd)\n")
    print("| model / method | test acc. % | test loss |")
    print("|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {fmt([x['accuracy'] for x in v])} | {fmt([x['loss'] for x in v], 1.0, 3)} |")
    sys.stdout.flush()


def same_width(arch, seeds, epochs):
    flat = arch == "mlp"
    Xtr, Ytr = zoo.load_digits("train", flat=flat)
    Xte, Yte = zoo.load_digits("test", flat=flat)
    rows, times = {}, {}
    rep = "bn_reset" if arch == "cnn" else None
    for s in seeds:
        a, b = make(arch, 2 * s), make(arch, 2 * s + 1)
        for m, sd in ((a, 2 * s), (b, 2 * s + 1)):
            zoo.train(m, (Xtr, Ytr), epochs=epochs, seed=sd)
        res = {"model A": evaluate(a, (Xte, Yte)), "model B": evaluate(b, (Xte, Yte))}
        with torch.no_grad():
            a.eval(), b.eval()
            lg = (a(Xte) + b(Xte)) / 2
        res["ensemble (mean logits)"] = {"accuracy": (lg.argmax(1) == Yte).float().mean().item(),
                                         "loss": torch.nn.functional.cross_entropy(lg, Yte).item()}
        for name, kw in [("average", dict(method="average", repair=rep)),
                         ("weight matching", dict(method="weight_matching", repair=rep)),
                         ("OT fusion, weights, exact", dict(method="ot_fusion")),
                         ("OT fusion, activations, exact", dict(method="ot_fusion", ground_cost="activations")),
                         ("OT fusion, weights, Sinkhorn reg 0.05", dict(method="ot_fusion", solver="sinkhorn", reg=0.05))]:  # noqa: E501
            t0 = time.perf_counter()
            r = merging.merge(a, b, data=(Xtr, Ytr), **kw)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            res[name] = evaluate(r.model, (Xte, Yte))
            print(f"  [{arch}] seed {s} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
        for k, v in res.items():
            rows.setdefault(k, []).append(v)
        print(f"[{arch}] seed {s} done", file=sys.stderr, flush=True)
        print_same(arch, rows, times, seeds[:seeds.index(s) + 1], epochs)
    return rows, times


def truncate(wide_sd, narrow_sd):
    out = {}
    for k, v in narrow_sd.items():
        w = wide_sd[k]
        out[k] = w[tuple(slice(0, n) for n in v.shape)]
    return out


def widths(seeds, epochs):
    Xtr, Ytr = zoo.load_digits("train")
    Xte, Yte = zoo.load_digits("test")
    rows = {}
    for s in seeds:
        narrow, wide = make("mlp", 2 * s, 128), make("mlp", 2 * s + 1, 256)
        zoo.train(narrow, (Xtr, Ytr), epochs=epochs, seed=2 * s)
        zoo.train(wide, (Xtr, Ytr), epochs=epochs, seed=2 * s + 1)
        res = {"narrow (128) alone": evaluate(narrow, (Xte, Yte)), "wide (256) alone": evaluate(wide, (Xte, Yte))}
        sn, sw = narrow.state_dict(), wide.state_dict()
        tr = truncate(sw, sn)
        m = make("mlp", 0, 128)
        m.load_state_dict({k: (sn[k] + tr[k]) / 2 for k in sn})
        res["naive: truncate wide, average"] = evaluate(m, (Xte, Yte))
        m.load_state_dict(tr)
        res["wide alone, truncated to 128"] = evaluate(m, (Xte, Yte))
        for gc in ("weights", "activations"):
            for un in ("sum", "otfusion"):
                r = merging.merge(wide, narrow, method="ot_fusion", data=(Xtr, Ytr), ground_cost=gc, unmerge=un)
                assert tuple(r.state_dict["fc.0.weight"].shape) == (128, 64)
                res[f"OT fusion -> 128, {gc}, unmerge={un}"] = evaluate(r.model, (Xte, Yte))
                r = merging.merge(wide, narrow, method="ot_fusion", data=(Xtr, Ytr), ground_cost=gc, unmerge=un,
                                  weights=[1.0, 0.0])
                res[f"wide alone, OT -> 128, {gc}, unmerge={un}"] = evaluate(r.model, (Xte, Yte))
        for k, v in res.items():
            rows.setdefault(k, []).append(v)
        print(f"[widths] seed {s} done", file=sys.stderr, flush=True)
        print_widths(rows, seeds[:seeds.index(s) + 1])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--parts", nargs="+", default=["mlp", "cnn", "widths"])
    args = ap.parse_args()
    for arch in [p for p in args.parts if p in ("mlp", "cnn")]:
        same_width(arch, args.seeds, args.epochs)   # tables printed after every seed
    if "widths" in args.parts:
        widths(args.seeds, args.epochs)

if __name__ == "__main__":
    main()
