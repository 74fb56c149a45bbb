"""ZipIt! (merging.zipit) and the layout transform it applies (weightspace.transform).

Oracles: a permutation matrix through ``transform`` equals ``ws.permute``; a positive-diagonal x
permutation change of basis with its inverse as unmerge preserves a ReLU network's function (with a
negative control using the transpose); beta = 0 equals a LAP on the correlation followed by
permute-and-average, computed independently here; zipping a model with a permuted copy of itself
returns the model; partial zipping returns every model's own outputs when the trunk is exact.
"""
import copy

import pytest
import torch

import merging
import weightspace as ws
from merging._zipit_heads import check_cut
from merging._zipit_match import zip_features, zipit_correlation
from weightspace import features, zoo


def _mlp(seed, hidden=(12, 10)):
    return zoo.MLP(8, hidden, 3, seed=seed).eval()


def _data(n=96, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------------- transform
@pytest.mark.parametrize("make", [lambda: _mlp(0),
                                  lambda: zoo.VGG(cfg=(4, "M", 6, "M"), seed=0, fc=(7,)),
                                  lambda: zoo.make("resnet20", width=1, norm="batch")])
def test_transform_with_permutation_matrices_equals_permute(make):
    m = make()
    spec = ws.permutation_spec(m, zoo.example_inputs(m))
    perms = ws.random_permutation(spec, seed=3)
    want = ws.permute(m.state_dict(), spec, perms)
    mats = {g: torch.eye(n)[perms[g]] for g, n in spec.groups.items()}
    for got in (ws.transform(m, spec, mats), ws.transform(m, spec, {g: (P, P.T) for g, P in mats.items()})):
        for k in want:
            assert torch.allclose(got[k].float(), want[k].float(), atol=1e-6), k
    # negative control: the inverse permutation gives something else
    wrong = ws.transform(m, spec, {g: P.T for g, P in mats.items()})
    assert any(not torch.allclose(wrong[k].float(), want[k].float()) for k in want)


def test_transform_change_of_basis_preserves_function_and_transpose_does_not():
    m = zoo.VGG(cfg=(4, "M", 6, "M"), batch_norm=False, seed=1, fc=(7,)).eval()  # flatten: product axis
    x = zoo.example_inputs(m, batch=5)
    spec = ws.permutation_spec(m, x)
    g = torch.Generator().manual_seed(0)
    maps, wrong = {}, {}
    for name, n in spec.groups.items():
        M = torch.diag(torch.rand(n, generator=g) + 0.5) @ torch.eye(n)[torch.randperm(n, generator=g)]
        maps[name] = (M, torch.linalg.inv(M))  # ReLU commutes with positive scalings and permutations
        wrong[name] = (M, M.T)
    out = copy.deepcopy(m)
    out.load_state_dict(ws.transform(m, spec, maps))
    bad = copy.deepcopy(m)
    bad.load_state_dict(ws.transform(m, spec, wrong))
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(out(x), y, atol=1e-5)
        assert not torch.allclose(bad(x), y, atol=1e-2)


def test_transform_changes_widths_and_reports_bad_maps():
    m = _mlp(0)
    spec = ws.permutation_spec(m, torch.randn(2, 8))
    g0 = list(spec.groups)[0]
    sd = ws.transform(m, spec, {g0: (torch.ones(5, 12) / 12, torch.ones(12, 5))})
    assert sd["fc.0.weight"].shape == (5, 8) and sd["fc.0.bias"].shape == (5,) and sd["fc.1.weight"].shape == (10, 5)
    with pytest.raises(ws.SpecError, match="unknown groups"):
        ws.transform(m, spec, {"nope": torch.eye(3)})
    with pytest.raises(ws.SpecError, match=r"has size 12"):
        ws.transform(m, spec, {g0: torch.eye(11)})


# ----------------------------------------------------------------------------------- the zip itself
def test_zip_recovers_planted_pairs_and_respects_the_budget():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 6, generator=g)
    perm = torch.randperm(6, generator=g)
    F = torch.cat([X, X[:, perm] + 0.05 * torch.randn(400, 6, generator=g)], 1)
    C = zipit_correlation(torch.cov(F.T))
    for beta in (0.0, 0.5, 1.0):
        z = zip_features(C, 2, alpha=0.5, beta=beta, matcher="greedy")
        assert sorted(sorted(m) for m in z.members) == sorted(sorted([int(perm[j]), 6 + j]) for j in range(6))
        assert all(w <= int(3 * beta) for w in z.within)
        assert torch.allclose(z.merge.sum(1), torch.ones(6, dtype=torch.float64))
        assert torch.equal(z.unmerge.sum(1), torch.ones(12, dtype=torch.float64))


