"""``weightspace merge`` end to end on checkpoints written here: elementwise methods without --model
(streamed), weight matching with --model weightspace.zoo:MLP (a planted permutation is undone), and every
refusal with nothing written."""
import json
import os
import re

import pytest
import torch

import merging
import weightspace as ws
from weightspace import io, zoo
from weightspace.cli import main

pytest.importorskip("safetensors")
HIDDEN = [16, 16]


def _noisy(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


@pytest.fixture()
def files(tmp_path):
    base = zoo.MLP(64, HIDDEN, 10, seed=0)
    sds = {"base": base.state_dict()}
    for i in range(3):
        sds[f"ft{i}"] = _noisy(base, 10 + i)
    paths = {}
    for name, sd in sds.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        io.save_state_dict(sd, paths[name])
    return tmp_path, sds, paths


def _listing(d):
    return sorted(os.listdir(d))


def test_ties_streams_without_model(files, capsys):
    d, sds, p = files
    out = d / "merged.safetensors"
    rc = main(["merge", str(p["ft0"]), str(p["ft1"]), str(p["ft2"]), "--base", str(p["base"]), "--method", "ties",
               "--option", "density=0.5", "--option", "trim=global", "--seed", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "streamed" in text and "wrote" in text and "time:" in text
    want = merging.merge(sds["ft0"], sds["ft1"], sds["ft2"], base=sds["base"], method="ties", density=0.5,
                         trim="global").state_dict
    got = io.load_state_dict(out)
    assert list(got) == list(sds["ft0"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads(io.read_metadata(out)["weightspace.merge"])
    assert meta["method"] == "ties" and meta["seed"] == 1 and meta["options"]["trim"] == "global"
    assert meta["options"]["density"] == 0.5 and "torch" in meta["versions"]


def test_average_of_torch_files_with_weights(tmp_path, files):
    d, sds, _ = files
    a, b = d / "a.pt", d / "b.pt"
    io.save_state_dict(sds["ft0"], a)
    io.save_state_dict(sds["ft1"], b)
    out = d / "avg.safetensors"
    assert main(["-q", "merge", str(a), str(b), "--method", "average", "--weights", "0.25,0.75",
                 "--out", str(out)]) == 0
    got = io.load_state_dict(out)
    for k, v in sds["ft0"].items():
        torch.testing.assert_close(got[k], 0.25 * v + 0.75 * sds["ft1"][k], rtol=0, atol=1e-6)
    assert json.loads(io.read_metadata(out)["weightspace.merge"])["weights"] == [0.25, 0.75]


def test_weight_matching_with_model_undoes_a_planted_permutation(tmp_path, capsys):
    if "weight_matching" not in merging.methods():
        pytest.skip("weight_matching is not registered in this checkout")
    a = zoo.MLP(64, HIDDEN, 10, seed=3)
    spec = ws.permutation_spec(a, zoo.example_inputs(a))
    b = ws.permute(a, spec, ws.random_permutation(spec, seed=4))
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    io.save_state_dict(a, pa)
    io.save_state_dict(b, pb)
    rc = main(["merge", str(pa), str(pb), "--method", "weight_matching", "--model", "weightspace.zoo:MLP",
               "--model-kwargs", json.dumps({"hidden": HIDDEN}), "--input-shape", "2,64", "--data", "digits",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    text = capsys.readouterr().out
    got = io.load_state_dict(out)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)   # midpoint of A and un-permuted B is A
    assert "alignment objective" in text and "merge barrier" in text
    barrier = float(re.search(r"merge barrier .*: (\S+)\n", text).group(1))
    assert abs(barrier) < 1e-5
    # negative control: averaging without alignment is not A
    assert main(["-q", "merge", str(pa), str(pb), "--method", "average", "--out", str(tmp_path / "n.safetensors")]) == 0
    naive = io.load_state_dict(tmp_path / "n.safetensors")
    assert any(not torch.allclose(naive[k], v, atol=1e-3) for k, v in a.state_dict().items())


def test_report_with_model_and_data(files, capsys):
    d, sds, p = files
    out, rep = d / "ta.safetensors", d / "ta.html"
    rc = main(["merge", str(p["ft0"]), str(p["ft1"]), "--base", str(p["base"]), "--method", "task_arithmetic",
               "--option", "scaling=0.5", "--model", "mlp", "--model-kwargs", json.dumps({"hidden": HIDDEN}),
               "--data", "digits", "--out", str(out), "--report", str(rep)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "test loss" in text and "merge barrier" in text
    html = rep.read_text()
    assert "task_arithmetic" in html and "merge barrier" in html
    got = io.load_state_dict(out)
    k = next(iter(got))
    torch.testing.assert_close(got[k], sds["base"][k] + 0.5 * (sds["ft0"][k] + sds["ft1"][k] - 2 * sds["base"][k]),
                               rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# refusals: one readable error, exit status 1, nothing written, inputs intact
# --------------------------------------------------------------------------------------------------
def _refused(capsys, d, argv, pattern):
    before = {n: (d / n).read_bytes() for n in _listing(d)}
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert pattern in err, err
    assert _listing(d) == sorted(before)
    assert all((d / n).read_bytes() == b for n, b in before.items())


def test_refusals_write_nothing(files, capsys):
    d, sds, p = files
    a, b, base = str(p["ft0"]), str(p["ft1"]), str(p["base"])
    existing = d / "exists.safetensors"
    io.save_state_dict(sds["ft2"], existing)
    torch.save(zoo.MLP(64, HIDDEN, 10, seed=0), d / "pickled.pt")            # a pickled module, not weights
    torch.save({"w": torch.zeros(2)}, d / "pickle.safetensors")              # a pickle disguised as safetensors
    short = {k: v for k, v in sds["base"].items() if not k.endswith("bias")}
    io.save_state_dict(short, d / "short_base.safetensors")
    out = str(d / "new.safetensors")
    _refused(capsys, d, ["merge", a, b, "--method", "average", "--out", str(existing)], "already exists")
    _refused(capsys, d, ["merge", a, b, "--method", "average", "--out", b], "is the input checkpoint")
    _refused(capsys, d, ["merge", a, str(d / "pickled.pt"), "--method", "average", "--out", out], "refusing to load")
    _refused(capsys, d, ["merge", a, str(d / "pickle.safetensors"), "--method", "average", "--out", out],
             "not a valid safetensors")
    _refused(capsys, d, ["merge", a, b, "--base", str(d / "short_base.safetensors"), "--method", "ties", "--out", out],
             "bias")
    _refused(capsys, d, ["merge", a, b, "--base", base, "--method", "ties", "--option", "densty=0.2", "--out", out],
             "its options are density")
    _refused(capsys, d, ["merge", a, b, "--base", base, "--method", "ties", "--option", "density", "--out", out],
             "not KEY=VALUE")
    _refused(capsys, d, ["merge", a, b, "--base", base, "--method", "ties", "--option", "density=3", "--out", out],
             "density")
    _refused(capsys, d, ["merge", a, b, "--method", "ties", "--out", out], "pass --base")
    _refused(capsys, d, ["merge", a, b, "--method", "averag", "--out", out], "valid methods")
    _refused(capsys, d, ["merge", a, b, "--method", "average", "--data", "digits", "--out", out], "needs --model")
    _refused(capsys, d, ["merge", a, b, "--method", "average", "--alpha", "1.5", "--out", out], "alpha")
    _refused(capsys, d, ["merge", a, str(d / "missing.safetensors"), "--method", "average", "--out", out],
             "does not exist")
