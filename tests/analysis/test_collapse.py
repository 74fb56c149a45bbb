"""Neural collapse NC1-NC4: analytic simplex-ETF oracle (Papyan, Han & Donoho 2020, PNAS, arXiv:2008.08186),
brute-force NumPy
re-derivations on random data, invariances with negative controls, model capture and bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import analysis
import analysis.collapse  # neural_collapse_of: a public name not yet in analysis' lazy map

neural_collapse_of = analysis.neural_collapse_of
C, D, R, S = 5, 8, 3.0, 0.5


def _etf_means(c=C, d=D, r=R, seed=0):
    """Simplex-ETF class means of norm r in R^d, randomly rotated (they sum to zero)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(c, dtype=torch.float64) - 1.0 / c
    e = e / e.norm(dim=1, keepdim=True) * r
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    return torch.cat([e, torch.zeros(c, d - c, dtype=torch.float64)], 1) @ q


def _etf_samples(means, s=S):
    """mu_c +/- s e_k for every coordinate k: 2d samples per class, Sigma_W = (s^2/d) I."""
    c, d = means.shape
    eye = torch.eye(d, dtype=torch.float64) * s
    h = torch.cat([torch.cat([means[k] + eye, means[k] - eye]) for k in range(c)])
    y = torch.arange(c).repeat_interleave(2 * d)
    return h, y


def test_etf_oracle_values():
    m = _etf_means()
    h, y = _etf_samples(m)
    res = analysis.neural_collapse(h, y, (m, torch.zeros(C)))  # W = Mdot^T (means already centred)
    assert res.nc1 == pytest.approx((S**2 / D) * (C - 1) ** 2 / (C * R**2), rel=1e-10)
    assert res.nc1 == pytest.approx(0.011111, abs=1e-6)
    assert res.nc1_quotient == pytest.approx(S**2 / R**2, rel=1e-10)
    assert res.nc1_cdnv == pytest.approx(S**2 * (C - 1) / (2 * R**2 * C), rel=1e-10)
    for k in ("nc2_equinorm_means", "nc2_cos_std_means", "nc2_cos_shift_means", "nc2_etf_means",
              "nc2_equinorm_weights", "nc2_cos_std_weights", "nc2_cos_shift_weights", "nc2_etf_weights",
              "nc3", "nc3_zhu"):
        assert abs(getattr(res, k)) < 1e-10, k
    assert res.nc4_train == 0.0 and res.accuracy_train == 1.0 and res.ncc_accuracy_train == 1.0
    assert (res.num_classes, res.num_samples, res.feature_dim, res.pinv_rank) == (C, 2 * D * C, D, C - 1)
    assert res.global_mean == "sample" and "squared" in res.nc3_variant


def test_exact_etf_without_noise_has_zero_nc1():
    m = _etf_means(seed=3)
    h = m.repeat_interleave(4, 0)
    y = torch.arange(C).repeat_interleave(4)
    res = analysis.neural_collapse(h, y)
    assert abs(res.nc1) < 1e-20 and abs(res.nc1_quotient) < 1e-20 and abs(res.nc1_cdnv) < 1e-20
    assert res.nc3 is None and res.nc4_train is None


def _brute_force(h, y, w, b, c, global_mean):
    h, w, b = (np.asarray(a, dtype=np.float64) for a in (h, w, b))
    y = np.asarray(y)
    n, d = h.shape
    mu = np.stack([h[y == k].mean(0) for k in range(c)])
    mu_g = h.mean(0) if global_mean == "sample" else mu.mean(0)
    mdot = (mu - mu_g).T  # (d, C) as in Papyan
    sw = sum(np.outer(h[i] - mu[y[i]], h[i] - mu[y[i]]) for i in range(n)) / n
    sb = mdot @ mdot.T / c
    lam, vec = np.linalg.eigh(sb)
    top = np.argsort(lam)[::-1][: c - 1]
    sb_pinv = (vec[:, top] / lam[top]) @ vec[:, top].T
    var = np.array([((h[y == k] - mu[k]) ** 2).sum(1).mean() for k in range(c)])
    cdnv = np.mean([(var[i] + var[j]) / (2 * ((mu[i] - mu[j]) ** 2).sum())
                    for i in range(c) for j in range(c) if i < j])
    norms = np.linalg.norm(mdot, axis=0)
    cos = (mdot.T @ mdot) / np.outer(norms, norms)
    off = cos[~np.eye(c, dtype=bool)]
    g = mdot.T @ mdot
    etf = (np.eye(c) - 1.0 / c) / math.sqrt(c - 1)
    nc3 = np.linalg.norm(w.T / np.linalg.norm(w) - mdot / np.linalg.norm(mdot)) ** 2
    ncc = np.argmin(((h[:, None, :] - mu[None]) ** 2).sum(-1), 1)
    nc4 = np.mean(np.argmax(h @ w.T + b, 1) != ncc)
    return {"nc1": np.trace(sw @ sb_pinv) / c, "nc1_quotient": np.trace(sw) / np.trace(sb), "nc1_cdnv": cdnv,
            "nc2_equinorm_means": norms.std(ddof=1) / norms.mean(), "nc2_cos_std_means": off.std(ddof=1),
            "nc2_cos_shift_means": np.abs(off + 1 / (c - 1)).mean(),
            "nc2_etf_means": np.linalg.norm(g / np.linalg.norm(g) - etf), "nc3": nc3, "nc4_train": nc4}


