"""Streaming merges of safetensors files: a valid incremental writer, lazy reads, results equal to the
in-memory merge, one key in memory at a time, clear refusals with nothing written."""

import json
import os
import weakref
from collections import OrderedDict

import pytest
import torch

import merging
from merging import _stream
from weightspace import io

safetensors = pytest.importorskip("safetensors")


def _state(g, dtype=torch.float32):
    return OrderedDict(
        [
            ("enc.weight", torch.randn(12, 9, generator=g).to(dtype)),
            ("enc.bias", torch.randn(12, generator=g).to(dtype)),
            ("bn.running_mean", torch.randn(12, generator=g).to(dtype)),
            ("bn.num_batches_tracked", torch.tensor(5)),
            ("head.weight", torch.randn(4, 12, generator=g).to(dtype)),
            ("scalar", torch.randn((), generator=g).to(dtype)),
        ]
    )


@pytest.fixture(params=[torch.float32, torch.bfloat16])
def ckpts(tmp_path, request):
    g = torch.Generator().manual_seed(0)
    dtype = request.param
    base = _state(g, dtype)
    fts = [
        OrderedDict(
            (k, (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v)
            for k, v in base.items()
        )
        for _ in range(3)
    ]
    io.save_state_dict(base, tmp_path / "base.safetensors")
    paths = []
    for i, ft in enumerate(fts):
        p = tmp_path / f"ft{i}.safetensors"
        io.save_state_dict(ft, p)
        paths.append(p)
    return tmp_path, base, fts, paths


def _files(d):
    return sorted(os.listdir(d))


# --------------------------------------------------------------------------------------------------
# writer and reader
# --------------------------------------------------------------------------------------------------
def test_writer_produces_valid_safetensors_in_order(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(1)
    tensors = OrderedDict(
        [
            ("z.last_first", torch.randn(3, 4, generator=g)),
            ("a.half", torch.randn(5, generator=g).half()),
            ("m.bf16", torch.randn(2, 2, 2, generator=g).bfloat16()),
            ("i.long", torch.arange(7)),
            ("b.bool", torch.tensor([True, False, True])),
            ("s.scalar", torch.tensor(2.5, dtype=torch.float64)),
            ("e.empty", torch.zeros(0, 3)),
        ]
    )
    path = tmp_path / "w.safetensors"
    with _stream.StreamWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"note": "x"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(str(path), framework="pt") as f:  # the reference reader accepts the file
        assert f.metadata()["note"] == "x"
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
    back = io.load_state_dict(path)  # and weightspace.io keeps our key order
    assert list(back) == list(tensors)
    lazy = _stream.LazySafetensors(path)
    assert list(lazy) == list(tensors) and lazy.shapes()["m.bf16"] == (2, 2, 2)
    assert all(torch.equal(lazy[k], v) for k, v in tensors.items())
    assert _files(tmp_path) == ["w.safetensors"]  # no temporary file left


def test_writer_failures_leave_nothing(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    path = tmp_path / "o.safetensors"
    with pytest.raises(merging.MergeError, match="expected tensor 'a'"):
        with _stream.StreamWriter(path, entries) as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(merging.MergeError, match=r"must be torch.float32 \(2,\)"):
        with _stream.StreamWriter(path, entries) as w:
            w.write("a", torch.zeros(4))
    with pytest.raises(merging.MergeError, match="1 tensors were not written"):
        with _stream.StreamWriter(path, entries) as w:
            w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="boom"):
        with _stream.StreamWriter(path, entries) as w:
            raise RuntimeError("boom")
    assert _files(tmp_path) == []
    path.write_bytes(b"keep me")
    with pytest.raises(merging.MergeError, match="already exists"):
        _stream.StreamWriter(path, entries)
    assert path.read_bytes() == b"keep me" and _files(tmp_path) == ["o.safetensors"]
    with _stream.StreamWriter(path, entries, overwrite=True) as w:
        w.write("a", torch.ones(2))
        w.write("b", torch.ones(3))
    assert torch.equal(io.load_state_dict(path)["b"], torch.ones(3))


def test_reader_rejects_corrupt_and_pickled_files(tmp_path, ckpts):
    d, _, _, paths = ckpts
    raw = paths[0].read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(merging.MergeError, match="trunc.safetensors.*corrupt or truncated"):
        _stream.LazySafetensors(trunc)
    pkl = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.zeros(2)}, pkl)
    with pytest.raises(merging.MergeError, match="pickle.safetensors.*not a valid safetensors"):
        _stream.LazySafetensors(pkl)


# --------------------------------------------------------------------------------------------------
# streamed merge == in-memory merge
# --------------------------------------------------------------------------------------------------
CASES = [
    ("average", {}),
    ("task_arithmetic", {"scaling": 0.4}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "trim": "global", "merge": "sum"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5, "rescale": "l1"}),
]


