"""Oracles for analysis.interpolate / InterpolationCurve.barrier / layerwise_barriers (Frankle et al. 2020,
arXiv:1912.05671; Entezari et al. 2022, arXiv:2110.06296; Adilova et al. 2024, arXiv:2307.06966)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import analysis
from _models import mlp as shared_mlp


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
class Scalar(nn.Module):
    """A 'model' whose output is its parameter: with loss (out^2 - 1)^2 the loss is (theta^2 - 1)^2."""

    def __init__(self, v):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([float(v)], dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(x.shape[0], 1)


def double_well(out, y):
    return ((out ** 2 - 1) ** 2).mean()


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def mlp(seed, width=16, bn=False, dtype=torch.float32):
    return shared_mlp((6, width, width, 4), seed, bn_after=(0,) if bn else (), dtype=dtype)


def cls_data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    Y = torch.randint(0, 4, (n,), generator=g)
    return X, Y


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [getattr(m, "momentum", None) for m in model.modules()])


def assert_unchanged(model, snap):
    sd, modes, moms = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [getattr(m, "momentum", None) for m in model.modules()] == moms


def direct_loss(model, X, Y):
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(m(X), Y))


# ---------------------------------------------------------------------------------------------
# barriers: analytic oracles
# ---------------------------------------------------------------------------------------------
def test_double_well_barriers_are_one_at_half():
    a, b = Scalar(-1.0), Scalar(1.0)
    data = (torch.zeros(5, 1), torch.zeros(5))
    curve = analysis.interpolate(a, b, data, alphas=11, metrics=("loss",), loss_fn=double_well)
    alphas = curve.alphas
    expected = ((2 * alphas - 1) ** 2 - 1) ** 2
    np.testing.assert_allclose(curve.values["data"]["loss"], expected, atol=1e-12)
    for kind in ("chord", "mean_endpoint", "midpoint"):
        bar = curve.barrier("loss", kind=kind)
        assert bar.value == pytest.approx(1.0, abs=1e-12)
        assert bar.alpha == 0.5
        assert bar.kind == kind and bar.metric == "loss"
    assert curve.barrier().endpoint_a == pytest.approx(0.0, abs=1e-12)


def test_model_with_itself_has_zero_barrier():
    m = mlp(0)
    X, Y = cls_data()
    curve = analysis.interpolate(m, m, (X, Y), alphas=7)
    for metric in ("loss", "accuracy"):
        for kind in ("chord", "mean_endpoint", "midpoint"):
            assert abs(curve.barrier(metric, kind=kind).value) < 1e-6
    assert curve.barrier("accuracy").metric == "error"


def test_convex_quadratic_chord_zero_mean_endpoint_half_gap():
    torch.manual_seed(1)
    N, p = 40, 3
    X = torch.randn(N, p, dtype=torch.float64)
    y = torch.randn(N, dtype=torch.float64)
    a = nn.Linear(p, 1).double()
    b = nn.Linear(p, 1).double()
    with torch.no_grad():
        b.weight.mul_(3.0)
    curve = analysis.interpolate(a, b, (X, y), alphas=21, metrics=("loss",), loss_fn=mse)
    v = curve.values["data"]["loss"]
    la, lb = v[0], v[-1]
    assert abs(la - lb) > 1e-2  # the oracle needs unequal endpoints
    assert curve.barrier(kind="chord").value == pytest.approx(0.0, abs=1e-12)
    assert curve.barrier(kind="mean_endpoint").value == pytest.approx(abs(la - lb) / 2, abs=1e-12)
    # exact quadratic: L(alpha) - chord = -1/2 alpha (1 - alpha) D^T H D, H = (2/N) Xa^T Xa
    Xa = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)
    D = torch.cat([(b.weight - a.weight).detach().reshape(-1), (b.bias - a.bias).detach()])
    q = float(D @ ((2.0 / N) * Xa.T @ Xa) @ D)
    al = curve.alphas
    np.testing.assert_allclose(v - ((1 - al) * la + al * lb), -0.5 * al * (1 - al) * q, atol=1e-10)


def test_barrier_on_accuracy_uses_error_and_relative():
    a, b = mlp(0), mlp(1)
    X, Y = cls_data()
    curve = analysis.interpolate(a, b, (X, Y), alphas=5)
    acc = curve.values["data"]["accuracy"]
    err = 1 - acc
    bar = curve.barrier("accuracy", kind="mean_endpoint")
    assert bar.value == pytest.approx(err.max() - (err[0] + err[-1]) / 2)
    assert bar.relative == pytest.approx(bar.value / ((err[0] + err[-1]) / 2))
    assert curve.barrier("error", kind="mean_endpoint").value == pytest.approx(bar.value)
    d = curve.to_dict()
    assert d["barriers"]["data"]["loss"]["chord"]["value"] == pytest.approx(curve.barrier().value)
    with pytest.raises(ValueError, match="kind"):
        curve.barrier(kind="nope")
    even = analysis.interpolate(a, b, (X, Y), alphas=4)
    with pytest.raises(ValueError, match="0.5"):
        even.barrier(kind="midpoint")


# ---------------------------------------------------------------------------------------------
# evaluation mechanics
# ---------------------------------------------------------------------------------------------
def test_vmap_and_loop_agree_and_are_recorded():
    a, b = mlp(0), mlp(1)
    X, Y = cls_data(80)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32)
    c1 = analysis.interpolate(a, b, loader, alphas=9, batched=True, batch_points=4)
    c2 = analysis.interpolate(a, b, loader, alphas=9, batched=False)
    assert c1.settings["mode"] == "vmap" and c2.settings["mode"] == "loop"
    for m in ("loss", "accuracy"):
        np.testing.assert_allclose(c1.values["data"][m], c2.values["data"][m], atol=1e-6)
    # endpoints equal the models' own losses
    assert c2.values["data"]["loss"][0] == pytest.approx(direct_loss(a, X, Y), abs=1e-6)
    assert c2.values["data"]["loss"][-1] == pytest.approx(direct_loss(b, X, Y), abs=1e-6)


def test_batches_are_weighted_by_size_not_averaged():
    a, b = mlp(0), mlp(1)
    X, Y = cls_data(50)
    full = analysis.interpolate(a, b, (X, Y), alphas=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=7)  # last batch has 1
    batched = analysis.interpolate(a, b, loader, alphas=3)
    np.testing.assert_allclose(batched.values["data"]["loss"], full.values["data"]["loss"], atol=1e-6)
    np.testing.assert_allclose(batched.values["data"]["accuracy"], full.values["data"]["accuracy"], atol=1e-12)
    # negative control: the mean of batch means is a different number here
    with torch.no_grad():
        means = [float(nn.functional.cross_entropy(a.eval()(x), y)) for x, y in loader]
    assert abs(np.mean(means) - full.values["data"]["loss"][0]) > 1e-3


def test_named_splits_custom_alphas_and_callable_metric():
    a, b = mlp(0), mlp(1)
    tr, te = cls_data(40, 0), cls_data(30, 1)

    def top2(out, y):
        return (out.topk(2, dim=-1).indices == y[:, None]).any(-1).float()

    curve = analysis.interpolate(a, b, {"train": tr, "test": te}, alphas=[0.25, 0.5, 1.5],
                                 metrics=("loss", "accuracy", top2))
    assert curve.splits == ["train", "test"]
    np.testing.assert_array_equal(curve.alphas, [0.0, 0.25, 0.5, 1.0, 1.5])
    assert curve.settings["alphas_added_endpoints"]
    assert curve.settings["examples"] == {"train": 40, "test": 30}
    acc = curve.values["test"]["accuracy"]
    assert np.all(curve.values["test"]["top2"] >= acc - 1e-12)
    # the extrapolated point 1.5 is outside [0, 1] and does not enter the barrier
    bar = curve.barrier("loss", split="test", kind="mean_endpoint")
    assert 0.0 <= bar.alpha <= 1.0


def test_models_never_mutated_including_train_mode_and_bn():
    a, b = mlp(0, bn=True), mlp(1, bn=True)
    X, Y = cls_data(64)
    a.train()          # the user's mode must survive
    b.eval()
    with torch.no_grad():
        a[1].running_mean.normal_()
        a[1].running_var.uniform_(0.5, 2.0)
    sa, sb = snapshot(a), snapshot(b)
    analysis.interpolate(a, b, (X, Y), alphas=3)
    analysis.interpolate(a, b, (X, Y), alphas=3, recalibrate_bn=False)
    analysis.layerwise_barriers(a, b, (X, Y))
    assert_unchanged(a, sa)
    assert_unchanged(b, sb)


def _manual_bn_reset_loss(model, loader, X, Y):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for x, _ in loader:
            m(x)
    m.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(m(X), Y))


def test_bn_recalibration_matches_manual_reference_at_every_alpha():
    a, b = mlp(0, bn=True), mlp(1, bn=True)
    for m in (a, b):  # stale statistics, unlike the data's
        with torch.no_grad():
            m[1].running_mean.fill_(3.0)
            m[1].running_var.fill_(9.0)
    X, Y = cls_data(60)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16)  # 16,16,16,12
    rec = analysis.interpolate(a, b, (X, Y), alphas=5, recalibrate_bn="auto", bn_data=loader)
    raw = analysis.interpolate(a, b, (X, Y), alphas=5, recalibrate_bn=False)
    assert rec.settings["recalibrate_bn"] and not raw.settings["recalibrate_bn"]
    assert rec.settings["mode"] == "loop"
    # endpoints move (stale stats replaced) and match deepcopy + reset + momentum None + train pass
    assert abs(rec.values["data"]["loss"][0] - raw.values["data"]["loss"][0]) > 1e-3
    for i, al in enumerate(rec.alphas):
        mid = copy.deepcopy(a)
        sd = {k: (1 - al) * v + al * b.state_dict()[k] if v.is_floating_point() else v
              for k, v in a.state_dict().items()}
        mid.load_state_dict(sd)
        assert rec.values["data"]["loss"][i] == pytest.approx(_manual_bn_reset_loss(mid, loader, X, Y), abs=2e-5)
    # without recalibration the endpoint is the model as stored
    assert raw.values["data"]["loss"][0] == pytest.approx(direct_loss(a, X, Y), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    a, b = mlp(0), mlp(1, width=8)
    X, Y = cls_data()
    with pytest.raises(ValueError, match=r"0\.weight.*\(16, 6\).*\(8, 6\)"):
        analysis.interpolate(a, b, (X, Y))
    b = mlp(1)
    with pytest.raises(ValueError, match="empty"):
        analysis.interpolate(a, b, (X[:0], Y[:0]))
    with pytest.raises(ValueError, match="empty"):
        analysis.interpolate(a, b, [])
    with pytest.raises(ValueError, match="out of range"):
        analysis.interpolate(a, b, (X, Y + 10))
    with pytest.raises(ValueError, match="NaN"):
        analysis.interpolate(a, b, (X * float("nan"), Y))
    bad = copy.deepcopy(b)
    with torch.no_grad():
        bad[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"model_b\['0.bias'\]"):
        analysis.interpolate(a, bad, (X, Y))
    with pytest.raises(ValueError, match="alphas"):
        analysis.interpolate(a, b, (X, Y), alphas=1)
    with pytest.raises(ValueError, match="split"):
        analysis.interpolate(a, b, {"train": (X, Y)}, splits=["test"])


# ---------------------------------------------------------------------------------------------
# layer-wise barriers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn", [False, True])
def test_layerwise_single_group_equals_full_midpoint_barrier(bn):
    a, b = mlp(0, bn=bn), mlp(1, bn=bn)
    X, Y = cls_data(64)
    curve = analysis.interpolate(a, b, (X, Y), alphas=3)
    lw = analysis.layerwise_barriers(a, b, (X, Y), groups={"all": [""]})
    for metric in ("loss", "accuracy"):
        full = curve.barrier(metric, kind="midpoint").value
        assert lw.barriers["A"]["data"][metric][0] == pytest.approx(full, abs=1e-6)
        assert lw.barriers["B"]["data"][metric][0] == pytest.approx(full, abs=1e-6)
    assert lw.settings["recalibrate_bn"] == bn


def test_layerwise_per_module_matches_manual_and_cumulative_ends_at_full():
    a, b = mlp(0), mlp(1)
    X, Y = cls_data(64)
    lw = analysis.layerwise_barriers(a, b, (X, Y), metrics=("loss",))
    assert lw.groups == ("0", "2", "4")
    la, lb = direct_loss(a, X, Y), direct_loss(b, X, Y)
    for gi, g in enumerate(lw.groups):
        for base, src in (("A", a), ("B", b)):
            m = copy.deepcopy(src)
            sd = m.state_dict()
            for k in (f"{g}.weight", f"{g}.bias"):
                sd[k] = 0.5 * a.state_dict()[k] + 0.5 * b.state_dict()[k]
            m.load_state_dict(sd)
            expected = direct_loss(m, X, Y) - 0.5 * (la + lb)
            assert lw.barriers[base]["data"]["loss"][gi] == pytest.approx(expected, abs=1e-5)
    cum = analysis.layerwise_barriers(a, b, (X, Y), cumulative=True, metrics=("loss",), base="A")
    full = analysis.interpolate(a, b, (X, Y), alphas=3, metrics=("loss",)).barrier(kind="midpoint").value
    assert cum.barriers["A"]["data"]["loss"][-1] == pytest.approx(full, abs=1e-6)
    assert cum.barriers["A"]["data"]["loss"][0] == pytest.approx(lw.barriers["A"]["data"]["loss"][0], abs=1e-6)
    assert list(cum.barriers) == ["A"]
    # heat-map helpers
    assert lw.as_matrix().shape == (3, 1)
    M = analysis.LayerwiseBarriers.stack([lw, lw, cum], metric="loss", base="A")
    assert M.shape == (3, 3)
    np.testing.assert_allclose(M[:, 0], lw.barriers["A"]["data"]["loss"])
    np.testing.assert_allclose(lw.as_matrix(base="mean")[:, 0],
                               0.5 * (lw.barriers["A"]["data"]["loss"] + lw.barriers["B"]["data"]["loss"]))


def test_layerwise_group_errors():
    a, b = mlp(0), mlp(1)
    X, Y = cls_data()
    with pytest.raises(ValueError, match="matches no"):
        analysis.layerwise_barriers(a, b, (X, Y), groups=["nope"])
    with pytest.raises(ValueError, match="two groups"):
        analysis.layerwise_barriers(a, b, (X, Y), groups={"x": "0", "y": ["0.weight"]})
    with pytest.raises(ValueError, match="base"):
        analysis.layerwise_barriers(a, b, (X, Y), base="C")


@pytest.mark.gpu
def test_cuda_matches_cpu_reference():
    a, b = mlp(0), mlp(1)
    X, Y = cls_data(64)
    cpu = analysis.interpolate(a, b, (X, Y), alphas=5)
    gpu = analysis.interpolate(a, b, (X, Y), alphas=5, device="cuda")
    assert gpu.settings["device"].startswith("cuda")
    np.testing.assert_allclose(gpu.values["data"]["loss"], cpu.values["data"]["loss"], atol=1e-4)
    lc = analysis.landscape(a, (X, Y), grid=5)
    lg = analysis.landscape(a, (X, Y), grid=5, device="cuda")
    np.testing.assert_allclose(lg.values["data"]["loss"], lc.values["data"]["loss"], atol=1e-4)
