"""OT fusion (merging.ot_fusion).

Oracles: fusing a model with itself returns it; a planted permutation is recovered exactly (MLP, and
a BatchNorm CNN with a flatten product axis); with exact OT, uniform marginals and equal widths the
result equals a permutation merge computed independently here (sequential LAP on the same weight
cost; LAP on E[z_a z_b^T] for the activation cost); different widths: the plans' marginals are exact,
the result has the target's shapes, and it beats naive truncation on held-out data.
"""
import copy

import pytest
import torch

import merging
import weightspace as ws
from merging.ot_fusion import fuse_states
from weightspace import features, zoo


def _mlp(seed, hidden=(12, 10), **kw):
    return zoo.MLP(8, hidden, 3, seed=seed, **kw).eval()


def _x(n=64, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _close(sd1, sd2, atol=1e-5):
    return all(torch.allclose(sd1[k].float(), sd2[k].float(), atol=atol) for k in sd2 if sd2[k].is_floating_point())


@pytest.mark.parametrize("kw", [dict(), dict(ground_cost="activations"), dict(cost="cosine"),
                                dict(solver="sinkhorn", reg=0.005)])
def test_fusing_a_model_with_itself_returns_it(kw):
    a = _mlp(0)
    x = _x()
    res = merging.merge(a, copy.deepcopy(a), method="ot_fusion", example_inputs=x[:2], data=(x, None), **kw)
    assert _close(res.state_dict, a.state_dict(), atol=1e-3 if "solver" in kw else 1e-6)


@pytest.mark.parametrize("make", [lambda: _mlp(1, activation="tanh"),
                                  lambda: zoo.VGG(cfg=(4, "M", 6, "M"), seed=0, fc=(7,))])
def test_planted_permutation_is_recovered(make):
    a = make().eval()
    x = zoo.example_inputs(a, batch=4)
    spec = ws.permutation_spec(a, x)
    perms = ws.random_permutation(spec, seed=4)
    b = ws.permute(a, spec, perms)
    res = merging.merge(a, b, method="ot_fusion", example_inputs=x)
    inv = ws.invert_permutation(perms)
    assert set(res.alignment.permutations) == set(spec.groups)
    for g in spec.groups:
        assert torch.equal(res.alignment.permutations[g], inv[g])
    assert _close(res.state_dict, a.state_dict())
    assert _close(ws.permute(b.state_dict(), spec, res.alignment.permutations), a.state_dict())


def test_exact_ot_equal_widths_is_the_sequential_lap_permutation_merge():
    a, b = _mlp(0), _mlp(1)
    spec = ws.permutation_spec(a, _x()[:2])
    res = merging.merge(a, b, method="ot_fusion", spec=spec)
    sa, sb = a.state_dict(), b.state_dict()
    # independent: group fc.0 from [W|b] rows; group fc.1 from rows of fc.1 with its columns moved by perm 0
    rows = lambda W, bias: torch.cat([W, bias[:, None]], 1).double()  # noqa: E731
    c0 = torch.cdist(rows(sb["fc.0.weight"], sb["fc.0.bias"]), rows(sa["fc.0.weight"], sa["fc.0.bias"])) ** 2
    r0 = merging.solvers.linear_assignment(c0)
    p0 = torch.as_tensor(r0.row_ind)[torch.argsort(torch.as_tensor(r0.col_ind))]  # target i <- source p0[i]
    W1 = sb["fc.1.weight"][:, p0]
    c1 = torch.cdist(rows(W1, sb["fc.1.bias"]), rows(sa["fc.1.weight"], sa["fc.1.bias"])) ** 2
    r1 = merging.solvers.linear_assignment(c1)
    p1 = torch.as_tensor(r1.row_ind)[torch.argsort(torch.as_tensor(r1.col_ind))]
    perms = {"fc.0": p0.long(), "fc.1": p1.long()}
    bp = ws.permute(sb, spec, perms)
    want = {k: (sa[k] + bp[k]) / 2 for k in sa}
    assert _close(res.state_dict, want)
    assert all(torch.equal(res.alignment.permutations[g], perms[g]) for g in perms)
    # negative control: the plain average differs
    assert not _close({k: (sa[k] + sb[k]) / 2 for k in sa}, want, atol=1e-3)


def test_exact_ot_activation_cost_is_activation_matching_on_second_moments():
    a, b = _mlp(0), _mlp(1)
    x = _x(200)
    res = merging.merge(a, b, method="ot_fusion", data=(x, None), ground_cost="activations")
    spec = res.spec
    pts = features.group_points(spec, "last")
    cs = features.cross_stats(a, b, (x, None), [m for m, _ in pts.values()])
    perms = {}
    for g, (m, _) in pts.items():  # Git Re-Basin AM: max <P, E[z_a z_b^T]> (row norms are constants)
        r = merging.solvers.linear_assignment(cs[m].second_moment_ab, maximize=True)
        perms[g] = torch.as_tensor(r.col_ind).long()
    bp = ws.permute(b.state_dict(), spec, perms)
    assert _close(res.state_dict, {k: (v + bp[k]) / 2 for k, v in a.state_dict().items()})


def test_different_widths_exact_marginals_target_shapes_and_better_than_truncation():
    Xtr, Ytr = zoo.load_digits("train")
    Xte, Yte = zoo.load_digits("test")
    narrow = zoo.MLP(64, (24,), 10, seed=0)
    wide = zoo.MLP(64, (48,), 10, seed=1)
    for m, s in ((narrow, 0), (wide, 1)):
        zoo.train(m, (Xtr, Ytr), epochs=4, seed=s)
    res = merging.merge(wide, narrow, method="ot_fusion", example_inputs=Xtr[:2])
    assert res.log["method"]["target"] == 1
    assert {k: tuple(v.shape) for k, v in res.state_dict.items()} == {k: tuple(v.shape) for k, v in narrow.state_dict().items()}  # noqa: E501
    assert isinstance(res.model, zoo.MLP) and res.model.fc[0].out_features == 24
    # the plan itself: exact marginals 1/48 (rows) and 1/24 (columns)
    sw, sn = wide.state_dict(), narrow.state_dict()
    specs = [ws.permutation_spec(m, Xtr[:2]) for m in (wide, narrow)]
    _, plans, _ = fuse_states([sw, sn], specs, [0.5, 0.5], 1, modules=[wide, narrow])
    T = plans[0]["fc.0"]
    assert T.shape == (48, 24)
    assert torch.allclose(T.sum(1), torch.full((48,), 1 / 48, dtype=T.dtype), atol=1e-12)
    assert torch.allclose(T.sum(0), torch.full((24,), 1 / 24, dtype=T.dtype), atol=1e-12)
    # naive truncation: the wide model's first 24 units averaged with the narrow model
    trunc = {"fc.0.weight": sw["fc.0.weight"][:24], "fc.0.bias": sw["fc.0.bias"][:24],
             "head.weight": sw["head.weight"][:, :24], "head.bias": sw["head.bias"]}
    naive = copy.deepcopy(narrow)
    naive.load_state_dict({k: (sn[k] + trunc[k]) / 2 for k in sn})
    with torch.no_grad():
        loss = lambda m: torch.nn.functional.cross_entropy(m(Xte), Yte).item()  # noqa: E731
        assert loss(res.model) < loss(naive)
    # inputs untouched
    assert all(torch.equal(sw[k], v) for k, v in wide.state_dict().items())


def test_options_and_errors():
    a, b = _mlp(0), _mlp(1)
    x = _x()
    with pytest.raises(merging.MergeError, match="solver must be one of"):
        merging.merge(a, b, method="ot_fusion", example_inputs=x[:2], solver="magic")
    with pytest.raises(merging.MergeError, match="pass data="):
        merging.merge(a, b, method="ot_fusion", example_inputs=x[:2], ground_cost="activations")
    with pytest.raises(merging.MergeError, match="target"):
        merging.merge(a, b, method="ot_fusion", example_inputs=x[:2], target=5)
    info = merging.methods()["ot_fusion"]
    assert "arXiv:1910.05653" in info.paper and info.same_shapes is False


@pytest.mark.gpu
def test_cuda_equals_cpu():
    a, b = _mlp(0), _mlp(1)
    x = _x()
    for kw in (dict(), dict(ground_cost="activations", data=(x, None))):
        cpu = merging.merge(a, b, method="ot_fusion", example_inputs=x[:2], device="cpu", **kw)
        gpu = merging.merge(a, b, method="ot_fusion", example_inputs=x[:2], device="cuda", **kw)
        assert _close(gpu.state_dict, cpu.state_dict, atol=1e-5)
