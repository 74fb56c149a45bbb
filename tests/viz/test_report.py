"""Reports without a browser: structure, offline-ness, determinism, tables, provenance and safe writing."""

import json
import re

import pytest
from plotly.offline import get_plotlyjs

import viz
from weightspace.results import WeightspaceError, versions


def _figures(res):
    return [
        viz.interpolation_figure(res["curves"]),
        viz.landscape_figure(res["landscape"]),
        viz.landscape_figure(res["landscape"], style="surface"),
        viz.layerwise_barrier_figure(res["layerwise"]),
    ]


def _report(res, title="t"):
    r = viz.Report(title)
    r.section("Interpolation", "Curves between A and B.")
    figs = _figures(res)
    for f in figs:
        r.add(f)
    r.add_table(viz.barrier_rows(res["curves"]), title="Barriers")
    r.add_text("line one\nline two", title="<b>escaped</b>")
    r.add_provenance({"curves": res["curves"], "landscape": res["landscape"]}, seed=0)
    return r, figs


def _configs(page):
    """The config argument of every Plotly.newPlot call."""
    return [json.loads(m) for m in re.findall(r"\},\s*(\{\"responsive\"[^}]*\{[^}]*\}[^}]*\})\s*\)", page)]


def test_structure_offline_and_one_inline_plotlyjs(results):
    r, figs = _report(results)
    page = r.to_html()
    n = len(figs)
    assert r.num_figures == n
    assert page.count('class="plotly-graph-div"') == n
    assert [int(i) for i in re.findall(r'<div id="figure-(\d+)"', page)] == list(range(n))
    assert page.count("Plotly.newPlot") == n
    assert page.count(get_plotlyjs()) == 1  # the library inlined exactly once
    assert page.index(get_plotlyjs()) < page.index("<body>")  # in <head>, before any figure script
    ours = page.replace(get_plotlyjs(), "")  # (plotly.js itself holds URLs in strings it never fetches here)
    assert not re.search(r"<script[^>]+src=", ours)  # no external script at all
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", ours)  # nor any remote link
    assert "default-src 'none'" in page  # the browser itself refuses network requests
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page and "<b>escaped" not in page
    assert page.count("<section") == 2  # Interpolation + Provenance


def test_no_share_or_cloud_button_in_any_config(results):
    r, figs = _report(results)
    cfgs = _configs(r.to_html())
    assert len(cfgs) == len(figs)
    for c in cfgs:
        assert c["showSendToCloud"] is False and c["displaylogo"] is False
        assert "sendDataToCloud" in c["modeBarButtonsToRemove"]
    # negative control: plotly's own default page config would offer the cloud button (no showSendToCloud=False)
    default = figs[0].to_html(include_plotlyjs=False, full_html=False)
    assert "showSendToCloud" not in default


def test_byte_identical_for_identical_input(results, tmp_path):
    p1 = _report(results)[0].write(tmp_path / "a.html")
    p2 = _report(results)[0].write(tmp_path / "b.html")  # figures rebuilt from the same results
    assert p1.read_bytes() == p2.read_bytes()
    p3 = _report(results, title="other")[0].write(tmp_path / "c.html")  # negative control
    assert p3.read_bytes() != p1.read_bytes()


def test_tables_show_exact_values_and_key_numbers(results):
    curves = results["curves"]
    r = viz.Report("x").add_table(viz.barrier_rows(curves), title="Barriers")
    page = r.to_html()
    for c in curves.values():
        for sp in c.values:
            for kind in ("chord", "mean_endpoint", "midpoint"):
                b = c.barrier("loss", split=sp, kind=kind)
                shown = f"{b.value:.6g}"
                exact = repr(b.value)
                assert f">{shown}</td>" in page
                if shown != exact:
                    assert f'title="{exact}">{shown}</td>' in page  # full precision on hover
    page = viz.Report("x").add_table({"a": [1, 2], "b": [0.5, 1e-12]}).to_html()
    assert "<th>a</th><th>b</th>" in page and '<td class="num">1e-12</td>' in page
    with pytest.raises(viz.VizError, match="different lengths"):
        viz.Report().add_table({"a": [1, 2], "b": [1]})
    with pytest.raises(viz.VizError, match="columns"):
        viz.Report().add_table([[1, 2]])


