"""Orthogonal (Procrustes) alignment within attention heads (attention="procrustes" of weight matching).

Oracles: the rotated B computes B's function (BERT, GPT-2, TinyViT) while rotating Q without K does
not; the objective is >= the permutation-only objective and equals <A, B'> recomputed; a planted
per-head rotation + permutation of A is undone exactly (permutations alone cannot); a model aligned
to itself is not rotated; refusals name the module (RoPE, per-head scales, no heads, three models).
"""

import functools
import json

import pytest
import torch
from torch import nn

import merging
import weightspace as ws
from merging import _procrustes as pr
from merging._wm_core import matched_keys
from weightspace import zoo
from weightspace.state import state_of


# ------------------------------------------------------------------------------------------ models
def _hf(kind, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=20,
            initializer_range=0.3,  # non-uniform attention at init: rotating q alone must show
        )
        return transformers.BertModel(cfg).eval()
    cfg = transformers.GPT2Config(
        vocab_size=50,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=20,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.3,
    )
    return transformers.GPT2Model(cfg).eval()


@functools.lru_cache(maxsize=None)
def _pair(kind):
    """Two independently initialised models of one architecture, example inputs and the spec."""
    if kind == "vit":
        a, b = zoo.make("vit", seed=0).eval(), zoo.make("vit", seed=1).eval()
        x = zoo.example_inputs(a)
    else:
        a, b = _hf(kind, 0), _hf(kind, 1)
        g = torch.Generator().manual_seed(5)
        x = {"input_ids": torch.randint(0, 50, (2, 7), generator=g)}
    return a, b, x, ws.permutation_spec(a, x)


@functools.lru_cache(maxsize=None)
def _aligned(kind):
    a, b, x, spec = _pair(kind)
    perm = merging.align(a, b, method="weight_matching", example_inputs=x, device="cpu", seed=0)
    rot = merging.align(a, b, method="weight_matching", example_inputs=x, device="cpu", seed=0, attention="procrustes")
    return perm, rot


def _outputs(model, x, state=None):
    from torch.func import functional_call

    with torch.no_grad():
        if state is None:
            out = model(**x) if isinstance(x, dict) else model(x)
        else:
            out = functional_call(model, state, (), x) if isinstance(x, dict) else functional_call(model, state, (x,))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _keys(model, spec):
    return matched_keys(spec, state_of(model), [k for k, _ in model.named_parameters()])


def _inner(sa, sb, keys):
    return sum(float((sa[k].double() * sb[k].double()).sum()) for k in keys)


