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