def test_provenance_lists_settings_seeds_and_versions(results):
    land = results["landscape"]
    page = _report(results)[0].to_html()
    prov = page[page.index("<h2>Provenance</h2>") :]
    assert "landscape (Landscape)" in prov and "<td>seed</td>" in prov
    assert f"<td>directions</td><td>{land.settings['directions']}</td>" in prov
    for k, v in versions().items():
        assert f"<td>{k}</td><td>{v}</td>" in prov
    # a report without explicit provenance still gets the versions, once
    bare = viz.Report("b").add(viz.barrier_figure(results["curves"])).to_html()
    assert bare.count("<h2>Provenance</h2>") == 1 and f"<td>{versions()['torch']}</td>" in bare


def test_legacy_api_and_add_rejects_non_figures(results, tmp_path):
    out = viz.Report("LMC").add(viz.barrier_figure(results["curves"]["naive"])).write(tmp_path / "r.html")
    assert out.read_text().count("Plotly.newPlot") == 1
    with pytest.raises(TypeError, match="plotly Figure"):
        viz.Report().add("not a figure")


def test_refuses_overwrite_missing_dir_and_writes_atomically(results, tmp_path, monkeypatch):
    fig = viz.barrier_figure(results["curves"])
    target = tmp_path / "r.html"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True") as ei:
        viz.Report().add(fig).write(target)
    assert isinstance(ei.value, WeightspaceError)
    assert target.read_text() == "keep me"
    viz.Report().add(fig).write(target, overwrite=True)
    assert "Plotly.newPlot" in target.read_text()

    from weightspace.io import OutputPathError

    missing = tmp_path / "no" / "such"
    with pytest.raises(OutputPathError, match=re.escape(str(missing))):
        viz.Report().write(missing / "r.html")
    assert not (tmp_path / "no").exists()  # never created
    with pytest.raises(OutputPathError, match="directory"):
        viz.Report().write(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("os.link", boom)
    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        viz.Report().add(fig).write(tmp_path / "new.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # nothing new, no temporary left


def test_large_figure_is_flagged(caplog):
    import logging

    import plotly.graph_objects as go

    r = viz.Report()
    r.max_points = 1000
    with caplog.at_level(logging.WARNING, logger="viz._report"):
        r.add(go.Figure(go.Scatter(y=list(range(1001)))), title="big")
        r.add(go.Figure(go.Scatter(y=list(range(1000)))), title="fine")
    assert len(caplog.records) == 1 and "1001 data points" in caplog.records[0].getMessage()


def test_analysis_report_covers_every_result(results, tmp_path):
    res = results
    rep = viz.analysis_report(
        {
            "Interpolation": res["curves"],
            "Layer-wise": res["layerwise"],
            "Landscape": res["landscape"],
            "Plane": res["plane"],
            "Path-norm": res["pathnorm"],
            "Spectra": res["spectral"],
            "Norms": res["norms"],
            "Collapse": res["collapse"],
            "NC": res["nc"],
            "Information plane": res["infoplane"],
            "Network": res["network"],
            "Graph": res["graph"],
            "Hessian": res["hessian"],
            "Processor": {"train_loss": [1.0, 0.5, 0.25], "val_tau": [0.1, 0.4, 0.6]},
        },
        "A vs B",
        provenance={"command": "weightspace analyze"},
    )
    # 1 interpolation + 2 layer-wise (loss, accuracy) + 2 + 2 landscapes + path-norm + spectra + norms + collapse
    # + information plane + graph + processor
    assert rep.num_figures == 1 + 2 + 2 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1
    page = rep.write(tmp_path / "a.html").read_text()
    assert page.count("Plotly.newPlot") == rep.num_figures
    for title in ("Interpolation", "Layer-wise", "Path-norm", "Hessian", "Provenance", "Network"):
        assert f"<h2>{title}</h2>" in page
    pa = res["pathnorm"]["A"]
    assert f">{pa.value:.6g}</td>" in page  # the key numbers are in tables, not only in plots
    assert f">{res['hessian'].mean:.6g}</td>" in page
    assert "<td>command</td><td>weightspace analyze</td>" in page
    with pytest.raises(viz.VizError, match="non-empty mapping"):
        viz.analysis_report({})
