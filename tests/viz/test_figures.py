"""Figure builders on real analysis results: the plotted numbers are the results' numbers, barriers sit
where the curves put them, colours follow the palette, and large inputs are reduced."""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import kendalltau

import viz


def _traces(fig, name_part):
    return [t for t in fig.data if t.name and name_part in t.name]


# ------------------------------------------------------------------------------------- palette
def test_palette_is_stable_across_figures_and_processes(results):
    res = results
    interp = viz.interpolation_figure(res["curves"])
    assert {t.line.color for t in _traces(interp, "naive")} == {viz.color("naive")}
    assert {t.line.color for t in _traces(interp, "permuted")} == {viz.color("permuted")}
    hist = viz.weight_histogram_figure(res["models"])
    bars = viz.path_norm_figure(res["pathnorm"])
    plane = viz.landscape_figure(res["plane"], labels={"w0": "A", "w1": "permuted", "w2": "B"})
    spec = viz.spectral_figure(res["spectral"])
    for model in ("A", "B"):
        c = viz.color(model)
        assert _traces(hist, model)[0].line.color == c
        assert _traces(spec, model)[0].line.color == c
        assert [t for t in plane.data if t.name == model][0].marker.color == c
        assert bars.data[0].marker.color[list(bars.data[0].x).index(model)] == c
    assert viz.color("A") != viz.color("B") != viz.color("merged")
    assert viz.color("Weight-Matching") == viz.color("weight_matching")
    # an unknown name hashes to the same colour in processes with different hash seeds
    code = "import viz; print(viz.color('my_new_method'))"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    got = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**env, "PYTHONHASHSEED": s}
        ).stdout.strip()
        for s in ("1", "2")
    }
    assert got == {viz.color("my_new_method")}


# -------------------------------------------------------------------------------- connectivity
def test_interpolation_figure_plots_values_and_marks_each_barrier(results):
    curves = results["curves"]
    for kind in ("chord", "mean_endpoint"):
        fig = viz.interpolation_figure(curves, kind=kind)
        lines = [t for t in fig.data if "barrier" not in t.name or "(" in t.name]
        marks = [t for t in fig.data if t.name.endswith(" barrier")]
        assert len(lines) == len(marks) == 2 * 2 * 2  # methods x splits x metrics (loss, accuracy)
        for name, c in curves.items():
            for sp in c.values:
                for axis, metric in (("x", "loss"), ("x2", "accuracy")):
                    line = [t for t in lines if t.name.startswith(f"{name} · {sp}") and t.xaxis == axis][0]
                    np.testing.assert_array_equal(line.y, c.values[sp][metric])
                    assert line.line.dash == ("dash" if sp == "train" else "solid")
                    b = c.barrier(metric, split=sp, kind=kind)
                    mark = [t for t in marks if t.name == f"{name} · {sp} barrier" and t.xaxis == axis][0]
                    assert mark.x == (b.alpha, b.alpha)
                    y = np.asarray(c.values[sp][metric])
                    at = float(y[list(c.alphas).index(b.alpha)])
                    assert mark.y[1] == pytest.approx(at, abs=1e-12)  # the segment ends on the curve
                    # and its length is the barrier (on the error for accuracy)
                    assert abs(mark.y[1] - mark.y[0]) == pytest.approx(abs(b.value), abs=1e-12)
                    if axis == "x":
                        assert f"{kind} barrier {b.value:.3g}" in line.name
    # A with its own permuted copy: the endpoints compute one function, so the chord is flat
    cp = curves["permuted"]
    assert cp.values["test"]["loss"][0] == pytest.approx(cp.values["test"]["loss"][-1], abs=1e-5)


def test_barrier_figure_keeps_its_api(results):
    c = results["curves"]["naive"]
    fig = viz.barrier_figure(c, metric="loss", kind="chord")
    assert len([t for t in fig.data if not t.name.endswith("barrier")]) == 1
    assert f"{c.barrier('loss', kind='chord').value:.3g}" in fig.data[0].name


def test_barrier_trend_figure(results):
    curves = results["curves"]
    fig = viz.barrier_trend_figure({"naive": {4: curves["naive"], 1: 0.5, 2: 0.25}}, "width multiplier")
    assert list(fig.data[0].x) == [1.0, 2.0, 4.0]  # numeric x sorted
    assert list(fig.data[0].y) == [0.5, 0.25, curves["naive"].barrier("loss").value]
    assert fig.layout.xaxis.title.text == "width multiplier"
    wide = viz.barrier_trend_figure({1: 0.1, 64: 0.0}, "width")
    assert wide.layout.xaxis.type == "log"
    with pytest.raises(viz.VizError, match="InterpolationCurve"):
        viz.barrier_trend_figure({1: "x"})