def _random_orthogonal(n_heads, d, gen):
    q, r = torch.linalg.qr(torch.randn(n_heads, d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


# ------------------------------------------------------------------------------------------ function
@pytest.mark.parametrize("kind", ["vit", "bert", "gpt2"])
def test_rotated_b_computes_b_function_and_rotating_q_alone_does_not(kind):
    a, b, x, spec = _pair(kind)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    _, aln = _aligned(kind)
    assert isinstance(aln, pr.RotatedAlignment)
    p = aln.log["procrustes"]
    assert p["heads_rotated"] > 0 and p["function_check"]["checked"]
    eye = torch.eye(aln.rotations[next(iter(aln.rotations))].shape[-1], dtype=torch.float64)
    assert any(not torch.allclose(R, eye.expand_as(R)) for R in aln.rotations.values())
    for R in aln.rotations.values():  # orthogonal (float64)
        torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand_as(R), rtol=0, atol=1e-12)
    ref = _outputs(b, x)
    sb = aln.apply(state_of(b))
    torch.testing.assert_close(_outputs(b, x, sb), ref, rtol=1e-4, atol=1e-5)
    mb = aln.apply(b)  # a module gives a new module, same function
    assert mb is not b
    torch.testing.assert_close(_outputs(mb, x), ref, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # B untouched
    # the weights did change (not the identity) and moved towards A
    keys = _keys(a, spec)
    assert max(float((sb[k] - ws.permute(state_of(b), spec, aln.permutations)[k]).abs().max()) for k in keys) > 1e-2
    # negative control: the same rotations on the queries only (keys left alone) change the function
    # (BERT: the `query` Linear; packed q|k|v of ViT / GPT-2: block 0 of the concat)
    q_only = {
        D: {**info, "where": [w for w in info["where"] if "query" in w[0] or w[2][:1] == [0]]}
        for D, info in aln.heads.items()
    }
    n_blocks = len({info["head_group"] for info in aln.heads.values()})
    assert sum(bool(v["where"]) for v in q_only.values()) == n_blocks  # one q/k group per block keeps its q
    bad = pr.RotatedAlignment(
        spec=spec, permutations=aln.permutations, objective=0.0, rotations=aln.rotations, heads=q_only
    )
    err = (_outputs(b, x, bad.apply(state_of(b))) - ref).abs().max() / ref.abs().max()
    assert err > 1e-2
    with pytest.raises(merging.MergeError, match="changes the outputs"):
        pr.function_check(b, state_of(b), bad, x)


@pytest.mark.parametrize("kind", ["vit", "bert", "gpt2"])
def test_objective_at_least_permutation_only_and_recomputed(kind):
    a, b, x, spec = _pair(kind)
    perm, aln = _aligned(kind)
    p = aln.log["procrustes"]
    keys = _keys(a, spec)
    # the permutation-only objective of the same descent (seeded) is the one recorded as "before"
    assert p["objective_permutation"] == pytest.approx(_inner(state_of(a), perm.apply(state_of(b)), keys), rel=1e-9)
    assert p["objective_permutation"] == pytest.approx(perm.objective, rel=1e-5)
    # after: <A, B'> recomputed from the applied alignment, strictly above for independent models
    assert aln.objective == pytest.approx(_inner(state_of(a), aln.apply(state_of(b)), keys), rel=1e-9)
    assert aln.objective > p["objective_permutation"] * (1 + 1e-3)
    # without the head re-matching: per-head gains add up exactly to the objective change, and the
    # re-matching (rotation-invariant head scores) never lowers the objective below it
    blocks, rot = pr.attention_blocks(spec, keys)
    sa, sb = state_of(a), state_of(b)
    perms, R, logs = pr.solve_heads(spec, sa, sb, perm.permutations, blocks, rotate=rot, rematch=False)
    assert all(torch.equal(perms[g], perm.permutations[g]) for g in spec.groups)
    fixed_heads = pr.RotatedAlignment(
        spec=spec, permutations=perms, objective=0.0, rotations=R, heads=pr.heads_info(blocks, rot)
    )
    obj_fixed = _inner(sa, fixed_heads.apply(sb), keys)
    gain = sum(
        g["objective_rotated"] - g["objective_unrotated"] for blk in logs.values() for g in blk["groups"].values()
    )
    assert obj_fixed - p["objective_permutation"] == pytest.approx(gain, rel=1e-6)
    assert p["objective_permutation"] < obj_fixed <= aln.objective * (1 + 1e-12)


# ------------------------------------------------------------------------------------------ planted
@pytest.mark.parametrize("kind", ["vit", "gpt2"])
def test_planted_rotation_and_permutation_recovered(kind):
    a, _, x, spec = _pair(kind)
    keys = _keys(a, spec)
    blocks, _ = pr.attention_blocks(spec, keys)
    gen = torch.Generator().manual_seed(7)
    P = ws.random_permutation(spec, seed=11)
    rot = {}
    for D, info in pr.heads_info(blocks).items():
        rot[D] = _random_orthogonal(spec.groups[info["head_group"]], spec.groups[D], gen)
    planted = pr.RotatedAlignment(spec=spec, permutations=P, objective=0.0, rotations=rot, heads=pr.heads_info(blocks))
    sb = planted.apply(state_of(a))  # B = rotate(permute(A)): same function as A, far from it
    torch.testing.assert_close(_outputs(a, x, sb), _outputs(a, x), rtol=1e-4, atol=1e-5)
    sa = state_of(a)
    aln = merging.align(a, sb, method="weight_matching", spec=spec, device="cpu", attention="procrustes")
    back = aln.apply(sb)
    for k in keys:
        torch.testing.assert_close(back[k], sa[k], rtol=0, atol=2e-5)
    want = _inner(sa, sa, keys)
    assert aln.objective == pytest.approx(want, rel=1e-6)
    assert aln.log["procrustes"]["function_check"]["checked"] is False  # no module/inputs given: said so
    # negative control: permutations alone cannot undo the rotations
    perm = merging.align(a, sb, method="weight_matching", spec=spec, device="cpu")
    pb = perm.apply(sb)
    assert max(float((pb[k] - sa[k]).abs().max()) for k in keys) > 1e-2
    assert perm.objective < want * (1 - 1e-3)


def test_model_aligned_to_itself_is_not_rotated():
    a, _, x, spec = _pair("vit")
    aln = merging.align(a, a, method="weight_matching", example_inputs=x, device="cpu", attention="procrustes")
    p = aln.log["procrustes"]
    assert p["heads_rotated"] == 0 and not p["heads_rematched"]
    for R in aln.rotations.values():
        assert torch.equal(R, torch.eye(R.shape[-1], dtype=R.dtype).expand_as(R))
    assert all(torch.equal(v, torch.arange(v.numel())) for v in aln.permutations.values())
    assert aln.objective == pytest.approx(p["objective_permutation"], rel=1e-12)


# ------------------------------------------------------------------------------------------ merge
def test_merge_averages_a_with_rotated_b_and_logs_it():
    a, b, x, spec = _pair("bert")
    res = merging.merge(a, b, method="weight_matching", example_inputs=x, device="cpu", attention="procrustes")
    aln = res.alignment
    sb = aln.apply(state_of(b))
    sa = state_of(a)
    for k, v in res.state_dict.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.5 * sa[k] + 0.5 * sb[k], rtol=1e-6, atol=1e-7)
    m = res.log["method"]
    assert m["attention"] == "procrustes"
    assert m["objective_procrustes"] > m["objective_permutation"]
    assert set(m["rotated_heads"]) == {"encoder.layer.0.attention", "encoder.layer.1.attention"}
    assert sum(len(v) for v in m["rotated_heads"].values()) == aln.log["procrustes"]["heads_rotated"] > 0
    assert res.settings["options"]["attention"] == "procrustes"
    plain = merging.merge(a, b, method="weight_matching", example_inputs=x, device="cpu")
    k = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(plain.state_dict[k], res.state_dict[k])
    json.dumps(res.to_dict())
    d = aln.to_dict()
    json.dumps(d)
    assert d["rotations"] and all(len(s) == 3 for s in d["rotations"].values())
    assert merging.methods()["weight_matching"].options["attention"] == "permutation"
    assert merging.methods()["weight_matching"].align_options["attention"] == "permutation"


# ------------------------------------------------------------------------------------------ refusals
class _Attn(nn.Module):
    """One attention block: plain, with a per-head-dim query scale, a flat query scale, or RoPE."""

    def __init__(self, mode="plain", d=16, h=4):
        super().__init__()
        self.h, self.mode = h, mode
        self.inp = nn.Linear(6, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        if mode in ("dscale", "flat"):
            self.scale = nn.Parameter(torch.rand(d // h if mode == "dscale" else d) + 0.5)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        B, T, _ = x.shape
        z = self.inp(x)
        q = self.q(z)
        if self.mode == "flat":
            q = q * self.scale
        q = q.view(B, T, self.h, -1).transpose(1, 2)
        if self.mode == "dscale":
            q = q * self.scale
        k = self.k(z).view(B, T, self.h, -1).transpose(1, 2)
        v = self.v(z).view(B, T, self.h, -1).transpose(1, 2)
        if self.mode == "rope":
            dh = q.shape[-1]
            ang = torch.arange(T).float()[:, None] / (10000 ** (torch.arange(0, dh, 2).float() / dh))[None]
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

            def half(t):
                return torch.cat([-t[..., dh // 2 :], t[..., : dh // 2]], -1)

            q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        y = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(B, T, -1)
        return self.out(self.o(y) + z)


@pytest.mark.parametrize(
    "mode, match",
    [
        ("rope", r"head dim of k, q is fixed .*RoPE.*'procrustes_vo'"),
        ("dscale", r"heads of q .*cannot be rotated"),
        ("flat", r"'scale' is a vector on the head dims"),
    ],
)
def test_refused_where_rotations_break_the_function(mode, match):
    torch.manual_seed(0)
    a, b = _Attn(mode), _Attn(mode)
    x = torch.randn(2, 5, 6)
    with pytest.raises(merging.MergeError, match=match):
        merging.align(a, b, method="weight_matching", example_inputs=x, attention="procrustes")
    merging.align(a, b, method="weight_matching", example_inputs=x)  # permutations still work there


def test_plain_custom_attention_is_rotated_exactly():
    torch.manual_seed(0)
    a, b = _Attn(), _Attn()
    x = torch.randn(2, 5, 6)
    aln = merging.align(a, b, method="weight_matching", example_inputs=x, attention="procrustes")
    assert aln.log["procrustes"]["heads_rotated"] > 0
    torch.testing.assert_close(_outputs(b, x, aln.apply(state_of(b))), _outputs(b, x), rtol=1e-4, atol=1e-6)


def test_bad_options_refused():
    # a CNN's (channels x spatial) flatten is a product axis too, but not attention
    vgg_a, vgg_b = zoo.make("vgg", seed=0), zoo.make("vgg", seed=1)
    with pytest.raises(merging.MergeError, match="no head-structured axis"):
        merging.align(
            vgg_a, vgg_b, method="weight_matching", example_inputs=zoo.example_inputs(vgg_a), attention="procrustes"
        )
    mlp_a, mlp_b = zoo.make("mlp", seed=0), zoo.make("mlp", seed=1)
    x = zoo.example_inputs(mlp_a)
    with pytest.raises(merging.MergeError, match="no head-structured axis"):
        merging.align(mlp_a, mlp_b, method="weight_matching", example_inputs=x, attention="procrustes_vo")
    with pytest.raises(
        merging.MergeError, match=r"attention must be one of \['permutation', 'procrustes', 'procrustes_vo'\]"
    ):
        merging.align(mlp_a, mlp_b, method="weight_matching", example_inputs=x, attention="rotate")
    mlp_c = zoo.make("mlp", seed=2)
    with pytest.raises(merging.MergeError, match="aligns two models"):
        merging.merge(mlp_a, mlp_b, mlp_c, method="weight_matching", example_inputs=x, attention="procrustes")


@pytest.mark.gpu
def test_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, b, x, spec = _pair("gpt2")
    _, cpu = _aligned("gpt2")
    gpu = merging.align(a, b, method="weight_matching", example_inputs=x, device="cuda", seed=0, attention="procrustes")
    assert all(torch.equal(gpu.permutations[g], cpu.permutations[g]) for g in spec.groups)
    for D, R in cpu.rotations.items():
        torch.testing.assert_close(gpu.rotations[D], R, rtol=0, atol=1e-6)
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-6)


def test_bfloat16_weights_keep_their_dtype_and_function():
    torch.manual_seed(0)
    a, b = _Attn().to(torch.bfloat16), _Attn().to(torch.bfloat16)
    x = torch.randn(2, 5, 6).to(torch.bfloat16)
    aln = merging.align(a, b, method="weight_matching", example_inputs=x, attention="procrustes")
    check = aln.log["procrustes"]["function_check"]
    assert check["checked"] and check["relative_error"] <= check["tol"]
    s0 = state_of(b)
    sb = aln.apply(s0)
    assert all(v.dtype == torch.bfloat16 for v in sb.values())
    f32 = _Attn()  # evaluated in float32 with the bf16 weights
    ref = _outputs(f32, x.float(), {k: v.float() for k, v in s0.items()})
    got = _outputs(f32, x.float(), {k: v.float() for k, v in sb.items()})
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05  # bf16 rounding of the rotated weights


def test_procrustes_vo_rotates_value_output_only_and_works_with_rope():
    torch.manual_seed(0)
    a, b = _Attn("rope"), _Attn("rope")
    x = torch.randn(2, 5, 6)
    perm = merging.align(a, b, method="weight_matching", example_inputs=x)
    aln = merging.align(a, b, method="weight_matching", example_inputs=x, attention="procrustes_vo")
    assert set(aln.rotations) == {"v#1"}  # the value/output head dim; q/k (fixed by RoPE) untouched
    p = aln.log["procrustes"]
    assert p["heads_rotated"] > 0 and p["function_check"]["checked"]
    sb = aln.apply(state_of(b))
    torch.testing.assert_close(_outputs(b, x, sb), _outputs(b, x), rtol=1e-4, atol=1e-6)
    assert aln.objective > p["objective_permutation"] * (1 + 1e-3)
    assert p["objective_permutation"] == pytest.approx(perm.objective, rel=1e-5)
    # on BERT it leaves the query/key group alone, rotates value/output, and sits between the two options
    a, b, x, _ = _pair("bert")
    vo = merging.align(a, b, method="weight_matching", example_inputs=x, device="cpu", attention="procrustes_vo")
    assert all(g.endswith("value#1") for g in vo.rotations) and len(vo.rotations) == 2
    perm, full = _aligned("bert")
    assert perm.objective * (1 + 1e-6) < vo.objective < full.objective
    # without a module the layer types are unknown: refused
    with pytest.raises(merging.MergeError, match="pass model_a or model_b as an nn.Module"):
        merging.align(
            state_of(a), state_of(b), method="weight_matching", spec=_pair("bert")[3], attention="procrustes_vo"
        )
