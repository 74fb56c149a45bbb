"""Benchmark of merging.solvers.linear_assignment on batches B x n x n (random uniform costs).

Compares, side by side in one run: a loop of SciPy ``linear_sum_assignment`` calls (the reference),
``linear_assignment(method="auto")``, the batched torch auction (``method="torch"``) on CPU and on CUDA
when available, and POT's batched solver ``ot.batch.solve_batch`` (POT >= 0.9.6; it is an entropic /
proximal-point OT solver, not an exact LAP; it is run as log-Sinkhorn with reg=1e-2 on the [0, 1] costs
and its objective gap n<T, M> - OPT is reported relative to OPT).

Usage::

    python benchmarks/bench_solvers.py            # n in {64, 256, 1024}, B in {1, 16, 128}
    python benchmarks/bench_solvers.py --quick    # n in {64, 256}, B in {1, 16}
    python benchmarks/bench_solvers.py --quick --schedules fast,legacy --no-pot   # before/after
    python benchmarks/bench_solvers.py --crossover  # threaded SciPy batch vs one thread, n x B grid
    python benchmarks/bench_solvers.py --emd        # S.emd batch: plain loop vs auto threads

``--schedules`` lists the torch auction schedules to run side by side (``fast``: the current default;
``legacy``: the previous one, ``auction_options={"schedule": "legacy"}``); for each one the torch
columns give the time, the ratio to the SciPy loop, and the auction's bidding rounds, certificate
sweeps and host synchronisations (``LinearAssignmentResult.stats``).

``auto`` runs SciPy on ``--threads`` threads for batches above ``THREAD_MIN_ENTRIES`` /
``THREAD_MIN_PROBLEM`` (``merging.solvers._threads``); ``--crossover`` prints the grid those thresholds come
from: time with one thread / time with ``--threads`` threads, per n and B.

Times are the best of ``--repeat`` runs (wall clock, ``torch.set_num_threads`` as given). Combinations
whose estimated time exceeds ``--budget`` seconds for a backend are skipped and marked ``skip``.
"""
from __future__ import annotations

import argparse
import platform
import time
import tracemalloc

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import merging.solvers as S
from merging.solvers._threads import n_workers  # the rule auto applies, reported in --crossover


POT_REG = 1e-2  # entropic reg of POT's batched log-Sinkhorn (costs are uniform in [0, 1])


