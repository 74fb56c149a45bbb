"""Information-plane trajectories of a narrow MLP on digits, with binning and KDE estimators.

An offline adaptation of Shwartz-Ziv & Tishby (2017, arXiv:1703.00810): their 12-bit synthetic task
and 12-10-7-5-4-3-2 tanh net become scikit-learn's 8x8 digits (64 inputs, 10 classes) and a
64-12-10-7-5-4-3-10 net with a softmax output. The net trains with minibatch SGD (Adam) on the fixed
1,200-image train split; ``I(X;T)`` and ``I(T;Y)`` of every layer are measured on all 1,797 images at
log-spaced epochs with

* binning: 30 equal-width bins on [-1, 1] for tanh and [0, 1] for softmax (``binning="auto"``),
  the observed data range ("adaptive") for ReLU layers;
* binning-q: 30 equal-mass (quantile) bins per layer, a control for the range choice;
* KDE: Kolchinsky-Tracey upper bound with noise variance ``sigma2`` (nats).

Saxe et al. (2018, ICLR) argue that the "compression phase" comes from tanh saturation seen through
binning, and vanishes with ReLU; ``--activation relu`` runs that control.

Compression (per layer): ``peak = max_e I(X;T)``, ``final`` = mean of the last 10% of the records;
compression iff the peak precedes that window and ``peak - final > 5% of peak``
(``InformationPlaneTracker.compression``).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_infoplane.py [--epochs 2000] [--seeds 0 1 2]
      [--activation tanh relu] [--sigma2 0.1]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import analysis  # noqa: E402
from weightspace.zoo.data import load_digits  # noqa: E402

WIDTHS = (64, 12, 10, 7, 5, 4, 3)


def make_net(act: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        mods += [nn.Linear(a, b), nn.Tanh() if act == "tanh" else nn.ReLU()]
    mods += [nn.Linear(WIDTHS[-1], 10), nn.Softmax(dim=1)]
    return nn.Sequential(*mods)


def record_epochs(total: int, n: int) -> list:
    return sorted({0, total} | {int(round(v)) for v in np.geomspace(1, total, n)})


def run(act: str, seed: int, epochs: int, n_records: int, sigma2: float, lr: float, batch: int):
    xtr, ytr = load_digits("train")
    xall, yall = load_digits("all")
    net = make_net(act, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    trackers = {"binning": analysis.InformationPlaneTracker(estimator="binning", bins=30),
                "binning-q": analysis.InformationPlaneTracker(estimator="binning", bins=30, binning="quantile"),
                "kde": analysis.InformationPlaneTracker(estimator="kde", sigma2=sigma2, units="bits")}
    rec = set(record_epochs(epochs, n_records))
    t_mi = 0.0
    for epoch in range(epochs + 1):
        if epoch in rec:
            t0 = time.perf_counter()
            for tr in trackers.values():
                tr.update(epoch, net, (xall, yall))
            t_mi += time.perf_counter() - t0
        if epoch == epochs:
            break
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.nll_loss(torch.log(net(xtr[idx]).clamp_min(1e-12)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc_tr = float((net(xtr).argmax(1) == ytr).float().mean())
        xte, yte = load_digits("test")
        acc_te = float((net(xte).argmax(1) == yte).float().mean())
    return trackers, acc_tr, acc_te, t_mi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2000)
    ap.add_argument("--records", type=int, default=40, help="log-spaced measurement epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--activation", nargs="+", default=["tanh", "relu"], choices=["tanh", "relu"])
    ap.add_argument("--sigma2", type=float, default=0.1, help="KDE noise variance")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rel", type=float, default=0.05, help="relative drop threshold for compression")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    print(f"digits, {'-'.join(map(str, WIDTHS))}-10 softmax, Adam lr={args.lr}, batch={args.batch}, "
          f"{args.epochs} epochs on 1200 train images; MI on all 1797 at "
          f"{len(record_epochs(args.epochs, args.records))} "
          "log-spaced epochs; binning 30 bins ('auto' ranges), binning-q 30 quantile bins, KDE upper bound "
          f"sigma2={args.sigma2}; units: bits; "
          f"compression = peak precedes last 10% of records and drop > {args.rel:.0%} of peak\n")
    summary = []
    for act in args.activation:
        for seed in args.seeds:
            t0 = time.perf_counter()
            trackers, acc_tr, acc_te, t_mi = run(act, seed, args.epochs, args.records, args.sigma2, args.lr, args.batch)
            print(f"### {act}, seed {seed}: train acc {acc_tr:.3f}, test acc {acc_te:.3f}, "
                  f"{time.perf_counter() - t0:.0f} s ({t_mi:.0f} s estimating MI)\n")
            print("| layer | width | estimator | I(X;T) ep 0 | peak (epoch) | final | drop | compressed | I(T;Y) final "
                  "|")
            print("|---|---|---|---|---|---|---|---|---|")
            for est, tr in trackers.items():
                comp = tr.compression(rel_threshold=args.rel, final_fraction=0.1)
                for li, (layer, traj) in enumerate(tr.trajectories.items()):
                    c = comp[layer]
                    width = (list(WIDTHS[1:]) + [10])[li]
                    print(f"| {layer} | {width} | {est} | {traj['i_xt'][0]:.3f} | {c['peak']:.3f} ({c['peak_epoch']}) "
                          "| "
                          f"{c['final']:.3f} | {c['drop']:.3f} | {'yes' if c['compressed'] else 'no'} | "
                          f"{traj['i_ty'][-1]:.3f} |")
                    summary.append((act, seed, est, layer, c["compressed"]))
            print()
    print("### compressed layers per run (of 7)\n")
    print("| activation | seed | binning | binning-q | kde |")
    print("|---|---|---|---|---|")
    for act in args.activation:
        for seed in args.seeds:
            n = {e: sum(1 for a, s, ee, _, c in summary if a == act and s == seed and ee == e and c)
                 for e in ("binning", "binning-q", "kde")}
            print(f"| {act} | {seed} | {n['binning']} | {n['binning-q']} | {n['kde']} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; log2(1797) = {math.log2(1797):.3f} bits, H(Y) ~ 3.32 bits")


if __name__ == "__main__":
    main()
