"""REPAIR and BN reset: goal statistics reached exactly, endpoints reproduced, BN networks."""

import pytest
import torch

import merging
from weightspace import zoo
from weightspace.features import activation_stats
from weightspace.state import state_of


@pytest.fixture(scope="module")
def digits():
    X, Y = zoo.load_digits("train")
    return X[:500], Y[:500]


def _goal(ends, weights, data, pts):
    stats = [activation_stats(m, data, pts, covariance=False) for m in ends]
    mu = {p: sum(w * s[p].mean for w, s in zip(weights, stats)) for p in pts}
    sd = {p: sum(w * s[p].std for w, s in zip(weights, stats)) for p in pts}
    return mu, sd


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_repair_reaches_interpolated_statistics_without_batchnorm(alpha, digits):
    a, b = zoo.make("mlp", hidden=(32, 32), seed=0), zoo.make("mlp", hidden=(32, 32), seed=1)
    res = merging.merge(
        a,
        b,
        method="weight_matching",
        example_inputs=digits[0][:2],
        data=digits,
        repair="repair",
        alpha=alpha,
        device="cpu",
    )
    pts = res.log["repair"]["points"]
    assert pts == ["fc.0", "fc.1"]  # the head (model output) is not touched
    mu, sd = _goal([a, res.alignment.apply(b)], [1 - alpha, alpha], digits, pts)
    got = activation_stats(res.model, digits, pts, covariance=False)
    for p in pts:
        torch.testing.assert_close(got[p].mean, mu[p], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[p].std, sd[p], rtol=1e-5, atol=1e-6)
    if alpha in (0.0, 1.0):  # an endpoint: nothing moves
        end = state_of(a) if alpha == 0.0 else res.alignment.apply(state_of(b))
        for k, v in end.items():
            torch.testing.assert_close(res.state_dict[k], v, rtol=1e-6, atol=1e-6)
    else:  # negative control: the plain merge has collapsed variance
        plain = merging.merge(a, b, method="weight_matching", spec=res.spec, device="cpu")
        got0 = activation_stats(plain.model, digits, pts, covariance=False)
        assert float(got0["fc.1"].std.mean()) < 0.95 * float(sd["fc.1"].mean())


def test_repair_after_average_and_for_three_models(digits):
    ms = [zoo.make("mlp", hidden=(16,), seed=s) for s in range(3)]
    res = merging.merge(*ms, weights=[0.2, 0.3, 0.5], data=digits, repair="repair", device="cpu")
    mu, sd = _goal(ms, [0.2, 0.3, 0.5], digits, ["fc.0"])
    got = activation_stats(res.model, digits, ["fc.0"], covariance=False)["fc.0"]
    torch.testing.assert_close(got.std, sd["fc.0"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mean, mu["fc.0"], rtol=0, atol=1e-5)


def test_repair_and_bn_reset_on_a_batchnorm_resnet():
    torch.manual_seed(0)
    a, b = zoo.make("resnet20", width=1, norm="batch", seed=0), zoo.make("resnet20", width=1, norm="batch", seed=1)
    x = zoo.example_inputs(a)
    data = (torch.randn((16,) + tuple(x.shape[1:])), torch.zeros(16, dtype=torch.long))
    for m in (a, b):  # distinct running statistics
        m.train()
        with torch.no_grad():
            m(data[0])
        m.eval()
    res = merging.merge(a, b, data=data, repair="repair", device="cpu")  # REPAIR after any method: here averaging
    pts = res.log["repair"]["points"]
    mods = dict(res.model.named_modules())
    assert any(isinstance(mods[p], torch.nn.BatchNorm2d) for p in pts)
    mu, sd = _goal([a, b], [0.5, 0.5], data, pts)
    got = activation_stats(res.model, data, pts, covariance=False)
    for p in pts:
        torch.testing.assert_close(got[p].std, sd[p], rtol=1e-4, atol=1e-5)
    reset = merging.merge(a, b, data=data, repair="bn_reset", device="cpu")
    bn_keys = [k for k in reset.state_dict if k.endswith("running_mean")]
    assert bn_keys and any(not torch.equal(reset.state_dict[k], res.state_dict[k]) for k in bn_keys)
