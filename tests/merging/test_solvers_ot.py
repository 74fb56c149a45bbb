"""Sinkhorn and exact OT: agreement with POT, exact marginals, limits, annealing, rounding, bad input."""

import numpy as np
import ot
import pytest
import torch

import merging.solvers as S


def _problem(seed, n=7, m=9):
    rng = np.random.default_rng(seed)
    M = rng.random((n, m))
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    return M, a / a.sum(), b / b.sum()


# ----------------------------------------------------------------------------- Sinkhorn

def test_sinkhorn_matches_pot_log_domain():
    M, a, b = _problem(0)
    res = S.sinkhorn(M, a, b, reg=0.05, max_iter=5000, tol=1e-12)
    ref = ot.sinkhorn(a, b, M, 0.05, method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
    assert res.converged and res.err <= 1e-12 and res.n_iter > 0
    np.testing.assert_allclose(res.plan, ref, atol=1e-10)
    assert np.isclose(res.cost, np.sum(ref * M), rtol=1e-8)
    np.testing.assert_allclose(res.plan.sum(1), a, atol=1e-12)
    np.testing.assert_allclose(res.plan.sum(0), b, atol=1e-12)


def test_sinkhorn_batched_equals_single_and_torch_kind():
    probs = [_problem(s) for s in range(3)]
    M = np.stack([p[0] for p in probs])
    a = np.stack([p[1] for p in probs])
    b = np.stack([p[2] for p in probs])
    batch = S.sinkhorn(torch.from_numpy(M), torch.from_numpy(a), torch.from_numpy(b), reg=0.1)
    assert torch.is_tensor(batch.plan) and batch.plan.shape == (3, 7, 9) and batch.converged.all()
    for k in range(3):
        one = S.sinkhorn(M[k], a[k], b[k], reg=0.1)
        assert isinstance(one.plan, np.ndarray)
        np.testing.assert_allclose(batch.plan[k].numpy(), one.plan, atol=1e-12)
        assert np.isclose(float(batch.cost[k]), one.cost, rtol=1e-12)


def test_sinkhorn_default_marginals_uniform():
    M = np.random.default_rng(1).random((2, 6, 4))
    res = S.sinkhorn(M, reg=0.1, tol=1e-10)
    np.testing.assert_allclose(res.plan.sum(2), 1 / 6, atol=1e-10)
    np.testing.assert_allclose(res.plan.sum(1), 1 / 4, atol=1e-12)


def test_sinkhorn_cost_approaches_emd_as_reg_vanishes():
    M, a, b = _problem(2, 8, 8)
    exact = S.emd(M, a, b).cost
    gaps = []
    for reg in (0.1, 0.03, 0.01, 0.003):
        res = S.sinkhorn(M, a, b, reg=reg, anneal=True, max_iter=20000, tol=1e-9)
        assert res.converged
        gaps.append(res.cost - exact)
        # entropic bound: 0 <= <T_reg, M> - OPT <= reg * (H(a) + H(b)) <= reg * log(n m)
        assert -1e-9 <= gaps[-1] <= reg * np.log(64) + 1e-9
    assert gaps[-1] < gaps[0] / 5


def test_annealing_converges_where_cold_start_does_not():
    rng = np.random.default_rng(3)
    n = 30
    X = rng.normal(size=(n, 2))
    perm = rng.permutation(n)
    Y = X[perm] + 0.05 * rng.normal(size=(n, 2))
    M = ((X[:, None] - Y[None]) ** 2).sum(-1)  # planted matching: row i <-> column argsort(perm)[i]
    reg = 5e-4
    with pytest.warns(RuntimeWarning, match="raise max_iter or reg"):
        cold = S.sinkhorn(M, reg=reg, max_iter=200)
    assert not cold.converged and cold.err > 1e-9
    warm = S.sinkhorn(M, reg=reg, max_iter=200, anneal=True, anneal_factor=0.25)
    assert warm.converged and warm.err <= 1e-9
    assert warm.reg == reg and list(warm.reg_schedule) == sorted(warm.reg_schedule, reverse=True)
    exact = S.emd(M).cost
    assert 0 <= warm.cost - exact <= reg * np.log(n * n)
    np.testing.assert_array_equal(S.round_to_permutation(warm.plan), np.argsort(perm))
    explicit = S.sinkhorn(M, reg=123.0, reg_schedule=warm.reg_schedule, max_iter=200)
    assert explicit.converged and explicit.reg_schedule == warm.reg_schedule and explicit.reg == reg
    np.testing.assert_allclose(explicit.plan, warm.plan, atol=1e-15)


def test_warm_start_init_reuses_potentials():
    M, a, b = _problem(4)
    first = S.sinkhorn(M, a, b, reg=0.05)
    again = S.sinkhorn(M, a, b, reg=0.05, init=(first.f, first.g))
    assert again.converged and again.n_iter <= 10 < first.n_iter


def test_round_to_permutation_planted():
    rng = np.random.default_rng(5)
    n = 12
    perm = rng.permutation(n)
    P = np.eye(n)[perm]
    plan = 0.7 * P / n + 0.3 * rng.random((n, n)) / n ** 2  # near the permutation, noisy
    np.testing.assert_array_equal(S.round_to_permutation(plan), perm)
    # via Sinkhorn on a planted cost, batched and torch
    cost = torch.from_numpy(np.stack([1.0 - P + 0.05 * rng.random((n, n)), 1.0 - P.T]))
    res = S.sinkhorn(cost, reg=0.05, tol=1e-6)
    got = S.round_to_permutation(res.plan)
    assert torch.is_tensor(got)
    np.testing.assert_array_equal(got.numpy(), np.stack([perm, np.argsort(perm)]))
    # negative control: rounding a uniform plan does not single out the planted permutation's cost
    with pytest.raises(ValueError, match="n <= m"):
        S.round_to_permutation(np.ones((4, 3)))


def test_sinkhorn_list_of_sizes():
    rng = np.random.default_rng(6)
    costs = [rng.random((4, 5)), rng.random((6, 6)), rng.random((4, 5))]
    out = S.sinkhorn(costs, reg=0.1)
    assert [r.plan.shape for r in out] == [(4, 5), (6, 6), (4, 5)]
    for c, r in zip(costs, out):
        single = S.sinkhorn(c, reg=0.1)
        np.testing.assert_allclose(r.plan, single.plan, atol=1e-12)
        assert r.converged


@pytest.mark.parametrize("kwargs,msg", [
    (dict(a=np.array([0.5, 0.5, 0.5]) / 1.5, b=np.ones(4) / 2), "different total mass"),
    (dict(a=np.array([1.2, -0.2, 0.0])), "negative entries"),
    (dict(a=np.ones(5) / 5), "length 5"),
    (dict(b=np.full(4, np.nan)), "NaN or inf"),
    (dict(reg=0.0), "reg must be a positive"),
    (dict(reg=-1.0), "reg must be a positive"),
    (dict(max_iter=0), "max_iter"),
])
def test_sinkhorn_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        S.sinkhorn(np.random.default_rng(0).random((3, 4)), **kwargs)


def test_sinkhorn_bad_cost():
    with pytest.raises(ValueError, match="empty side"):
        S.sinkhorn(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        S.sinkhorn(np.array([[0.0, np.inf]]))
    with pytest.raises(ValueError, match="ndim=1"):
        S.sinkhorn(np.zeros(4))


# ----------------------------------------------------------------------------- exact OT

@pytest.mark.parametrize("backend", ["pot", "linprog"])
def test_emd_marginals_exact_and_cost_matches_pot(backend):
    for seed, (n, m) in enumerate([(7, 9), (9, 4), (1, 5), (6, 6)]):
        M, a, b = _problem(10 + seed, n, m)
        res = S.emd(M, a, b, backend=backend)
        assert res.backend == backend
        assert (res.plan >= 0).all()
        np.testing.assert_allclose(res.plan.sum(1), a, rtol=0, atol=1e-15)
        np.testing.assert_allclose(res.plan.sum(0), b, rtol=0, atol=1e-15)
        assert np.isclose(res.cost, ot.emd2(a, b, M), rtol=1e-12, atol=0)
        assert np.isclose(res.cost, np.sum(res.plan * M), rtol=1e-13)


def test_emd_backends_agree_batched_torch():
    rng = np.random.default_rng(20)
    M = torch.from_numpy(rng.random((3, 5, 8)))
    a = torch.from_numpy(rng.dirichlet(np.ones(5), size=3))
    b = torch.from_numpy(rng.dirichlet(np.ones(8), size=3))
    p = S.emd(M, a, b, backend="pot")
    q = S.emd(M, a, b, backend="linprog")
    assert torch.is_tensor(p.plan) and p.plan.shape == (3, 5, 8) and p.cost.shape == (3,)
    np.testing.assert_allclose(p.cost.numpy(), q.cost.numpy(), rtol=1e-12)
    np.testing.assert_allclose(q.plan.sum(1).numpy(), b.numpy(), atol=1e-15)


@pytest.mark.parametrize("backend", ["auto", "linprog"])
def test_emd_uniform_square_is_the_lap(backend):
    rng = np.random.default_rng(21)
    n = 9
    C = rng.random((2, n, n))
    res = S.emd(C, backend=backend)
    lap = S.linear_assignment(C)
    for k in range(2):
        P = n * res.plan[k]
        assert np.allclose(P, np.round(P), atol=1e-12) and set(np.round(P).ravel()) <= {0.0, 1.0}
        np.testing.assert_array_equal(np.round(P).sum(0), 1)
        np.testing.assert_array_equal(np.round(P).sum(1), 1)
        assert np.isclose(n * res.cost[k], lap.objective[k], rtol=1e-12)


def test_emd_zero_mass_entries_and_rescaled_b():
    M, a, b = _problem(22, 5, 6)
    a = a.copy()
    a[2] = 0.0
    a /= a.sum()
    b = b * (1 + 1e-9)  # totals equal to 1e-9: accepted, b rescaled exactly
    res = S.emd(M, a, b, backend="linprog")
    assert np.all(res.plan[2] == 0)
    np.testing.assert_allclose(res.plan.sum(1), a, atol=1e-15)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(a=np.array([0.6, 0.6, 0.0])), ValueError, "different total mass"),
    (dict(b=np.array([0.5, 0.7, -0.2, 0.0])), ValueError, "negative entries"),
    (dict(b=np.ones(3) / 3), ValueError, "length 3"),
    (dict(a=np.ones((2, 3)) / 3), ValueError, "shape"),
    (dict(backend="networkx"), ValueError, "backend must be"),
])
def test_emd_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        S.emd(np.random.default_rng(0).random((3, 4)), **kwargs)


