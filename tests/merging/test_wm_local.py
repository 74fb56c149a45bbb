"""Local steps of weight matching (``steps="local"``): exact on their row subset, never worse, and the
descent still stops only at a certified coordinate-wise optimum."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import merging
import weightspace as ws
from merging import _wm_core as core
from merging.weight_matching import match_weights, single_group_gains
from weightspace import zoo
from weightspace.state import state_of


def _value(C, p):
    return float(C[np.arange(len(p)), p].sum())


@pytest.mark.parametrize("seed", range(5))
def test_local_step_is_the_exact_optimum_over_its_subset(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    C = torch.randn(n, n, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    new, gain, size = core.local_step(C, perm, k=6)
    Cn, p, q = C.numpy(), perm.numpy(), new.numpy()
    assert sorted(q.tolist()) == list(range(n))  # a permutation
    S = np.nonzero(q != p)[0]
    assert 0 < len(S) <= size < n  # a real subset, and it moved something
    assert gain == pytest.approx(_value(Cn, q) - _value(Cn, p), rel=1e-12, abs=1e-12) and gain > 0
    # no permutation that agrees with perm outside the moved rows does better (SciPy on that block)
    sub = Cn[np.ix_(S, p[S])]
    r, c = linear_sum_assignment(sub, maximize=True)
    assert _value(Cn, q) >= _value(Cn, p) + sub[r, c].sum() - np.trace(sub) - 1e-10
    # with every row in the subset the step is a full LAP: SciPy's optimum
    full, gain_full, size_full = core.local_step(C, perm, k=n)
    r, c = linear_sum_assignment(Cn, maximize=True)
    assert size_full == n and _value(Cn, full.numpy()) == pytest.approx(Cn[r, c].sum(), rel=1e-12)


def test_local_step_repairs_planted_swaps_and_leaves_an_optimum_alone():
    g = torch.Generator().manual_seed(0)
    n = 64
    C = torch.randn(n, n, generator=g) + 8.0 * torch.eye(n)  # the identity is the unique optimum
    ident = torch.arange(n)
    perm = ident.clone()
    for i, j in [(3, 40), (7, 9), (20, 61)]:  # three planted transpositions
        perm[[i, j]] = perm[[j, i]]
    new, gain, size = core.local_step(C, perm, k=4)
    assert torch.equal(new, ident) and gain > 0 and size < n
    # negative control: at the optimum nothing moves and the gain is zero
    same, gain0, _ = core.local_step(C, ident, k=4)
    assert torch.equal(same, ident) and gain0 == pytest.approx(0.0, abs=1e-9)


def test_local_descent_never_decreases_and_stops():
    g = torch.Generator().manual_seed(1)
    n = 96
    C = torch.randn(n, n, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    p, total, steps = core.local_descent(C, perm, k=8, rtol=1e-12)
    Cn = C.numpy()
    assert total == pytest.approx(_value(Cn, p.numpy()) - _value(Cn, perm.numpy()), rel=1e-10) and total > 0
    assert 1 <= steps < 64
    # stopped at a point the next local step cannot improve
    _, more, _ = core.local_step(C, p, k=8)
    assert more <= 1e-12 * abs(_value(Cn, p.numpy())) + 1e-12
    r, c = linear_sum_assignment(Cn, maximize=True)
    assert _value(Cn, p.numpy()) <= Cn[r, c].sum() + 1e-9


def test_dsatur_colours_a_chain_with_two_classes():
    m = zoo.make("mlp", hidden=(16,) * 8, seed=0)
    spec = ws.permutation_spec(m, zoo.example_inputs(m))
    sd = state_of(m)
    keys = core.matched_keys(spec, sd, [k for k, _ in m.named_parameters()])
    prob = core.build_problem(spec, sd, sd, keys=keys)
    for seed in range(4):
        idx = torch.randperm(len(spec.groups), generator=torch.Generator().manual_seed(seed))
        order = [list(spec.groups)[i] for i in idx]
        classes = core.color_classes_dsatur(prob, order)
        assert len(classes) == 2
        for cls in classes:  # groups of one class share no tensor
            for g, h in itertools.combinations(cls, 2):
                assert h not in prob.neighbours[g]
        assert sorted(sum(classes, [])) == sorted(spec.groups)


@pytest.mark.parametrize("steps", ["local", "full"])
def test_both_step_kinds_stop_at_a_certified_local_optimum(steps):
    a, b = zoo.make("mlp", hidden=(96,) * 4, seed=0), zoo.make("mlp", hidden=(96,) * 4, seed=1)
    spec = ws.permutation_spec(a, zoo.example_inputs(a))
    names = [k for k, _ in a.named_parameters()]
    aln = match_weights(spec, state_of(a), state_of(b), seed=0, dtype="float64", param_names=names, steps=steps)
    run = aln.log["restarts"][0]
    assert run["converged"]
    if steps == "local":  # the local steps were really taken, and certification sweeps closed the run
        assert run["n_local_steps"] > 0 and any(s["kind"] == "certify" for s in run["sweeps"])
        assert run["sweeps"][-1]["kind"] == "certify"
    else:
        assert run["n_local_steps"] == 0
    gains = single_group_gains(spec, state_of(a), state_of(b), aln.permutations, param_names=names)
    assert max(gains.values()) <= 1e-9 * abs(aln.objective)
    # negative control: the identity is not a local optimum
    ident = ws.identity_permutation(spec)
    assert max(single_group_gains(spec, state_of(a), state_of(b), ident, param_names=names).values()) > 1e-3
    objs = [aln.log["objective_identity"]] + [s["objective"] for s in run["sweeps"]]
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(objs, objs[1:]))
    assert aln.settings["steps"] == steps


def test_local_steps_recover_a_planted_permutation():
    m = zoo.make("mlp", hidden=(128, 128), seed=0)
    spec = ws.permutation_spec(m, zoo.example_inputs(m))
    P = ws.random_permutation(spec, seed=4)
    mb = ws.permute(m, spec, P)
    names = [k for k, _ in m.named_parameters()]
    aln = match_weights(spec, state_of(m), state_of(mb), param_names=names, steps="local")
    inv = ws.invert_permutation(P)
    assert all(torch.equal(aln.permutations[g], inv[g]) for g in spec.groups)


def test_bad_step_options_are_named():
    m = zoo.make("mlp", hidden=(8,), seed=0)
    spec = ws.permutation_spec(m, zoo.example_inputs(m))
    with pytest.raises(merging.MergeError, match="steps must be"):
        match_weights(spec, state_of(m), state_of(m), steps="fast")
    with pytest.raises(merging.MergeError, match="local_size"):
        match_weights(spec, state_of(m), state_of(m), local_size=0.0)


def test_step_options_reach_merge_and_full_steps_match_match_weights():
    a, b = zoo.make("mlp", hidden=(80, 80), seed=0), zoo.make("mlp", hidden=(80, 80), seed=1)
    x = zoo.example_inputs(a)
    res = merging.merge(a, b, method="weight_matching", example_inputs=x, seed=2, device="cpu", steps="full")
    assert res.alignment.settings["steps"] == "full"
    names = [k for k, _ in a.named_parameters()]
    ref = match_weights(res.spec, state_of(a), state_of(b), seed=2, param_names=names, steps="full")
    assert all(torch.equal(res.alignment.permutations[g], ref.permutations[g]) for g in res.spec.groups)
    with pytest.raises(merging.MergeError, match="steps must be"):
        merging.merge(a, b, method="weight_matching", example_inputs=x, device="cpu", steps="exact")


def test_auto_takes_local_steps_only_for_groups_above_the_threshold(monkeypatch):
    from merging import weight_matching as wm

    a, b = zoo.make("mlp", hidden=(128,) * 3, seed=0), zoo.make("mlp", hidden=(128,) * 3, seed=1)
    spec = ws.permutation_spec(a, zoo.example_inputs(a))
    names = [k for k, _ in a.named_parameters()]
    below = match_weights(spec, state_of(a), state_of(b), param_names=names)  # 128 < AUTO_LOCAL_MIN_N
    assert below.settings["steps"] == "auto" and below.log["restarts"][0]["n_local_steps"] == 0
    monkeypatch.setattr(wm, "AUTO_LOCAL_MIN_N", 128)
    above = match_weights(spec, state_of(a), state_of(b), param_names=names)
    assert above.log["restarts"][0]["n_local_steps"] > 0 and above.log["restarts"][0]["converged"]
    gains = single_group_gains(spec, state_of(a), state_of(b), above.permutations, param_names=names)
    assert max(gains.values()) <= 1e-4 * abs(above.objective)  # float32 costs: rtol 1e-5 per step
