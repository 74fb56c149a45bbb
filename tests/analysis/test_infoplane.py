"""Information-plane estimators: analytic values (H(Y), log N, Gaussian MI, Renyi sanity values),
agreement with scikit-learn's kNN estimators, binning edge handling, model capture and bad input."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import analysis
import analysis.infoplane  # entropy: a public name not yet in analysis' lazy map

entropy = analysis.entropy


def _plugin_entropy(labels, base=2.0):
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(base))


# ------------------------------------------------------------------------------------- binning
def test_binning_t_equal_y_gives_h_y():
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=500, p=[0.5, 0.25, 0.15, 0.1])
    t = np.eye(4)[y] * 0.8 - 0.4  # T is a continuous copy of Y
    got = analysis.mutual_information(t, y, "binning", binning="fixed", range=(-1, 1))
    assert got == pytest.approx(_plugin_entropy(y), abs=1e-12)
    assert analysis.mutual_information(t, y, "binning", units="nats") == pytest.approx(_plugin_entropy(y, math.e),
                                                                                       abs=1e-12)
    shuffled = rng.permutation(y)  # negative control: independent labels give ~0
    assert analysis.mutual_information(t, shuffled, "binning") < 0.05


def test_binning_distinct_t_gives_log_n():
    n = 64
    x = np.arange(n)  # distinct inputs, as symbols
    t = np.stack([np.linspace(-0.95, 0.95, n), np.zeros(n)], 1)  # 64 distinct values, bins narrower than spacing
    fine = analysis.mutual_information(x, t, "binning", bins=100, binning="fixed")
    assert fine == pytest.approx(math.log2(n), abs=1e-12)
    coarse = analysis.mutual_information(x, t, "binning", bins=4, binning="fixed")
    counts, _ = np.histogram(t[:, 0], bins=4, range=(-1, 1))  # NumPy's histogram as the reference
    p = counts / n
    assert coarse == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-12) and coarse < math.log2(n)


def test_binning_edges_do_not_wrap_and_upper_edge_is_last_bin():
    opts = dict(estimator="binning", bins=4, binning="fixed", range=(-1.0, 1.0))
    # the upper edge belongs to the last bin [0.5, 1]: same symbol as 0.99 -> zero entropy
    assert entropy(np.array([1.0, 0.99]), **opts) == 0.0
    # below the lower edge -> first bin (with a warning), not the last one
    with pytest.warns(RuntimeWarning, match="outside the fixed binning range"):
        assert entropy(np.array([-1.5, -0.99]), **opts) == 0.0
    with pytest.warns(RuntimeWarning):
        assert entropy(np.array([-1.5, 0.99]), **opts) == pytest.approx(1.0)  # a wrap would give 0
    with pytest.warns(RuntimeWarning):
        assert entropy(np.array([3.0, 0.6]), **opts) == 0.0  # above the range -> last bin
    # interior edges are left-closed: 0.0 shares [0, 0.5) with 0.25 but not with -0.01
    assert entropy(np.array([0.0, 0.25]), **opts) == 0.0
    assert entropy(np.array([0.0, -0.01]), **opts) == pytest.approx(1.0)
    # adaptive: the maximum goes to the last bin, not a bin of its own
    vals = np.arange(11.0)  # edges 0, 5, 10 -> counts 5 and 6
    p = np.array([5, 6]) / 11
    assert entropy(vals, "binning", bins=2, binning="adaptive") == pytest.approx(float(-(p * np.log2(p)).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entropy(np.array([-1.0, 1.0]), **opts)  # the closed range itself does not warn


def test_quantile_binning_is_equal_mass():
    x = np.random.default_rng(1).exponential(size=(1000, 1))
    assert entropy(x, "binning", bins=8, binning="quantile") == pytest.approx(3.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_knn_bivariate_gaussian(rho):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5000, 2))
    x, y = z[:, 0], rho * z[:, 0] + math.sqrt(1 - rho**2) * z[:, 1]
    got = analysis.mutual_information(x, y, "knn", units="nats", k=3)
    assert got == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.03)


def test_knn_matches_sklearn():
    from sklearn.feature_selection import mutual_info_classif, mutual_info_regression
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1500)
    y = np.sin(2 * x) + 0.3 * rng.standard_normal(1500)
    ours = analysis.mutual_information(x, y, "knn", units="nats")
    ref = mutual_info_regression(x[:, None], y, n_neighbors=3, random_state=0)[0]
    assert ours == pytest.approx(ref, abs=1e-6)
    lab = rng.integers(0, 3, 1500)
    xc = lab + rng.standard_normal(1500)
    ours_cd = analysis.mutual_information(xc, lab, "knn", units="nats")
    ref_cd = mutual_info_classif(xc[:, None], lab, n_neighbors=3, random_state=0)[0]
    assert ours_cd == pytest.approx(ref_cd, abs=1e-6) and ours_cd > 0.1


# ----------------------------------------------------------------------------------------- KDE
def test_kde_bounds_range_and_limits():
    rng = np.random.default_rng(3)
    n = 200
    t = rng.standard_normal((n, 3))
    y = rng.integers(0, 4, n)
    for s2 in (1e-3, 1e-1, 10.0):
        up = analysis.mutual_information(t, t, "kde", units="nats", sigma2=s2)
        lo = analysis.mutual_information(t, t, "kde", units="nats", sigma2=s2, bound="lower")
        assert -1e-12 <= lo <= up <= math.log(n) + 1e-12
    # tiny noise: distinct points are resolved -> ln N, and I(T;Y) -> H(Y) exactly
    assert analysis.mutual_information(t, t, "kde", units="nats", sigma2=1e-8) == pytest.approx(math.log(n), abs=1e-9)
    assert analysis.mutual_information(t, y, "kde", units="nats",
                                       sigma2=1e-8) == pytest.approx(_plugin_entropy(y, math.e), abs=1e-9)
    # huge noise: nothing is resolved -> 0
    assert analysis.mutual_information(t, t, "kde", units="nats", sigma2=1e8) < 1e-6


def test_kde_entropy_of_single_point_is_noise_entropy():
    d, s2 = 3, 0.2
    h = entropy(np.zeros((1, d)), "kde", units="nats", sigma2=s2)
    assert h == pytest.approx(0.5 * d * (math.log(2 * math.pi * s2) + 1))  # exact Gaussian entropy


# --------------------------------------------------------------------------------------- Renyi
def test_renyi_sanity_values():
    n = 40
    same = np.ones((n, 3))
    assert abs(entropy(same, "renyi")) < 1e-9
    assert abs(analysis.mutual_information(same, same, "renyi")) < 1e-9
    far = np.arange(n)[:, None] * 100.0 * np.ones((1, 2))  # K = I up to exp(-huge)
    assert entropy(far, "renyi", sigma=1.0) == pytest.approx(math.log2(n), abs=1e-9)
    assert analysis.mutual_information(far, far, "renyi", sigma=1.0) == pytest.approx(math.log2(n), abs=1e-9)
    # delta kernel on labels: S_alpha of the label distribution
    lab = np.repeat(np.arange(3), [10, 20, 10])
    p, a = np.array([0.25, 0.5, 0.25]), 1.5
    assert entropy(lab, "renyi", alpha=a) == pytest.approx(math.log2((p**a).sum()) / (1 - a), abs=1e-9)


# ------------------------------------------------------------------------------ information plane
def _tanh_net(weight=1.0):
    net = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[0].bias.zero_()
    return net


def test_information_plane_binning_analytic_and_model_untouched():
    n = 8
    x = torch.linspace(-0.6, 0.6, n)[:, None]  # tanh keeps the 8 values > 1 bin (2/30) apart
    y = (torch.arange(n) % 2).long()
    net = _tanh_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ip = analysis.information_plane(net, (x, y))
    assert ip.layers == ("1", "3") and ip.estimator == "binning" and ip.units == "bits"
    assert ip.layer_settings[0] == {"binning": "fixed", "range": (-1.0, 1.0)}
    assert ip.i_xt[0] == pytest.approx(3.0, abs=1e-12) and ip.h_x == pytest.approx(3.0)
    assert ip.i_ty[0] == pytest.approx(1.0, abs=1e-12) and ip.h_y == pytest.approx(1.0)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    collapsed = analysis.information_plane(_tanh_net(weight=0.0), (x, y), layers=["1"])
    assert collapsed.i_xt == (0.0,) and collapsed.i_ty == (0.0,)  # negative control
    nats = analysis.information_plane(net, (x, y), units="nats")
    assert nats.i_xt[0] == pytest.approx(3.0 * math.log(2))


def test_information_plane_relu_uses_adaptive_bins_and_fixed_range_warns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.mul_(10)
    x, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
    ip = analysis.information_plane(net, (x, y))
    assert ip.layer_settings[0]["binning"] == "adaptive" and 0 < ip.i_xt[0] <= ip.h_x + 1e-12
    with pytest.warns(RuntimeWarning, match="unbounded activations"):
        analysis.information_plane(net, (x, y), binning="fixed", range=(-1, 1))
    lin = analysis.information_plane(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), (x, y))
    assert lin.layers == ("0", "1")  # no activation modules: the Linear outputs


@pytest.mark.parametrize("estimator, opts", [("kde", {"sigma2": 0.1}), ("knn", {}), ("renyi", {})])
def test_information_plane_other_estimators_are_bounded_and_recorded(estimator, opts):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(150, 5), torch.randint(0, 3, (150,))
    ip = analysis.information_plane(net, [(x[:70], y[:70]), (x[70:], y[70:])], estimator=estimator, units="nats",
                                    **opts)
    assert ip.estimator == estimator and ip.num_samples == 150 and len(ip.layers) == 2
    assert all(np.isfinite(ip.i_xt)) and all(np.isfinite(ip.i_ty))
    assert all(v >= -1e-9 for v in ip.i_xt + ip.i_ty)
    if estimator == "kde":
        assert ip.options["sigma2"] == 0.1 and ip.options["bound"] == "upper"
        assert all(v <= math.log(150) + 1e-9 for v in ip.i_xt)
        assert all(v <= ip.h_y + 1e-6 for v in ip.i_ty)


def test_tracker_trajectories_and_compression_rule():
    torch.manual_seed(2)
    net = _tanh_net()
    x, y = torch.linspace(-0.6, 0.6, 8)[:, None], (torch.arange(8) % 2).long()
    tr = analysis.InformationPlaneTracker(estimator="binning")
    for e in range(3):
        tr.update(e, net, (x, y))
    assert set(tr.trajectories) == {"1", "3"} and tr.trajectories["1"]["epoch"] == [0, 1, 2]
    assert len(tr.history["epoch"]) == 6
    # the compression rule on hand-made trajectories: rise-then-fall compresses, a rise does not
    tr2 = analysis.InformationPlaneTracker()
    mk = lambda a, b: analysis.InformationPlane(("up", "hump"), (a, b), (0.0, 0.0), "binning", {}, "bits", 10, 3.0, 1.0)
    for e, (a, b) in enumerate([(1, 1), (2, 3), (2.5, 2.8), (3, 2.0), (3, 1.9)]):
        tr2.epochs.append(e)
        tr2.planes.append(mk(a, b))
    comp = tr2.compression(rel_threshold=0.05, final_fraction=0.4)
    assert comp["hump"]["compressed"] and comp["hump"]["peak_epoch"] == 1
    assert comp["hump"]["drop"] == pytest.approx(3 - 1.95)
    assert not comp["up"]["compressed"]


class _Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(3, 4), nn.Linear(4, 2), nn.Tanh()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


@pytest.mark.parametrize("call, err", [
    (lambda: analysis.information_plane(_Reuse(), (torch.zeros(4, 3), torch.zeros(4).long())), ValueError),
    (lambda: analysis.mutual_information(np.zeros(5), np.zeros(4)), ValueError),
    (lambda: analysis.mutual_information(np.array([1.0, np.nan, 2.0]), np.zeros(3)), ValueError),
    (lambda: analysis.mutual_information(np.zeros(5), np.zeros(5), "histogram"), ValueError),
    (lambda: analysis.mutual_information(np.zeros(5), np.zeros(5), "knn", bins=3), TypeError),
    (lambda: analysis.mutual_information(np.zeros(5), np.zeros(5), "binning", units="bans"), ValueError),
    (lambda: analysis.mutual_information(np.zeros(5), np.zeros(5), "binning", binning="log"), ValueError),
    (lambda: analysis.mutual_information(np.zeros(5), np.ones(5), "knn", k=5), ValueError),
    (lambda: analysis.mutual_information(np.zeros(5), np.ones(5), "kde", sigma2=0.0), ValueError),
    (lambda: analysis.mutual_information(np.zeros(0), np.zeros(0)), ValueError),
    (lambda: analysis.information_plane(nn.Linear(2, 2), (torch.zeros(3, 2), torch.zeros(3).long()), layers=["nope"]),
     ValueError),
    (lambda: analysis.information_plane("model", (torch.zeros(3, 2), torch.zeros(3))), TypeError),
])
def test_bad_input_raises(call, err):
    with pytest.raises(err):
        call()