def test_emd_bad_cost():
    with pytest.raises(ValueError, match="empty side"):
        S.emd(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="NaN or inf"):
        S.emd(np.array([[np.nan, 1.0]]))


@pytest.mark.parametrize("backend", ["pot", "linprog"])
def test_emd_threaded_batch_equals_plain_loop(backend):
    """Each problem of a threaded batch is solved by the same call as in a loop: identical plans."""
    rng = np.random.default_rng(21)
    B, n, m = (6, 48, 50) if backend == "pot" else (3, 12, 10)
    M = rng.random((B, n, m))
    a = rng.random((B, n)) + 0.1
    b = rng.random((B, m)) + 0.1
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    loop = S.emd(M, a, b, backend=backend, workers=1)
    for workers in (2, -1, None):
        res = S.emd(M, a, b, backend=backend, workers=workers)
        np.testing.assert_array_equal(res.plan, loop.plan)
    for k in range(B):  # and each equals a single solve
        np.testing.assert_array_equal(S.emd(M[k], a[k], b[k], backend=backend).plan, loop.plan[k])


def test_emd_bad_workers():
    with pytest.raises(ValueError, match="workers must be"):
        S.emd(np.random.default_rng(0).random((3, 4, 4)), workers=0)
    with pytest.raises(ValueError, match="workers must be"):
        S.emd(np.random.default_rng(0).random((4, 4)), workers=-3)


