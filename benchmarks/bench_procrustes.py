"""TinyViT pairs on digits: naive averaging vs weight matching (permutations) vs weight matching with
per-head orthogonal Procrustes (``attention="procrustes"``, Zhang et al. 2025, arXiv:2502.00264).

Per seed pair two TinyViTs (8x8 digits, 2x2 patches, ``--dim`` wide, ``--heads`` heads, ``--depth``
blocks) are trained from different initialisations and data orders (Adam 2e-3, cosine). B is aligned to A
and the test loss/accuracy is measured along the straight line ``alpha in {0, .25, .5, .75, 1}``
(``analysis.interpolate``); the table gives the midpoint loss, the chord barrier, the midpoint
accuracy, the weight-matching objective and the alignment time, side by side in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_procrustes --pairs 3 --epochs 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import analysis
import merging
from weightspace import zoo

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _train(seed, train, epochs, dim, heads, depth):
    m = zoo.make("vit", dim=dim, heads=heads, depth=depth, seed=seed)
    zoo.train(m, train, epochs=epochs, lr=2e-3, schedule="cosine", seed=seed, device="cpu")
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    train, test = zoo.load_digits("train", flat=False), zoo.load_digits("test", flat=False)
    x = train[0][:8]
    rows = {"naive": [], "permutation": [], "procrustes_vo": [], "procrustes (descent heads)": [], "procrustes": []}
    for p in range(args.pairs):
        sa, sb = 2 * p, 2 * p + 1
        t0 = time.perf_counter()
        a = _train(sa, train, args.epochs, args.dim, args.heads, args.depth)
        b = _train(sb, train, args.epochs, args.dim, args.heads, args.depth)
        print(f"pair {p}: trained in {time.perf_counter() - t0:.0f}s", flush=True)
        ends = analysis.interpolate(a, b, test, alphas=[0.0, 1.0], device="cpu")
        perm_aln = None
        for name in rows:
            t0 = time.perf_counter()
            info = ""
            if name == "naive":
                bp, obj = b, float("nan")
            elif name == "procrustes (descent heads)":  # ablation: rotations without the head re-matching
                bp, obj = _no_rematch(a, b, perm_aln)
            else:
                kw = {} if name == "permutation" else {"attention": name}
                aln = merging.align(a, b, method="weight_matching", example_inputs=x, device="cpu", seed=0, **kw)
                bp, obj = aln.apply(b), aln.objective
                if name == "permutation":
                    perm_aln = aln
                else:
                    pl = aln.log["procrustes"]
                    info = f"rotated {pl['heads_rotated']} heads, re-matched {len(pl['heads_rematched'])} blocks"
            secs = time.perf_counter() - t0
            c = analysis.interpolate(a, bp, test, alphas=ALPHAS, device="cpu")
            losses = [float(v) for v in next(iter(c.values.values()))["loss"]]
            rows[name].append(
                {
                    "barrier": c.barrier("loss", kind="chord").value,
                    "mid_loss": _at(c, "loss", 0.5),
                    "mid_acc": _at(c, "accuracy", 0.5),
                    "objective": obj,
                    "seconds": secs,
                    "info": info,
                    "losses": losses,
                }
            )
            print(
                f"  {name:12s} mid loss {rows[name][-1]['mid_loss']:.4f} barrier {rows[name][-1]['barrier']:.4f} "
                f"mid acc {rows[name][-1]['mid_acc']:.4f} objective {obj:.4g} ({secs:.1f}s) {info}",
                flush=True,
            )
        print(
            f"  endpoints: loss {_at(ends, 'loss', 0.0):.4f} / {_at(ends, 'loss', 1.0):.4f}, "
            f"acc {_at(ends, 'accuracy', 0.0):.4f} / {_at(ends, 'accuracy', 1.0):.4f}",
            flush=True,
        )

    def ms(vals, fmt="{:.3f}"):
        if any(v != v for v in vals):  # nan: no objective for naive averaging
            return "-"
        if len(vals) == 1:
            return fmt.format(vals[0])
        return (fmt + " ± " + fmt).format(statistics.mean(vals), statistics.stdev(vals))

    print(f"\nTinyViT dim {args.dim}, {args.heads} heads, depth {args.depth}, {args.epochs} epochs, {args.pairs} pairs")
    print("| alignment | midpoint test loss | chord barrier (nats) | midpoint acc | WM objective | align s |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        print(
            f"| {name} | {ms([r['mid_loss'] for r in rs])} | {ms([r['barrier'] for r in rs])} | "
            f"{ms([100 * r['mid_acc'] for r in rs], '{:.1f}')}% | {ms([r['objective'] for r in rs], '{:.1f}')} | "
            f"{ms([r['seconds'] for r in rs], '{:.1f}')} |"
        )
    for name, rs in rows.items():
        print(name, "per pair mid loss:", ", ".join(f"{r['mid_loss']:.4f}" for r in rs))


def _no_rematch(a, b, perm_aln):
    """Procrustes rotations on the descent's head matching (no re-matching): the ablation row."""
    from merging import _procrustes as pr
    from merging._wm_core import matched_keys
    from weightspace.state import state_of

    spec, sa, sb = perm_aln.spec, state_of(a), state_of(b)
    keys = matched_keys(spec, sa, [k for k, _ in a.named_parameters()])
    blocks, rot = pr.attention_blocks(spec, keys)
    perms, R, _ = pr.solve_heads(spec, sa, sb, perm_aln.permutations, blocks, rotate=rot, rematch=False)
    aln = pr.RotatedAlignment(
        spec=spec, permutations=perms, objective=0.0, rotations=R, heads=pr.heads_info(blocks, rot)
    )
    bs = aln.apply(sb)
    obj = sum(float((sa[k].double() * bs[k].double()).sum()) for k in keys)
    return aln.apply(b), obj


def _at(curve, metric, alpha):
    """The metric at ``alpha`` on the curve's first split."""
    i = int(abs(curve.alphas - alpha).argmin())
    return float(next(iter(curve.values.values()))[metric][i])


if __name__ == "__main__":
    main()
