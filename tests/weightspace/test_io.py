"""Checkpoint I/O (weightspace.io): exact round trips, atomic writes, safe loading, factories."""
import os
import textwrap

import pytest
import torch

import weightspace as ws

io = ws.io


class NotATensor:  # a custom class: unpickling it must be refused
    def __init__(self):
        self.payload = [1, 2, 3]


def _trained_bn_model():
    m = ws.zoo.ResNet20(norm="batch", seed=0).train()
    with torch.no_grad():
        for _ in range(3):
            m(m.example_input(batch=4, seed=_))  # non-trivial running stats and num_batches_tracked
    return m


def _assert_exact(sd, ref):
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_exact_including_bn_buffers(tmp_path, suffix):
    m = _trained_bn_model()
    ref = m.state_dict()
    assert int(ref["norm1.num_batches_tracked"]) == 3
    path = io.save_state_dict(m, tmp_path / f"ckpt{suffix}", metadata={"seed": "0", "arch": "resnet20"})
    _assert_exact(io.load_state_dict(path), ref)
    assert io.read_metadata(path) == {"seed": "0", "arch": "resnet20"}
    path2 = io.save_state_dict(ref, tmp_path / f"plain{suffix}")
    _assert_exact(io.load_state_dict(path2), ref)
    assert io.read_metadata(path2) == {}
    if suffix == ".pt":  # without metadata the file is a plain dict of tensors
        raw = torch.load(path2, weights_only=True)
        assert isinstance(raw, dict) and all(torch.is_tensor(v) for v in raw.values())


def test_tied_and_view_tensors_are_saved(tmp_path):
    w = torch.randn(4, 3)
    sd = {"a.weight": w, "b.weight": w, "c.view": w[1:3], "d.t": w.t()}
    for suffix in (".safetensors", ".pt"):
        out = io.load_state_dict(io.save_state_dict(sd, tmp_path / f"tied{suffix}"))
        for k, v in sd.items():
            assert torch.equal(out[k], v), (suffix, k)


def test_overwrite_refused_then_allowed(tmp_path):
    path = tmp_path / "x.safetensors"
    io.save_state_dict({"w": torch.zeros(2)}, path)
    with pytest.raises(FileExistsError, match=r"x\.safetensors.*overwrite=True"):
        io.save_state_dict({"w": torch.ones(2)}, path)
    assert torch.equal(io.load_state_dict(path)["w"], torch.zeros(2))  # untouched
    io.save_state_dict({"w": torch.ones(2)}, path, overwrite=True)
    assert torch.equal(io.load_state_dict(path)["w"], torch.ones(2))


@pytest.mark.parametrize("suffix, writer", [(".safetensors", "_write_safetensors"), (".pt", "_write_torch")])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, suffix, writer):
    from weightspace import io as io_mod

    def boom(obj, path, *a):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io_mod, writer, boom)
    target = tmp_path / f"out{suffix}"
    with pytest.raises(OSError, match="disk full"):
        io.save_state_dict({"w": torch.zeros(3)}, target)
    assert not target.exists() and os.listdir(tmp_path) == []
    # an existing file is not damaged by a failed overwrite either
    monkeypatch.undo()
    io.save_state_dict({"w": torch.zeros(3)}, target)
    monkeypatch.setattr(io_mod, writer, boom)
    with pytest.raises(OSError):
        io.save_state_dict({"w": torch.ones(3)}, target, overwrite=True)
    assert torch.equal(io.load_state_dict(target)["w"], torch.zeros(3)) and os.listdir(tmp_path) == [target.name]


def test_untrusted_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": NotATensor()}, path)
    with pytest.raises(io.CheckpointError, match=r"evil\.pt.*weights_only=False"):
        io.load_state_dict(path)


