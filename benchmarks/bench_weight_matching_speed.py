"""Weight matching speed: merging.weight_matching against a straightforward per-layer torch + SciPy
implementation of the same algorithm (Git Re-Basin Alg. 1 as in the reference code), side by side.

Models (two independent initialisations each): an MLP 64-2048x3-10, an MLP 64-512x8-10 and ResNet-20
x8 (LayerNorm-free, BatchNorm statistics do not vote). Both implementations start from the identity,
use the same seeded group order per sweep and stop after a sweep without improvement (the baseline)
or when no group is dirty (ours). Runs are interleaved (baseline, ours, baseline, ours, ...) on the
shared machine; medians and the ratio of medians are reported, with both objectives.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_weight_matching_speed --repeats 3
    OMP_NUM_THREADS=2 python -m benchmarks.bench_weight_matching_speed --also-full   # + ours with steps="full"
    python -m benchmarks.bench_weight_matching_speed --device cuda     # GPU costs (numbers where a GPU is lent)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment

import weightspace as ws
from merging import _wm_core as core
from merging.weight_matching import match_weights
from weightspace import zoo
from weightspace.state import state_of


def baseline(spec, A, B, keys, seed=0, max_iter=100, device="cpu"):
    """Per-layer reference: rebuild every cost from scratch with gathers on every axis, SciPy LAP, stop
    after a full sweep without improvement (samuela/git-re-basin ``weight_matching`` in torch)."""
    perm_to_axes, axes_to_perm = spec.to_rebasin()
    keys = set(keys)
    A = {k: A[k].to(device=device, dtype=torch.float32) for k in keys}
    B = {k: B[k].to(device=device, dtype=torch.float32) for k in keys}
    perm = {p: torch.arange(n, device=device) for p, n in spec.groups.items()}
    names = list(spec.groups)
    g = torch.Generator().manual_seed(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        progress = False
        for i in torch.randperm(len(names), generator=g).tolist():
            p = names[i]
            n = spec.groups[p]
            C = torch.zeros(n, n, device=device)
            for wk, axis in perm_to_axes[p]:
                if wk not in keys:
                    continue
                w_b = B[wk]
                for ax, q in enumerate(axes_to_perm[wk]):
                    if ax != axis and q is not None:
                        w_b = w_b.index_select(ax, perm[q])
                wa = A[wk].movedim(axis, 0).reshape(n, -1)
                wb = w_b.movedim(axis, 0).reshape(n, -1)
                C += wa @ wb.T
            Cn = C.double().cpu().numpy()
            ri, ci = linear_sum_assignment(Cn, maximize=True)
            old = Cn[range(n), perm[p].cpu().numpy()].sum()
            new = Cn[ri, ci].sum()
            progress = progress or new > old + 1e-12
            perm[p] = torch.as_tensor(ci, device=device)
        if not progress:
            break
    return {p: v.cpu() for p, v in perm.items()}, sweeps


CASES = {
    "mlp-2048x3": lambda s: zoo.make("mlp", hidden=(2048,) * 3, seed=s),
    "mlp-512x8": lambda s: zoo.make("mlp", hidden=(512,) * 8, seed=s),
    "resnet20x8": lambda s: zoo.make("resnet20", width=8, seed=s),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--also-full", action="store_true", help="also time ours with steps='full' (no local steps)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = []
    for name in args.cases.split(","):
        a, b = CASES[name](0), CASES[name](1)
        spec = ws.permutation_spec(a, zoo.example_inputs(a))
        names = [k for k, _ in a.named_parameters()]
        sa, sb = state_of(a), state_of(b)
        keys = core.matched_keys(spec, sa, names)
        prob = core.build_problem(spec, sa, sb, keys=keys, dtype=torch.float64, device="cpu")
        tb, to, ob, oo, sw_b, sw_o, cb, co, tf = [], [], [], [], [], [], [], [], []
        for r in range(args.repeats):
            seed = r
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            pb, nb = baseline(spec, sa, sb, keys, seed=seed, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            tb.append(time.perf_counter() - t0)
            cb.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            aln = match_weights(spec, sa, sb, seed=seed, param_names=names, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            to.append(time.perf_counter() - t0)
            co.append(time.process_time() - c0)
            if args.also_full:
                t0 = time.perf_counter()
                full = match_weights(spec, sa, sb, seed=seed, param_names=names, device=dev, steps="full")
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                tf.append(time.perf_counter() - t0)
                print(f"{name} rep {r}: ours steps='full' {tf[-1]:.2f}s obj {full.objective:.2f} "
                      f"({full.log['restarts'][0]['n_assignments']} LAPs)", flush=True)
            ob.append(core.objective(prob, pb))
            oo.append(core.objective(prob, aln.permutations))
            sw_b.append(nb)
            sw_o.append(len(aln.log["restarts"][0]["sweeps"]))
            print(
                f"{name} rep {r}: baseline {tb[-1]:.2f}s (CPU {cb[-1]:.2f}s) obj {ob[-1]:.2f} ({nb} sweeps) | "
                f"ours {to[-1]:.2f}s (CPU {co[-1]:.2f}s) "
                f"obj {oo[-1]:.2f} ({sw_o[-1]} sweeps, {aln.log['restarts'][0]['n_assignments']} LAPs, "
                f"{aln.log['restarts'][0].get('n_local_steps', 0)} local steps)",
                flush=True,
            )
        mb, mo = statistics.median(tb), statistics.median(to)
        rel = (statistics.median(oo) - statistics.median(ob)) / abs(statistics.median(ob))
        cpu = statistics.median(cb) / statistics.median(co)
        full_x = f"{mb / statistics.median(tf):.2f}x" if tf else "-"
        rows.append((name, mb, mo, mb / mo, cpu, full_x, statistics.median(ob), statistics.median(oo), rel))
    print()
    print("| model | baseline (s) | ours (s) | speed-up | CPU-time ratio | speed-up, steps='full' | baseline objective "
          "| our objective | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, mb, mo, sp, cpu, fx, ob_, oo_, rel in rows:
        print(
            f"| {n} | {mb:.2f} | {mo:.2f} | {sp:.2f}x | {cpu:.2f}x | {fx} | {ob_:.2f} | {oo_:.2f} | {rel * 100:+.2f}% |"
        )


if __name__ == "__main__":
    main()
