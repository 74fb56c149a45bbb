"""MergeMany: planted copies collapse to one model, convergence, routing from merge()."""

import pytest
import torch

import merging
import weightspace as ws
from weightspace import zoo
from weightspace.state import state_of


def test_permuted_copies_merge_back_to_the_model():
    m = zoo.make("mlp", hidden=(32, 32), seed=0)
    x = torch.zeros(1, 64)
    spec = ws.permutation_spec(m, x)
    copies = [ws.permute(m, spec, ws.random_permutation(spec, seed=s)) for s in (1, 2, 3)]
    res = merging.merge(m, *copies, method="weight_matching", spec=spec, device="cpu")
    assert res.settings["runner"] == "merge_many" and res.log["method"]["converged"]
    # all four are one function: the merge is that function (in some basis)
    xs = torch.randn(20, 64)
    torch.testing.assert_close(res.model(xs), m(xs), rtol=1e-5, atol=1e-5)
    # relative permutations send each copy into model_a's basis exactly
    rel = res.alignment.log["relative_to_model_a"]
    for k, c in enumerate(copies, start=1):
        back = ws.permute(state_of(c), spec, rel[k])
        assert all(torch.equal(back[key], v) for key, v in state_of(m).items())
    # negative control: the naive average of the copies is a different function
    naive = merging.merge(m, *copies, device="cpu")
    assert (naive.model(xs) - m(xs)).abs().max() > 1e-2


def test_merge_many_options_and_convergence():
    ms = [zoo.make("mlp", hidden=(16, 16), seed=s) for s in range(3)]
    x = torch.zeros(1, 64)
    res = merging.merge(*ms, method="weight_matching", example_inputs=x, max_sweeps=50, max_rounds=10, device="cpu")
    rounds = res.alignment.log["rounds"]
    assert rounds[-1]["changed"] == 0 and len(rounds) <= 10
    with pytest.raises(merging.MergeError, match="no option.*bogus"):
        merging.merge(*ms, method="weight_matching", example_inputs=x, bogus=1)
    with pytest.raises(merging.MergeError, match="aligning inner method"):
        merging.merge(*ms, method="merge_many", inner="average", example_inputs=x)
