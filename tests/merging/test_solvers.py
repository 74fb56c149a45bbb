"""Linear assignment: the batched torch solver against SciPy, kinds/devices, bad input, nested LAP."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import merging.solvers as S


def _scipy_obj(C, maximize):
    C = np.asarray(C)
    if C.ndim == 2:
        r, c = linear_sum_assignment(C, maximize=maximize)
        return C[r, c].sum()
    return np.array([_scipy_obj(Ck, maximize) for Ck in C])


def _check_valid(res, C):
    """Injective matching, SciPy's (row-sorted) layout, objective recomputed from the pairs."""
    C = np.asarray(C)
    C3 = C if C.ndim == 3 else C[None]
    rows = np.asarray(res.row_ind).reshape(C3.shape[0], -1)
    cols = np.asarray(res.col_ind).reshape(C3.shape[0], -1)
    k = min(C3.shape[1:])
    obj = np.atleast_1d(np.asarray(res.objective))
    for b in range(C3.shape[0]):
        assert rows.shape[1] == cols.shape[1] == k
        assert len(set(rows[b].tolist())) == k and len(set(cols[b].tolist())) == k
        assert np.all(np.diff(rows[b]) > 0)
        assert (rows[b] < C3.shape[1]).all() and (cols[b] < C3.shape[2]).all()
        assert np.isclose(C3[b][rows[b], cols[b]].sum(), obj[b], rtol=1e-12, atol=0)


def _families(rng):
    B = 3
    x, y = rng.random((B, 12, 1)), rng.random((B, 1, 12))
    return {
        "random": rng.random((B, 12, 12)),
        "integer": rng.integers(0, 100, (B, 10, 10)).astype(float),
        "tied": rng.integers(0, 3, (B, 12, 12)).astype(float),
        "all_equal": np.full((B, 9, 9), 2.5),
        "rank1": x * y,
        "dynamic_range": 10.0 ** rng.uniform(-8, 8, (B, 10, 10)),
        "negative": rng.normal(size=(B, 11, 11)) * 1e3,
        "wide": rng.random((B, 5, 13)),
        "tall": rng.random((B, 13, 5)),
        "wide_tied": rng.integers(0, 2, (B, 4, 9)).astype(float),
        "B1": rng.random((1, 15, 15)),
        "n1": rng.random((B, 1, 1)),
        "row1": rng.random((B, 1, 7)),
        "col1": rng.random((B, 7, 1)),
    }


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("family", list(_families(np.random.default_rng(0))))
def test_torch_backend_matches_scipy(family, maximize):
    C = _families(np.random.default_rng(1))[family]
    ref = _scipy_obj(C, maximize)
    res = S.linear_assignment(torch.from_numpy(C), maximize=maximize, method="torch")
    assert res.method == "torch"
    got = res.objective.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-300)
    _check_valid(res, C)
    # single problem (unbatched) path gives the same optimum
    one = S.linear_assignment(torch.from_numpy(C[0]), maximize=maximize, method="torch")
    np.testing.assert_allclose(float(one.objective), ref[0], rtol=1e-9, atol=1e-300)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), m=st.integers(1, 7), hi=st.integers(1, 6), maximize=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_property_integer_costs(n, m, hi, maximize, seed):
    C = np.random.default_rng(seed).integers(-hi, hi + 1, (2, n, m)).astype(float)
    res = S.linear_assignment(C, maximize=maximize, method="torch")
    np.testing.assert_allclose(res.objective, _scipy_obj(C, maximize), rtol=1e-9, atol=1e-12)
    _check_valid(res, C)


def test_scipy_backend_and_auto_on_cpu():
    C = np.random.default_rng(2).random((4, 20, 20))
    for method in ("scipy", "auto"):
        res = S.linear_assignment(C, method=method)
        assert res.method == "scipy"  # auto never picks the slower torch solver on CPU
        np.testing.assert_allclose(res.objective, _scipy_obj(C, False), rtol=1e-12)
        _check_valid(res, C)


