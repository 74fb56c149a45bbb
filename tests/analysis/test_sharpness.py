"""Hessian eigenvalues and trace against the exact Hessian of linear least squares, H = (2/N) X^T X."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import analysis


def _problem(seed=0, n=40, d=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    Y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    net = nn.Linear(d, 1, bias=False).double()
    H = (2.0 / n) * (X.T @ X).numpy()
    return net, X, Y, H


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top2_match_eigvalsh(method):
    net, X, Y, H = _problem()
    exact = np.linalg.eigvalsh(H)[::-1][:2]
    res = analysis.hessian_eigenvalues(net, (X, Y), k=2, method=method, tol=1e-12, max_iter=2000)
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=1e-6)
    assert res.converged and res.method == method and res.which == "LA"
    # eigenvectors: H v = lambda v (power iteration stops on the eigenvalue, its vectors are less exact)
    for lam, vec in zip(res.eigenvalues, res.eigenvectors):
        v = vec["weight"].reshape(-1).numpy()
        assert np.linalg.norm(v) == pytest.approx(1.0)
        np.testing.assert_allclose(H @ v, lam * v, atol=(1e-8 if method == "lanczos" else 1e-4) * lam)


def test_minibatches_give_full_data_hessian():
    net, X, Y, H = _problem(seed=1)
    batches = [(X[i:i + 7], Y[i:i + 7]) for i in range(0, 40, 7)]
    res = analysis.hessian_eigenvalues(net, batches, k=1, tol=1e-12)
    assert res.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-9)


def test_trace_within_standard_errors():
    net, X, Y, H = _problem(seed=2)
    res = analysis.hessian_trace(net, (X, Y), n_samples=200, seed=0)
    assert len(res.samples) == 200 and res.std_error > 0
    assert abs(res.mean - np.trace(H)) < 4 * res.std_error
    np.testing.assert_allclose(res.mean, np.mean(res.samples))


def _neg_mse(out, y):
    return -F.mse_loss(out, y)


def test_concave_loss_negative_top_eigenvalue():
    net, X, Y, H = _problem(seed=3)
    w = np.linalg.eigvalsh(-H)  # concave: every eigenvalue < 0
    la = analysis.hessian_eigenvalues(net, (X, Y), k=1, loss_fn=_neg_mse, tol=1e-12)
    assert la.eigenvalues[0] == pytest.approx(w[-1], rel=1e-6) and la.eigenvalues[0] < 0
    la_p = analysis.hessian_eigenvalues(net, (X, Y), k=1, loss_fn=_neg_mse, method="power", tol=1e-12,
                                        max_iter=5000)
    assert la_p.eigenvalues[0] == pytest.approx(w[-1], rel=1e-5)
    # negative control: largest magnitude is the most negative eigenvalue, not lambda_max
    lm = analysis.hessian_eigenvalues(net, (X, Y), k=1, loss_fn=_neg_mse, which="LM", method="power",
                                      tol=1e-12, max_iter=2000)
    assert lm.eigenvalues[0] == pytest.approx(w[0], rel=1e-6)
    assert lm.eigenvalues[0] < la.eigenvalues[0]


def test_deterministic_and_model_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    X, Y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = analysis.hessian_eigenvalues(net, (X, Y), k=2, max_iter=20)
    b = analysis.hessian_eigenvalues(net, (X, Y), k=2, max_iter=20)
    assert a.eigenvalues == b.eigenvalues
    t1 = analysis.hessian_trace(net, (X, Y), n_samples=5, seed=3)
    t2 = analysis.hessian_trace(net, (X, Y), n_samples=5, seed=3)
    assert t1.samples == t2.samples
    assert analysis.hessian_trace(net, (X, Y), n_samples=5, seed=4).samples != t1.samples
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # train mode runs on cloned buffers: the user's running stats stay as they were
    analysis.hessian_trace(net, (X, Y), n_samples=2, mode="train")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_input():
    net, X, Y, _ = _problem()
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        analysis.hessian_eigenvalues(net, (Xn, Y))
    with pytest.raises(ValueError, match="method"):
        analysis.hessian_eigenvalues(net, (X, Y), method="arnoldi")
    with pytest.raises(ValueError, match="exceeds"):
        analysis.hessian_eigenvalues(net, (X, Y), k=7)
    with pytest.raises(ValueError, match="empty"):
        analysis.hessian_trace(net, [])
    clf = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="labels out of range"):
        analysis.hessian_trace(clf, (torch.randn(4, 3), torch.tensor([0, 1, 2, 1])))