def test_layerwise_heatmap_equals_the_result(results):
    lb = results["layerwise"]
    fig = viz.layerwise_barrier_figure(lb, metric="loss")
    hm = fig.data[0]
    z = np.asarray(hm.z)
    np.testing.assert_array_equal(z[:, 0], lb.as_matrix("loss", "A")[:, 0])
    np.testing.assert_array_equal(z[:, 1], lb.as_matrix("loss", "B")[:, 0])
    assert list(hm.y) == list(lb.groups) and hm.zmid == 0.0
    assert fig.layout.yaxis.autorange == "reversed"  # network order top to bottom
    stacked = viz.layerwise_barrier_figure([lb, lb, lb], metric="accuracy", base="mean", epochs=[1, 2, 3])
    np.testing.assert_array_equal(np.asarray(stacked.data[0].z), type(lb).stack([lb] * 3, "accuracy", "mean"))
    assert list(stacked.data[0].x) == ["1", "2", "3"]


# ---------------------------------------------------------------------------------- landscapes
def test_landscape_contour_surface_and_plane(results):
    land = results["landscape"]
    fig = viz.landscape_figure(land)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), np.asarray(land.values["data"]["loss"]).T)
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1  # equal axis scaling
    traj = [t for t in fig.data if t.name == "trajectory"][0]
    np.testing.assert_array_equal(np.c_[traj.x, traj.y], land.trajectory[:, :2])
    assert [t for t in fig.data if t.name == "A"][0].x == (0.0,)
    surf = viz.landscape_figure(land, style="surface", points={"B": (0.25, -0.25)})
    assert surf.data[0].type == "surface"
    ar = surf.layout.scene.aspectratio
    assert (ar.x, ar.y) == (1.0, 1.0)  # the span is square, so is the picture
    b = [t for t in surf.data if t.name == "B"][0]
    zz = np.asarray(land.values["data"]["loss"])
    i, j = list(land.coords[0]).index(0.25), list(land.coords[1]).index(-0.25)
    assert b.z[0] == pytest.approx(zz[i, j], abs=1e-12)  # a model on a grid node sits on the surface
    plane = results["plane"]
    pf = viz.landscape_figure(plane, labels={"w0": "A", "w1": "permuted", "w2": "B"})
    for key, name in (("w0", "A"), ("w1", "permuted"), ("w2", "B")):
        t = [t for t in pf.data if t.name == name][0]
        assert (t.x[0], t.y[0]) == pytest.approx(plane.coordinates[key])
    one = viz.landscape_figure(results["landscape1d"])
    np.testing.assert_array_equal(one.data[0].y, results["landscape1d"].values["data"]["loss"])
    with pytest.raises(viz.VizError, match="style"):
        viz.landscape_figure(land, style="bars")


def test_large_landscape_grid_is_block_averaged(results):
    """A 708 x 708 grid (501,264 points) is shown as at most 200 x 200 block means; on a linear
    function the block mean equals the function at the block centre, which is the oracle."""
    from dataclasses import replace

    land = results["landscape"]
    a = np.linspace(-1, 1, 708)
    Z = 3.0 * a[:, None] - 2.0 * a[None, :] + 1.0
    big = replace(land, coords=(a, a), values={"data": {"loss": Z}}, trajectory=None)
    fig = viz.landscape_figure(big)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.size <= 200 * 200 and viz.figure_points(fig) <= 200 * 200 + 10
    x, y = np.asarray(fig.data[0].x), np.asarray(fig.data[0].y)
    np.testing.assert_allclose(z, (3.0 * x[None, :] - 2.0 * y[:, None] + 1.0), atol=1e-12)