def test_kinds_and_shapes():
    C = np.random.default_rng(3).random((2, 4, 6))
    r = S.linear_assignment(C)
    assert isinstance(r.col_ind, np.ndarray) and r.col_ind.shape == (2, 4) and r.col_ind.dtype == np.int64
    assert isinstance(r.objective, np.ndarray) and r.objective.shape == (2,)
    for method in ("scipy", "torch"):
        t = S.linear_assignment(torch.from_numpy(C).float(), method=method)
        assert torch.is_tensor(t.col_ind) and t.col_ind.shape == (2, 4) and t.col_ind.dtype == torch.long
        assert t.objective.shape == (2,)
        s = S.linear_assignment(torch.from_numpy(C[0]), method=method)
        assert s.col_ind.shape == (4,) and s.objective.ndim == 0
    np_single = S.linear_assignment(C[0].T)  # tall: m rows matched, sorted like SciPy
    r2, c2 = linear_sum_assignment(C[0].T)
    np.testing.assert_array_equal(np_single.row_ind, r2)


def test_planted_permutation_recovered_and_negative_control():
    rng = np.random.default_rng(4)
    n = 30
    perm = rng.permutation(n)
    W = rng.normal(size=(n, 8))
    Wb = W[perm] + 1e-3 * rng.normal(size=(n, 8))  # B's unit perm[i] ... B row i is A row perm[i]
    sim = W @ Wb.T
    for method in ("scipy", "torch"):
        res = S.linear_assignment(sim, maximize=True, method=method)
        np.testing.assert_array_equal(res.col_ind, np.argsort(perm))
        # negative control: minimising instead cannot return the planted matching
        assert not np.array_equal(S.linear_assignment(sim, method=method).col_ind, np.argsort(perm))


def test_invariance_under_row_and_column_permutations():
    rng = np.random.default_rng(5)
    C = rng.random((25, 25))
    p, q = rng.permutation(25), rng.permutation(25)
    a = S.linear_assignment(torch.from_numpy(C), method="torch")
    b = S.linear_assignment(torch.from_numpy(C[p][:, q]), method="torch")
    assert np.isclose(float(a.objective), float(b.objective), rtol=1e-12)
    # the matchings correspond: row p[i] -> column q[b.col_ind[i]] in the original problem
    mapped = np.empty(25, dtype=int)
    mapped[p] = q[b.col_ind.numpy()]
    assert np.isclose(C[np.arange(25), mapped].sum(), float(a.objective), rtol=1e-12)


