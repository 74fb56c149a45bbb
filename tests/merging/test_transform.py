"""weightspace.transform on structured layouts (attention products, packed q|k|v, GPT-2 Conv1D):
permutation matrices equal ws.permute, an orthogonal change of the MLP hidden basis keeps the function."""
import pytest
import torch

import weightspace as ws
from weightspace import zoo
from weightspace.state import state_of


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=20, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2Model(cfg).eval(), {"input_ids": torch.randint(0, 50, (2, 7))}


@pytest.mark.parametrize("arch", ["vit", "gpt2"])
def test_permutation_matrices_through_structured_axes_equal_permute(arch):
    if arch == "gpt2":
        m, x = _gpt2()
    else:
        m = zoo.make("vit", seed=0)
        x = zoo.example_inputs(m)
    spec = ws.permutation_spec(m, x)
    assert any(not lay.is_simple for v in spec.axes.values() for lay in v if lay is not None)
    perms = ws.random_permutation(spec, seed=4)
    want = ws.permute(state_of(m), spec, perms)
    got = ws.transform(m, spec, {g: torch.eye(n)[perms[g]] for g, n in spec.groups.items()})
    for k in spec.permuted_keys():
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # negative control: transposed matrices are the inverse permutation, not the same one
    inv = ws.transform(m, spec, {g: torch.eye(n)[perms[g]].T for g, n in spec.groups.items()})
    assert any(not torch.allclose(inv[k], want[k]) for k in spec.permuted_keys())


def test_orthogonal_map_of_a_linear_hidden_layer_preserves_the_function():
    """A linear hidden layer admits any invertible change of basis: merge Q on its producer, unmerge Q^T."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 3))
    spec = ws.permutation_spec(m, torch.zeros(1, 6))
    (g,) = spec.groups
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    out = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 3))
    out.load_state_dict(ws.transform(m, spec, {g: Q}))
    x = torch.randn(5, 6)
    torch.testing.assert_close(out(x), m(x), rtol=1e-5, atol=1e-5)
    assert (out[0].weight - m[0].weight).abs().max() > 1e-2  # the weights did change
    bad = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 3))
    bad.load_state_dict(ws.transform(m, spec, {g: (Q, Q)}))  # negative control: unmerge Q instead of Q^T
    assert (bad(x) - m(x)).abs().max() > 1e-3
