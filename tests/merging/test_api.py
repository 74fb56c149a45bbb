"""merging.merge / merging.align / the registry: contract, closed forms and bad input."""

import json

import pytest
import torch

import merging
import weightspace as ws
from merging import MergeError
from weightspace import zoo


def _mlp(seed, hidden=(16, 16)):
    return zoo.make("mlp", hidden=hidden, seed=seed)


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_registry_lists_average_with_paper_and_options():
    info = merging.methods()["average"]
    assert "2203.05482" in info.paper and info.elementwise and not info.aligns
    assert info.options == {}
    d = info.to_dict()
    assert "fn" not in d and d["name"] == "average"
    json.dumps(d)


def test_unknown_method_and_option_list_the_valid_ones():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(MergeError, match="valid methods: .*average"):
        merging.merge(a, b, method="avg")
    with pytest.raises(MergeError, match="no option.*'density'.*common to all"):
        merging.merge(a, b, method="average", density=0.2)


def test_register_rejects_bad_declarations():
    with pytest.raises(ValueError, match="unknown needs"):
        merging.register("x_bad", paper="p", needs=("gpu",))
    with pytest.raises(ValueError, match="align_fn"):
        merging.register("x_bad", paper="p", aligns=True)
    with pytest.raises(TypeError, match="needs a default"):
        merging.register("x_bad", paper="p")(lambda ctx, k: None)
    with pytest.raises(ValueError, match="already registered"):
        merging.register("average", paper="p")(lambda ctx: None)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_average_is_the_closed_form_and_endpoints_exact(alpha):
    a, b = _mlp(0), _mlp(1)
    sa, sb = _snapshot(a), _snapshot(b)
    res = merging.merge(a, b, alpha=alpha, device="cpu")
    for k in sa:
        want = (1 - alpha) * sa[k] + alpha * sb[k]
        torch.testing.assert_close(res.state_dict[k], want, rtol=0, atol=1e-7)
    if alpha == 0.0:
        assert _same(res.state_dict, sa)
    if alpha == 1.0:
        assert _same(res.state_dict, sb)
    # inputs untouched, result a new module of A's class holding the merged weights
    assert _same(_snapshot(a), sa) and _same(_snapshot(b), sb)
    assert type(res.model) is type(a) and res.model is not a
    assert _same(_snapshot(res.model), {k: v for k, v in res.state_dict.items()})
    assert res.alignment is None and res.spec is None
    d = res.to_dict()
    json.dumps(d)
    assert d["tensors"]["fc.0.weight"] == list(sa["fc.0.weight"].shape)
    assert d["settings"]["weights"] == [1 - alpha, alpha] and "versions" in d["settings"]
    assert "method" in d["log"]["timings"]


def test_three_models_weighted_and_batchnorm_counter_from_a():
    ms = [zoo.make("mlp", hidden=(8,), norm="batch", seed=s) for s in range(3)]
    with torch.no_grad():
        ms[1].norms[0].num_batches_tracked.fill_(7)
    w = [0.5, 0.25, 0.25]
    res = merging.merge(*ms, weights=w, device="cpu")
    sds = [m.state_dict() for m in ms]
    for k, v in res.state_dict.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(wi * sd[k] for wi, sd in zip(w, sds)), rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, sds[0][k])


def test_state_dicts_and_paths(tmp_path):
    a, b = _mlp(0), _mlp(1)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.pt"
    ws.io.save_state_dict(a, pa)
    ws.io.save_state_dict(b, pb)
    r1 = merging.merge(a, b, device="cpu")
    r2 = merging.merge(str(pa), pb, device="cpu")
    assert r2.model is None and _same(r1.state_dict, r2.state_dict)
    r3 = merging.merge(a.state_dict(), b, device="cpu")  # a module anywhere gives the model
    assert r3.model is not None and _same(r1.state_dict, r3.state_dict)
    out = tmp_path / "m.safetensors"
    merging.merge(str(pa), str(pb), out=out, device="cpu")
    assert _same(ws.io.load_state_dict(out), r1.state_dict)
    with pytest.raises(MergeError, match="already exists"):
        merging.merge(a, b, out=out)
    with pytest.raises(MergeError, match="one of the input"):
        merging.merge(str(pa), str(pb), out=pa, overwrite=True)
    assert _same(ws.io.load_state_dict(pa), _snapshot(a))


def test_bad_input_names_the_problem(tmp_path):
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match=r"fc.0.weight.*\(8, 64\).*\(16, 64\)"):
        merging.merge(a, _mlp(1, hidden=(8, 16)))
    bad = _snapshot(b)
    bad["fc.1.bias"][3] = float("nan")
    with pytest.raises(ValueError, match=r"model_b\['fc.1.bias'\].*NaN"):
        merging.merge(a, bad)
    with pytest.raises(MergeError, match=r"alpha must lie in \[0, 1\]"):
        merging.merge(a, b, alpha=1.5)
    with pytest.raises(MergeError, match="sum to 1"):
        merging.merge(a, b, weights=[0.5, 0.6])
    with pytest.raises(MergeError, match="one weight per model"):
        merging.merge(a, b, weights=[1.0])
    with pytest.raises(MergeError, match="alpha= is for two models"):
        merging.merge(a, b, _mlp(2), alpha=0.5)
    with pytest.raises(MergeError, match="does not use base"):
        merging.merge(a, b, base=_mlp(3))
    with pytest.raises(MergeError, match="repair must be one of"):
        merging.merge(a, b, repair="fix")
    with pytest.raises(MergeError, match="pass data="):
        merging.merge(a, b, repair="bn_reset")
    with pytest.raises(MergeError, match="no BatchNorm"):
        merging.merge(a, b, repair="bn_reset", data=zoo.load_digits("train"))
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": object()}, p)
    with pytest.raises(ValueError, match="evil.pt"):
        merging.merge(str(p), str(p))
    with pytest.raises(MergeError, match="nn.Module, a state dict or a checkpoint path"):
        merging.merge(a, 3)


def test_bn_reset_equals_the_recalibrated_average():
    torch.manual_seed(0)
    ms = [zoo.make("mlp", hidden=(16,), norm="batch", seed=s) for s in range(2)]
    data = zoo.load_digits("train")
    for m in ms:  # give each model its own running statistics
        m.train()
        with torch.no_grad():
            m(data[0][:200])
        m.eval()
    res = merging.merge(*ms, repair="bn_reset", data=data, device="cpu")
    # the statistics of the merged weights: cumulative mean/unbiased variance of the first layer's output
    lin = res.model.fc[0]
    with torch.no_grad():
        h = lin(data[0])
    torch.testing.assert_close(res.state_dict["norms.0.running_mean"], h.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.state_dict["norms.0.running_var"], h.var(0), rtol=1e-4, atol=1e-5)
    plain = merging.merge(*ms, device="cpu")
    assert not torch.allclose(plain.state_dict["norms.0.running_mean"], h.mean(0), atol=1e-3)  # negative control