# ------------------------------------------------------------------------------------ matching
def test_matching_figure_marks_the_planted_permutation(planted):
    C, p = planted
    fig = viz.matching_figure(C, p)
    hm, marks = fig.data
    np.testing.assert_array_equal(np.asarray(hm.z), C)
    assert list(marks.x) == list(p) and list(marks.y) == list(range(len(p)))
    assert "objective 0 (optimum 0)" in fig.layout.title.text
    wrong = p.copy()
    wrong[[0, 1]] = wrong[[1, 0]]  # negative control: a non-optimal assignment shows a gap
    t = viz.matching_figure(C, wrong).layout.title.text
    assert f"objective {C[np.arange(len(p)), wrong].sum():.6g} (optimum 0)" in t
    # any object with .costs / .permutations (a merging alignment, later), by group
    from types import SimpleNamespace

    aln = SimpleNamespace(costs={"g0": C, "g1": C.T}, permutations={"g0": p, "g1": np.argsort(p)})
    assert list(viz.matching_figure(aln, group="g1").data[1].x) == list(np.argsort(p))
    assert "optimum 0" in viz.matching_figure(aln, group="g1").layout.title.text
    with pytest.raises(viz.VizError, match="repeats a column"):
        viz.matching_figure(C, np.zeros(len(p), dtype=int))
    with pytest.raises(viz.VizError, match="group 'nope'"):
        viz.matching_figure(aln, group="nope")


def test_large_matching_matrix_is_reduced():
    g = np.random.default_rng(1)
    n = 1000  # a million cells
    C = g.standard_normal((n, n))
    p = g.permutation(n)
    fig = viz.matching_figure(C, p, max_side=200)
    assert np.asarray(fig.data[0].z).shape == (200, 200)
    assert viz.figure_points(fig) <= 200 * 200 + n
    np.testing.assert_allclose(np.asarray(fig.data[0].z)[0, 0], C[:5, :5].mean())


# ----------------------------------------------------------------------------- over training
def test_collapse_figure_plots_the_tracker(results):
    tr = results["collapse"]
    fig = viz.collapse_figure(tr)
    h = tr.history
    nc1 = [t for t in fig.data if t.name == "nc1"][0]
    assert list(nc1.x) == h["epoch"] and list(nc1.y) == h["nc1"]
    assert fig.layout.yaxis.type == "log"  # NC1 panel
    assert fig.layout.yaxis2.type == "linear"
    assert [t for t in fig.data if t.name == "nc4_test"]  # test data given to the tracker
    two = viz.collapse_figure({"A": tr, "B": tr})
    assert {t.line.color for t in two.data if t.name.startswith("A:")} == {viz.color("A")}


def test_infoplane_figure_plots_each_layer_trajectory(results):
    tr = results["infoplane"]
    fig = viz.infoplane_figure(tr)
    layers = [t for t in fig.data if t.name.startswith("layer ")]
    assert len(layers) == len(tr.trajectories)
    for t in layers:
        traj = tr.trajectories[t.name[len("layer ") :]]
        assert list(t.x) == traj["i_xt"] and list(t.y) == traj["i_ty"]
        assert list(t.marker.color) == [float(e) for e in traj["epoch"]]  # coloured by epoch
    assert "bits" in fig.layout.xaxis.title.text
    single = viz.infoplane_figure(tr.planes[0])
    assert sum(len(t.x) for t in single.data) == len(tr.planes[0].layers)
    with pytest.raises(viz.VizError, match="InformationPlane"):
        viz.infoplane_figure([1, 2])


def test_processor_curves_500k_points_keep_the_envelope():
    n = 500_000
    g = np.random.default_rng(0)
    loss = np.exp(-np.linspace(0, 5, n)) + 0.01 * g.random(n)
    loss[123_457] = 9.0  # a spike must survive decimation
    tau = np.tanh(np.linspace(0, 3, n))
    fig = viz.processor_figure({"train_loss": loss, "val_tau": tau}, max_points=2000)
    assert viz.figure_points(fig) <= 2 * 2000
    lt = [t for t in fig.data if t.name == "train_loss"][0]
    assert max(lt.y) == 9.0 and 123_457.0 in lt.x
    assert min(lt.y) == loss.min()
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "linear"
    small = viz.processor_figure({"train_loss": [3.0, 2.0, 1.0]})
    assert list(small.data[0].y) == [3.0, 2.0, 1.0]  # short series untouched


def test_prediction_figure_statistics_and_density_for_500k():
    g = np.random.default_rng(0)
    true = g.random(300)
    pred = true + 0.1 * g.standard_normal(300)
    fig = viz.prediction_figure(pred, true)
    tau = kendalltau(true, pred).statistic
    assert f"Kendall tau {tau:.4f}" in fig.layout.title.text
    assert list(fig.data[0].x) == list(true) and fig.data[1].name == "y = x"
    n = 500_000
    true = g.random(n)
    big = viz.prediction_figure(true + 0.05 * g.standard_normal(n), true)
    assert big.data[0].type == "heatmap" and viz.figure_points(big) <= 100 * 100 + 2
    assert np.asarray(big.data[0].z).sum() == n  # every model counted


