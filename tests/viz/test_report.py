"""Self-contained report: structure, offline-ness, determinism, safe writing."""
import re

import numpy as np
import plotly.graph_objects as go
import pytest

import viz


class _Curve:
    """Duck-typed stand-in for analysis.InterpolationCurve (viz reads attributes only)."""

    def __init__(self, y):
        self.alphas = np.linspace(0, 1, len(y))
        self.values = {"test": {"loss": np.asarray(y, dtype=float), "accuracy": 1 - np.asarray(y) / 10}}
        self.splits = ["test"]

    def barrier(self, metric, split=None, kind="chord"):
        class B:
            value = 0.5
        return B()


def _report():
    r = viz.Report("t")
    r.add(viz.barrier_figure({"a": _Curve([0, 1, 0]), "b": _Curve([0, 0.5, 0.1])}))
    r.add(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])), title="heat")
    r.add_text("line one\nline two", title="<b>escaped</b>")
    return r


def test_structure_offline_and_deterministic(tmp_path):
    r = _report()
    html = r.to_html()
    assert html.count('class="plotly-graph-div"') == r.num_figures == 2
    assert len(re.findall(r'id="figure-\d+"', html)) == 2
    assert not re.search(r'<script[^>]+src="https?:', html)  # no CDN: renders offline
    assert html.count("Plotly.newPlot") == 2
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html
    p1, p2 = r.write(tmp_path / "a.html"), _report().write(tmp_path / "b.html")
    assert p1.read_bytes() == p2.read_bytes()


def test_refuses_to_overwrite_and_writes_atomically(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        _report().write(target)
    assert target.read_text() == "keep me"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(viz.Report, "to_html", lambda self: "x" * 10)
    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(RuntimeError):
        _report().write(tmp_path / "new.html")
    assert not (tmp_path / "new.html").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary left behind


def test_add_rejects_non_figures():
    with pytest.raises(TypeError, match="plotly Figure"):
        viz.Report().add("not a figure")


@pytest.mark.browser
def test_renders_offline_in_a_real_browser(tmp_path):
    """Headless Chromium (Debian's package) draws every figure from the file alone."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("browser: no system Chromium (apt-get install chromium)")
    page = _report().write(tmp_path / "r.html")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert dom.count('class="main-svg"') >= 2 * 2  # plotly draws two svg layers per figure
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == 2  # both divs initialised by Plotly
    # negative control: without the inlined library nothing is drawn
    bare = tmp_path / "bare.html"
    bare.write_text(page.read_text().split("<script type=\"text/javascript\">",
                                           1)[0] + "</head><body>" + page.read_text().split("<body>", 1)[1])
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", bare.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "main-svg" not in dom