def _best(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def _scipy_loop(C):
    return np.array([C[b][linear_sum_assignment(C[b])].sum() for b in range(C.shape[0])])


def _peak_tracemalloc(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _crossover(args):
    """Print time(workers=1) / time(workers=--threads) of a SciPy batch for a grid of n and B."""
    ns = [int(x) for x in args.ns.split(",")] if args.ns else [8, 16, 32, 48, 64, 128, 256]
    Bs = [int(x) for x in args.Bs.split(",")] if args.Bs else [2, 4, 16, 128]
    print(f"# machine: {platform.processor() or platform.machine()}; one thread / {args.threads} threads "
          "(> 1: threads win); * marks where auto threads")
    print("| n | " + " | ".join(f"B={B}" for B in Bs) + " |")
    print("|---" * (len(Bs) + 1) + "|")
    rng = np.random.default_rng(0)
    for n in ns:
        row = [str(n)]
        for B in Bs:
            C = rng.random((B, n, n))
            reps = max(1, int(2e6 // (B * n * n)))
            t1 = t2 = float("inf")
            for _ in range(args.repeat + 2):  # interleaved, best of
                t1 = min(t1, _best(lambda: [S.linear_assignment(C, workers=1) for _ in range(reps)], 1)[0])
                t2 = min(t2, _best(lambda: [S.linear_assignment(C, workers=args.threads) for _ in range(reps)],
                                   1)[0])
            auto = n_workers(None, B, n * n) > 1
            row.append(f"{t1 / t2:.2f}{'*' if auto else ''}")
        print("| " + " | ".join(row) + " |", flush=True)


def _emd_threads(args):
    """Print time of ``S.emd`` on a batch with ``workers=1`` vs the automatic rule (uniform marginals)."""
    print(f"# machine: {platform.processor() or platform.machine()}, torch threads {args.threads}")
    print("| B | n | emd, workers=1 (s) | emd, auto (s) | speed-up |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for B, n in [(16, 64), (16, 256), (64, 256)]:
        C = rng.random((B, n, n))
        t1 = t2 = float("inf")
        for _ in range(args.repeat):  # interleaved, best of
            t1 = min(t1, _best(lambda: S.emd(C, workers=1), 1)[0])
            t2 = min(t2, _best(lambda: S.emd(C), 1)[0])
        print(f"| {B} | {n} | {t1:.4f} | {t2:.4f} | {t1 / t2:.2f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=60.0, help="skip a backend predicted slower than this (s)")
    ap.add_argument("--schedules", default="fast", help="comma list of torch auction schedules: fast,legacy")
    ap.add_argument("--no-pot", action="store_true", help="skip POT's batched solver")
    ap.add_argument("--ns", default=None, help="comma list of sizes n (overrides --quick)")
    ap.add_argument("--Bs", default=None, help="comma list of batch sizes B (overrides --quick)")
    ap.add_argument("--crossover", action="store_true", help="only the threaded-SciPy crossover grid")
    ap.add_argument("--emd", action="store_true", help="only merging.solvers.emd: loop vs threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.crossover:
        return _crossover(args)
    if args.emd:
        return _emd_threads(args)
    ns = [64, 256] if args.quick else [64, 256, 1024]
    Bs = [1, 16] if args.quick else [1, 16, 128]
    ns = [int(x) for x in args.ns.split(",")] if args.ns else ns
    Bs = [int(x) for x in args.Bs.split(",")] if args.Bs else Bs
    scheds = [x.strip() for x in args.schedules.split(",") if x.strip()]
    try:
        import ot
        import ot.batch  # noqa: F401
        pot = f"ot.batch.solve_batch (POT {ot.__version__})"
    except Exception:  # pragma: no cover - depends on the environment
        ot, pot = None, "absent"
    if args.no_pot:
        ot, pot = None, "not run (--no-pot)"
    cuda = torch.cuda.is_available()
    print(f"# machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if cuda else 'no'}; POT batched: {pot}")
    tcols = "".join(f" torch {k} CPU (s) | {k}/scipy | {k} rounds | {k} sweeps | {k} syncs |" for k in scheds)
    head = ("| B | n | scipy loop (s) | auto (s) | auto/scipy |" + tcols + " fallbacks |"
            " max rel gap torch | POT batch (s) | POT rel gap | scipy peak MiB | torch CUDA (s) | CUDA/scipy |"
            " CUDA peak MiB | auto, CUDA input (s) | auto CUDA-in/scipy |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    rng = np.random.default_rng(0)
    torch_rate = {k: None for k in scheds}  # s per (B * n^2) of the previous run, for skip predictions
    for n in ns:
        for B in Bs:
            C = rng.random((B, n, n))
            Ct = torch.from_numpy(C)
            t_sp = t_auto = float("inf")
            for _ in range(args.repeat):  # interleaved, best of: the CPU is shared and noisy
                t, ref = _best(lambda: _scipy_loop(C), 1)
                t_sp = min(t_sp, t)
                t, ra = _best(lambda: S.linear_assignment(C, method="auto"), 1)
                t_auto = min(t_auto, t)
            peak = _peak_tracemalloc(lambda: _scipy_loop(C)) / 2**20
            assert np.allclose(ra.objective, ref, rtol=1e-12)
            row = [str(B), str(n), f"{t_sp:.4f}", f"{t_auto:.4f}", f"{t_auto / t_sp:.2f}"]
            fb, gap = 0, 0.0
            for k in scheds:
                rate = torch_rate[k]
                pred = None if rate is None else rate * B * n * n * (n / 64) ** 0.5
                if pred is not None and pred > args.budget:
                    row += ["skip", "-", "-", "-", "-"]
                    continue
                opts = {"schedule": k}
                t_to, rt = _best(lambda: S.linear_assignment(Ct, method="torch", auction_options=opts), 1)
                torch_rate[k] = t_to / (B * n * n * (n / 64) ** 0.5)
                gap = max(gap, float(np.max(np.abs(rt.objective.numpy() - ref) / np.abs(ref))))
                fb += rt.n_fallback
                st = rt.stats
                row += [f"{t_to:.3f}", f"{t_to / t_sp:.1f}", str(st.rounds), str(st.cert_sweeps), str(st.syncs)]
            row += [str(fb), f"{gap:.1e}"]
            if ot is not None and B * n * n <= 2 ** 20:
                Mt = torch.from_numpy(C)
                t_pot, rp = _best(lambda: ot.batch.solve_batch(Mt, reg=POT_REG, max_iter=1000, tol=1e-5,
                                                               method="log_sinkhorn"), 1)
                val = n * np.asarray(rp.value_linear, dtype=float)
                row += [f"{t_pot:.3f}", f"{np.max(np.abs(val - ref) / ref):.1e}"]
            else:
                row += ["skip" if ot is not None else "absent", "-"]
            row.append(f"{peak:.1f}")
            if cuda:
                Cg = Ct.cuda()
                S.linear_assignment(Cg[:1], method="torch")  # warm-up
                torch.cuda.reset_peak_memory_stats()
                t_cu, rc = _best(lambda: S.linear_assignment(Cg, method="torch"), args.repeat)
                assert np.allclose(rc.objective.cpu().numpy(), ref, rtol=1e-9)
                row += [f"{t_cu:.4f}", f"{t_cu / t_sp:.2f}", f"{torch.cuda.max_memory_allocated() / 2**20:.1f}"]
                # what a user holding CUDA costs gets from auto: copy to host, threaded SciPy, copy back
                t_ac, rac = _best(lambda: S.linear_assignment(Cg, method="auto"), args.repeat)
                assert np.allclose(rac.objective.cpu().numpy(), ref, rtol=1e-12)
                row += [f"{t_ac:.4f}", f"{t_ac / t_sp:.2f}"]
            else:
                row += ["n/a", "-", "-", "n/a", "-"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
