"""Power-law fits, WeightWatcher-style layer spectra and Jiang et al. norm measures on known matrices."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn as nn

import analysis


# ---------------------------------------------------------------- power-law fit
def _pareto(alpha, n, seed, xmin=1.0):
    rng = np.random.default_rng(seed)
    return xmin * (1.0 + rng.pareto(alpha - 1.0, size=n))  # density ~ x^-alpha on [xmin, inf)


def test_fixed_xmin_is_closed_form_mle_and_scipy_ks():
    x = _pareto(3.0, 5000, seed=0)
    fit = analysis.fit_power_law(x, xmin=1.0)
    alpha = 1 + x.size / np.log(x).sum()
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin_fixed and fit.n_tail == 5000
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(5000))
    ks = scipy.stats.kstest(x, scipy.stats.pareto(b=alpha - 1, scale=1.0).cdf).statistic
    assert fit.D == pytest.approx(ks, rel=1e-9)


@pytest.mark.parametrize("alpha,seed", [(2.5, 1), (3.0, 2), (4.0, 3)])
def test_recovers_pareto_exponent(alpha, seed):
    x = _pareto(alpha, 20000, seed)
    fit = analysis.fit_power_law(x)
    assert not fit.xmin_fixed and fit.n_tail >= 5
    assert abs(fit.alpha - alpha) < 4 * fit.sigma
    assert fit.D < 0.05


def test_xmin_selection_ignores_a_non_power_law_bulk():
    rng = np.random.default_rng(4)
    bulk = rng.uniform(0.0, 1.0, 3000)          # not a power law
    tail = _pareto(3.0, 3000, seed=5, xmin=1.0)
    fit = analysis.fit_power_law(np.r_[bulk, tail])
    assert fit.xmin >= 0.9
    assert abs(fit.alpha - 3.0) < 4 * fit.sigma
    # negative control: forcing xmin into the bulk gives a poor fit
    assert analysis.fit_power_law(np.r_[bulk, tail], xmin=0.05).D > 3 * fit.D


def test_fit_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        analysis.fit_power_law([1.0, np.nan, 2.0])
    with pytest.raises(ValueError):
        analysis.fit_power_law([])
    with pytest.raises(ValueError, match="at least"):
        analysis.fit_power_law([1.0, 2.0])


# ---------------------------------------------------------------- spectral metrics
def _with_singular_values(n_out, n_in, s, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    S = torch.zeros(n_out, n_in, dtype=torch.float64)
    S[range(len(s)), range(len(s))] = torch.as_tensor(s, dtype=torch.float64)
    return U @ S @ V.T


def test_linear_layer_known_spectrum():
    s = np.linspace(0.5, 4.0, 12)
    net = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3)).double()
    with torch.no_grad():
        net[0].weight.copy_(_with_singular_values(20, 12, s, 0))
    res = analysis.spectral_metrics(net, min_size=10)
    rec = {r.name: r for r in res.layers}
    r0 = rec["0"]
    lam = s ** 2
    assert not r0.skipped and (r0.N, r0.M, r0.n_eigenvalues) == (20, 12, 12)
    assert r0.lambda_max == pytest.approx(16.0)
    assert r0.log_spectral_norm == pytest.approx(math.log10(16.0))
    assert r0.log_norm == pytest.approx(math.log10(lam.sum()))
    assert r0.stable_rank == pytest.approx(lam.sum() / 16.0)
    p = lam / lam.sum()
    assert r0.entropy == pytest.approx(-(p * np.log(p)).sum() / math.log(12))
    assert r0.alpha_weighted == pytest.approx(r0.alpha * math.log10(16.0))
    fit = analysis.fit_power_law(lam, min_tail=5)
    assert r0.alpha == pytest.approx(fit.alpha) and r0.xmin == pytest.approx(fit.xmin)
    # the small layer is reported, not dropped
    assert rec["2"].skipped and "min_size" in rec["2"].reason and rec["2"].M == 3
    assert [d["name"] for d in res.to_dicts()] == ["0", "2"]


def test_conv_split_per_kernel_position():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3)
    res = analysis.spectral_metrics(nn.Sequential(conv), fit=False)
    r = res.layers[0]
    assert (r.n_slices, r.N, r.M, r.n_eigenvalues) == (9, 128, 64, 576)
    W = conv.weight.detach().double()
    assert r.log_norm == pytest.approx(math.log10(float((W ** 2).sum())), rel=1e-10)
    lmax = max(float(torch.linalg.matrix_norm(W[:, :, i, j], ord=2)) ** 2 for i in range(3) for j in range(3))
    assert r.lambda_max == pytest.approx(lmax, rel=1e-10)


def test_unsupported_modules_reported():
    net = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
    res = analysis.spectral_metrics(net)
    assert len(res.layers) == 2 and len(res.skipped) == 1
    assert "Embedding" in res.skipped[0].reason


# ---------------------------------------------------------------- norm measures
def _known_net():
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        net[2].weight.copy_(torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.5]]))
    return net


def test_norm_measures_analytic():
    res = analysis.norm_measures(_known_net())
    assert res.n_layers == 2
    assert res.sum_spectral == pytest.approx(9 + 16)
    assert res.log_prod_spectral == pytest.approx(math.log(9) + math.log(16))
    assert res.sum_frobenius == pytest.approx(14 + 16.25)
    assert res.log_prod_frobenius == pytest.approx(math.log(14) + math.log(16.25))
    assert res.frobenius_over_spectral == pytest.approx(14 / 9 + 16.25 / 16)
    assert res.margin is None and res.dist_from_init is None


def test_dist_from_init_and_bn_folding():
    net = _known_net()
    init = _known_net()
    with torch.no_grad():
        init[0].weight.fill_(0.0)
    res = analysis.norm_measures(net, init_model=init)
    assert res.dist_from_init == pytest.approx(14.0)
    bn_net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        bn_net[0].weight.copy_(torch.eye(3, dtype=torch.float64))
        bn_net[1].running_var.copy_(torch.tensor([3.0, 8.0, 0.0]))
        bn_net[1].weight.copy_(torch.tensor([2.0, 1.0, 1.0]))
    eps = bn_net[1].eps
    a = np.array([2 / math.sqrt(3 + eps), 1 / math.sqrt(8 + eps), 1 / math.sqrt(eps)])
    res = analysis.norm_measures(bn_net)
    assert res.layers[0]["spectral_sq"] == pytest.approx(a.max() ** 2)
    assert res.layers[0]["frobenius_sq"] == pytest.approx((a ** 2).sum())
    assert "folded 1" in res.settings["bn"]
    raw = analysis.norm_measures(bn_net, fold_bn=False)  # negative control
    assert raw.layers[0]["spectral_sq"] == pytest.approx(1.0)


def test_margin_on_hand_made_logits():
    net = nn.Sequential(nn.Linear(3, 3, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3, dtype=torch.float64))
    # 11 samples with margins 0, 1, ..., 10 (label 0 wins by m over the runner-up)
    X = torch.tensor([[float(m), 0.0, -1.0] for m in range(11)], dtype=torch.float64)
    Y = torch.zeros(11, dtype=torch.long)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    res = analysis.norm_measures(net, (X[perm], Y[perm]))
    assert res.margin == pytest.approx(1.0)  # 10th percentile of 0..10
    assert res.log_prod_spectral_over_margin == pytest.approx(0.0)  # spectral norm 1, margin 1
    assert res.path_norm_sq == pytest.approx(3.0)
    # a wrong label gives a negative margin for that sample
    X2 = torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64)
    assert analysis.norm_measures(net, (X2, torch.tensor([0]))).margin == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="labels out of range"):
        analysis.norm_measures(net, (X2, torch.tensor([3])))


def test_norm_measures_fold_batchnorm_in_models_fx_cannot_trace():
    """The zoo MLP has Python control flow in forward (torch.fx fails); with data the BN pairs come
    from an eager run, and folding equals scaling the rows by gamma / sqrt(var + eps)."""
    from weightspace import zoo

    model = zoo.MLP(64, (16, 8), 10, norm="batch", seed=0)
    g = torch.Generator().manual_seed(0)
    for bn in model.norms:
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        bn.weight.data.copy_(torch.randn(bn.weight.shape, generator=g))
    X, Y = zoo.load_digits("test")
    res = analysis.norm_measures(model, (X, Y), path_norm=False)
    assert res.settings["bn"].startswith("folded 2")
    layer = next(l for l in res.layers if l["name"] == "fc.0")
    bn = model.norms[0]
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    W = (model.fc[0].weight.double() * scale[:, None]).detach()
    assert layer["frobenius_sq"] == pytest.approx(float((W ** 2).sum()), rel=1e-10)
    unfolded = analysis.norm_measures(model, (X, Y), path_norm=False, fold_bn=False)
    fc0 = next(l for l in unfolded.layers if l["name"] == "fc.0")
    assert fc0["frobenius_sq"] != pytest.approx(layer["frobenius_sq"])