@pytest.mark.parametrize("global_mean", ["sample", "class"])
def test_matches_brute_force_on_random_unbalanced_data(global_mean):
    g = torch.Generator().manual_seed(1)
    c, d = 4, 6
    y = torch.cat([torch.full((n,), k) for k, n in enumerate([5, 9, 14, 22])])
    h = torch.randn(len(y), d, generator=g, dtype=torch.float64) + 2.0 * torch.randn(c, d, generator=g,
                                                                                     dtype=torch.float64)[y]
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    res = analysis.neural_collapse(h, y, (w, b), global_mean=global_mean)
    ref = _brute_force(h, y, w, b, c, global_mean)
    for k, v in ref.items():
        assert getattr(res, k) == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert res.global_mean == global_mean


def test_global_mean_variants_differ_when_unbalanced():
    g = torch.Generator().manual_seed(2)
    y = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(5, dtype=torch.long), torch.full((5,), 2)])
    h = torch.randn(50, 5, generator=g) + 3 * torch.eye(5)[:3][y]
    a = analysis.neural_collapse(h, y, global_mean="sample")
    b = analysis.neural_collapse(h, y, global_mean="class")
    assert abs(a.nc1 - b.nc1) > 1e-3  # negative control for the option actually being used


def _random_problem(seed=0, n=200, c=5, d=7, sep=1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    y[:c] = torch.arange(c)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) + sep * torch.randn(c, d, generator=g,
                                                                                dtype=torch.float64)[y]
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    return h, y, w


SCALE_INVARIANT = ("nc1", "nc1_quotient", "nc1_cdnv", "nc2_equinorm_means", "nc2_cos_std_means",
                   "nc2_cos_shift_means", "nc2_etf_means", "nc3", "nc3_zhu", "nc4_train", "ncc_accuracy_train")


def test_invariant_to_scaling_features():
    h, y, w = _random_problem()
    a = analysis.neural_collapse(h, y, w)  # no bias: NC4 is scale invariant too
    b = analysis.neural_collapse(7.5 * h, y, w)
    for k in SCALE_INVARIANT:
        assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-9, abs=1e-12), k


def test_invariant_to_consistent_coordinate_permutation_with_negative_control():
    h, y, w = _random_problem(seed=4)
    b = torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    perm = torch.randperm(h.shape[1], generator=torch.Generator().manual_seed(5))
    a = analysis.neural_collapse(h, y, (w, b))
    p = analysis.neural_collapse(h[:, perm], y, (w[:, perm], b))
    for k, v in a.to_dict().items():
        if isinstance(v, float):
            assert getattr(p, k) == pytest.approx(v, rel=1e-9, abs=1e-12), k
    bad = analysis.neural_collapse(h[:, perm], y, (w, b))  # W's columns not permuted
    assert abs(bad.nc3 - a.nc3) > 1e-3


def test_random_features_large_nc1_and_chance_level_nc4():
    g = torch.Generator().manual_seed(0)
    n, c, d = 4000, 5, 10
    h = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    w = torch.randn(c, d, generator=g)
    res = analysis.neural_collapse(h, y, w)
    m = _etf_means()
    collapsed = analysis.neural_collapse(*_etf_samples(m), m)
    assert res.nc1 > 50 * collapsed.nc1 and res.nc1 > 10
    assert 0.8 - 0.05 < res.nc4_train < 0.8 + 0.05  # agreement ~ 1/C
    assert 0.2 - 0.05 < res.accuracy_train < 0.2 + 0.05


def test_test_features_use_train_means():
    m = _etf_means()
    h, y = _etf_samples(m)
    ht = m[torch.tensor([0, 1, 2, 3, 4, 0])] * 0.9
    yt = torch.tensor([0, 1, 2, 3, 4, 0])
    res = analysis.neural_collapse(h, y, m, test_features=ht, test_labels=yt)
    assert res.nc4_test == 0.0 and res.accuracy_test == 1.0 and res.ncc_accuracy_test == 1.0


