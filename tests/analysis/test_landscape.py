"""Oracles for analysis.landscape / random_directions / pca_directions (Li et al. 2018, NeurIPS, arXiv:1712.09913)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import analysis


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def least_squares_model(N=50, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, p, generator=g, dtype=torch.float64)
    y = X @ torch.randn(p, generator=g, dtype=torch.float64) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(Xa, y[:, None]).solution[:, 0]
    m = nn.Linear(p, 1).double()
    with torch.no_grad():
        m.weight.copy_(sol[:p][None])
        m.bias.copy_(sol[p:])
    return m, X, y, Xa


def cnn(seed, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers).double()


def test_linear_regression_slice_is_the_exact_quadratic():
    m, X, y, Xa = least_squares_model()
    N = X.shape[0]
    dirs = analysis.random_directions(m, n=2, norm="filter", ignore=None, seed=3)
    ls = analysis.landscape(m, (X, y), directions=dirs, grid=5, span=(-1, 1), metrics=("loss",), loss_fn=mse)
    H = (2.0 / N) * Xa.T @ Xa
    d = torch.cat([dirs[0]["weight"].reshape(-1), dirs[0]["bias"]])
    e = torch.cat([dirs[1]["weight"].reshape(-1), dirs[1]["bias"]])
    L_star = float(mse(m(X), y).detach())
    a, b = ls.coords
    np.testing.assert_array_equal(a, [-1.0, -0.5, 0.0, 0.5, 1.0])
    expected = np.empty((5, 5))
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            v = ai * d + bj * e
            expected[i, j] = L_star + 0.5 * float(v @ H @ v)
    np.testing.assert_allclose(ls.values["data"]["loss"], expected, rtol=1e-10, atol=1e-12)
    assert ls.center["data"]["loss"] == pytest.approx(L_star, abs=1e-13)
    # 1-D slice along the first direction
    one = analysis.landscape(m, (X, y), directions=dirs[:1], grid=7, span=(-2, 2), metrics=("loss",), loss_fn=mse)
    assert one.dims == 1 and one.values["data"]["loss"].shape == (7,)
    quad = [L_star + 0.5 * float((t * d) @ H @ (t * d)) for t in one.coords[0]]
    np.testing.assert_allclose(one.values["data"]["loss"], quad, rtol=1e-10)


def test_filter_normalisation_norms_and_bias_handling():
    m = cnn(0)
    d = analysis.random_directions(m, n=2, norm="filter", ignore="biasbn", seed=0)
    params = dict(m.named_parameters())
    for dd in d:
        for k, t in dd.items():
            w = params[k].detach()
            if w.dim() > 1:
                np.testing.assert_allclose(t.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-8)
            else:
                assert torch.count_nonzero(t) == 0, k
    assert not torch.equal(d[0]["0.weight"], d[1]["0.weight"])
    same = analysis.random_directions(m, n=2, seed=0)
    other = analysis.random_directions(m, n=2, seed=1)
    assert torch.equal(same[1]["0.weight"], d[1]["0.weight"])
    assert not torch.equal(other[0]["0.weight"], d[0]["0.weight"])
    keep = analysis.random_directions(m, n=1, norm="filter", ignore=None, seed=0)[0]
    assert torch.equal(keep["1.bias"], params["1.bias"].detach())  # d = theta for 1-D tensors
    layer = analysis.random_directions(m, n=1, norm="layer", seed=0)[0]
    assert float(layer["4.weight"].norm()) == pytest.approx(float(params["4.weight"].detach().norm()), rel=1e-8)
    with pytest.raises(ValueError, match="norm"):
        analysis.random_directions(m, norm="unit")


def test_rescaled_conv_before_bn_gives_the_same_filter_normalised_plot():
    a = cnn(0)
    a.eval()
    with torch.no_grad():
        a[1].running_mean.normal_()
        a[1].running_var.uniform_(0.5, 2.0)
    c = 7.0
    b = copy.deepcopy(a)
    with torch.no_grad():  # the same function: conv * c, BN stats and eps rescaled accordingly
        b[0].weight.mul_(c)
        b[1].running_mean.mul_(c)
        b[1].running_var.mul_(c * c)
        b[1].eps = a[1].eps * c * c
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(30, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    la = analysis.landscape(a, (X, Y), grid=5, seed=4, metrics=("loss",))
    lb = analysis.landscape(b, (X, Y), grid=5, seed=4, metrics=("loss",))
    np.testing.assert_allclose(la.values["data"]["loss"], lb.values["data"]["loss"], rtol=1e-8)
    assert la.settings["mode"] == "vmap"
    # negative control: unnormalised directions see the rescaling
    ra = analysis.landscape(a, (X, Y), grid=5, seed=4, directions="none", metrics=("loss",))
    rb = analysis.landscape(b, (X, Y), grid=5, seed=4, directions="none", metrics=("loss",))
    assert np.abs(ra.values["data"]["loss"] - rb.values["data"]["loss"]).max() > 1e-3


def test_pca_recovers_planted_coefficients():
    torch.manual_seed(0)
    m = nn.Linear(12, 5).double()
    keys = [k for k, _ in m.named_parameters()]
    P = sum(p.numel() for p in m.parameters())
    Q, _ = torch.linalg.qr(torch.randn(P, 2, dtype=torch.float64))
    T = 12
    i = np.arange(T)
    a_true, b_true = 3.0 * np.cos(2 * np.pi * i / T), np.sin(2 * np.pi * i / T)  # centred, uncorrelated
    base = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def unflat(vec):
        out, off = {}, 0
        for k, p in m.named_parameters():
            out[k] = vec[off:off + p.numel()].reshape(p.shape).clone()
            off += p.numel()
        return out

    traj = [unflat(base + a_true[t] * Q[:, 0] + b_true[t] * Q[:, 1]) for t in range(T)]
    pca = analysis.pca_directions(traj, n=2)
    planted = np.stack([a_true - a_true[-1], b_true - b_true[-1]], 1)
    signs = np.sign(np.sum(pca.coords * planted, 0))
    np.testing.assert_allclose(pca.coords * signs, planted, atol=1e-10)
    np.testing.assert_allclose(pca.explained_variance, [np.var(a_true, ddof=1), np.var(b_true, ddof=1)], rtol=1e-10)
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-10)
    d0 = torch.cat([pca.directions[0][k].reshape(-1) for k in keys])
    assert abs(float(d0 @ Q[:, 0])) == pytest.approx(1.0, abs=1e-10)
    # the landscape stores the trajectory's coordinates in the PCA plane, centred at the final model
    final = copy.deepcopy(m)
    final.load_state_dict(traj[-1])
    X, y = torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    ls = analysis.landscape(final, (X, y), directions="pca", trajectory=traj, grid=3, metrics=("loss",),
                            loss_fn=lambda o, t: ((o - t) ** 2).mean())
    np.testing.assert_allclose(np.abs(ls.trajectory), np.abs(planted), atol=1e-10)
    assert ls.settings["directions"] == "pca" and ls.explained_variance_ratio is not None
    with pytest.raises(ValueError, match="at most"):
        analysis.pca_directions(traj[:2], n=2)


def test_centre_is_the_model_loss_vmap_equals_loop_and_nothing_is_mutated():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    m.train()
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    X, Y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    calls = []
    ls = analysis.landscape(m, {"train": (X, Y)}, grid=21, batch_points=100, progress=lambda d, t: calls.append((d, t)))
    assert ls.coords[0][10] == 0.0 and ls.coords[1][10] == 0.0
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(m(X), Y))
        acc = float((m(X).argmax(1) == Y).double().mean())
    assert ls.values["train"]["loss"][10, 10] == pytest.approx(loss, abs=1e-6)
    assert ls.center["train"]["loss"] == pytest.approx(loss, abs=1e-6)
    assert ls.center["train"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert calls[-1] == (441, 441) and len(calls) == 5
    loop = analysis.landscape(m, {"train": (X, Y)}, grid=(5, 3), span=((-1, 1), (-0.5, 0.5)), batched=False)
    vm = analysis.landscape(m, {"train": (X, Y)}, grid=(5, 3), span=((-1, 1), (-0.5, 0.5)), batched=True)
    np.testing.assert_allclose(loop.values["train"]["loss"], vm.values["train"]["loss"], atol=1e-6)
    assert loop.values["train"]["loss"].shape == (5, 3)
    np.testing.assert_allclose(vm.values["train"]["loss"], ls.values["train"]["loss"][::5, 5:16:5], atol=1e-6)
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k])
    d = ls.to_dict()
    assert d["settings"]["seed"] == 0 and len(d["direction_norms"]) == 2


def test_landscape_bad_arguments():
    m = nn.Linear(3, 2)
    data = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    with pytest.raises(ValueError, match="dims"):
        analysis.landscape(m, data, dims=3)
    with pytest.raises(ValueError, match="trajectory"):
        analysis.landscape(m, data, directions="pca")
    with pytest.raises(ValueError, match="not a floating parameter"):
        analysis.landscape(m, data, directions=[{"nope": torch.zeros(2)}])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        analysis.landscape(m, data, directions=[{"bias": torch.zeros(3)}])
    with pytest.raises(ValueError, match="span"):
        analysis.landscape(m, data, span=(1, -1))
