"""Benchmark: path-norm cost relative to a forward pass, and Hessian sharpness cost, on sklearn digits.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_pathnorm.py [--repeats 20] [--baseline FILE]

Models use random weights (timings do not depend on training). Prints Markdown tables.
``--baseline FILE`` also times the ``path_norm`` of another implementation loaded from a .py file (e.g. the
former torch.fx version: ``git show 7eb2d75:analysis/pathnorm.py > /tmp/pathnorm_fx.py``) and checks that
both give the same value where the baseline can handle the model.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import analysis
from weightspace import zoo


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
    ap.add_argument("--baseline", default=None, help="a .py file defining path_norm (e.g. the torch.fx version)")
    args = ap.parse_args(argv)
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("pathnorm_baseline", args.baseline)
        base = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = base  # dataclasses look their module up there
        spec.loader.exec_module(base)
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
    resnet = zoo.make("resnet20", norm="batch", seed=args.seed).eval()
    vgg = zoo.make("vgg", batch_norm=True, seed=args.seed).eval()
    for m in list(resnet.modules()) + list(vgg.modules()):
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    X4 = X.reshape(-1, 1, 8, 8)
    inputs = {"MLP 64-128-128-10": (mlp, X), "CNN (2 conv+BN+maxpool, fc)": (cnn, X4),
              "zoo mlp (control flow in forward)": (zoo.make("mlp", seed=args.seed).eval(), X4),
              "zoo vgg, batch_norm=True": (vgg, X4), "zoo resnet20, norm=batch": (resnet, X4)}

    rows = []
    for name, (model, data) in inputs.items():
        with torch.no_grad():
            t_f1 = _time(lambda: model(data[:1]), args.repeats)
            t_f1000 = _time(lambda: model(data), args.repeats)
        for q in (1, 2):
            t_pn = _time(lambda: analysis.path_norm(model, data[:1], q=q), args.repeats)
            res = analysis.path_norm(model, data[:1], q=q)
            t_base = "-"
            if base is not None:
                try:
                    ref = base.path_norm(model, data[:1], q=q)
                    assert math.isclose(ref.log_value, res.log_value, rel_tol=1e-10, abs_tol=1e-10), (ref, res)
                    t_base = f"{_time(lambda: base.path_norm(model, data[:1], q=q), args.repeats) * 1e3:.2f}"
                except Exception as exc:  # noqa: BLE001 - the baseline may not handle the model
                    t_base = f"fails ({type(exc).__name__})"
            rows.append((name, q, t_pn * 1e3, t_base, t_f1 * 1e3, t_f1000 * 1e3, t_pn / t_f1, t_pn / t_f1000,
                         res.value))

    print("| model | q | path_norm (ms) | baseline (ms) | forward 1 sample (ms) | forward 1000 (ms) | ratio vs 1 | "
          "ratio vs 1000 | value |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.0f}x | {r[7]:.1f}x | "
              f"{r[8]:.4g} |")

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
