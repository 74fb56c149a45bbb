"""Weight-space processors on the toolkit's own data sets: accuracy prediction on the digits CNN zoo
(Kendall tau) and classification of digits SIREN INRs (accuracy), plus throughput.

Processors: FlatMLP, StatNN, DWS, NFN-NP, NFN-HNP, NFT, UNF (dense, one architecture: the zoo's
fixed-architecture part, the INRs' SIREN) and GraphProcessor / RelationalTransformer (neural graphs;
the ``--mixed`` row also trains the graph processor on the mixed-architecture part). Each parameter tensor is divided
by its
train-split standard deviation (one scalar per key, so no symmetry is broken; without it the SIREN
hidden weights, ~0.02, leave the dense processors at chance). Every processor gets the same split, epochs, batch size,
optimiser and hidden width; each seed changes the processor's
initialisation and batch order (splits are fixed). DWS takes MLPs only, so it has no zoo number.

INR task: each key minus its train-split mean, divided by its std (``wsnn.weight_statistics``; the
std-only scaling turned the head bias into a constant ~11 channel), the dense equivariant processors
standardise their pooled invariant features (``feature_norm=True``; shared-initialisation INRs pool
to features that differ by a few percent between INRs, and the raw readout stayed at the majority
class even on 100 training INRs), and 200 INRs of the train split are a validation split whose best
epoch is restored (``monitor="eval_accuracy"``); the test split is scored once. ``--inr-legacy-norm``
restores the earlier setting for comparison.

    python benchmarks/bench_processors.py                       # defaults below (the RESULTS.md run)
    python benchmarks/bench_processors.py --quick               # a smoke run (tiny data, 2 epochs)
    torchrun --nproc_per_node 2 benchmarks/bench_processors.py --only GraphProcessor   # DDP (gloo on CPU)
    python benchmarks/bench_processors.py --tasks zoo --only StatNN-GBT   # gradient-boosted trees on the statistics

Data sets are generated on first use and cached (``$WEIGHTSPACE_CACHE`` or ``~/.cache/weightspace``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import weightspace as ws  # noqa: E402
from weightspace import nn as wsnn  # noqa: E402
from weightspace import zoo  # noqa: E402

DENSE = ["FlatMLP", "StatNN", "DWS", "NFN-NP", "NFN-HNP", "NFT", "UNF"]
GRAPH = ["GraphProcessor", "RelationalTransformer"]


def _bar(desc):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        return None, lambda d, t: None
    bar = tqdm(desc=desc, unit="net", leave=False)

    def cb(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, cb


def make(name, spec, out, hidden, seed, feature_norm=False):
    """One processor of the table. ``feature_norm`` (the INR runs) standardises the pooled features of the
    dense equivariant processors before the head (StatNN already standardises its statistics)."""
    torch.manual_seed(seed)
    kw = dict(hidden_channels=hidden, num_layers=2, out_features=out)
    fn = dict(feature_norm=True) if feature_norm else {}
    if name == "FlatMLP":
        return wsnn.FlatMLP(spec, **kw)
    if name == "StatNN":
        return wsnn.StatNN(spec, **kw)
    if name == "DWS":
        return wsnn.DWSNet(spec, **kw, **fn)
    if name in ("NFN-NP", "NFN-HNP"):
        return wsnn.NFN(spec, variant=name[4:], **kw, **fn)
    if name == "NFT":
        return wsnn.NFT(spec, **kw, **fn)
    if name == "UNF":  # UNF's own default, kernel positions permuted (with fixed_axes="dense" it is NFN-HNP exactly)
        return wsnn.UNF(spec, fixed_axes="permuted", **kw, **fn)
    if name == "GraphProcessor":
        return wsnn.GraphProcessor(out, hidden_channels=2 * hidden, num_layers=3)
    if name == "RelationalTransformer":
        return wsnn.RelationalTransformer(out, hidden_channels=2 * hidden, num_layers=2, num_heads=4)
    raise ValueError(name)


class Task:
    """One data set: dense batch + graphs + targets + fixed split."""

    def __init__(self, name, z, targets, task, train_idx, test_idx, normalize=True, center=False, val_idx=None):
        self.train_idx, self.test_idx, self.val_idx = train_idx, test_idx, val_idx
        if center:  # INRs: one mean and one std per key over the training networks (wsnn.weight_statistics)
            stats = wsnn.weight_statistics([z.states[i] for i in train_idx])
            z = zoo.ModelZoo(
                tuple(wsnn.standardize_states(z.states, stats)),
                z.metadata,
                z.settings,
                z.log + ("benchmark: each key minus its train-split mean, divided by its std",),
                z.builder,
            )
        elif normalize:  # one scale per tensor key (the train split's std): a scalar per key keeps every symmetry
            keys = list(z.states[0])
            std = {k: torch.stack([z.states[i][k] for i in train_idx]).std().clamp(min=1e-12) for k in keys}
            z = zoo.ModelZoo(
                tuple({k: v / std[k] for k, v in sd.items()} for sd in z.states),
                z.metadata,
                z.settings,
                z.log + ("benchmark: each key divided by its train-split std",),
                z.builder,
            )
        self.name, self.z, self.y, self.task = name, z, targets, task
        m = z.model(train_idx[0])
        x = m.example_input()
        self.spec = ws.permutation_spec(m, x)
        self.dense = wsnn.WeightSpaceBatch.from_state_dicts(list(z.states), self.spec)
        self.graphs = z.graphs()
        self.out = 10 if task == "classification" else 1

    def inputs(self, kind, idx):
        return [int(i) for i in idx] if kind == "dense" else [self.graphs[int(i)] for i in idx]

    def collate(self, kind):
        return (lambda items: self.dense.select(items)) if kind == "dense" else ws.NeuralGraph.batch

    def score(self, pred, idx):
        y = self.y[idx]
        if self.task == "classification":
            return float((pred.argmax(-1) == y).float().mean())
        return wsnn.kendall_tau(pred[:, 0], y)


def stat_gbt(task, seed):
    """Unterthiner et al.'s strongest StatNN variant: gradient-boosted trees on the 7 statistics of every
    tensor (42 for the zoo CNN); the number of trees is chosen on the validation split."""
    from sklearn.ensemble import GradientBoostingRegressor

    if task.task != "regression" or task.val_idx is None:
        return None, "StatNN-GBT: regression tasks with a validation split only (the zoo)"

    feats = wsnn.StatFeatures(task.dense.keys)(task.dense).numpy()
    y = task.y.numpy()
    t0 = time.perf_counter()
    gbt = GradientBoostingRegressor(n_estimators=600, learning_rate=0.05, max_depth=3, subsample=0.8, random_state=seed)
    gbt.fit(feats[task.train_idx], y[task.train_idx])
    val = [wsnn.kendall_tau(torch.tensor(p), task.y[task.val_idx]) for p in gbt.staged_predict(feats[task.val_idx])]
    best = int(torch.tensor(val).argmax())
    pred = list(gbt.staged_predict(feats[task.test_idx]))[best]
    note = f"{time.perf_counter() - t0:.0f}s, {best + 1} trees (val {val[best]:.3f})"
    return task.score(torch.tensor(pred).unsqueeze(1), task.test_idx), note


def run_one(task, name, seed, args):
    if name == "StatNN-GBT":
        return stat_gbt(task, seed)
    kind = "graph" if name in GRAPH else "dense"
    try:
        model = make(name, task.spec, task.out, args.hidden, seed, feature_norm=task.name == "inr" and args.inr_norm)
    except Exception as exc:  # e.g. DWS on a CNN: report why, do not crash the table
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    y = task.y if task.task == "classification" else task.y.unsqueeze(1)
    sel = {}
    if task.val_idx is not None:  # the epoch with the best validation score is restored (never the test split)
        key = "eval_accuracy" if task.task == "classification" else "eval_kendall_tau"
        sel = dict(eval_inputs=task.inputs(kind, task.val_idx), eval_targets=y[task.val_idx], monitor=key)
    fit = wsnn.fit_processor(
        model,
        task.inputs(kind, task.train_idx),
        y[task.train_idx],
        collate=task.collate(kind),
        task=task.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=seed,
        device=args.device,
        **sel,
    )
    pred = wsnn.predict(model, task.inputs(kind, task.test_idx), collate=task.collate(kind), batch_size=256)
    note = f"{fit.seconds:.0f}s" + (f", best epoch {fit.best_epoch}" if fit.best_epoch else "")
    if fit.best_epoch:
        val = fit.history[fit.best_epoch - 1][key]
        note += f", val {val:.3f}, train loss {fit.history[fit.best_epoch - 1]['train_loss']:.3f}"
    return task.score(pred.cpu(), task.test_idx), note


def _task_args(args, tname):
    """The INR task may train for its own number of epochs (--inr-epochs)."""
    if tname == "inr" and args.inr_epochs is not None:
        return argparse.Namespace(**{**vars(args), "epochs": args.inr_epochs})
    return args


def throughput(task, name, args, reps=5):
    kind = "graph" if name in GRAPH else "dense"
    try:
        model = make(name, task.spec, task.out, args.hidden, 0)
    except Exception:
        return None
    dev = ws.resolve_device(args.device)
    model.to(dev)
    idx = list(task.train_idx[:64])
    batch = task.collate(kind)(task.inputs(kind, idx))
    batch = batch.to(dev) if hasattr(batch, "to") else batch

    def step():
        out = model(batch)
        out.float().sum().backward()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return len(idx) * reps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-models", type=int, default=2000)
    ap.add_argument("--zoo-mixed", type=int, default=0)
    ap.add_argument("--zoo-steps", type=int, nargs=2, default=(50, 380))
    ap.add_argument(
        "--zoo-split",
        type=int,
        nargs=2,
        default=(1250, 250),
        metavar=("TRAIN", "VAL"),
        help="fixed-architecture nets for training and validation (best epoch); the rest are the test split",
    )
    ap.add_argument("--inr-steps", type=int, default=200)
    ap.add_argument("--inr-variant", default="shared_permuted")
    ap.add_argument("--inr-train", type=int, default=None, help="use only the first N training INRs (CPU budgets)")
    ap.add_argument(
        "--inr-val", type=int, default=200, help="INRs of the train split held out to choose the epoch (0: last epoch)"
    )
    ap.add_argument(
        "--inr-legacy-norm",
        dest="inr_norm",
        action="store_false",
        help="INRs: the earlier input scaling (std only) and raw pooled readouts, for comparison",
    )
    ap.add_argument("--inr-epochs", type=int, default=None, help="epochs for the INR task (default --epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", nargs="+", default=None, help="processor names (default: all)")
    ap.add_argument("--tasks", nargs="+", default=["zoo", "inr"])
    ap.add_argument("--mixed", action="store_true", help="also train the graph processor on the mixed-architecture zoo")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.zoo_models, args.zoo_mixed, args.zoo_steps, args.inr_steps, args.epochs, args.seeds = (
            24,
            8,
            (5, 10),
            20,
            2,
            [0],
        )
        args.zoo_split = (12, 4)
    logging.basicConfig(level=logging.WARNING)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: fit_processor wraps the processors in DDP
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    names = args.only or DENSE + GRAPH
    tasks = {}
    if "zoo" in args.tasks:
        bar, cb = _bar("digits CNN zoo")
        z = zoo.digits_cnn_zoo(args.zoo_models, args.zoo_mixed, seed=0, steps=tuple(args.zoo_steps), progress=cb)
        bar and bar.close()
        fixed = torch.tensor(z.where(part="fixed"))
        perm = fixed[torch.randperm(len(fixed), generator=torch.Generator().manual_seed(0))]
        ntr, nva = args.zoo_split
        if ntr + nva >= len(perm):
            raise SystemExit(f"--zoo-split {ntr} {nva} leaves no test nets out of {len(perm)} fixed-architecture nets")
        tasks["zoo"] = Task(
            "zoo",
            z.select(perm.tolist()),
            z.select(perm.tolist()).targets("test_accuracy"),
            "regression",
            list(range(ntr)),
            list(range(ntr + nva, len(perm))),
            val_idx=list(range(ntr, ntr + nva)),
        )
        acc = tasks["zoo"].y
        print(
            f"zoo: {len(z)} nets ({len(fixed)} fixed-architecture), test accuracy q0/q10/q25/q50/q75/q90/q100 = "
            f"{[round(float(v), 3) for v in torch.quantile(acc, torch.tensor([0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))]}; "
            f"split {ntr} train / {nva} validation / {len(perm) - ntr - nva} test",
            flush=True,
        )
    if "inr" in args.tasks:
        bar, cb = _bar("digits INRs")
        inr = zoo.digits_inrs(args.inr_variant, steps=args.inr_steps, progress=cb)
        bar and bar.close()
        split = inr.column("split")
        tr_all = [i for i, s in enumerate(split) if s == "train"]
        # the validation INRs: a fixed random subset of the train split (the digits are ordered as load_digits)
        shuffled = [tr_all[int(j)] for j in torch.randperm(len(tr_all), generator=torch.Generator().manual_seed(0))]
        va = sorted(shuffled[: args.inr_val])
        tr = sorted(shuffled[args.inr_val :])[: args.inr_train]
        te = [i for i, s in enumerate(split) if s == "test"]
        tasks["inr"] = Task(
            "inr",
            inr,
            torch.tensor(inr.column("label")),
            "classification",
            tr,
            te,
            center=args.inr_norm,
            val_idx=va or None,
        )
        print(
            f"INRs: {len(inr)} ({args.inr_variant}), median PSNR {torch.tensor(inr.column('psnr')).median():.1f} dB; "
            f"split {len(tr)} train / {len(va)} validation / {len(te)} test"
        )
    results = {}
    for tname, task in tasks.items():
        for name in names:
            scores, notes = [], []
            for s in args.seeds:
                t0 = time.perf_counter()
                sc, note = run_one(task, name, s, _task_args(args, tname))
                if sc is None:
                    notes.append(note)
                    break
                scores.append(sc)
                notes.append(note)
                print(
                    f"  {tname:4s} {name:22s} seed {s}: {sc:.3f} ({time.perf_counter() - t0:.0f}s; {note})", flush=True
                )
            thr = throughput(task, name, args) if scores and name != "StatNN-GBT" else None
            results[(tname, name)] = (scores, notes, thr)
    if args.mixed and "zoo" in tasks:
        z = tasks["zoo"].z
        # all nets of the full zoo, fixed split: the graph processor on mixed architectures
        zall = zoo.digits_cnn_zoo(args.zoo_models, args.zoo_mixed, seed=0, steps=tuple(args.zoo_steps))
        perm = torch.randperm(len(zall), generator=torch.Generator().manual_seed(0)).tolist()
        zz = zall.select(perm)
        h = len(perm) // 2
        t = Task("zoo-mixed", zz, zz.targets("test_accuracy"), "regression", list(range(h)), list(range(h, len(perm))))
        scores = []
        for s in args.seeds:
            sc, _ = run_one(t, "GraphProcessor", s, args)
            scores.append(sc)
            print(f"  mixed GraphProcessor seed {s}: {sc:.3f}", flush=True)
        results[("zoo-mixed", "GraphProcessor")] = (scores, [], None)
    print()
    print(
        "| processor | zoo Kendall tau (mean ± sd) | INR accuracy (mean ± sd) | nets/s fwd+bwd, batch 64 (zoo / INR) |"
    )
    print("|---|---|---|---|")
    fmt = lambda v: (
        "n/a"
        if not v
        else (f"{torch.tensor(v).mean():.3f} ± {torch.tensor(v).std():.3f}" if len(v) > 1 else f"{v[0]:.3f}")
    )
    for name in names:
        z = results.get(("zoo", name), ([], [], None))
        i = results.get(("inr", name), ([], [], None))
        why = "; ".join(n for n in z[1] + i[1] if "Error" in n)
        thr = " / ".join("-" if r[2] is None else f"{r[2]:.0f}" for r in (z, i))
        print(f"| {name} | {fmt(z[0])} | {fmt(i[0])} | {thr} |" + (f" {why}" if why else ""))
    if ("zoo-mixed", "GraphProcessor") in results:
        print(f"| GraphProcessor, mixed-architecture zoo | {fmt(results[('zoo-mixed', 'GraphProcessor')][0])} | | |")
    print(
        f"\nsettings: epochs {args.epochs}, batch {args.batch_size}, AdamW lr {args.lr} wd {args.weight_decay}, hidden {args.hidden}, "  # noqa: E501
        f"seeds {args.seeds}, device {ws.resolve_device(args.device)}, torch {torch.__version__}, threads {torch.get_num_threads()}"  # noqa: E501
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {f"{k[0]}/{k[1]}": {"scores": v[0], "notes": v[1], "throughput": v[2]} for k, v in results.items()},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
