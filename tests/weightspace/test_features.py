"""Activation capture and streaming statistics (weightspace.features) against two-pass numpy."""
import copy

import numpy as np
import pytest
import torch

import weightspace as ws

feat = ws.features
zoo = ws.zoo


def _uneven_batches(X, Y, cuts=(0, 7, 100, 101, 250)):
    bounds = list(cuts) + [X.shape[0]]
    return [(X[a:b], Y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _rows(a, fd):
    return a.movedim(fd, -1).reshape(-1, a.shape[fd]).double().numpy()


@pytest.fixture(scope="module")
def digits_images():
    X, Y = zoo.load_digits("test", flat=False)
    return X[:300], Y[:300]


def test_stats_match_two_pass_numpy(digits_images):
    X, Y = digits_images
    m = zoo.VGG(cfg=(8, "M", 16), batch_norm=True, head="flatten", seed=0)
    data = _uneven_batches(X, Y)
    points = ["features.1", "features.3", "features.6", "classifier.0"]  # BN, pool, ReLU (4-D), Linear
    acts = feat.capture(m, data, points)
    assert acts["features.6"].shape == (300, 16, 4, 4) and acts["classifier.0"].dtype == torch.float32
    for ddof in (0, 1):
        st = feat.activation_stats(m, data, points, ddof=ddof)
        for name in points:
            s = st[name]
            fd = 1  # the channel dim of 4-D maps and the last dim of (N, C) rows
            r = _rows(acts[name], fd)
            assert s.count == r.shape[0] and s.feature_dim == fd and s.ddof == ddof
            assert s.mean.dtype == torch.float64 and s.cov.shape == (r.shape[1],) * 2
            np.testing.assert_allclose(s.mean.numpy(), r.mean(0), atol=1e-6)
            np.testing.assert_allclose(s.cov.numpy(), np.cov(r, rowvar=False, ddof=ddof), atol=1e-6)
            np.testing.assert_allclose(s.std.numpy(), r.std(0, ddof=ddof), atol=1e-6)
            np.testing.assert_allclose(s.second_moment.numpy(), r.T @ r / r.shape[0], atol=1e-6)
    # diagonal-only mode agrees with the full covariance's diagonal
    diag = feat.activation_stats(m, data, points, covariance=False)
    full = feat.activation_stats(m, data, points)
    for name in points:
        assert diag[name].cov is None
        torch.testing.assert_close(diag[name].var, torch.diagonal(full[name].cov))


def test_streaming_is_exact_in_float64():
    """Chan's merge on a badly centred float64 stream agrees with the two-pass answer."""
    g = torch.Generator().manual_seed(0)
    X = (1e4 + torch.randn(1000, 5, generator=g, dtype=torch.float64)) * torch.tensor([1, 2, 3, 4, 5.0],
                                                                                      dtype=torch.float64)
    sm = feat.StreamingMoments()
    for a, b in [(0, 1), (1, 3), (3, 400), (400, 401), (401, 1000)]:
        sm.update(X[a:b])
    mean, cov = sm.finalize(ddof=1)
    np.testing.assert_allclose(cov.numpy(), np.cov(X.numpy(), rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(mean.numpy(), X.numpy().mean(0), rtol=1e-12)


def test_feature_dim_auto_and_explicit():
    m = zoo.TinyViT(seed=0)
    X, Y = zoo.load_digits("test", flat=False)
    data = (X[:20], Y[:20])
    st = feat.activation_stats(m, data, ["patch_embed", "blocks.0.norm1", "blocks.0.attn"])
    assert st["patch_embed"].feature_dim == 1 and st["patch_embed"].count == 20 * 16
    assert st["blocks.0.norm1"].feature_dim == 2 and st["blocks.0.norm1"].count == 20 * 17
    assert st["blocks.0.attn"].mean.shape == (32,)  # tuple output: first tensor
    tok = feat.activation_stats(m, data, ["blocks.0.norm1"], feature_dim={"blocks.0.norm1": 1})
    assert tok["blocks.0.norm1"].mean.shape == (17,) and tok["blocks.0.norm1"].count == 20 * 32
    with pytest.raises(ValueError, match="out of range"):
        feat.activation_stats(m, data, ["head"], feature_dim=3)


def test_input_points_equal_previous_outputs():
    m = zoo.MLP(hidden=(16, 8), dropout=0.5, seed=0)
    X, Y = zoo.load_digits("test")
    out = feat.capture(m, (X, Y), ["acts.1"], at="output")
    inp = feat.capture(m, (X, Y), ["head"], at="input")
    torch.testing.assert_close(out["acts.1"], inp["head"])  # eval mode: dropout is the identity
    acts, targets = feat.capture(m, _uneven_batches(X, Y), ["head"], return_targets=True)
    assert torch.equal(targets, Y)
    torch.testing.assert_close(acts["head"], m.eval()(X), atol=1e-5, rtol=1e-5)


def test_model_left_untouched():
    m = zoo.ResNet20(norm="batch", seed=0).train()
    m.layer1.eval()  # a mixed mode must be restored exactly
    modes = {n: mod.training for n, mod in m.named_modules()}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    X, Y = zoo.load_digits("test", flat=False)
    feat.activation_stats(m, (X[:50], Y[:50]), ["layer1", "layer2.0.norm1"])
    feat.cross_stats(m, m, (X[:50], Y[:50]), ["layer3"])
    def failing_loader():
        yield X[:5], Y[:5]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        feat.capture(m, failing_loader(), ["linear"])
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN stats unchanged
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_cross_stats_matches_corrcoef_and_permutation():
    X, Y = zoo.load_digits("test")
    data = _uneven_batches(X, Y)
    a = zoo.MLP(hidden=(12,), seed=0)
    b = zoo.MLP(hidden=(12,), seed=1)
    cs = feat.cross_stats(a, b, data, ["acts.0"], eps=0.0)["acts.0"]
    ra = feat.capture(a, data, ["acts.0"])["acts.0"].double().numpy()
    rb = feat.capture(b, data, ["acts.0"])["acts.0"].double().numpy()
    full = np.corrcoef(ra, rb, rowvar=False)
    np.testing.assert_allclose(cs.corr.numpy(), full[:12, 12:], atol=1e-8)
    np.testing.assert_allclose(cs.cov_ab.numpy(), np.cov(ra, rb, rowvar=False, ddof=0)[:12, 12:], atol=1e-8)
    np.testing.assert_allclose(cs.second_moment_ab.numpy(), ra.T @ rb / len(ra), atol=1e-8)
    assert cs.count == 597 and cs.eps == 0.0 and cs.corr.dtype == torch.float64

    self_cs = feat.cross_stats(a, a, data, ["acts.0", "head"])
    for c in self_cs.values():
        np.testing.assert_allclose(torch.diagonal(c.corr).numpy(), 1.0, atol=1e-5)
    # a copy of `a` with permuted hidden units: its correlation with `a` is a permuted identity
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    ap = copy.deepcopy(a)
    with torch.no_grad():
        ap.fc[0].weight.copy_(a.fc[0].weight[perm])
        ap.fc[0].bias.copy_(a.fc[0].bias[perm])
        ap.head.weight.copy_(a.head.weight[:, perm])
    torch.testing.assert_close(ap(X), a(X))
    cp = feat.cross_stats(a, ap, data, ["acts.0"])["acts.0"].corr
    torch.testing.assert_close(cp, self_cs["acts.0"].corr[:, perm])
    assert torch.equal(cp.argmax(0), perm)  # B's unit j is A's unit perm[j]
    assert not torch.equal(perm, torch.arange(12))  # negative control: the permutation is not trivial


def test_cross_stats_different_point_names_and_errors():
    X, Y = zoo.load_digits("test", flat=False)
    vgg = zoo.VGG(cfg=(8, "M", 8), seed=0)
    res = zoo.ResNet20(seed=0)
    cs = feat.cross_stats(vgg, res, (X[:30], Y[:30]), ["features.0"], ["conv1"])
    assert cs["features.0"].cov_ab.shape == (8, 16) and cs["features.0"].name_b == "conv1"
    with pytest.raises(ValueError, match="sample rows"):
        feat.cross_stats(vgg, res, (X[:30], Y[:30]), ["features.4"], ["layer1"])
    with pytest.raises(ValueError, match="pair by position"):
        feat.cross_stats(vgg, res, (X[:30], Y[:30]), ["features.0"], ["conv1", "linear"])


def test_unknown_point_and_bad_data():
    m = zoo.ResNet20(seed=0)
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv3'.*close matches.*layer2\.0\.conv1"):
        feat.activation_stats(m, (torch.zeros(2, 1, 8, 8), torch.zeros(2)), ["layer2.0.conv3"])
    with pytest.raises(ValueError, match="empty"):
        feat.capture(m, [], ["conv1"])
    with pytest.raises(ValueError, match="at must be"):
        feat.capture(m, (torch.zeros(2, 1, 8, 8), torch.zeros(2)), ["conv1"], at="grad")
    with pytest.raises(ValueError, match="points is empty"):
        feat.capture(m, (torch.zeros(2, 1, 8, 8), torch.zeros(2)), [])
    st = feat.activation_stats(m, [(torch.zeros(2, 1, 8, 8), None)] * 3, ["conv1"], max_batches=2)
    assert st["conv1"].count == 2 * 2 * 64


def test_group_points_recover_a_planted_permutation():
    """Cross-correlations at the spec's group points between a model and its permuted copy have
    their maximum at the planted permutation (the activation-matching oracle)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    import weightspace as ws
    from weightspace import zoo

    model = zoo.make("resnet20", norm="batch", seed=0)
    x = zoo.example_inputs(model, batch=4)
    spec = ws.permutation_spec(model, x)
    perms = ws.random_permutation(spec, seed=3)
    permuted = ws.permute(model, spec, perms)
    for which in ("first", "last"):
        pts = ws.features.group_points(spec, which=which)
        assert set(pts) == set(spec.groups)
        modules = list(dict.fromkeys(m for m, _ in pts.values()))
        dims = {m: d for m, d in pts.values()}
        data = (torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(32, dtype=torch.long))
        stats = ws.features.cross_stats(permuted, model, data, modules, feature_dim=dims)
        for group, (module, _) in pts.items():
            corr = stats[module].corr.numpy()
            rows, cols = linear_sum_assignment(corr, maximize=True)
            assert np.array_equal(cols, perms[group].numpy()), (group, module)
            assert np.allclose(corr[rows, cols], 1.0, atol=1e-3)  # corr = cov / (std std^T + eps)
    with pytest.raises(ValueError, match="which"):
        ws.features.group_points(spec, which="middle")


def test_capture_labelled_aligns_inputs_labels_and_activations_and_rejects_reused_modules():
    import torch
    import torch.nn as nn

    from weightspace.features import call_order, capture_labelled

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    X, Y = torch.randn(10, 4), torch.arange(10) % 2
    batches = [(X[:6], Y[:6]), (X[6:], Y[6:])]
    feats, y, x = capture_labelled(model, batches, ["0", "1"], need_inputs=True)
    assert torch.equal(x, X) and torch.equal(y, Y)
    with torch.no_grad():
        assert torch.allclose(feats["0"], model[0](X)) and torch.allclose(feats["1"], model[1](model[0](X)))
    relu = nn.ReLU()
    reused = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    assert call_order(reused, (X, Y), ["1", "2"]) == ["1", "2", "1"]
    with pytest.raises(ValueError, match="called that many times"):
        capture_labelled(reused, (X, Y), ["1"])
