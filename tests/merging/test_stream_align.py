"""Streaming weight matching of safetensors files: the in-memory result bit for bit, planted permutations
recovered, a bounded number of tensors alive (with a negative control that holds everything), clear
refusals with nothing written, the documented in-memory fallbacks, and the ``weightspace merge`` command."""

import json
import logging
import os

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import merging
import weightspace as ws
from merging import _stream, _stream_align
from weightspace import io, zoo
from weightspace.cli import main

pytest.importorskip("safetensors")


class ConvBN(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> pool -> linear: product axes, BN buffers, integer buffers."""

    def __init__(self, seed=0, c=6):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.b1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c * 4, 5)
        for bn in (self.b1, self.b2):  # non-trivial running statistics
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _models(arch):
    if arch == "mlp":
        a, b = zoo.MLP(20, (16, 12, 16), 5, seed=0), zoo.MLP(20, (16, 12, 16), 5, seed=1)
        x = torch.randn(2, 20)
    else:
        a, b = ConvBN(0), ConvBN(1)
        x = torch.randn(2, 3, 8, 8)
    return a, b, ws.permutation_spec(a, x)


def _save(tmp_path, a, b, dtype=None):
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for m, p in ((a, pa), (b, pb)):
        sd = m.state_dict() if isinstance(m, nn.Module) else m
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        io.save_state_dict(sd, p)
    return pa, pb


def _same_merge(res, mem, out):
    written = io.load_state_dict(out)
    assert list(written) == list(mem.state_dict)
    for k, v in mem.state_dict.items():
        assert written[k].dtype == v.dtype, k
        assert torch.equal(written[k], v), k
    for g, p in mem.alignment.permutations.items():
        assert torch.equal(res.alignment.permutations[g], p), g
    assert res.alignment.objective == mem.alignment.objective


@pytest.mark.parametrize("arch,dtype,opts", [
    ("mlp", None, {"alpha": 0.3}),
    ("mlp", torch.bfloat16, {"weights": [0.6, 0.4]}),
    ("conv", None, {"restarts": 2, "seed": 5}),
])
def test_streamed_weight_matching_equals_in_memory_bit_for_bit(tmp_path, arch, dtype, opts):
    a, b, spec = _models(arch)
    pa, pb = _save(tmp_path, a, b, dtype)
    out = tmp_path / "m.safetensors"
    res = merging.merge(pa, pb, method="weight_matching", spec=spec, out=out, **opts)
    assert res.log["streamed"] and res.model is None and res.spec is spec
    mem = merging.merge(io.load_state_dict(pa), io.load_state_dict(pb), method="weight_matching", spec=spec, **opts)
    _same_merge(res, mem, out)
    assert res.alignment.objective > res.alignment.log["objective_identity"]  # it did align something
    meta = json.loads(io.read_metadata(out)[_stream.MERGE_METADATA_KEY])
    assert meta["method"] == "weight_matching" and meta["streamed"] and "torch" in meta["versions"]
    assert meta["weights"] == res.settings["weights"]
    json.dumps(res.to_dict())
    assert res.log["bytes_read"] >= 2 * res.log["input_bytes"]


def test_align_on_files_streams_and_equals_in_memory(tmp_path):
    a, b, spec = _models("conv")
    pa, pb = _save(tmp_path, a, b)
    aln = merging.align(pa, pb, spec=spec, seed=1, max_sweeps=30)
    assert aln.log["streamed"] and aln.log["bytes_read_align"] > 0
    mem = merging.align(a.state_dict(), b.state_dict(), spec=spec, seed=1, max_sweeps=30)
    assert aln.objective == mem.objective
    for g, p in mem.permutations.items():
        assert torch.equal(aln.permutations[g], p)
    with pytest.raises(merging.MergeError, match="needs spec="):
        merging.align(pa, pb)


def test_no_budget_rereads_but_agrees_with_in_memory(tmp_path):
    a, b, spec = _models("mlp")
    pa, pb = _save(tmp_path, a, b)
    info = merging.methods()["weight_matching"]
    kw = dict(info=info, paths=[pa, pb], spec=spec, options=dict(info.options), seed=2, device="cpu")
    big = _stream_align.stream_align_merge(out=tmp_path / "big.safetensors", **kw)
    none = _stream_align.stream_align_merge(out=tmp_path / "none.safetensors", work_bytes=0, cache_bytes=0, **kw)
    assert none.log["work_lru"]["peak"] == 0 and none.log["cost_cache_lru"]["peak"] == 0  # nothing kept
    assert big.log["cost_cache_lru"]["peak"] > 0
    assert none.log["bytes_read_align"] > big.log["bytes_read_align"]  # ... so every cost term re-reads
    # without caches every cost is a full product instead of a low-rank update: equal up to rounding;
    # on these models the permutations, hence the merges, are identical
    for g in spec.groups:
        assert torch.equal(none.alignment.permutations[g], big.alignment.permutations[g])
    assert none.alignment.objective == pytest.approx(big.alignment.objective, rel=1e-6)
    x, y = io.load_state_dict(tmp_path / "big.safetensors"), io.load_state_dict(tmp_path / "none.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_planted_permutation_is_undone(tmp_path):
    a = zoo.MLP(24, (20, 20, 20), 6, seed=3)
    spec = ws.permutation_spec(a, torch.randn(2, 24))
    planted = ws.random_permutation(spec, seed=4)
    b = ws.permute(a, spec, planted)
    pa, pb = _save(tmp_path, a, b)
    res = merging.merge(pa, pb, method="weight_matching", spec=spec, out=tmp_path / "m.safetensors")
    inv = ws.invert_permutation(planted)
    for g in spec.groups:
        assert torch.equal(res.alignment.permutations[g], inv[g]), g
    got = io.load_state_dict(tmp_path / "m.safetensors")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)  # midpoint of A and un-permuted B is A
    # negative control: the streamed average without alignment is far from A
    merging.merge(pa, pb, method="average", out=tmp_path / "n.safetensors")
    naive = io.load_state_dict(tmp_path / "n.safetensors")
    assert any(not torch.allclose(naive[k], v, atol=1e-3) for k, v in a.state_dict().items())


def _track_reads(monkeypatch):
    """Weak references to the storage of every tensor read from a file (views and casts that share it keep
    it alive); ``max_alive`` is the most bytes of such storages alive at any read."""
    live, max_alive = [], [0]
    orig = _stream.LazySafetensors.__getitem__

    def tracked(self, key):
        t = orig(self, key)
        live.append((StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        max_alive[0] = max(max_alive[0], sum(n for r, n in live if not r.expired()))
        return t

    monkeypatch.setattr(_stream.LazySafetensors, "__getitem__", tracked)
    return live, max_alive


def test_few_tensors_alive_at_a_time_with_a_negative_control(tmp_path, monkeypatch):
    width, depth = 16, 24
    a, b = zoo.MLP(width, (width,) * depth, width, seed=0), zoo.MLP(width, (width,) * depth, width, seed=1)
    spec = ws.permutation_spec(a, torch.randn(2, width))
    pa, pb = _save(tmp_path, a, b)
    info = merging.methods()["weight_matching"]
    kw = dict(info=info, paths=[pa, pb], spec=spec, options=dict(info.options), device="cpu")
    largest = width * width * 4
    ckpt = sum(v.numel() * v.element_size() for v in a.state_dict().values())
    live, max_alive = _track_reads(monkeypatch)
    small = _stream_align.stream_align_merge(out=tmp_path / "s.safetensors", work_bytes=4 * largest,
                                             cache_bytes=2 * largest, **kw)
    assert len(live) > 2 * len(a.state_dict())  # it read everything (more than once)
    # the working set plus the tensors in flight: a few tensors, not the checkpoints (2 x 25 weights)
    assert largest <= max_alive[0] <= 6 * largest < ckpt / 2
    assert small.log["work_lru"]["peak"] <= 4 * largest and small.log["cost_cache_lru"]["peak"] <= 2 * largest
    # negative control: with room for everything the same oracle sees both checkpoints' matched tensors held
    live.clear()
    max_alive[0] = 0
    whole = _stream_align.stream_align_merge(out=tmp_path / "w.safetensors", work_bytes=2**30, cache_bytes=2**30, **kw)
    assert max_alive[0] >= 2 * (ckpt - width * width * 4 - width * 4)  # all but the unpermuted output layer
    for g in spec.groups:
        assert torch.equal(small.alignment.permutations[g], whole.alignment.permutations[g])


# --------------------------------------------------------------------------------------------------
# refusals and fallbacks
# --------------------------------------------------------------------------------------------------
def test_refusals_name_the_problem_and_write_nothing(tmp_path):
    a, b, spec = _models("mlp")
    pa, pb = _save(tmp_path, a, b)
    sd = dict(b.state_dict())
    sd["fc.1.weight"] = sd["fc.1.weight"].clone()
    sd["fc.1.weight"][0, 0] = float("inf")
    io.save_state_dict(sd, tmp_path / "inf.safetensors")
    other = zoo.MLP(20, (16, 13, 16), 5, seed=1)
    io.save_state_dict(other.state_dict(), tmp_path / "other.safetensors")
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "never.safetensors"
    with pytest.raises(merging.MergeError, match="needs spec="):
        merging.merge(pa, pb, method="weight_matching", out=out)
    with pytest.raises(merging.MergeError, match=r"model_b\['fc.1.weight'\].*NaN or inf"):
        merging.merge(pa, tmp_path / "inf.safetensors", method="weight_matching", spec=spec, out=out)
    with pytest.raises(merging.MergeError, match=r"'fc.1.weight'.*\(12, 16\).*\(13, 16\)"):
        merging.merge(pa, tmp_path / "other.safetensors", method="weight_matching", spec=spec, out=out)
    with pytest.raises(merging.MergeError, match="max_sweeps"):
        merging.merge(pa, pb, method="weight_matching", spec=spec, out=out, max_sweeps=0)
    with pytest.raises(merging.MergeError, match="already exists"):
        merging.merge(pa, pb, method="weight_matching", spec=spec, out=pb.parent / "other.safetensors")
    wrong = ws.permutation_spec(zoo.MLP(20, (8, 12, 16), 5), torch.randn(2, 20))
    with pytest.raises(merging.MergeError, match="spec expects 'fc.0.weight'"):
        merging.merge(pa, pb, method="weight_matching", spec=wrong, out=out)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file
    assert torch.equal(io.load_state_dict(pb)["fc.1.weight"], b.state_dict()["fc.1.weight"])


def test_three_models_fall_back_to_memory_with_a_warning(tmp_path, caplog):
    ms = [zoo.MLP(20, (12, 12), 5, seed=s) for s in range(3)]
    spec = ws.permutation_spec(ms[0], torch.randn(2, 20))
    paths = []
    for i, m in enumerate(ms):
        paths.append(tmp_path / f"m{i}.safetensors")
        io.save_state_dict(m.state_dict(), paths[-1])
    with caplog.at_level(logging.WARNING, logger="merging._api"):
        res = merging.merge(*paths, method="weight_matching", spec=spec, out=tmp_path / "mm.safetensors")
    assert "not streamed" in caplog.text and "MergeMany" in caplog.text
    assert not res.log.get("streamed")
    want = merging.merge(*[m.state_dict() for m in ms], method="weight_matching", spec=spec)
    got = io.load_state_dict(tmp_path / "mm.safetensors")
    assert all(torch.equal(got[k], want.state_dict[k]) for k in want.state_dict)


def test_lazy_problem_refuses_a_precomputed_tensor_it_cannot_keep_lazy(tmp_path, monkeypatch):
    from merging import _wm_core as core

    a, b, spec = _models("mlp")
    pa, pb = _save(tmp_path, a, b)
    orig = core.build_problem

    def with_extra(*args, **kwargs):  # a core that precomputes something from the weights
        prob = orig(*args, **kwargs)
        if prob.device.type == "meta":
            prob.occs[next(iter(prob.occs))][0].norms = torch.empty(3, device="meta")
        return prob

    monkeypatch.setattr(core, "build_problem", with_extra)
    with pytest.raises(RuntimeError, match="Occ.norms"):
        merging.merge(pa, pb, method="weight_matching", spec=spec, out=tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["cpu", "meta"])
def test_command_streams_weight_matching(tmp_path, capsys, monkeypatch, template):
    from weightspace import _cli_merge

    if template == "meta":  # as for a checkpoint too large to build a CPU template of
        monkeypatch.setattr(_cli_merge, "META_TEMPLATE_BYTES", 0)
    hidden = [16, 16]
    a, b = zoo.MLP(64, hidden, 10, seed=3), zoo.MLP(64, hidden, 10, seed=4)
    pa, pb = _save(tmp_path, a, b)
    out = tmp_path / "m.safetensors"
    rc = main(["merge", str(pa), str(pb), "--method", "weight_matching", "--model", "weightspace.zoo:MLP",
               "--model-kwargs", json.dumps({"hidden": hidden}), "--input-shape", "2,64", "--alpha", "0.25",
               "--option", "max_sweeps=50", "--out", str(out), "--report", str(tmp_path / "r.html")])
    assert rc == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "streamed" in text and f"on the {template} device" in text and "alignment objective" in text
    assert "bytes_read_align" in (tmp_path / "r.html").read_text()
    spec = ws.permutation_spec(a, torch.randn(2, 64))
    want = merging.merge(a.state_dict(), b.state_dict(), method="weight_matching", spec=spec, alpha=0.25,
                         max_sweeps=50)
    got = io.load_state_dict(out)
    assert list(got) == list(want.state_dict)
    assert all(torch.equal(got[k], want.state_dict[k]) for k in got)
    meta = json.loads(io.read_metadata(out)[_stream.MERGE_METADATA_KEY])
    assert meta["options"]["max_sweeps"] == 50 and meta["weights"] == [0.75, 0.25]


@pytest.mark.gpu
def test_streamed_weight_matching_on_cuda_matches_cpu(tmp_path):
    a, b, spec = _models("conv")
    pa, pb = _save(tmp_path, a, b)
    cpu = merging.merge(pa, pb, method="weight_matching", spec=spec, out=tmp_path / "c.safetensors", device="cpu")
    gpu = merging.merge(pa, pb, method="weight_matching", spec=spec, out=tmp_path / "g.safetensors", device="cuda")
    assert gpu.settings["device"].startswith("cuda")
    for g in spec.groups:
        assert torch.equal(gpu.alignment.permutations[g], cpu.alignment.permutations[g])
    x, y = io.load_state_dict(tmp_path / "c.safetensors"), io.load_state_dict(tmp_path / "g.safetensors")
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-6, atol=1e-6)
