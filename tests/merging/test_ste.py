"""STE matching (merging.ste, Git Re-Basin Alg. 2).

Oracles: a planted permutation is recovered and the merge returns the model; the kept permutation's
recorded loss equals the merged loss recomputed independently; it is never worse than weight
matching's (the epoch-0 candidate, checked against merging.merge(method="weight_matching")).
"""
import pytest
import torch

import merging
import weightspace as ws
from weightspace import zoo
from weightspace.state import evaluate


def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_planted_permutation_recovered_and_merge_returns_the_model():
    a = zoo.MLP(8, (12, 10), 3, seed=0).eval()
    x, y = _data()
    spec = ws.permutation_spec(a, x[:2])
    perms = ws.random_permutation(spec, seed=2)
    b = ws.permute(a, spec, perms)
    res = merging.merge(a, b, method="ste", data=(x, y), epochs=1, batch_size=64)
    inv = ws.invert_permutation(perms)
    assert all(torch.equal(res.alignment.permutations[g], inv[g]) for g in spec.groups)
    assert all(torch.allclose(res.state_dict[k], v, atol=1e-6) for k, v in a.state_dict().items())


def test_kept_permutation_is_the_best_loss_and_never_worse_than_weight_matching():
    a = zoo.MLP(8, (16,), 3, seed=0).eval()
    b = zoo.MLP(8, (16,), 3, seed=1).eval()
    x, y = _data(256)
    res = merging.merge(a, b, method="ste", data=(x, y), epochs=3, batch_size=64, optimizer="adam", lr=3e-2)
    hist = res.alignment.log["epochs"]
    assert len(hist) == 4 and hist[0]["epoch"] == 0
    wm = merging.merge(a, b, method="weight_matching", spec=res.spec)
    wm_loss = evaluate(wm.model, (x, y))["loss"]
    assert hist[0]["loss"] == pytest.approx(wm_loss, rel=1e-6)
    kept = evaluate(res.model, (x, y))["loss"]
    assert kept == pytest.approx(res.alignment.log["best_loss"], rel=1e-6)
    assert kept == pytest.approx(min(h["loss"] for h in hist), rel=1e-9)
    assert kept <= wm_loss + 1e-9
    assert res.alignment.objective == pytest.approx(-kept)
    # the straight-through gradient moves the proxy: weight matching of it changes the permutation
    assert any(h["batches_with_new_perm"] > 0 for h in hist[1:])


def test_ste_needs_data_and_valid_options():
    a, b = zoo.MLP(8, (6,), 3, seed=0), zoo.MLP(8, (6,), 3, seed=1)
    with pytest.raises(merging.MergeError, match="data"):
        merging.merge(a, b, method="ste", example_inputs=torch.randn(2, 8))
    with pytest.raises(merging.MergeError, match="optimizer"):
        merging.merge(a, b, method="ste", data=_data(), optimizer="lbfgs")
    info = merging.methods()["ste"]
    assert info.aligns and "arXiv:2209.04836" in info.paper and info.options["epochs"] >= 1