def test_minmax_decimate_is_identity_below_the_budget_and_bounded_above():
    x = np.arange(10.0)
    y = np.sin(x)
    xd, yd = viz.minmax_decimate(x, y, 10)
    np.testing.assert_array_equal(xd, x)
    xd, yd = viz.minmax_decimate(np.arange(1001.0), np.arange(1001.0) % 7, 100)
    assert len(xd) <= 100 and np.all(np.diff(xd) > 0)
    assert set(yd) == {0.0, 6.0}


# --------------------------------------------------------------------------------- per layer
def test_spectral_norms_and_path_norm_figures_equal_the_results(results):
    sm = results["spectral"]["A"]
    fig = viz.spectral_figure(results["spectral"])
    alpha_a = [t for t in fig.data if t.name == "A" and t.xaxis == "x"][0]
    assert list(alpha_a.x) == [r.name for r in sm.analysed]
    assert list(alpha_a.y) == [r.alpha if np.isfinite(r.alpha) else None for r in sm.analysed]
    nm = results["norms"]["A"]
    nf = viz.norms_figure(results["norms"])
    assert list(nf.data[0].y) == [r["spectral_sq"] for r in nm.layers]
    assert nf.layout.yaxis.type == "log"
    pn = results["pathnorm"]
    bars = viz.path_norm_figure(pn).data[0]
    assert list(bars.y) == [pn[k].value for k in bars.x]
    # path-norms are permutation-invariant: A and its permuted copy have equal bars
    assert bars.y[list(bars.x).index("permuted")] == pytest.approx(bars.y[list(bars.x).index("A")], rel=1e-9)


def test_weight_histograms_count_every_weight(results):
    models = results["models"]
    fig = viz.weight_histogram_figure(models, bins=50)
    a = models["A"].state_dict()
    keys = [k for k, v in a.items() if v.dim() >= 2]
    w = np.concatenate([a[k].numpy().ravel() for k in keys])
    ta = [t for t in fig.data if t.name == "A"][0]
    assert sum(ta.customdata) == w.size and sum(ta.y) == pytest.approx(1.0)
    per = viz.weight_histogram_figure(models, per_layer=True, bins=20)
    assert len(per.data) == len(keys) * 2
    # 500k weights still ship only `bins` points per trace
    import torch

    big = viz.weight_histogram_figure({"A": {"w": torch.randn(1000, 500)}}, bins=64)
    assert viz.figure_points(big) == 64 and sum(big.data[0].customdata) == 500_000
    with pytest.raises(viz.VizError, match="no tensors"):
        viz.weight_histogram_figure({"A": a, "B": {"x": a[keys[0]]}})


def test_neural_graph_unit_level_and_per_layer_summary(results):
    g = results["graph"]
    G = g.to_networkx()
    fig = viz.neural_graph_figure(g)
    edge_traces = [t for t in fig.data if t.mode == "lines"]
    assert sum(sum(1 for v in t.x if v is None) for t in edge_traces) == g.num_edges  # every edge drawn once
    values = np.array([d["value"] for _, _, d in G.edges(data=True)])
    eps = 5e-3 * np.abs(values).max()  # bin bounds are printed to 3 digits
    for t in edge_traces:  # each colour bin holds exactly the weights its name says
        lo, hi = (float(s) for s in t.name[len("weights in [") : -1].split(", "))
        n = sum(1 for v in t.x if v is None)
        assert (
            ((values > lo + eps) & (values < hi - eps)).sum()
            <= n
            <= ((values >= lo - eps) & (values <= hi + eps)).sum()
        )
    mids = [t for t in fig.data if t.name == "edge weights"][0]
    vals = {(int(u), int(v)): w for u, v, w, _ in mids.customdata}
    assert len(vals) == G.number_of_edges()
    for (u, v), w in list(vals.items())[:50]:
        assert w == G.edges[u, v]["value"]
    units = sum(len(t.x) for t in fig.data if t.name.endswith(" units"))
    assert units == g.num_nodes
    summ = viz.neural_graph_figure(g, max_edges=100)
    conn = [t for t in summ.data if t.name == "layer connections"][0]
    assert sum(c[2] for c in conn.customdata) == g.num_edges
    # the per-layer mean |w| of the first connection equals the weights of that Linear
    A = results["models"]["A"]
    first = A.fc[0].weight.detach().double().numpy()
    row = [c for c in conn.customdata if c[2] == first.size][0]
    assert row[4] == pytest.approx(np.abs(first).mean(), rel=1e-6)
    nodes = [t for t in summ.data if t.name == "layers"][0]
    assert len(nodes.x) == len(g.layers)
