"""A report with every figure type, rendered in headless Chromium (Playwright + the system browser).

Asserts: every figure div drew (holds a ``.main-svg``) and holds ``len(fig.data)`` traces, no page or
console errors, every request is ``file:``/``data:``/``blob:`` (offline), no "Share chart" button.
Negative controls: the same page without plotly.js draws nothing and errors; a CDN page requests
the network; plotly's default config shows the cloud button our config removes.
"""

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

import viz

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser_ready():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip('browser: Playwright is not installed (pip install -e ".[test]" or "weightspace[browser]")')
    if viz.find_chromium() is None:
        pytest.skip("browser: no system Chromium (apt-get install chromium, or set CHROMIUM_PATH)")


def _every_figure(res, planted):
    C, p = planted
    return [
        viz.interpolation_figure(res["curves"]),
        viz.barrier_trend_figure({"naive": {1: 0.3, 2: 0.2, 4: 0.1}, "weight_matching": {1: 0.1, 2: 0.05, 4: 0.0}}),
        viz.layerwise_barrier_figure(res["layerwise"]),
        viz.landscape_figure(res["landscape"]),
        viz.landscape_figure(res["landscape"], style="surface"),  # WebGL (SwiftShader)
        viz.landscape_figure(res["plane"], labels={"w0": "A", "w1": "permuted", "w2": "B"}),
        viz.matching_figure(C, p),
        viz.collapse_figure(res["collapse"]),
        viz.infoplane_figure(res["infoplane"]),
        viz.spectral_figure(res["spectral"]),
        viz.norms_figure(res["norms"]),
        viz.path_norm_figure(res["pathnorm"]),
        viz.weight_histogram_figure(res["models"]),
        viz.neural_graph_figure(res["graph"]),
        viz.neural_graph_figure(res["graph"], max_edges=100),
        viz.processor_figure({"train_loss": np.exp(-np.linspace(0, 4, 3000)), "val_tau": np.linspace(0, 0.8, 3000)}),
        viz.prediction_figure(np.linspace(0, 1, 50) + 0.03 * np.sin(np.arange(50)), np.linspace(0, 1, 50)),
    ]


def test_every_figure_renders_offline(browser_ready, results, planted, tmp_path):
    figs = _every_figure(results, planted)
    rep = viz.Report("every figure")
    for i, f in enumerate(figs):
        rep.section(f"figure {i}").add(f)
    rep.add_table(viz.barrier_rows(results["curves"]), title="Barriers")
    page = rep.write(tmp_path / "all.html")
    out = viz.browser_check(page, len(figs), timeout_s=90, screenshot_to=tmp_path / "all.png")
    assert out["errors"] == []
    assert out["divs"] == out["drawn"] == len(figs)
    assert out["main_svg"] >= len(figs)
    assert out["data_lengths"] == [len(f.data) for f in figs]
    assert out["offline"], [u for u in out["requests"] if not u.startswith(("file:", "data:", "blob:"))]
    assert out["share_buttons"] == 0 and not any("Share" in (t or "") for t in out["modebar_titles"])
    assert (tmp_path / "all.png").stat().st_size > 10_000


def test_negative_controls_fail_the_check(browser_ready, tmp_path):
    fig = go.Figure(go.Scatter(y=[1, 3, 2], name="line"))
    good = viz.Report("one").add(fig).write(tmp_path / "good.html")
    # negative controls, checked in the same browser session:
    # 1. the same page without the inlined plotly.js: nothing drawn, "Plotly is not defined"
    bare = tmp_path / "bare.html"
    bare.write_text(good.read_text().replace(get_plotlyjs(), ""))
    # 2. a CDN page asks the network for plotly.js
    cdn = tmp_path / "cdn.html"
    fig.write_html(cdn, include_plotlyjs="cdn")
    # 3. plotly's default config offers "Share chart..." (sends the data to Plotly's cloud)
    default = tmp_path / "default.html"
    fig.write_html(default, include_plotlyjs=True)
    # pages that must draw get a generous timeout (a loaded machine is slow); the controls that must
    # not draw wait a short one, since they run to their timeout
    ok, out_default = viz.browser_check([good, default], [1, 1], timeout_s=60)
    out_bare, out_cdn = viz.browser_check([bare, cdn], [1, 1], timeout_s=5)
    assert ok["drawn"] == 1 and ok["errors"] == [] and ok["share_buttons"] == 0 and ok["offline"]
    assert out_bare["drawn"] == 0 and any("Plotly is not defined" in e for e in out_bare["errors"])
    assert not out_cdn["offline"] and out_cdn["drawn"] == 0
    assert out_default["drawn"] == 1 and out_default["share_buttons"] == 1


def test_demo_merge_and_analyze_reports_render(browser_ready, tmp_path, capsys):
    """The reports the commands write (demo, merge --report, analyze --report) on checkpoints written
    here render completely offline in Chromium: every figure drawn, no errors, no requests."""
    from weightspace import io, zoo
    from weightspace.cli import main

    demo = tmp_path / "demo.html"
    assert main(["demo", "--out", str(demo), "--epochs", "2", "--width", "16", "--alphas", "5", "--grid", "5"]) == 0
    a, b = zoo.MLP(64, (16,), 10, seed=0), zoo.MLP(64, (16,), 10, seed=1)
    train = zoo.load_digits("train")
    for s, m in enumerate((a, b)):
        zoo.train(m, train, epochs=2, seed=s)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    io.save_state_dict(a, pa)
    io.save_state_dict(b, pb)
    merge_html, analyze_html = tmp_path / "merge.html", tmp_path / "analyze.html"
    rc = main(["merge", str(pa), str(pb), "--method", "weight_matching", "--model", "weightspace.zoo:MLP",
               "--model-kwargs", '{"hidden": [16]}', "--input-shape", "2,64", "--data", "digits",
               "--out", str(tmp_path / "m.safetensors"), "--report", str(merge_html)])
    assert rc == 0
    rc = main(["analyze", str(pa), "--model", "weightspace.zoo:MLP", "--model-kwargs", '{"hidden": [16]}',
               "--compare", str(pb), "--grid", "5", "--alphas", "5", "--report", str(analyze_html)])
    assert rc == 0
    capsys.readouterr()
    pages = [demo, merge_html, analyze_html]
    counts = [p.read_text().count('class="plotly-graph-div"') for p in pages]
    assert counts[0] >= 8 and counts[1] >= 1 and counts[2] >= 2
    for page, n, out in zip(pages, counts, viz.browser_check(pages, counts, timeout_s=90)):
        assert out["drawn"] == n, (page.name, out)
        assert out["errors"] == [], (page.name, out["errors"])
        assert out["offline"], (page.name, out["requests"])
        assert out["share_buttons"] == 0
