"""Weight matching: planted permutations, SciPy optimum, identity, local optimality, monotone log."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import merging
import weightspace as ws
from merging.weight_matching import match_weights, single_group_gains
from weightspace import zoo
from weightspace.state import state_of


def _planted(model, x, seed=1):
    spec = ws.permutation_spec(model, x)
    P = ws.random_permutation(spec, seed=seed)
    return spec, P, ws.permute(model, spec, P)


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=20,
        )
        m = transformers.BertModel(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=20, bos_token_id=0, eos_token_id=0
        )
        m = transformers.GPT2Model(cfg)
    return m.eval(), {"input_ids": torch.randint(0, 50, (2, 7))}


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet20", "vit", "bert", "gpt2"])
def test_planted_permutations_recovered_exactly(arch):
    if arch in ("bert", "gpt2"):
        m, x = _hf(arch)
    else:
        kw = {"mlp": dict(hidden=(32, 32, 32)), "resnet20": dict(width=1)}.get(arch, {})
        m = zoo.make(arch, seed=0, **kw)
        x = zoo.example_inputs(m)
    spec, P, mb = _planted(m, x)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in P.values())  # a real permutation
    before = {k: v.clone() for k, v in mb.state_dict().items()}
    aln = merging.align(m, mb, spec=spec, device="cpu", seed=3)
    inv = ws.invert_permutation(P)
    wrong = [g for g in spec.groups if not torch.equal(aln.permutations[g], inv[g])]
    assert not wrong, f"groups not recovered: {wrong}"
    # B permuted by the alignment is A again; B itself is untouched
    back = aln.apply(state_of(mb))
    for k, v in state_of(m).items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in mb.state_dict().items())
    # the objective at the recovered permutation is sum ||W_A||^2 over the matched parameters
    keys = merging._wm_core.matched_keys(spec, state_of(m), [k for k, _ in m.named_parameters()])
    want = sum(float((state_of(m)[k].double() ** 2).sum()) for k in keys)
    assert aln.objective == pytest.approx(want, rel=1e-5)


def test_attention_heads_need_block_matching():
    """Negative control: without the head-block step, plain coordinate descent stalls on a planted ViT."""
    from merging import _wm_core as core

    m = zoo.make("vit", seed=0)
    spec, P, mb = _planted(m, zoo.example_inputs(m))
    orig = core.find_heads
    try:
        core.find_heads = lambda *a, **k: {}
        # full-LAP steps: the reference descent (whether another trajectory escapes the stall is luck)
        plain = match_weights(
            spec, state_of(m), state_of(mb), param_names=[k for k, _ in m.named_parameters()], steps="full"
        )
    finally:
        core.find_heads = orig
    block = match_weights(spec, state_of(m), state_of(mb), param_names=[k for k, _ in m.named_parameters()])
    inv = ws.invert_permutation(P)
    assert all(torch.equal(block.permutations[g], inv[g]) for g in spec.groups)
    assert plain.objective < block.objective * (1 - 1e-4)


def test_single_hidden_layer_equals_scipy_optimum():
    a, b = zoo.make("mlp", hidden=(48,), seed=0), zoo.make("mlp", hidden=(48,), seed=1)
    sa = {k: v.double() for k, v in a.state_dict().items()}
    sb = {k: v.double() for k, v in b.state_dict().items()}
    C = (
        sa["fc.0.weight"] @ sb["fc.0.weight"].T
        + torch.outer(sa["fc.0.bias"], sb["fc.0.bias"])
        + sa["head.weight"].T @ sb["head.weight"]
    ).numpy()
    r, c = linear_sum_assignment(C, maximize=True)
    aln = merging.align(a, b, example_inputs=torch.zeros(1, 64), device="cpu", dtype="float64")
    (g,) = aln.spec.groups
    assert np.array_equal(aln.permutations[g].numpy(), c)
    const = float((sa["head.bias"].double() * sb["head.bias"].double()).sum())  # unpermuted, not in the objective
    assert aln.objective == pytest.approx(C[r, c].sum(), rel=1e-10)
    assert const != 0.0


def test_matching_a_model_to_itself_is_the_identity():
    m = zoo.make("resnet20", width=1, seed=0)
    aln = merging.align(m, m, example_inputs=zoo.example_inputs(m), device="cpu")
    assert all(torch.equal(p, torch.arange(p.numel())) for p in aln.permutations.values())
    res = merging.merge(m, m, method="weight_matching", spec=aln.spec, device="cpu")
    assert all(torch.equal(res.state_dict[k], v) for k, v in state_of(m).items())


@pytest.mark.parametrize("arch", ["mlp", "resnet20"])
def test_converged_alignment_is_a_local_optimum_and_log_is_monotone(arch):
    kw = {"mlp": dict(hidden=(64, 64, 64)), "resnet20": dict(width=1)}[arch]
    a, b = zoo.make(arch, seed=0, **kw), zoo.make(arch, seed=1, **kw)
    spec = ws.permutation_spec(a, zoo.example_inputs(a))
    names = [k for k, _ in a.named_parameters()]
    aln = match_weights(spec, state_of(a), state_of(b), seed=0, restarts=2, dtype="float64", param_names=names)
    gains = single_group_gains(spec, state_of(a), state_of(b), aln.permutations, param_names=names)
    assert max(gains.values()) <= 1e-9 * abs(aln.objective)
    # negative control: the identity is not a local optimum for two independent networks
    ident = ws.identity_permutation(spec)
    assert max(single_group_gains(spec, state_of(a), state_of(b), ident, param_names=names).values()) > 1e-3
    for run in aln.log["restarts"]:
        objs = [aln.log["objective_identity"] if run["restart"] == 0 else -np.inf] + [
            s["objective"] for s in run["sweeps"]
        ]
        assert all(y >= x - 1e-9 * abs(x) for x, y in zip(objs, objs[1:]))
        assert run["converged"]
    assert aln.objective == max(r["objective"] for r in aln.log["restarts"])
    assert aln.objective > aln.log["objective_identity"]


def test_recurrent_self_coupled_group_never_decreases():
    class RNNNet(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.rnn = torch.nn.GRU(6, 12, batch_first=True)
            self.head = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    a, b = RNNNet(0), RNNNet(1)
    x = torch.randn(2, 5, 6)
    spec = ws.permutation_spec(a, x)
    names = [k for k, _ in a.named_parameters()]
    aln = match_weights(spec, state_of(a), state_of(b), dtype="float64", param_names=names)
    objs = [aln.log["objective_identity"]] + [s["objective"] for s in aln.log["restarts"][0]["sweeps"]]
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(objs, objs[1:]))
    # planted: recovered exactly even though W_hh couples the group to itself
    P = ws.random_permutation(spec, seed=2)
    rec = match_weights(spec, state_of(a), ws.permute(state_of(a), spec, P), param_names=names)
    inv = ws.invert_permutation(P)
    assert all(torch.equal(rec.permutations[g], inv[g]) for g in spec.groups)


def test_weight_matching_merge_and_seeded_reproducibility():
    a, b = zoo.make("mlp", hidden=(32, 32), seed=0), zoo.make("mlp", hidden=(32, 32), seed=1)
    x = torch.zeros(1, 64)
    r1 = merging.merge(a, b, method="weight_matching", example_inputs=x, seed=5, device="cpu")
    r2 = merging.merge(a, b, method="weight_matching", example_inputs=x, seed=5, device="cpu")
    assert all(torch.equal(r1.state_dict[k], r2.state_dict[k]) for k in r1.state_dict)
    bp = r1.alignment.apply(state_of(b))
    for k, v in r1.state_dict.items():
        torch.testing.assert_close(v, 0.5 * state_of(a)[k] + 0.5 * bp[k])
    assert r1.settings["method"] == "weight_matching" and r1.log["spec_source"] == "traced from example_inputs"
    with pytest.raises(merging.MergeError, match="needs a permutation spec.*example_inputs"):
        merging.merge(a, b, method="weight_matching")
    with pytest.raises(merging.MergeError, match="state dicts cannot be traced"):
        merging.merge(a.state_dict(), b.state_dict(), method="weight_matching", example_inputs=x)
    sd = merging.merge(a.state_dict(), b.state_dict(), method="weight_matching", spec=r1.spec, seed=5, device="cpu")
    assert sd.model is None and all(torch.equal(sd.state_dict[k], r1.state_dict[k]) for k in sd.state_dict)


def test_untraceable_model_points_to_a_hand_written_spec():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(4, 4)

        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(merging.MergeError, match="from_axes_to_perm"):
        merging.merge(Weird(), Weird(), method="weight_matching", example_inputs=torch.zeros(1, 4))


@pytest.mark.gpu
def test_gpu_costs_match_cpu():
    a, b = zoo.make("resnet20", width=1, seed=0), zoo.make("resnet20", width=1, seed=1)
    x = zoo.example_inputs(a)
    cpu = merging.align(a, b, example_inputs=x, device="cpu", dtype="float64")
    gpu = merging.align(a.cuda(), b.cuda(), example_inputs=x.cuda(), device="cuda", dtype="float64")
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-9)
    assert all(torch.equal(gpu.permutations[g], cpu.permutations[g]) for g in cpu.permutations)
