"""Work counts of the torch auction's ``"fast"`` schedule (the CUDA default) under two settings.

On a GPU the fast schedule's time is dominated by its sequential steps: bidding rounds (each a chain
of ~25 small kernels), Bellman-Ford certificate sweeps (a few dense ``(B, n, n)`` passes each) and
host synchronisations. Those counts are deterministic, so they can be compared on any machine. This
script runs ``auction_square(C, schedule="fast", **setting)`` on random uniform float64 costs for
several seeds and prints, per size, the mean counts and

    proxy = 25 * rounds + 4 * sweeps + 4 * syncs      (~ kernel launches; not a time)

for the previous defaults (``sinkhorn_reg=1e-2, sinkhorn_iters=30, eps0=1e-3``) and the current
ones, the proxy change and on how many seeds the current setting is lower. Every problem is also
solved with SciPy: a certified answer that costs more than the optimum would be reported (none may).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_auction_counts.py                  # (16,256), (128,64): 10 seeds;
    (128,256): 2
    OMP_NUM_THREADS=2 python benchmarks/bench_auction_counts.py --sizes 16x256 --seeds 3
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from merging.solvers._auction import auction_square

SETTINGS = {
    "previous defaults (reg 1e-2, 30 iters, eps0 1e-3)": {"sinkhorn_reg": 1e-2, "sinkhorn_iters": 30, "eps0": 1e-3},
    "current defaults (reg 3e-3, 100 iters, eps0 1e-4)": {},
}


def counts(B: int, n: int, seed: int, kw: dict):
    C = torch.rand(B, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sigma, cert, st = auction_square(C, schedule="fast", **kw)
    Cn, s = C.numpy(), sigma.numpy()
    wrong = 0
    for b in range(B):
        r, c = linear_sum_assignment(Cn[b])
        if cert[b] and Cn[b][np.arange(n), s[b]].sum() > Cn[b][r, c].sum() * (1 + 1e-12):
            wrong += 1
    return dict(rounds=st.rounds, sweeps=st.cert_sweeps, syncs=st.syncs, certified=st.n_certified,
                proxy=25 * st.rounds + 4 * st.cert_sweeps + 4 * st.syncs, wrong=wrong)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16x256:10,128x64:10,128x256:2",
                    help="comma list of BxN[:seeds]; seeds default to --seeds")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| B | n | seeds | setting | rounds | sweeps | syncs | certified | proxy (mean) | vs previous | "
          "lower on seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for item in args.sizes.split(","):
        size, _, k = item.partition(":")
        B, n = (int(x) for x in size.lower().split("x"))
        seeds = range(int(k) if k else args.seeds)
        res = {name: [counts(B, n, s, kw) for s in seeds] for name, kw in SETTINGS.items()}
        base = [r["proxy"] for r in res[next(iter(SETTINGS))]]
        for name, rs in res.items():
            assert all(r["wrong"] == 0 for r in rs), "a certified answer was not optimal"
            mean = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
            lower = sum(r["proxy"] < b for r, b in zip(rs, base))
            print(f"| {B} | {n} | {len(rs)} | {name} | {mean('rounds'):.0f} | {mean('sweeps'):.0f} | "
                  f"{mean('syncs'):.0f} | {sum(r['certified'] for r in rs)}/{B * len(rs)} | {mean('proxy'):.0f} | "
                  f"{100 * (mean('proxy') / statistics.mean(base) - 1):+.1f}% | {lower}/{len(rs)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
