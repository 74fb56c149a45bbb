"""Benchmark: path-norm cost relative to a forward pass, and Hessian sharpness cost, on sklearn digits.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_pathnorm.py [--repeats 20]

Models use random weights (timings do not depend on training). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import analysis


def _time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    digits = load_digits()
    X = torch.tensor(digits.data[:1000] / 16.0, dtype=torch.float32)
    Y = torch.tensor(digits.target[:1000], dtype=torch.long)

    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 2 * 2, 10)).eval()
    with torch.no_grad():
        for m in cnn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    inputs = {"MLP 64-128-128-10": (mlp, X), "CNN (2 conv+BN+maxpool, fc)": (cnn, X.reshape(-1, 1, 8, 8))}

    rows = []
    for name, (model, data) in inputs.items():
        with torch.no_grad():
            t_f1 = _time(lambda: model(data[:1]), args.repeats)
            t_f1000 = _time(lambda: model(data), args.repeats)
        for q in (1, 2):
            t_pn = _time(lambda: analysis.path_norm(model, data[:1], q=q), args.repeats)
            val = analysis.path_norm(model, data[:1], q=q).value
            rows.append((name, q, t_pn * 1e3, t_f1 * 1e3, t_f1000 * 1e3, t_pn / t_f1, t_pn / t_f1000, val))

    print("| model | q | path_norm (ms) | forward 1 sample (ms) | forward 1000 (ms) | ratio vs 1 | ratio vs 1000 | value |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.0f}x | {r[6]:.1f}x | {r[7]:.4g} |")

    reps = max(3, args.repeats // 5)
    with torch.no_grad():
        t_f = _time(lambda: mlp(X), reps)
    t_eig = _time(lambda: analysis.hessian_eigenvalues(mlp, (X, Y), k=1), reps)
    eig = analysis.hessian_eigenvalues(mlp, (X, Y), k=1)
    t_tr = _time(lambda: analysis.hessian_trace(mlp, (X, Y), n_samples=50), reps)
    tr = analysis.hessian_trace(mlp, (X, Y), n_samples=50)
    print()
    print("| MLP, 1000 digits, CE loss | time (s) | result | iterations / HVPs |")
    print("|---|---|---|---|")
    print(f"| top-1 Hessian eigenvalue (Lanczos, tol 1e-3) | {t_eig:.3f} | {eig.eigenvalues[0]:.5g} "
          f"(converged={eig.converged}) | {eig.n_iter} |")
    print(f"| Hutchinson trace, 50 Rademacher samples | {t_tr:.3f} | {tr.mean:.5g} +- {tr.std_error:.2g} | 50 |")
    print(f"| (one forward pass on the 1000 digits) | {t_f:.4f} | | |")
    print(f"\nparams: MLP {sum(p.numel() for p in mlp.parameters())}, CNN {sum(p.numel() for p in cnn.parameters())}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
