"""Generated zoos (digits CNN zoo, digits SIREN INRs) and user zoos (load_zoo / save_zoo).

Oracles: recorded accuracies equal a fresh evaluation of each rebuilt network; nets never interact
(grouped training equals one-net-at-a-time training up to round-off); exact cache and save/load round
trips; shared-init INRs differ from their permuted versions by exactly the recorded permutation,
which equals ws.permute and leaves the function unchanged.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import weightspace as ws
from weightspace import zoo
from weightspace.zoo.inr import _targets, permute_hidden

REPO = Path(__file__).resolve().parents[2]
KW = dict(n_models=3, n_mixed=3, seed=0, steps=(3, 6), device="cpu", cache=False)


@pytest.fixture(scope="module")
def tiny_zoo():
    return zoo.digits_cnn_zoo(group_size=3, **KW)


def test_recorded_targets_equal_fresh_evaluation(tiny_zoo):
    z = tiny_zoo
    assert len(z) == 6 and z.column("part") == ["fixed"] * 3 + ["mixed"] * 3
    assert all(a == "cnn-w8-d2-relu" for a in z.column("architecture")[:3])
    assert len(set(z.column("architecture")[3:])) > 1  # the mixed part varies width/depth/activation
    assert z.metadata[0]["num_params"] == 754
    Xte, Yte = zoo.load_digits("test", flat=False)
    for i in range(len(z)):
        m = z.model(i)
        with torch.no_grad():
            logits = m(Xte)
        r = z.metadata[i]
        assert (logits.argmax(1) == Yte).float().mean().item() == pytest.approx(r["test_accuracy"], abs=1e-9)
        assert F.cross_entropy(logits, Yte).item() == pytest.approx(r["test_loss"], rel=1e-4)
        assert (
            5e-4 <= r["lr"] <= 5e-2
            and 1e-6 <= r["weight_decay"] <= 1e-2
            and 0.3 <= r["init_scale"] <= 2
            and 3 <= r["steps"] <= 6
        )
    # training moved every net away from its (scaled) initialisation
    init = zoo.DigitsCNN(8, 2, seed=z.metadata[0]["seed"]).state_dict()
    assert not torch.allclose(init["head.weight"] * z.metadata[0]["init_scale"], z.states[0]["head.weight"])


def test_nets_never_interact(tiny_zoo):
    alone = zoo.digits_cnn_zoo(group_size=1, **KW)  # each net trained by itself
    assert [r["seed"] for r in alone.metadata] == [r["seed"] for r in tiny_zoo.metadata]
    for a, b in zip(alone.states, tiny_zoo.states):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    other = zoo.digits_cnn_zoo(**dict(KW, seed=1), group_size=3)
    assert not torch.allclose(other.states[0]["head.weight"], tiny_zoo.states[0]["head.weight"])


def test_cache_round_trip_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSPACE_CACHE", str(tmp_path / "cache"))
    kw = dict(KW, cache=True, n_mixed=0)
    calls = []

    def stop_after_first(done, total):
        calls.append(done)
        if len(calls) == 1:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        zoo.digits_cnn_zoo(group_size=2, progress=stop_after_first, **kw)
    parts = list((tmp_path / "cache" / "zoos").glob("*.part0of1.pt"))
    assert len(parts) == 1  # the finished chunk was kept
    z1 = zoo.digits_cnn_zoo(group_size=2, **kw)  # resumes
    assert not list((tmp_path / "cache" / "zoos").glob("*.part*"))
    z2 = zoo.digits_cnn_zoo(group_size=2, **kw)  # cache hit
    assert any("cache hit" in line for line in z2.log)
    z3 = zoo.digits_cnn_zoo(group_size=2, **dict(kw, cache=False))  # fresh, uninterrupted
    for a, b, c in zip(z1.states, z2.states, z3.states):
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert z1.metadata == z2.metadata == z3.metadata
    assert REPO not in (tmp_path / "cache").resolve().parents


def test_zoo_selection_and_errors(tiny_zoo):
    z = tiny_zoo
    fixed = z.where(part="fixed")
    assert fixed == [0, 1, 2]
    sub = z.select(fixed[::-1])
    assert sub.metadata[0] == z.metadata[2] and torch.equal(sub.targets(), z.targets()[[2, 1, 0]])
    assert sum(z.architectures().values()) == 6
    with pytest.raises(zoo.ZooError, match="no_such_column"):
        z.targets("no_such_column")
    with pytest.raises(zoo.ZooError, match="out of range"):
        z.select([99])
    with pytest.raises(zoo.ZooError, match="n_models"):
        zoo.digits_cnn_zoo(0, 0, cache=False)
    with pytest.raises(zoo.ZooError, match="lr range"):
        zoo.digits_cnn_zoo(2, lr=(1e-2, 1e-3), cache=False)
    gs = z.graphs([0, 5])
    ref = ws.NeuralGraph.from_model(z.model(5), z.model(5).example_input())
    assert torch.equal(gs[1].edge_attr, ref.edge_attr) and torch.equal(gs[1].x, ref.x)


def test_save_load_round_trip_and_errors(tiny_zoo, tmp_path):
    d = zoo.save_zoo(tiny_zoo, tmp_path / "z")
    back = zoo.load_zoo(d, builder=tiny_zoo.builder)
    assert len(back) == len(tiny_zoo)
    for a, b in zip(back.states, tiny_zoo.states):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for ra, rb in zip(back.metadata, tiny_zoo.metadata):
        assert {k: v for k, v in ra.items() if k != "file"} == rb  # floats exact through the CSV
    x = zoo.load_digits("test", flat=False)[0][:5]
    assert torch.equal(back.model(2)(x), tiny_zoo.model(2)(x))
    with pytest.raises(zoo.ZooError, match="overwrite=True"):
        zoo.save_zoo(tiny_zoo, d)
    # JSON tables, and a "pkg.module:factory" builder
    j = zoo.save_zoo(tiny_zoo.select([0, 1]), tmp_path / "j", metadata="meta.json")
    rows = json.loads((j / "meta.json").read_text())
    for r in rows:
        r["model_kwargs"] = {"width": 8, "depth": 2}
    (j / "meta.json").write_text(json.dumps(rows))
    bj = zoo.load_zoo(j, "meta.json", builder="weightspace.zoo:DigitsCNN")
    assert torch.equal(bj.model(1)(x), tiny_zoo.model(1)(x))
    # errors name the file / row / column
    with pytest.raises(zoo.ZooError, match="not found"):
        zoo.load_zoo(d, "missing.csv")
    with pytest.raises(zoo.ZooError, match="does not exist"):
        zoo.load_zoo(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(tiny_zoo.states[0], bad / "a.pt")
    (bad / "metadata.csv").write_text("file,acc\na.pt,0.5\na.pt,0.6\n")
    with pytest.raises(zoo.ZooError, match="listed twice"):
        zoo.load_zoo(bad)
    (bad / "metadata.csv").write_text("file,acc\nb.pt,0.5\n")
    with pytest.raises(zoo.ZooError, match="row 1: checkpoint"):
        zoo.load_zoo(bad)
    (bad / "metadata.csv").write_text("file,acc\n../z/net_00000.safetensors,0.5\n")
    with pytest.raises(zoo.ZooError, match="outside the zoo folder"):
        zoo.load_zoo(bad)
    (bad / "metadata.csv").write_text("path,acc\na.pt,0.5\n")
    with pytest.raises(zoo.ZooError, match="file_column"):
        zoo.load_zoo(bad)
    ok = zoo.load_zoo(bad, file_column="path")
    assert ok.metadata[0]["acc"] == 0.5
    nan = dict(tiny_zoo.states[0])
    nan["head.bias"] = nan["head.bias"].clone()
    nan["head.bias"][0] = float("nan")
    torch.save(nan, bad / "a.pt")
    with pytest.raises(zoo.ZooError, match="a.pt"):
        zoo.load_zoo(bad, file_column="path")


@pytest.fixture(scope="module")
def inrs():
    kw = dict(limit=3, steps=25, device="cpu", cache=False)
    return {v: zoo.digits_inrs(v, **kw) for v in ("shared_permuted", "shared", "independent")}


def test_inrs_fit_their_digits_and_variants(inrs):
    img, Y, is_test, coords = _targets(16)
    sp, sh, ind = inrs["shared_permuted"], inrs["shared"], inrs["independent"]
    assert len(sp) == 6 and sp.column("split") == ["train"] * 3 + ["test"] * 3
    for i in range(len(sp)):
        r = sp.metadata[i]
        assert r["label"] == int(Y[r["image"]])
        with torch.no_grad():
            out = sp.model(i)(coords).squeeze(-1)
        assert ((out - img[r["image"]]) ** 2).mean().item() == pytest.approx(r["mse"], rel=1e-3)
    x = torch.rand(7, 2) * 2 - 1
    spec = ws.permutation_spec(sh.model(0), x)
    for i in range(len(sp)):
        # the permuted INR is the shared-init INR relabelled by the recorded permutation (equal to ws.permute)
        g = torch.Generator().manual_seed(sp.metadata[i]["perm_seed"])
        perms = [torch.randperm(16, generator=g) for _ in range(2)]
        mine = permute_hidden(sh.states[i], perms)
        assert all(torch.equal(mine[k], sp.states[i][k]) for k in mine)
        names = sorted(spec.groups)
        via_ws = ws.permute(sh.states[i], spec, {n: p for n, p in zip(names, perms)})
        assert all(torch.equal(via_ws[k], mine[k]) for k in mine)
        torch.testing.assert_close(sp.model(i)(x), sh.model(i)(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(sp.states[0]["fc.0.weight"], sp.states[1]["fc.0.weight"])
    # the independent variant starts every INR from its own initialisation
    assert not torch.allclose(ind.states[0]["fc.1.weight"], sh.states[0]["fc.1.weight"], atol=1e-2)
    with pytest.raises(zoo.ZooError, match="variant"):
        zoo.digits_inrs("aligned", cache=False)


def _train_alone(r, lr):
    """One digits CNN of zoo row ``r`` trained by itself with torch.optim.AdamW on its own batches."""
    Xtr, Ytr = zoo.load_digits("train", flat=False)
    net = zoo.DigitsCNN(r["width"], r["depth"], r["activation"], seed=r["seed"])
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight"):
                p.mul_(r["init_scale"])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=r["weight_decay"], eps=1e-8)
    g = torch.Generator().manual_seed(r["seed"] + 1)  # the net's own shuffled epochs
    B, n = r["batch_size"], Xtr.shape[0]
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-r["steps"] * B // n))])
    for t in range(r["steps"]):
        b = order[t * B : (t + 1) * B]
        opt.zero_grad()
        F.cross_entropy(net(Xtr[b]), Ytr[b]).backward()
        opt.step()
    return net.state_dict()


def test_grouped_training_equals_torch_adamw_per_net():
    # the oracle for the grouped trainer (channels-last grouped convs, matmul pooling, batched AdamW):
    # each net equals a plain DigitsCNN trained alone by torch.optim.AdamW on the same batches
    z = zoo.digits_cnn_zoo(n_models=2, n_mixed=2, seed=3, steps=(3, 5), group_size=4, device="cpu", cache=False)
    assert {r["activation"] for r in z.metadata} == {"relu", "tanh"} or len(z.architectures()) > 1
    for i in range(len(z)):
        alone = _train_alone(z.metadata[i], z.metadata[i]["lr"])
        for k, v in alone.items():
            torch.testing.assert_close(z.states[i][k], v, rtol=1e-4, atol=1e-5)
    # negative control: the same protocol with another learning rate does not match
    other = _train_alone(z.metadata[0], z.metadata[0]["lr"] * 1.5)
    assert not torch.allclose(other["head.weight"], z.states[0]["head.weight"], rtol=1e-4, atol=1e-5)