def test_wrappers_and_non_tensor_entries(tmp_path):
    sd = {"w": torch.arange(4.0)}
    for key in ("state_dict", "model"):
        p = tmp_path / f"{key}.pt"
        torch.save({key: sd, "epoch": 3}, p)
        _assert_exact(io.load_state_dict(p), sd)
    p = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "epoch": 3}, p)
    with pytest.raises(io.CheckpointError, match=r"mixed\.pt.*epoch"):
        io.load_state_dict(p)
    with pytest.raises(TypeError, match="'n'"):
        io.save_state_dict({"w": torch.zeros(1), "n": 3}, tmp_path / "bad.pt")
    with pytest.raises(TypeError, match="metadata"):
        io.save_state_dict(sd, tmp_path / "bad.safetensors", metadata={"epoch": 3})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_and_corrupt_files(tmp_path, suffix):
    m = ws.zoo.MLP(hidden=(16,), seed=0)
    good = io.save_state_dict(m, tmp_path / f"good{suffix}")
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.CheckpointError, match=f"cut{suffix}"):
        io.load_state_dict(cut)
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(io.CheckpointError, match=f"junk{suffix}"):
        io.load_state_dict(junk)
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(io.CheckpointError, match="empty"):
        io.load_state_dict(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        io.load_state_dict(tmp_path / "missing.pt")


def test_check_finite_names_key(tmp_path):
    sd = {"ok": torch.ones(3), "layer.bad": torch.tensor([1.0, float("nan"), float("inf")]), "n": torch.tensor(3)}
    p = io.save_state_dict(sd, tmp_path / "nan.safetensors")
    assert torch.isnan(io.load_state_dict(p)["layer.bad"][1])  # off by default
    with pytest.raises(ValueError, match=r"'layer\.bad'.*1 NaN and 1 inf"):
        io.load_state_dict(p, check_finite=True)


def test_resolve_factory_and_build_model(tmp_path):
    assert io.resolve_factory("weightspace.zoo:MLP") is ws.zoo.MLP
    assert io.resolve_factory("weightspace.zoo.models:ResNet20.forward") is ws.zoo.ResNet20.forward
    for bad in ("weightspace.zoo", "weightspace.zoo:", ":MLP", ""):
        with pytest.raises(ValueError, match="pkg.module:callable"):
            io.resolve_factory(bad)
    with pytest.raises(ImportError, match="no_such_pkg"):
        io.resolve_factory("no_such_pkg.models:make")
    with pytest.raises(AttributeError, match="did you mean MLP"):
        io.resolve_factory("weightspace.zoo:MPL")
    with pytest.raises(TypeError, match="not callable"):
        io.resolve_factory("weightspace.zoo:TASKS")
    f = tmp_path / "my_models.py"
    f.write_text(textwrap.dedent("""
        import torch
        def make(width=3):
            return torch.nn.Linear(2, width)
        def not_a_model():
            return 42
    """))
    m = io.build_model(f"{f}:make", width=5)
    assert isinstance(m, torch.nn.Linear) and m.out_features == 5
    with pytest.raises(TypeError, match="not an nn.Module"):
        io.build_model(f"{f}:not_a_model")
    assert isinstance(io.build_model("mlp", hidden=(4,)), ws.zoo.MLP)
    with pytest.raises(ValueError, match="zoo name"):
        io.build_model("not_a_zoo_model")


def test_load_into_returns_copy_and_reports_mismatches(tmp_path):
    src = _trained_bn_model()
    dst = ws.zoo.ResNet20(norm="batch", seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    new = io.load_into(dst, src.state_dict())
    assert new is not dst
    _assert_exact(new.state_dict(), src.state_dict())
    _assert_exact(dst.state_dict(), before)  # the given model is untouched
    p = io.save_state_dict(src, tmp_path / "src.pt")
    _assert_exact(io.load_into(dst, p).state_dict(), src.state_dict())

    sd = dict(src.state_dict())
    sd.pop("linear.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['linear.bias'\].*unexpected keys \['extra.weight'\]"):
        io.load_into(dst, sd)
    relaxed = io.load_into(dst, sd, strict=False)
    assert torch.equal(relaxed.linear.weight, src.linear.weight)
    assert torch.equal(relaxed.linear.bias, dst.linear.bias)
    wide = ws.zoo.ResNet20(norm="batch", width=2, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"conv1\.weight: checkpoint \(32, 1, 3, 3\) vs model \(16, 1, 3, 3\)"):
        io.load_into(dst, wide, strict=False)
