"""The weightspace command: spec, graph and a small demo, through main(argv)."""
import re

from weightspace.cli import main


def test_spec_prints_groups_and_checks(capsys, tmp_path):
    out = tmp_path / "spec.json"
    rc = main(["spec", "--model", "weightspace.zoo:MLP", "--model-kwargs", '{"hidden": [16, 8]}', "--input-shape",
               "2,64", "--check", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "fc.0" in text and "size    16" in text and "2 permutation groups" in text and "check_spec" in text
    assert '"fc.0.weight"' in out.read_text()


def test_graph_command(capsys):
    assert main(["graph", "--model", "weightspace.zoo:VGG", "--input-shape", "2,1,8,8"]) == 0
    assert "NeuralGraph(" in capsys.readouterr().out


def test_bad_factory_is_one_readable_error(capsys):
    rc = main(["spec", "--model", "weightspace.zoo:NoSuchModel", "--input-shape", "2,64"])
    err = capsys.readouterr().err
    assert rc == 1 and "NoSuchModel" in err and "Traceback" not in err


def test_small_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo.html"
    rc = main(["demo", "--out", str(out), "--epochs", "2", "--width", "16", "--alphas", "5", "--grid", "5"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "with the permutation undone 0.0000" in text  # a model's barrier with itself is zero
    pn = re.search(r"path-norm A (\S+) = permuted A (\S+);", text)
    assert pn and pn.group(1) == pn.group(2)  # the path-norm is permutation-invariant
    page = out.read_text()
    assert page.count('class="plotly-graph-div"') >= 8
    for section in ("Merging two models of one task", "Merging models of disjoint tasks", "Provenance"):
        assert section in page
    assert main(["demo", "--out", str(out)]) == 2  # refuses to overwrite


def test_analyze_checkpoints_with_progress(tmp_path, capsys):
    from weightspace import io, zoo

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    io.save_state_dict(zoo.MLP(64, (16,), 10, seed=0), a)
    io.save_state_dict(zoo.MLP(64, (16,), 10, seed=1), b)
    report = tmp_path / "r.html"
    rc = main(["analyze", str(a), "--model", "mlp", "--model-kwargs", '{"hidden": [16]}', "--report", str(report),
               "--compare", str(b), "--grid", "5", "--alphas", "5"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "L1 path-norm" in cap.out and "loss barrier to b.safetensors" in cap.out
    assert "top Hessian eigenvalue" in cap.out
    assert "landscape 5x5: 25/25" in cap.err  # progress reported (a bar on a terminal)
    page = report.read_text()
    # landscape, interpolation, path-norm, spectra, norms, weight histograms: a figure each at least
    assert page.count('class="plotly-graph-div"') >= 6
    for section in ("Linear interpolation", "Path-norm", "Spectral metrics per layer", "Provenance"):
        assert section in page