@pytest.mark.parametrize("as_torch", [False, True])
def test_sinkhorn_list_padded_equals_separate_calls(as_torch):
    """Every layer of a fusion at once: zero-mass padding leaves each problem's answer unchanged (up to
    summation-order round-off, which can move the stopping check by one ``check_every`` step)."""
    rng = np.random.default_rng(22)
    costs = [rng.random((4, 5)) + 1.0, rng.random((7, 3)) * 5, rng.random((6, 6)), rng.random((2, 2))]
    if as_torch:
        costs = [torch.from_numpy(c) for c in costs]
    for kw in (dict(reg=0.1), dict(reg=0.05, anneal=True, reg_start=1.0)):
        padded = S.sinkhorn(costs, pad=True, **kw)
        for c, r in zip(costs, padded):
            single = S.sinkhorn(c, **kw)
            assert tuple(r.plan.shape) == tuple(c.shape) and torch.is_tensor(r.plan) == as_torch
            np.testing.assert_allclose(np.asarray(r.plan), np.asarray(single.plan), atol=1e-8)
            assert r.converged and abs(r.n_iter - single.n_iter) <= 10
            assert np.isclose(float(r.cost), float(single.cost), rtol=1e-8)
            n, m = c.shape  # the uniform marginals hold on the real entries
            np.testing.assert_allclose(np.asarray(r.plan).sum(1), np.full(n, 1 / n), atol=1e-9)
            np.testing.assert_allclose(np.asarray(r.plan).sum(0), np.full(m, 1 / m), atol=1e-12)
    with pytest.raises(ValueError, match="pad=True applies to a list"):
        S.sinkhorn(np.ones((2, 3, 3)), pad=True)
