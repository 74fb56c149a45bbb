"""No silent wrong answers from the symmetry layer: specs that do not fit a module, forwards whose
control flow depends on tensor values, and checks on inputs other than the traced example."""
import pytest
import torch
from torch import nn

import weightspace as ws


def _mlp(seed=0, width=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def test_permute_refuses_a_spec_for_another_module():
    a = _mlp()
    spec = ws.permutation_spec(a, torch.randn(2, 4))
    perms = ws.random_permutation(spec, seed=1)
    wrapped = nn.Sequential()
    wrapped.add_module("net", _mlp())  # same layers under a prefix: keys "net.0.weight", ...
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(ws.SpecError, match=r"module does not have.*0\.weight"):
        ws.permute(wrapped, spec, perms)
    with pytest.raises(ws.SpecError, match=r"lacks keys.*0\.weight"):
        ws.permute(wrapped.state_dict(), spec, perms)
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())
    # positive control: the right module is permuted, and the state dict path agrees with the module path
    pa = ws.permute(a, spec, perms)
    assert not torch.equal(pa[0].weight, a[0].weight)
    sd = ws.permute(a.state_dict(), spec, perms)
    assert all(torch.equal(sd[k], v) for k, v in pa.state_dict().items())


class _Branchy(nn.Module):
    """Branches on a value that depends on the permuted hidden units: the traced path (relu) is
    permutation-equivariant, the other one (roll along the hidden dimension) is not."""

    def __init__(self, x0):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        with torch.no_grad():  # put the example input just on the traced side of the branch
            self.threshold = float(self.fc1(x0).abs().amax()) + 1e-3

    def forward(self, x):
        h = self.fc1(x)
        if h.abs().amax() < self.threshold:
            return self.fc2(torch.relu(h))
        return self.fc2(h.roll(1, -1))


class _Loop(nn.Module):
    """A loop count and an index taken out of torch (int, tolist) from permuted hidden units."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        for _ in range(int(h.sum() > 1e9)):  # zero iterations on the example: the flip is never traced
            h = h.flip(-1)
        top = h.amax(-1).tolist()  # values leave torch and come back
        return self.fc2(h) + torch.tensor(top, dtype=h.dtype)[:, None] * 0


class _InputOnly(nn.Module):
    """Data-dependent events that involve no permuted dimension: must not be flagged."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.abs().max() > 100:  # a bool of a scalar computed from the inputs only
            x = x / x.abs().max().item()
        n = int(torch.tensor(x.shape[0]))  # a shape-derived int
        return self.fc2(torch.relu(self.fc1(x)))[:n]


X0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))


def test_branch_on_permuted_values_is_recorded_warned_and_strict_raises():
    m = _Branchy(X0)
    with pytest.warns(ws.symmetry.DataDependentTraceWarning, match=r"bool \(x1"):
        spec = ws.permutation_spec(m, X0)
    assert spec.info["data_dependent"] == (("bool", "<the model's own forward>", 1),)
    assert dict(spec.groups) == {"fc1": 8}
    with pytest.raises(ws.TraceError, match="Python values: bool"):
        ws.permutation_spec(m, X0, strict=True)
    assert isinstance(ws.TraceError("x"), ws.WeightspaceError)


def test_loop_counts_and_tolist_are_recorded():
    with pytest.warns(ws.symmetry.DataDependentTraceWarning):
        spec = ws.permutation_spec(_Loop(), X0)
    events = {op: n for op, _, n in spec.info["data_dependent"]}
    assert events == {"int": 1, "tolist": 1}
    assert dict(spec.groups) == {"fc1": 8}


def test_values_of_fixed_dimensions_only_are_not_flagged(recwarn):
    spec = ws.permutation_spec(_InputOnly(), X0, strict=True)  # strict: would raise if flagged
    assert spec.info["data_dependent"] == () and spec.info["data_dependent_unflagged"] >= 2
    assert dict(spec.groups) == {"fc1": 8}
    assert not [w for w in recwarn if issubclass(w.category, ws.symmetry.DataDependentTraceWarning)]


def test_check_spec_tries_perturbed_inputs_and_names_the_failing_one():
    m = _Branchy(X0)
    with pytest.warns(ws.symmetry.DataDependentTraceWarning):
        spec = ws.permutation_spec(m, X0)
    # on the traced input alone the spec looks fine (the old check_spec passed here)
    only = ws.check_spec(m, spec, X0, perturbed=0)
    assert only.inputs == ("the example inputs",) and max(only.max_rel_diff.values()) < 1e-5
    with pytest.raises(ws.SpecError, match=r"on perturbed input #\d .*group 'fc1'.*different path"):
        ws.check_spec(m, spec, X0)
    # an input the user supplies that takes the other branch is named too
    other = next(x for x in ws.symmetry.perturb_inputs(X0, 10, seed=5) if m.fc1(x).abs().amax() >= m.threshold)
    with pytest.raises(ws.SpecError, match=r"on inputs\[0\]"):
        ws.check_spec(m, spec, X0, perturbed=0, inputs=[other])


def test_check_spec_negative_control_and_perturbation_contract():
    m = _mlp()
    spec = ws.permutation_spec(m, X0)
    rep = ws.check_spec(m, spec, X0, perturbed=2)
    assert len(rep.inputs) == 3 and all(v < 1e-5 for v in rep.max_rel_diff_by_input.values())
    with pytest.raises(ws.SpecError, match="trials must be >= 1"):
        ws.check_spec(m, spec, X0, trials=0)
    ids = torch.tensor([[3, 7, 5], [4, 4, 6]])
    x = {"ids": ids, "x": X0, "mask": torch.ones(2, 3, dtype=torch.bool), "flag": True}
    a, b = ws.symmetry.perturb_inputs(x, 2, seed=0)
    c, _ = ws.symmetry.perturb_inputs(x, 2, seed=0)
    assert torch.equal(a["x"], c["x"]) and not torch.equal(a["x"], b["x"])  # seeded
    assert a["ids"].dtype == ids.dtype and int(a["ids"].min()) >= 3 and int(a["ids"].max()) <= 7
    assert torch.equal(a["mask"], x["mask"]) and a["flag"] is True
    assert 0.3 < float((a["x"] - X0).std() / X0.abs().std()) < 3  # noise of the inputs' own scale
