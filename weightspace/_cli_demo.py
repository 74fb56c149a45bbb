"""``weightspace demo``: the whole toolkit on the embedded digits, in one offline report.

Part of the CLI (the only part of ``weightspace`` that may import ``merging``, ``analysis`` and
``viz``, and that prints). Steps, each with a line of output:

1. train two MLPs 64-W-W-10 from different seeds on all digits, tracking neural collapse
   (Papyan et al. 2020) and the information plane (Shwartz-Ziv & Tishby 2017) every other epoch;
2. discover their permutation symmetry by tracing and verify it numerically;
3. merge them with averaging, weight matching and activation matching (Ainsworth et al. 2023,
   arXiv:2209.04836) with and without REPAIR (Jordan et al. 2023, arXiv:2211.08403), and OT fusion
   (Singh & Jaggi 2020, arXiv:1910.05653); barriers before and after alignment;
4. train a pair on disjoint tasks (digits 0-4 and 5-9) and merge it with averaging, weight matching,
   ZipIt! (Stoica et al. 2024, arXiv:2305.03053) and OT fusion, against the ensemble;
5. the loss plane through A, B and their merge (Garipov et al. 2018), path-norms
   (Gonon et al. 2024), weight histograms, the matching heatmap and the neural graph of A.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch


def _joint_accuracy(model: torch.nn.Module, data) -> float:
    from weightspace.zoo import evaluate

    return float(evaluate(model, data)[1])


def _ensemble_accuracy(models, data) -> float:
    x, y = data
    with torch.no_grad():
        probs = sum(torch.softmax(m.eval()(x), dim=1) for m in models)
    return float((probs.argmax(1) == y).float().mean())


def run(args: Any, say: Callable[[str], None], progress_factory: Callable[[str], Callable[[int, int], None]]) -> int:
    """Run the demo; ``say`` prints a line, ``progress_factory(label)`` makes a progress callback."""
    import analysis
    import merging
    import viz
    import weightspace as ws
    from weightspace import features, zoo

    out = Path(args.out)
    t_start = time.perf_counter()
    stage: Dict[str, float] = {}

    def mark(name: str, t0: float) -> None:
        stage[name] = time.perf_counter() - t0

    train, test = zoo.load_digits("train"), zoo.load_digits("test")
    data = {"train": train, "test": test}
    width, epochs, seed = args.width, args.epochs, args.seed

    # 1. a pair from different seeds, with per-epoch neural collapse and information plane ----------
    t0 = time.perf_counter()
    models, fits, nc, ip = [], [], {}, {}
    bar = progress_factory(f"training 2 MLPs x {epochs} epochs")
    for i, s in enumerate((seed, seed + 1)):
        name = "A" if i == 0 else "B"
        m = zoo.MLP(64, (width, width), 10, seed=s)
        nc[name] = analysis.CollapseTracker()
        ip[name] = analysis.InformationPlaneTracker(estimator="binning")

        def on_epoch(epoch: int, model: torch.nn.Module, _n=name, _i=i) -> None:
            if epoch % 2 == 1 or epoch == epochs - 1:  # every other epoch keeps the demo in minutes
                nc[_n].update(epoch + 1, model, train)
                ip[_n].update(epoch + 1, model, train)
            bar(_i * epochs + epoch + 1, 2 * epochs)

        fits.append(
            zoo.train(m, train, epochs=epochs, lr=1e-3, seed=s, device=args.device, eval_data=test, callback=on_epoch)
        )
        models.append(m)
    a, b = models
    mark("train pair", t0)
    say(
        f"trained A and B (MLP 64-{width}-{width}-10, seeds {seed}, {seed + 1}): test accuracy "
        f"{fits[0].test_accuracy:.3f} and {fits[1].test_accuracy:.3f} ({stage['train pair']:.1f} s)"
    )

    # 2. symmetry ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    x = zoo.example_inputs(a, batch=8)
    spec = ws.permutation_spec(a, x)
    check = ws.check_spec(a, spec, x)
    perms = ws.random_permutation(spec, seed=seed)
    a_perm = ws.permute(a, spec, perms)
    with torch.no_grad():
        same = float((a.eval()(test[0]) - a_perm.eval()(test[0])).abs().max())
    mark("spec", t0)
    say(
        f"discovered {len(spec.groups)} permutation groups ({', '.join(f'{g}: {n}' for g, n in spec.groups.items())}); "
        f"check_spec max relative change {max(check.max_rel_diff.values()):.1e}; permuted A differs by {same:.1e}"
    )

    # 3. merging the pair ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    curves, merged, summary = {}, {}, []
    curves["A vs permuted A"] = analysis.interpolate(a, a_perm, data, alphas=args.alphas)
    curves["naive"] = analysis.interpolate(a, b, data, alphas=args.alphas)
    merged["average"] = merging.merge(a, b, method="average")
    merged["weight_matching"] = merging.merge(a, b, method="weight_matching", example_inputs=x, seed=seed)
    merged["activation_matching"] = merging.merge(
        a, b, method="activation_matching", example_inputs=x, data=train, seed=seed
    )
    merged["activation_matching + REPAIR"] = merging.merge(
        a, b, method="activation_matching", example_inputs=x, data=train, repair="repair", seed=seed
    )
    alignments = {m: merged[m].alignment for m in ("weight_matching", "activation_matching")}  # each aligned once
    for method, aln in alignments.items():
        curves[method] = analysis.interpolate(a, ws.permute(b, spec, aln.permutations), data, alphas=args.alphas)
    merged["ot_fusion"] = merging.merge(a, b, method="ot_fusion", example_inputs=x, seed=seed)
    mark("merge pair", t0)
    undone = analysis.interpolate(a, ws.permute(a_perm, spec, ws.invert_permutation(perms)), data, alphas=args.alphas)
    say(
        f"loss barrier from A to its permuted copy {curves['A vs permuted A'].barrier('loss', split='test').value:.4f}; "  # noqa: E501
        f"with the permutation undone {undone.barrier('loss', split='test').value:.4f}"
    )
    rows = []
    for name, c in {**curves, "A vs permuted A, permutation undone": undone}.items():
        bl, be = c.barrier("loss", split="test"), c.barrier("error", split="test")
        rows.append(
            {
                "path": name,
                "test loss barrier (nats)": bl.value,
                "test error barrier": be.value,
                "midpoint test accuracy": float(c.values["test"]["accuracy"][len(c.alphas) // 2]),
            }
        )
    for name, res in merged.items():
        loss, acc = zoo.evaluate(res.model, test)
        summary.append(
            {
                "method": name,
                "test loss": loss,
                "test accuracy": acc,
                "seconds": sum(res.log.get("timings", {}).values()),
            }
        )
    best = max(summary, key=lambda r: r["test accuracy"])
    say(
        f"loss barrier A-B on test: naive {curves['naive'].barrier('loss', split='test').value:.3f}, weight matching "
        f"{curves['weight_matching'].barrier('loss', split='test').value:.3f}, activation matching "
        f"{curves['activation_matching'].barrier('loss', split='test').value:.3f} nats; best merge "
        f"{best['method']} at {best['test accuracy']:.3f} test accuracy ({stage['merge pair']:.1f} s)"
    )

    # 4. disjoint tasks --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tasks = []
    for i, classes in enumerate(("0-4", "5-9")):
        m = zoo.MLP(64, (width, width), 10, seed=seed + 10 + i)
        zoo.train(
            m, zoo.load_digits("train", classes=classes), epochs=epochs, lr=1e-3, seed=seed + 10 + i, device=args.device
        )
        tasks.append(m)
    joint = [
        {"method": "model 0-4 alone", "joint accuracy": _joint_accuracy(tasks[0], test)},
        {"method": "model 5-9 alone", "joint accuracy": _joint_accuracy(tasks[1], test)},
        {"method": "ensemble (2x compute)", "joint accuracy": _ensemble_accuracy(tasks, test)},
    ]
    for method, kw in (
        ("average", {}),
        ("weight_matching", {"example_inputs": x}),
        ("zipit", {"example_inputs": x, "data": train}),
        ("ot_fusion", {"example_inputs": x}),
    ):
        res = merging.merge(*tasks, method=method, seed=seed, **kw)
        joint.append({"method": method, "joint accuracy": _joint_accuracy(res.model, test)})
    mark("disjoint tasks", t0)
    say(
        "disjoint tasks (0-4 vs 5-9), joint test accuracy: "
        + ", ".join(f"{r['method']} {r['joint accuracy']:.3f}" for r in joint)
    )

    # 5. landscape, path-norms, graph ------------------------------------------------------------------
    t0 = time.perf_counter()
    # the merge is the midpoint of A and *aligned* B, so those three are collinear: the plane goes through
    # A, the merge and B as trained, which shows the barrier on the A-B line and the merge's valley off it
    plane = analysis.plane(
        a,
        merged["weight_matching"].model,
        b,
        {"test": test},
        grid=args.grid,
        metrics=("loss",),
        progress=progress_factory(f"loss plane {args.grid}x{args.grid}"),
    )
    pns = {
        "A": analysis.path_norm(a, x, q=1),
        "permuted A": analysis.path_norm(a_perm, x, q=1),
        "B": analysis.path_norm(b, x, q=1),
        "merged": analysis.path_norm(merged["weight_matching"].model, x, q=1),
    }
    graph = ws.NeuralGraph.from_model(a, x)
    stats = features.cross_stats(a, b, train, ["acts.0"])
    corr = next(iter(stats.values())).corr
    perm_fc0 = alignments["activation_matching"].permutations["fc.0"]  # B unit perm[i] is matched to A unit i
    mark("landscape and metrics", t0)
    say(
        f"L1 path-norm A {pns['A'].value:.4g} = permuted A {pns['permuted A'].value:.4g}; B {pns['B'].value:.4g}; "
        f"merged {pns['merged'].value:.4g}. Neural graph of A: {graph.num_nodes} nodes, {graph.num_edges} edges"
    )

    # report -----------------------------------------------------------------------------------------
    r = viz.Report("weightspace demo: merging, connectivity and weight-space analysis on digits")
    r.add_text(
        f"Two MLPs 64-{width}-{width}-10 trained on scikit-learn digits from seeds {seed} and {seed + 1} (test "
        f"accuracy {fits[0].test_accuracy:.3f} and {fits[1].test_accuracy:.3f}). weightspace found their "
        f"{len(spec.groups)} permutation groups by tracing; a random permutation of A changes no output "
        f"(max |logit difference| {same:.1e}) yet the straight line from A to its permuted copy crosses a loss "
        f"barrier. Aligning B to A before interpolating removes most of the A-B barrier.",
        title="Summary",
    )
    r.section("Merging two models of one task")
    r.add_table(rows, title="Barriers along linear paths (test split; chord variant, Entezari et al. 2022)")
    r.add_table(summary, title="Merged models at alpha = 1/2 (test split)")
    r.add(viz.interpolation_figure(curves), title="Loss and accuracy along linear paths, before and after alignment")
    r.add(
        viz.matching_figure(corr[:, perm_fc0].numpy(), torch.arange(len(perm_fc0)).numpy(), maximize=True, group="fc.0"),  # noqa: E501
        title="Correlation of A's and B's first hidden units, B's units in the order activation matching chose "
        "(the matches lie on the diagonal)",
    )
    r.add(
        viz.landscape_figure(plane, metric="loss", split="test", labels={"w0": "A", "w1": "merged", "w2": "B"}),
        title="Test loss on the plane through A, B and their weight-matching merge (Garipov et al. 2018)",
    )
    r.section("Merging models of disjoint tasks")
    r.add_table(joint, title="Joint 10-class test accuracy of models trained on digits 0-4 and 5-9")
    r.section("Weight-space analysis of A and B")
    r.add(viz.path_norm_figure(pns), title="L1 path-norms (Gonon et al. 2024): permutation-invariant")
    r.add(
        viz.weight_histogram_figure({"A": a, "B": b, "merged": merged["weight_matching"].model}),
        title="Weight histograms",
    )
    r.add(viz.collapse_figure(nc), title="Neural collapse over training epochs (Papyan et al. 2020)")
    r.add(viz.infoplane_figure(ip["A"]), title="Information plane of A over epochs (binning estimator)")
    r.add(viz.neural_graph_figure(graph), title="Neural computational graph of A (edges coloured by weight)")
    r.add_text(str(spec), title="Discovered permutation spec")
    r.add_table({k: round(v, 2) for k, v in stage.items()}, title="Time per stage (s)")
    r.add_provenance(
        {"weight matching": alignments["weight_matching"], "merge": merged["weight_matching"]},
        command=" ".join(["weightspace", *sys.argv[1:]]) if sys.argv else "weightspace demo",
        seed=seed,
    )
    r.write(out, overwrite=args.overwrite)
    say(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {r.num_figures} figures) in "
        f"{time.perf_counter() - t_start:.1f} s; open it in a browser (works offline)"
    )
    return 0