@pytest.mark.parametrize("method,opts", CASES)
def test_streamed_equals_in_memory(ckpts, method, opts):
    d, base, fts, paths = ckpts
    b_path = None if method == "average" else d / "base.safetensors"
    out = d / "merged.safetensors"
    res = merging.merge(*paths, base=b_path, method=method, out=out, seed=3, **opts)
    assert res.log["streamed"] and res.model is None
    mem = merging.merge(*fts, base=None if b_path is None else base, method=method, seed=3, **opts)
    written = io.load_state_dict(out)
    assert list(written) == list(fts[0])
    for k, v in mem.state_dict.items():
        assert written[k].dtype == fts[0][k].dtype
        assert torch.equal(written[k], v.to(written[k].dtype)), k
        assert torch.equal(res.state_dict[k], written[k])  # the lazy result reads the file
    if opts.get("trim") == "global":
        assert res.log["method"]["global_thresholds"] == mem.log["method"]["global_thresholds"]
    meta = json.loads(io.read_metadata(out)[_stream.MERGE_METADATA_KEY])
    assert meta["method"] == method and meta["seed"] == 3
    assert meta["options"] == json.loads(json.dumps(res.settings["options"])) and set(opts) <= set(meta["options"])
    assert "torch" in meta["versions"]


def test_streaming_holds_one_key_at_a_time(ckpts, monkeypatch):
    d, _, _, paths = ckpts
    live = []
    max_alive = [0]
    orig = _stream.LazySafetensors.__getitem__

    def tracked(self, key):
        alive = sum(r() is not None for r in live)
        max_alive[0] = max(max_alive[0], alive)
        t = orig(self, key)
        live.append(weakref.ref(t))
        return t

    monkeypatch.setattr(_stream.LazySafetensors, "__getitem__", tracked)
    merging.merge(*paths, base=d / "base.safetensors", method="ties", trim="global", out=d / "m.safetensors")
    # before each read at most the other tensors of the same key are alive: 3 models + the base
    assert 1 <= max_alive[0] <= len(paths)
    assert len(live) > 4 * len(paths)  # it did read everything (3 passes)


def test_result_to_dict_reads_no_tensor(ckpts):
    d, _, _, paths = ckpts
    res = merging.merge(*paths, method="average", out=d / "m.safetensors")
    info = res.to_dict()
    assert info["tensors"]["enc.weight"] == [12, 9]
    assert res.state_dict.bytes_read == 0
    json.dumps(info)


# --------------------------------------------------------------------------------------------------
# refusals: clear message, nothing written
# --------------------------------------------------------------------------------------------------
def test_streaming_refusals_write_nothing(ckpts):
    d, base, fts, paths = ckpts
    before = _files(d)
    out = d / "never.safetensors"
    bad = OrderedDict(fts[1])
    bad["enc.weight"] = torch.zeros(12, 10, dtype=fts[1]["enc.weight"].dtype)
    io.save_state_dict(bad, d / "bad_shape.safetensors")
    nan = OrderedDict(fts[1])
    nan["head.weight"] = fts[1]["head.weight"].clone()
    nan["head.weight"][1, 2] = float("nan")
    io.save_state_dict(nan, d / "nan.safetensors")
    short = OrderedDict((k, v) for k, v in base.items() if k != "enc.bias")
    io.save_state_dict(short, d / "short_base.safetensors")
    before = _files(d)
    with pytest.raises(ValueError, match=r"'enc.weight'.*\(12, 9\).*\(12, 10\)"):
        merging.merge(paths[0], d / "bad_shape.safetensors", method="average", out=out)
    with pytest.raises(ValueError, match=r"model_b\['head.weight'\].*NaN"):
        merging.merge(paths[0], d / "nan.safetensors", method="average", out=out)
    with pytest.raises(ValueError, match="enc.bias"):
        merging.merge(*paths, base=d / "short_base.safetensors", method="ties", out=out)
    with pytest.raises(ValueError, match="needs base="):
        merging.merge(*paths, method="ties", out=out)
    with pytest.raises(ValueError, match="one of the input checkpoints"):
        merging.merge(*paths, method="average", out=paths[1])
    with pytest.raises(ValueError, match="already exists"):
        merging.merge(*paths, method="average", out=paths[1].parent / "base.safetensors")
    with pytest.raises(ValueError, match="density"):
        merging.merge(*paths, base=d / "base.safetensors", method="ties", density=2.0, out=out)
    assert _files(d) == before  # no output, no temporary file
    assert torch.equal(io.load_state_dict(paths[0])["enc.weight"], fts[0]["enc.weight"])  # inputs intact


@pytest.mark.gpu
def test_streaming_on_cuda_equals_cpu(ckpts):
    d, _, _, paths = ckpts
    kw = dict(base=d / "base.safetensors", method="ties", trim="global", density=0.3)
    merging.merge(*paths, out=d / "cpu.safetensors", device="cpu", **kw)
    merging.merge(*paths, out=d / "gpu.safetensors", device="cuda", **kw)
    a, b = io.load_state_dict(d / "cpu.safetensors"), io.load_state_dict(d / "gpu.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