def test_empty_problems():
    for shape in [(0, 3), (3, 0), (2, 0, 4)]:
        res = S.linear_assignment(np.zeros(shape))
        assert np.asarray(res.col_ind).size == 0
        assert np.all(np.asarray(res.objective) == 0)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "NaN or inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "NaN or inf"),
    (np.zeros(3), ValueError, "ndim=1"),
    (np.zeros((2, 2, 2, 2)), ValueError, "ndim=4"),
    (np.array([["a", "b"]]), TypeError, "numeric"),
    ("cost", TypeError, "numeric"),
    ({"a": 1}, TypeError, "NumPy array or torch tensor"),
])
def test_bad_input(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        S.linear_assignment(bad)


def test_bad_method():
    with pytest.raises(ValueError, match="method must be"):
        S.linear_assignment(np.eye(3), method="hungarian")


def _nested_bruteforce(C4, maximize):
    H, H2 = C4.shape[:2]
    inner = np.array([[_scipy_obj(C4[h, g], maximize) for g in range(H2)] for h in range(H)])
    best = None
    for perm in itertools.permutations(range(H2), H):
        v = sum(inner[h, perm[h]] for h in range(H))
        best = v if best is None else (max(best, v) if maximize else min(best, v))
    return best, inner


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("method", ["scipy", "torch"])
def test_hierarchical_assignment_matches_nested_bruteforce(method, maximize):
    rng = np.random.default_rng(6)
    C4 = rng.random((4, 4, 5, 5))
    best, inner = _nested_bruteforce(C4, maximize)
    res = S.hierarchical_assignment(torch.from_numpy(C4), maximize=maximize, method=method)
    assert np.isclose(float(res.objective), best, rtol=1e-12)
    np.testing.assert_allclose(res.inner_objective.numpy(), inner, rtol=1e-12)
    hr, hc = res.head_rows.numpy(), res.head_cols.numpy()
    assert sorted(hc.tolist()) == [0, 1, 2, 3]
    total = 0.0
    for t in range(4):  # the returned inner matchings realise the objective
        cols = res.inner_cols.numpy()[t]
        assert sorted(cols.tolist()) == list(range(5))
        total += C4[hr[t], hc[t]][res.inner_rows.numpy()[t], cols].sum()
    assert np.isclose(total, best, rtol=1e-12)


def test_hierarchical_equals_flat_bruteforce_on_tiny_problem():
    """Nested optimum == global optimum over all (head perm, inner perms) block matchings."""
    rng = np.random.default_rng(7)
    C4 = rng.random((2, 2, 3, 3))
    best = min(
        sum(C4[h, hp[h], i, ips[h][i]] for h in range(2) for i in range(3))
        for hp in itertools.permutations(range(2))
        for ips in itertools.product(itertools.permutations(range(3)), repeat=2))
    res = S.hierarchical_assignment(C4)
    assert isinstance(res.head_cols, np.ndarray)
    assert np.isclose(float(res.objective), best, rtol=1e-12)


def test_hierarchical_bad_shape():
    with pytest.raises(ValueError, match=r"\(H, H', d, e\)"):
        S.hierarchical_assignment(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="empty axis"):
        S.hierarchical_assignment(np.zeros((2, 2, 0, 3)))


def test_fast_schedule_exact_and_fewer_rounds_and_syncs_than_legacy():
    """Warm start + block rounds + early certificates: same optimum as SciPy, fewer rounds and syncs."""
    C = np.random.default_rng(7).random((4, 48, 48))
    ref = _scipy_obj(C, False)
    Ct = torch.from_numpy(C)
    new = S.linear_assignment(Ct, method="torch", auction_options={"schedule": "fast"})
    old = S.linear_assignment(Ct, method="torch", auction_options={"schedule": "legacy"})
    assert S.linear_assignment(Ct, method="torch").stats.schedule == "legacy"  # "auto" on the CPU
    for res in (new, old):
        np.testing.assert_allclose(res.objective.numpy(), ref, rtol=1e-9)
        _check_valid(res, C)
        assert res.n_fallback == 0 and res.stats.n_certified == 4
    assert new.stats.schedule == "fast" and old.stats.schedule == "legacy"
    assert 0 < new.stats.rounds < old.stats.rounds
    assert 0 < new.stats.syncs < old.stats.syncs / 5
    assert new.stats.phases < old.stats.phases  # early certificate stops before eps_min
    assert S.linear_assignment(C, method="scipy").stats is None


@pytest.mark.parametrize("opts", [{"warm": "none"}, {"warm": "colmin"}, {"warm": "sinkhorn", "eps0": 0.5},
                                  {"block": 1, "early_sweeps": 1}, {"theta": 0.5, "check_below": 1.0}])
@pytest.mark.parametrize("family", ["tied", "dynamic_range", "wide_tied", "tall", "rank1"])
def test_fast_schedule_options_stay_exact(opts, family):
    C = _families(np.random.default_rng(3))[family]
    res = S.linear_assignment(torch.from_numpy(C), method="torch", auction_options={"schedule": "fast", **opts})
    np.testing.assert_allclose(res.objective.numpy(), _scipy_obj(C, False), rtol=1e-9, atol=1e-300)
    _check_valid(res, C)


def test_auction_options_bad():
    C = np.random.default_rng(0).random((2, 5, 5))
    with pytest.raises(TypeError, match="auction_options"):
        S.linear_assignment(C, method="torch", auction_options=["legacy"])
    with pytest.raises(ValueError, match="schedule"):
        S.linear_assignment(C, method="torch", auction_options={"schedule": "fastest"})
    with pytest.raises(ValueError, match="warm"):
        S.linear_assignment(C, method="torch", auction_options={"warm": "hot"})


def test_fast_only_options_select_or_reject():
    C = torch.from_numpy(np.random.default_rng(1).random((2, 6, 6)))
    assert S.linear_assignment(C, method="torch", auction_options={"warm": "colmin"}).stats.schedule == "fast"
    with pytest.raises(ValueError, match="schedule='fast' only"):
        S.linear_assignment(C, method="torch", auction_options={"schedule": "legacy", "block": 4})


@pytest.mark.parametrize("shape", [(6, 50, 50), (5, 40, 70), (5, 70, 40), (3, 1, 1)])
@pytest.mark.parametrize("maximize", [False, True])
def test_threaded_scipy_batch_equals_the_plain_loop(shape, maximize):
    C = np.random.default_rng(11).integers(0, 5, shape).astype(float)  # ties: same answer regardless
    ref = [linear_sum_assignment(Ck, maximize=maximize) for Ck in C]
    for workers in (None, 1, 2, 3, -1):
        for cost in (C, torch.from_numpy(C)):
            res = S.linear_assignment(cost, maximize=maximize, method="scipy", workers=workers)
            for b, (r, c) in enumerate(ref):  # each problem solved exactly as in the loop
                np.testing.assert_array_equal(np.asarray(res.row_ind[b]), r)
                np.testing.assert_array_equal(np.asarray(res.col_ind[b]), c)
            _check_valid(res, C)


def test_threads_are_used_when_asked_and_only_for_large_batches(monkeypatch):
    import threading

    import merging.solvers._threads as thr
    from scipy import optimize

    names = []
    real = optimize.linear_sum_assignment

    def spy(c, maximize=False):
        names.append(threading.current_thread().name)
        return real(c, maximize=maximize)

    monkeypatch.setattr(optimize, "linear_sum_assignment", spy)
    big = np.random.default_rng(12).random((8, 64, 64))  # 2^15 entries, 2^12 per problem
    S.linear_assignment(big, workers=2)
    assert len(names) == 8 and all(n.startswith("weightspace-solver") for n in names)
    names.clear()
    S.linear_assignment(big, workers=1)
    assert names == [threading.current_thread().name] * 8
    # the automatic rule: threads only above both thresholds
    assert thr.n_workers(None, 8, 64 * 64) == min(8, torch.get_num_threads())
    assert thr.n_workers(None, 4, 64 * 64) == 1      # too few entries in all
    assert thr.n_workers(None, 128, 32 * 32) == 1    # problems too small (GIL-bound)
    assert thr.n_workers(None, 1, 1024 * 1024) == 1  # nothing to split
    assert thr.n_workers(5, 3, 10) == 3              # never more threads than problems


def test_worker_errors_propagate(monkeypatch):
    from scipy import optimize

    real = optimize.linear_sum_assignment

    def failing(c, maximize=False):
        if c[0, 0] < 0:
            raise RuntimeError("planted failure")
        return real(c, maximize=maximize)

    monkeypatch.setattr(optimize, "linear_sum_assignment", failing)
    C = np.random.default_rng(13).random((6, 64, 64))
    C[4, 0, 0] = -1.0
    with pytest.raises(RuntimeError, match="planted failure"):
        S.linear_assignment(C, workers=2)


@pytest.mark.parametrize("workers", [0, -2, 1.5, True, "2"])
def test_bad_workers(workers):
    C = np.random.default_rng(0).random((4, 64, 64))
    for cost in (C, C[0], torch.from_numpy(C[:1])):  # single problems and tensors too
        with pytest.raises(ValueError, match="workers must be"):
            S.linear_assignment(cost, workers=workers)


def _solve_in_child(q):
    C = np.random.default_rng(14).random((4, 64, 64))
    q.put(float(S.linear_assignment(C, workers=2).objective.sum()))


def test_thread_pool_survives_fork():
    """A forked child (e.g. a DataLoader worker) must not wait on the parent's dead pool threads."""
    import multiprocessing as mp

    C = np.random.default_rng(14).random((4, 64, 64))
    ref = float(S.linear_assignment(C, workers=2).objective.sum())  # the parent's pool exists now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_solve_in_child, args=(q,))
    p.start()
    p.join(timeout=30)
    if p.is_alive():
        p.kill()
        pytest.fail("linear_assignment hung in a forked child")
    assert p.exitcode == 0 and q.get(timeout=5) == pytest.approx(ref, rel=1e-12)
