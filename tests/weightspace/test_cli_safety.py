"""The command line never destroys a file, never creates a directory tree silently, checks its outputs
before any work, rejects counts that would check nothing, and names the flag in every usage error."""
import os
import sys

import pytest

from weightspace import io
from weightspace.cli import main

MLP = ["--model", "weightspace.zoo:MLP", "--model-kwargs", '{"hidden": [8]}', "--input-shape", "2,64"]


def test_spec_json_refuses_to_overwrite_and_writes_atomically(tmp_path, capsys):
    ckpt = tmp_path / "precious.json"
    ckpt.write_bytes(b"do not destroy")
    rc = main(["spec", *MLP, "--json", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and str(ckpt) in err
    assert ckpt.read_bytes() == b"do not destroy"
    assert main(["spec", *MLP, "--json", str(ckpt), "--overwrite"]) == 0
    assert '"fc.0.weight"' in ckpt.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["precious.json"]  # no temp file left behind


@pytest.mark.parametrize("cmd", ["spec", "demo", "analyze"])
def test_missing_directory_is_named_not_created(tmp_path, capsys, cmd):
    target = tmp_path / "no" / "such" / "dir" / "out.file"
    if cmd == "spec":
        argv = ["spec", *MLP, "--json", str(target)]
    elif cmd == "demo":
        argv = ["demo", "--out", str(target), "--epochs", "1", "--width", "4", "--alphas", "2", "--grid", "2"]
    else:
        ck = tmp_path / "a.pt"
        io.save_state_dict(__import__("weightspace").zoo.MLP(64, (8,), 10, seed=0), ck)
        argv = ["analyze", str(ck), "--model", "mlp", "--model-kwargs", '{"hidden": [8]}', "--report", str(target),
                "--grid", "2"]
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2
    assert f"directory {target.parent} does not exist" in cap.err and "create it" in cap.err
    assert not (tmp_path / "no").exists()
    assert "trained" not in cap.out  # nothing was computed


def test_demo_out_is_validated_before_any_work(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path)])  # a directory: full-size demo would take many seconds
    cap = capsys.readouterr()
    assert rc == 2 and "is a directory" in cap.err and "trained" not in cap.out
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "r.html"
    existing.write_text("keep")
    assert main(["demo", "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "keep"


@pytest.mark.parametrize("flag,value", [("--trials", "0"), ("--trials", "-1"), ("--input-high", "0")])
def test_non_positive_counts_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["spec", *MLP, "--check", flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--grid", "--alphas", "--epochs", "--width"])
def test_demo_counts_are_rejected(flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "x.html"), flag, "0"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_quiet_and_verbose_after_the_subcommand(capsys):
    assert main(["spec", *MLP, "-q"]) == 0
    assert main(["spec", "-v", *MLP]) == 0
    assert main(["-q", "spec", *MLP, "-v"]) == 0
    from weightspace.cli import _parser

    args = _parser().parse_args(["-v", "spec", *MLP, "-v"])
    assert args.verbose + args.verbose_sub == 2
    args = _parser().parse_args(["spec", *MLP, "-q"])
    assert args.quiet_sub and not args.quiet


def test_model_from_the_current_directory(tmp_path, monkeypatch, capsys):
    name = f"ws_user_models_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n\ndef build(width=5):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))\n")
    monkeypatch.chdir(tmp_path)
    # the console script's sys.path: no '' and no cwd
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.delitem(sys.modules, name, raising=False)
    rc = main(["spec", "--model", f"{name}:build", "--model-kwargs", '{"width": 7}', "--input-shape", "2,3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "size     7  0.weight[0], 0.bias[0], 2.weight[1]" in cap.out
    sys.modules.pop(name, None)


@pytest.mark.parametrize("kwargs,needle", [("{width: 4}", "not valid JSON"), ("[4]", "JSON object"),
                                           ('{"no_such_arg": 4}', "does not accept")])
def test_model_kwargs_errors_name_the_flag(kwargs, needle, capsys):
    rc = main(["spec", "--model", "weightspace.zoo:MLP", "--model-kwargs", kwargs, "--input-shape", "2,64"])
    err = capsys.readouterr().err
    assert rc == 2 and "--model-kwargs" in err and needle in err and "Traceback" not in err


def test_library_writers_share_the_rule(tmp_path):
    import torch
    import viz

    sd = {"w": torch.ones(2)}
    with pytest.raises(io.OutputPathError, match="does not exist; create it"):
        io.save_state_dict(sd, tmp_path / "nope" / "a.pt")
    with pytest.raises(io.OutputPathError, match="does not exist; create it"):
        viz.Report("t").add_text("x").write(tmp_path / "nope" / "r.html")
    assert not (tmp_path / "nope").exists()
    p = viz.Report("t").add_text("x").write(tmp_path / "r.html")
    with pytest.raises(FileExistsError, match="overwrite"):
        viz.Report("t").add_text("y").write(p)
    assert ">x<" in p.read_text()
    with pytest.raises(io.OutputPathError, match="is a directory"):
        io.atomic_write(tmp_path, "x", overwrite=True)
    assert issubclass(io.OutputExistsError, __import__("weightspace").WeightspaceError)
    io.atomic_write(p, "new", overwrite=True)
    assert p.read_text() == "new" and sorted(x.name for x in tmp_path.iterdir()) == ["r.html"]