def test_bias_option_is_used_and_recorded():
    h, y, w = _random_problem(seed=6, sep=0.5)
    b = torch.tensor([50.0, 0, 0, 0, 0], dtype=torch.float64)  # always predicts class 0 with the bias
    with_b = analysis.neural_collapse(h, y, (w, b), nc4_bias=True)
    without = analysis.neural_collapse(h, y, (w, b), nc4_bias=False)
    assert with_b.nc4_bias and not without.nc4_bias
    assert with_b.accuracy_train == pytest.approx(float((y == 0).double().mean()))
    assert with_b.nc4_train != without.nc4_train


def test_linear_module_equals_weight_bias_pair():
    h, y, _ = _random_problem(seed=7)
    lin = nn.Linear(7, 5)
    a = analysis.neural_collapse(h, y, lin)
    b = analysis.neural_collapse(h, y, (lin.weight.detach(), lin.bias.detach()))
    assert a == b


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_neural_collapse_of_model_matches_manual_features_and_leaves_model_untouched():
    torch.manual_seed(0)
    net = _Net().train()
    x = torch.randn(120, 6)
    y = torch.arange(120) % 4
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = neural_collapse_of(net, (x, y))
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    net.eval()
    with torch.no_grad():
        feats = net.body(x)
    net.train()
    ref = analysis.neural_collapse(feats, y, net.head)
    assert res.nc1 == pytest.approx(ref.nc1, rel=1e-6)
    assert res.nc4_train == ref.nc4_train
    # a named intermediate layer (output of the first ReLU), no classifier
    mid = neural_collapse_of(net, [(x[:60], y[:60]), (x[60:], y[60:])], layer="body.1")
    assert mid.feature_dim == 16 and mid.nc3 is None


def test_shuffled_loader_keeps_features_and_labels_aligned():
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(3)
    net = _Net()
    x, y = torch.randn(96, 6), torch.arange(96) % 4
    ref = neural_collapse_of(net, (x, y))
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    got = neural_collapse_of(net, loader)  # metrics are order invariant, so only alignment matters
    assert got.nc1 == pytest.approx(ref.nc1, rel=1e-6) and got.nc4_train == ref.nc4_train
    net.eval()
    wrong = analysis.neural_collapse(torch.cat([net.body(xb).detach() for xb, _ in loader]), y, net.head)
    assert abs(wrong.nc1 - ref.nc1) > 1e-3  # negative control: misaligned labels change NC1


def test_tracker_records_columns_from_model_and_from_features():
    torch.manual_seed(1)
    net = _Net()
    x, y = torch.randn(80, 6), torch.arange(80) % 4
    tr = analysis.CollapseTracker(test_data=(x[:20], y[:20]))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for epoch in range(3):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.update(epoch, net, (x, y))
    m = _etf_means()
    tr.update(3, *_etf_samples(m), m)
    hist = tr.history
    assert hist["epoch"] == [0, 1, 2, 3] and len(tr) == 4
    assert all(len(v) == 4 for v in hist.values())
    assert hist["nc1"][-1] == pytest.approx(0.011111, abs=1e-6)
    assert hist["nc4_test"][0] is not None and hist["nc4_test"][-1] is None


@pytest.mark.parametrize("case, err", [
    ("label_range", ValueError), ("negative_label", ValueError), ("one_class", ValueError),
    ("nan", ValueError), ("rows", ValueError), ("w_shape", ValueError), ("float_labels", TypeError),
    ("empty_class", ValueError), ("global_mean", ValueError), ("1d", ValueError),
])
def test_bad_input_raises(case, err):
    h, y, w = _random_problem(seed=8)
    kwargs = {}
    if case == "label_range":
        kwargs["num_classes"] = 3
    elif case == "negative_label":
        y = y.clone()
        y[0] = -1
    elif case == "one_class":
        y = torch.zeros_like(y)
    elif case == "nan":
        h = h.clone()
        h[3, 2] = float("nan")
    elif case == "rows":
        y = y[:-1]
    elif case == "w_shape":
        w = w[:, :-1]
    elif case == "float_labels":
        y = y.double()
    elif case == "empty_class":
        kwargs["num_classes"] = 7
    elif case == "global_mean":
        kwargs["global_mean"] = "median"
    elif case == "1d":
        h = h[:, 0]
    with pytest.raises(err) as info:
        analysis.neural_collapse(h, y, None if case == "1d" else w, **kwargs)
    assert len(str(info.value)) > 20  # says what was wrong