def test_zip_within_model_budget_is_used_when_features_are_redundant():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(500, 4, generator=g)
    A = torch.cat([X[:, :2], X[:, :2] + 0.01 * torch.randn(500, 2, generator=g)], 1)  # A's units 2,3 copy 0,1
    B = torch.cat([X[:, 2:], X[:, 2:] + 0.01 * torch.randn(500, 2, generator=g)], 1)  # B's likewise, other signals
    C = zipit_correlation(torch.cov(torch.cat([A, B], 1).T))
    z = zip_features(C, 2, alpha=0.5, beta=1.0)
    assert z.within == [2, 2]  # each model folds its duplicate units; no cross merge of unrelated signals
    assert sorted(sorted(m) for m in z.members) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    z0 = zip_features(C, 2, beta=0.0)  # negative control: beta = 0 must pair across models
    assert z0.within == [0, 0] and all(len({i // 4 for i in m}) == 2 for m in z0.members)


# ----------------------------------------------------------------------------------- merge()
def test_beta_zero_equals_lap_on_correlation_then_permute_and_average():
    a, b = _mlp(0), _mlp(1)
    data = _data()
    res = merging.merge(a, b, method="zipit", data=data, zip_beta=0.0, reset_bn_stats=False)
    assert res.log["method"]["groups"]["fc.0"]["solver"] == "lap"
    # independent computation: correlation at the same points, one LAP per group, permute B, average
    spec = ws.permutation_spec(a, data[0][:2])
    pts = features.group_points(spec, "last")
    cs = features.cross_stats(a, b, data, [m for m, _ in pts.values()])
    perms = {}
    for grp, (mod, _) in pts.items():
        s = cs[mod]
        full = torch.cat([torch.cat([s.cov_a, s.cov_ab], 1), torch.cat([s.cov_ab.T, s.cov_b], 1)], 0)
        d = s.cov_a.shape[0]
        r = merging.solvers.linear_assignment(zipit_correlation(full)[:d, d:], maximize=True)
        perms[grp] = torch.as_tensor(r.col_ind).long()
    bp = ws.permute(b.state_dict(), spec, perms)
    for k, v in a.state_dict().items():
        assert torch.allclose(res.state_dict[k], (v + bp[k]) / 2, atol=1e-6), k
    # negative control: plain averaging is not it
    assert not torch.allclose(res.state_dict["fc.0.weight"], (a.fc[0].weight + b.fc[0].weight) / 2, atol=1e-3)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_zipping_a_model_with_its_permuted_copy_returns_the_model(beta):
    a = zoo.MLP(8, (12, 10), 3, activation="tanh", seed=0).eval()  # no dead units: every twin has corr 1
    x, y = _data()
    spec = ws.permutation_spec(a, x[:2])
    b = ws.permute(a, spec, ws.random_permutation(spec, seed=5))
    before = copy.deepcopy(b.state_dict())
    res = merging.merge(a, b, method="zipit", data=(x, y), zip_beta=beta, zip_alpha=0.5)
    with torch.no_grad():
        assert torch.allclose(res.model(x), a(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # inputs untouched


def test_three_models_and_batchnorm_reset():
    a = zoo.MLP(8, (12, 10), 3, norm="batch", activation="tanh", seed=0)  # tanh: no dead units, no ties
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, dtype=torch.long)
    spec = ws.permutation_spec(a, x[:2])
    b = ws.permute(a, spec, ws.random_permutation(spec, seed=1))
    c = ws.permute(a, spec, ws.random_permutation(spec, seed=2))
    # alpha = 1: a merged pair keeps its similarity, so the third twin joins it (alpha < 1 damps that)
    res = merging.merge(a, b, c, method="zipit", data=(x, y), zip_alpha=1.0)
    want = ws.state.recalibrate_bn(a, (x, y))  # ZipIt! recomputes BN statistics after merging
    a2 = copy.deepcopy(a)
    a2.load_state_dict({k: v for k, v in want.items()}, strict=False)
    a2.eval()
    with torch.no_grad():
        assert torch.allclose(res.model.eval()(x), a2(x), atol=1e-4)
    assert res.log["method"]["bn_reset_batches"] == 1


def test_partial_zip_returns_a_multi_head_model():
    a = _mlp(0)
    x, y = _data()
    spec = ws.permutation_spec(a, x[:2])
    b = ws.permute(a, spec, ws.random_permutation(spec, seed=7))
    res = merging.merge(a, b, method="zipit", data=(x, y), stop="acts.0")
    mh = res.model
    assert isinstance(mh, torch.nn.Module) and res.log["method"]["zipped"] == ["fc.0"]
    with torch.no_grad():
        outs = mh(x)
        assert isinstance(outs, list) and len(outs) == 2
        assert torch.allclose(outs[0], a(x), atol=1e-5) and torch.allclose(outs[1], b(x), atol=1e-5)
    mh.output = "concat"
    with torch.no_grad():
        assert mh(x).shape == (x.shape[0], 6)
    # two unrelated models: tails keep their own heads, so the outputs differ from a plain zip
    c = _mlp(3)
    part = merging.merge(a, c, method="zipit", data=(x, y), stop="fc.0")
    full = merging.merge(a, c, method="zipit", data=(x, y))
    with torch.no_grad():
        assert not torch.allclose(part.model(x)[0], full.model(x), atol=1e-3)


def test_partial_zip_stop_must_cut_the_graph():
    r = zoo.make("resnet20", width=1, norm="batch").eval()
    x = zoo.example_inputs(r, batch=4)
    assert check_cut(r, "layer1.0", x) < 1e-5  # a block output is a cut
    with pytest.raises(ValueError, match="does not cut"):
        check_cut(r, "layer1.0.conv1", x)  # inside the block the residual branch bypasses it


def test_zipit_errors_name_the_problem():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(merging.MergeError, match="data"):
        merging.merge(a, b, method="zipit", example_inputs=torch.randn(2, 8))
    with pytest.raises(merging.MergeError, match="stop='nope'"):
        merging.merge(a, b, method="zipit", data=_data(), stop="nope")
    with pytest.raises(merging.MergeError, match="zip_beta"):
        merging.merge(a, b, method="zipit", data=_data(), zip_beta=2.0)
    info = merging.methods()["zipit"]
    assert "arXiv:2305.03053" in info.paper and set(info.needs) == {"spec", "data"}


@pytest.mark.gpu
def test_cuda_equals_cpu():
    a, b = _mlp(0), _mlp(1)
    data = _data()
    cpu = merging.merge(a, b, method="zipit", data=data, device="cpu")
    gpu = merging.merge(a, b, method="zipit", data=data, device="cuda")
    for k, v in cpu.state_dict.items():
        assert torch.allclose(gpu.state_dict[k].cpu(), v, atol=1e-5), k
    part = merging.merge(a, b, method="zipit", data=data, device="cuda", stop="acts.0")
    with torch.no_grad():
        outs = part.model(data[0].cuda())
    assert outs[0].is_cuda
