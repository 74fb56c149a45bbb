"""Oracles for analysis.train_curve / ModeCurve / plane (Garipov et al. 2018, NeurIPS, arXiv:1802.10026)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import analysis
from _models import mlp as shared_mlp


class Point(nn.Module):
    """A 'model' whose output is its 2-D parameter; the ring loss (|theta|^2 - 1)^2 has a circular valley."""

    def __init__(self, xy):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(xy, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(x.shape[0], 2)


def ring(out, y):
    return (((out ** 2).sum(-1) - 1) ** 2).mean()


DUMMY = (torch.zeros(4, 1), torch.zeros(4))


def mlp(seed, dtype=torch.float64):
    return shared_mlp((5, 8, 3), seed, dtype=dtype)


def test_bezier_and_polychain_coefficients():
    np.testing.assert_allclose(analysis.ModeCurve.basis("bezier", 3, 0.3), [0.49, 0.42, 0.09], atol=1e-15)
    np.testing.assert_allclose(analysis.ModeCurve.basis("polychain", 3, 0.25), [0.5, 0.5, 0.0], atol=1e-15)
    np.testing.assert_allclose(analysis.ModeCurve.basis("polychain", 3, 0.75), [0.0, 0.5, 0.5], atol=1e-15)
    np.testing.assert_allclose(analysis.ModeCurve.basis("polychain", 4, 1 / 3), [0, 1, 0, 0], atol=1e-15)
    # Bezier against De Casteljau's recursion on random control points (an independent algorithm)
    rng = np.random.default_rng(0)
    P = rng.normal(size=(5, 3))
    for t in rng.uniform(size=6):
        pts = P.copy()
        while len(pts) > 1:
            pts = (1 - t) * pts[:-1] + t * pts[1:]
        np.testing.assert_allclose(analysis.ModeCurve.basis("bezier", 5, t) @ P, pts[0], atol=1e-12)
    ts = np.linspace(0, 1, 17)
    for kind in ("bezier", "polychain"):
        np.testing.assert_allclose(analysis.ModeCurve.basis(kind, 4, ts).sum(1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        analysis.ModeCurve.basis("spline", 3, 0.5)


def test_point_uses_the_basis_and_endpoints_are_exact():
    a, b = mlp(0), mlp(1)
    curve = analysis.train_curve(a, b, (torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))),
                                 bends=2, epochs=3, lr=0.05)
    assert curve.num_points == 4
    for k, v in a.state_dict().items():
        assert torch.equal(curve.point(0.0)[k], v)
        assert torch.equal(curve.point(1.0)[k], b.state_dict()[k])
    c = analysis.ModeCurve.basis("bezier", 4, 0.3)
    p = curve.point(0.3)
    for k in p:
        manual = sum(c[j] * curve.control_points[j][k] for j in range(4))
        torch.testing.assert_close(p[k], manual)
    assert len(curve.history) == 3 and curve.settings["bends"] == 2


def test_untrained_curve_is_the_segment():
    a, b = mlp(0), mlp(1)
    X, Y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    curve = analysis.train_curve(a, b, (X, Y), kind="bezier", bends=3, epochs=0)
    for t in (0.2, 0.5, 0.9):
        for k, v in curve.point(t).items():
            torch.testing.assert_close(v, (1 - t) * a.state_dict()[k] + t * b.state_dict()[k])
    ev = curve.evaluate((X, Y), points=11)
    line = analysis.interpolate(a, b, (X, Y), alphas=11)
    np.testing.assert_allclose(ev.values["data"]["loss"], line.values["data"]["loss"], atol=1e-10)
    dist = math.sqrt(sum(float(((b.state_dict()[k] - v) ** 2).sum()) for k, v in a.state_dict().items()))
    st = ev.stats("loss")
    assert st["length"] == pytest.approx(dist, rel=1e-9)
    v = ev.values["data"]["loss"]
    assert st["arc_mean"] == pytest.approx(np.mean(0.5 * (v[1:] + v[:-1])), rel=1e-9)  # uniform speed
    assert st["max"] == pytest.approx(v.max()) and st["min"] == pytest.approx(v.min())


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_trained_curve_goes_around_the_barrier(kind):
    a, b = Point([-1.0, 0.0]), Point([0.6, 0.8])  # both on the unit circle; the chord cuts inside it
    sa, sb = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    line = analysis.interpolate(a, b, DUMMY, alphas=61, metrics=("loss",), loss_fn=ring)
    curve = analysis.train_curve(a, b, DUMMY, kind=kind, bends=1, epochs=300, lr=0.05, optimizer="adam",
                                 loss_fn=ring, seed=0)
    ev = curve.evaluate(DUMMY, points=61, metrics=("loss",), loss_fn=ring)
    line_max = line.values["data"]["loss"].max()
    assert line_max > 0.5
    assert ev.stats("loss")["max"] < 0.5 * line_max
    assert ev.stats("loss")["length"] > float(torch.linalg.vector_norm(sb["theta"] - sa["theta"]))
    assert torch.equal(a.state_dict()["theta"], sa["theta"]) and torch.equal(b.state_dict()["theta"], sb["theta"])
    # seeded: a second run gives the same curve
    again = analysis.train_curve(a, b, DUMMY, kind=kind, bends=1, epochs=300, lr=0.05, optimizer="adam",
                                 loss_fn=ring, seed=0)
    assert torch.equal(again.control_points[1]["theta"], curve.control_points[1]["theta"])


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _set_flat(m, vec):
    m = copy.deepcopy(m)
    off = 0
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(vec[off:off + p.numel()].reshape(p.shape))
            off += p.numel()
    return m


def test_plane_coordinates_and_values_at_the_models():
    w0 = mlp(0)
    g = torch.Generator().manual_seed(3)
    D2 = torch.randn(_flat(w0).numel(), generator=g, dtype=torch.float64)
    P = torch.randn(D2.numel(), generator=g, dtype=torch.float64)
    P = P - (P @ D2) / (D2 @ D2) * D2  # orthogonal to D2
    w2 = _set_flat(w0, _flat(w0) + D2)
    w1 = _set_flat(w0, _flat(w0) + 0.5 * D2 + P)
    X, Y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    res = analysis.plane(w0, w1, w2, (X, Y), grid=13, margin=0.25, metrics=("loss",))
    dx, dy = float(D2.norm()), float(P.norm())
    assert res.dx == pytest.approx(dx, rel=1e-12) and res.dy == pytest.approx(dy, rel=1e-12)
    assert res.coordinates["w0"] == (0.0, 0.0)
    assert res.coordinates["w1"] == pytest.approx((0.5 * dx, dy), rel=1e-10)
    assert res.coordinates["w2"] == (pytest.approx(dx), 0.0)
    assert res.values["data"]["loss"].shape == (13, 13)

    def loss(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(X), Y))

    L = res.values["data"]["loss"]
    # grid nodes a = -0.25 + 0.125 i: a = 0, 0.5, 1 at i = 2, 6, 10
    assert res.x[2] == pytest.approx(0.0, abs=1e-12) and res.y[10] == pytest.approx(dy)
    assert L[2, 2] == pytest.approx(loss(w0), abs=1e-9)
    assert L[10, 2] == pytest.approx(loss(w2), abs=1e-9)
    assert L[6, 10] == pytest.approx(loss(w1), abs=1e-9)
    for nm, m in (("w0", w0), ("w1", w1), ("w2", w2)):
        assert res.model_values[nm]["data"]["loss"] == pytest.approx(loss(m), abs=1e-9)
    assert res.to_dict()["dx"] == pytest.approx(dx)


def test_plane_rejects_collinear_points_and_state_dicts_need_a_model():
    w0, w2 = mlp(0), mlp(1)
    sd = {k: 0.7 * v + 0.3 * w2.state_dict()[k] for k, v in w0.state_dict().items()}
    X, Y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="dy"):
        analysis.plane(w0, sd, w2, (X, Y), grid=5)
    with pytest.raises(ValueError, match="dx = 0"):
        analysis.plane(w0, w2, copy.deepcopy(w0), (X, Y), grid=5)
    with pytest.raises(TypeError, match="model="):
        analysis.plane(w0.state_dict(), mlp(2).state_dict(), w2.state_dict(), (X, Y), grid=5)
    res = analysis.plane(w0.state_dict(), mlp(2).state_dict(), w2.state_dict(), (X, Y), grid=3, model=w0)
    assert res.values["data"]["accuracy"].shape == (3, 3)


def test_curve_bad_arguments():
    a, b = mlp(0), mlp(1)
    with pytest.raises(ValueError, match="bends"):
        analysis.train_curve(a, b, DUMMY, bends=0)
    with pytest.raises(ValueError, match="kind"):
        analysis.train_curve(a, b, DUMMY, kind="spline")
