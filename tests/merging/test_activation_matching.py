"""Activation matching: planted permutations on data, sequential == joint, SciPy optimum of one group."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import merging
import weightspace as ws
from weightspace import zoo
from weightspace.features import cross_stats
from weightspace.state import state_of


@pytest.fixture(scope="module")
def digits():
    X, Y = zoo.load_digits("train")
    return X[:400], Y[:400]


@pytest.mark.parametrize("arch", ["mlp", "resnet20", "vit"])
@pytest.mark.parametrize("statistic", ["correlation", "second_moment"])
def test_planted_permutations_recovered_on_data(arch, statistic, digits):
    if arch == "mlp":
        m, data = zoo.make("mlp", hidden=(32, 32), seed=0), digits
    else:
        m = zoo.make(arch, seed=0, **({"width": 1} if arch == "resnet20" else {}))
        x = zoo.example_inputs(m)
        g = torch.Generator().manual_seed(0)
        data = (torch.randn((24,) + tuple(x.shape[1:]), generator=g), torch.zeros(24, dtype=torch.long))
    spec = ws.permutation_spec(m, data[0][:2])
    P = ws.random_permutation(spec, seed=1)
    mb = ws.permute(m, spec, P)
    aln = merging.align(m, mb, method="activation_matching", data=data, spec=spec, statistic=statistic, device="cpu")
    inv = ws.invert_permutation(P)
    wrong = [g for g in spec.groups if not torch.equal(aln.permutations[g], inv[g])]
    assert not wrong
    if arch == "vit":  # heads x head-dim groups have no unit-wise point: aligned by the weight-matching fallback
        assert aln.log["not_activation_matched"] and aln.log["weight_matching_fallback"] is not None
    # negative control: matching without the fallback leaves those groups at the identity
    if aln.log["not_activation_matched"]:
        ident = merging.align(
            m, mb, method="activation_matching", data=data, spec=spec, fallback="identity", device="cpu"
        )
        assert any(not torch.equal(ident.permutations[g], inv[g]) for g in aln.log["not_activation_matched"])


def test_sequential_equals_joint_and_one_group_is_scipy_optimal(digits):
    a, b = zoo.make("mlp", hidden=(24, 24), seed=0), zoo.make("mlp", hidden=(24, 24), seed=1)
    j = merging.align(a, b, method="activation_matching", data=digits, example_inputs=digits[0][:2], device="cpu")
    s = merging.align(a, b, method="activation_matching", data=digits, spec=j.spec, sequential=True, device="cpu")
    assert all(torch.equal(j.permutations[g], s.permutations[g]) for g in j.spec.groups)
    assert s.log["data_passes"] == len(j.spec.groups) and j.log["data_passes"] == 1
    g, (mod, dim) = next(iter(j.log["points"].items()))
    cs = cross_stats(a, b, digits, [mod], feature_dim={mod: dim})[mod]
    S = (cs.cov_ab / (torch.outer(cs.std_a, cs.std_b) + 1e-4)).numpy()
    r, c = linear_sum_assignment(S, maximize=True)
    assert np.array_equal(j.permutations[g].numpy(), c)
    assert j.log["similarity"][g] == pytest.approx(S[r, c].sum(), rel=1e-9)


def test_activation_matching_needs_data_and_a_module(digits):
    a, b = zoo.make("mlp", hidden=(8,), seed=0), zoo.make("mlp", hidden=(8,), seed=1)
    with pytest.raises(merging.MergeError, match="data-driven: pass data="):
        merging.merge(a, b, method="activation_matching", example_inputs=digits[0][:2])
    with pytest.raises(merging.MergeError, match="statistic must be"):
        merging.merge(a, b, method="activation_matching", data=digits, statistic="cka")
    res = merging.merge(a, b, method="activation_matching", data=digits, device="cpu")
    bp = res.alignment.apply(state_of(b))
    for k, v in res.state_dict.items():
        torch.testing.assert_close(v, 0.5 * (state_of(a)[k] + bp[k]))
