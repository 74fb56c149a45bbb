"""Every merging method on every zoo architecture and on Hugging Face BERT and GPT-2 (issue 9, "done when").

The method list comes from ``merging.methods()`` and the architectures from ``weightspace.zoo.MODELS``
plus ``transformers.BertModel`` / ``GPT2Model`` with tiny random configs, so a new method or model is
covered (or fails here) without editing this file. Oracles:

* merging a model with a randomly permuted copy of itself through ``merging.merge`` gives back the
  model's function (outputs equal on a batch) for every method that aligns or transports units
  (weight/activation matching, STE, MergeMany, ZipIt!, OT fusion); plain ``average`` does not
  (negative control: the permuted copy is a different point of weight space);
* ``merging.align`` of an aligning method recovers the planted permutation exactly (B permuted by it
  is A, bit for bit);
* task-vector methods with fine-tunes ``base + delta`` give the closed form ``base + scaling * delta``
  at density 1, and at density 1/2 every entry of the merged task vector is 0 or the closed form's
  (times ``1/density`` for DARE's rescale), with the kept entries the largest ones for TIES's trim;
* every merged model computes finite outputs of the original's shape, and no input is modified.

Where a method cannot handle an architecture, the test asserts its error message: OT fusion cannot
transport attention heads x head dim (no module output exposes them unit by unit); STE needs a model
whose outputs a loss can read (BertModel/GPT2Model return hidden states, no logits); ZipIt! leaves
those head groups unaligned (averaged as they are) and says so in the log.

Three costly ResNet-20 cells (``SLOW``) are marked ``slow`` (run with ``--runslow``); what they check is
covered more cheaply by other cells. Known bugs on Hugging Face task heads are strict xfails.

Two command-line tests add what ``tests/weightspace/test_cli_merge.py`` does not cover: the
data-driven methods through ``--data digits`` and a Hugging Face GPT-2 through ``--model
module:callable --input-dtype long``.
"""
import copy
import functools
import json
import logging

import pytest
import torch

import merging
import weightspace as ws
from weightspace import features, zoo
from weightspace.state import state_of

transformers = pytest.importorskip("transformers")

VOCAB = 30
HF = ("bert", "gpt2")
ARCHS = tuple(zoo.MODELS) + HF
METHODS = tuple(merging.methods())
# tiny configurations: every (method, architecture) pair runs in well under a second
ZOO_KW = {"mlp": dict(hidden=(16, 16)), "vgg": dict(cfg=(8, "M", 8, "M")), "resnet20": dict(width=1),
          "vit": dict(dim=16, depth=1, heads=2)}


# the costliest (method, architecture) cells, each covered more cheaply elsewhere in this file: STE's
# training epoch on ResNet-20 (STE trains on every other architecture; align() runs on ResNet-20), three
# ResNet-20s through MergeMany (two run in the merge test), align() by activation matching on ResNet-20
# (the merge test checks the same alignment)
SLOW = {("merge", "ste", "resnet20"), ("three", "weight_matching", "resnet20"),
        ("align", "activation_matching", "resnet20")}


def _cells(test, methods, archs=ARCHS):
    return [pytest.param(m, a, marks=pytest.mark.slow) if (test, m, a) in SLOW else pytest.param(m, a)
            for m in methods for a in archs]


def _hf(arch, seed=0):
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=12)
        return transformers.BertModel(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=12, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2Model(cfg).eval()


@functools.lru_cache(maxsize=None)
def _setup(arch):
    """(model, inputs, data, spec, planted permutation, permuted copy); callers never modify them."""
    g = torch.Generator().manual_seed(0)
    if arch in HF:
        m = _hf(arch)
        x = {"input_ids": torch.randint(0, VOCAB, (32, 6), generator=g)}
        data = [(x, x["input_ids"])]
    else:
        m = zoo.make(arch, seed=0, **ZOO_KW.get(arch, {})).eval()
        shape = zoo.example_inputs(m).shape[1:]
        n = 128 if arch == "mlp" else 32  # enough rows (pixels/tokens count too) for ZipIt!'s correlations
        x = torch.randn(n, *shape, generator=g)
        data = (x, torch.randint(0, 10, (n,), generator=g))
    spec = ws.permutation_spec(m, x[:2] if torch.is_tensor(x) else {"input_ids": x["input_ids"][:2]})
    perms = ws.random_permutation(spec, seed=1)
    return m, x, data, spec, perms, ws.permute(m, spec, perms)


def _out(model, x):
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def _snapshot(*models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def _untouched(models, snaps):
    for m, snap in zip(models, snaps):
        sd = m.state_dict()
        assert list(sd) == list(snap)
        assert all(torch.equal(sd[k], v) for k, v in snap.items()), "an input model was modified"


def _attention_groups(spec):
    """Groups no module output exposes unit by unit (attention heads x head dim)."""
    pts = features.group_points(spec)
    return [g for g in spec.groups if g not in pts]


def _finite_and_shaped(merged, ref, x):
    got, want = _out(merged, x), _out(ref, x)
    assert got.shape == want.shape and torch.isfinite(got).all()
    return got, want


# ------------------------------------------------------------------ permuted copies: function preserved
@pytest.mark.parametrize(("method", "arch"),
                         _cells("merge", [n for n, i in merging.methods().items() if "base" not in i.needs]))
def test_merging_a_permuted_copy_gives_back_the_function(method, arch, caplog):
    m, x, data, spec, perms, mp = _setup(arch)
    info = merging.methods()[method]
    attn = _attention_groups(spec)
    kw = dict(spec=spec, seed=0, device="cpu")
    if "data" in info.needs:
        kw["data"] = data
    if "reset_bn_stats" in info.options:  # the oracle is the model itself, with its own BN statistics
        kw["reset_bn_stats"] = False
    if method == "ste":
        kw.update(epochs=1, batch_size=64)
    snaps = _snapshot(m, mp)
    b = mp
    if method == "ot_fusion" and attn:
        with pytest.raises(merging.MergeError, match="cannot transport this group.*weight_matching"):
            merging.merge(m, mp, method=method, **kw)
        _untouched((m, mp), snaps)
        return
    if method == "ste" and arch in HF:
        with pytest.raises(merging.MergeError, match="without logits"):
            merging.merge(m, mp, method=method, **kw)
        _untouched((m, mp), snaps)
        return
    if method == "zipit" and attn:
        # head groups stay unaligned (logged); plant the permutation on the other groups only
        b = ws.permute(m, spec, {g: (torch.arange(p.numel()) if g in attn else p) for g, p in perms.items()})
        caplog.set_level(logging.WARNING, logger="merging")
    res = merging.merge(m, b, method=method, **kw)
    _untouched((m, mp), snaps)
    got, want = _finite_and_shaped(res.model, m, x)
    if method == "average":  # negative control: without alignment the permuted copy is another function
        assert not torch.allclose(got, want, atol=1e-3)
        return
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if info.aligns:  # the alignment the merge used is the planted permutation's inverse
        inv = ws.invert_permutation(perms)
        assert all(torch.equal(res.alignment.permutations[g], inv[g]) for g in spec.groups)
    if method == "zipit" and attn:
        assert all(g in caplog.text for g in attn) and "unaligned" in caplog.text


@pytest.mark.parametrize(("method", "arch"), _cells("align", [n for n, i in merging.methods().items() if i.aligns]))
def test_align_recovers_the_planted_permutation(method, arch):
    m, x, data, spec, perms, mp = _setup(arch)
    kw = dict(data=data) if "data" in merging.methods()[method].needs else {}
    if method == "ste":
        if arch in HF:
            pytest.skip("STE on BertModel/GPT2Model: no logits (asserted in the merge test); see the head test below")
        kw.update(epochs=0)  # the API path only: the merge test above runs an STE epoch on every architecture
    aln = merging.align(m, mp, method=method, spec=spec, seed=0, device="cpu", **kw)
    inv = ws.invert_permutation(perms)
    wrong = [g for g in spec.groups if not torch.equal(aln.permutations[g], inv[g])]
    assert not wrong, f"{method} on {arch}: groups not recovered {wrong}"
    back = ws.permute(state_of(mp), aln.spec, aln.permutations)
    assert all(torch.equal(back[k], v) for k, v in state_of(m).items())


@pytest.mark.parametrize(("method", "arch"), _cells("three", ["weight_matching"]))
def test_three_permuted_copies_merge_many_back_to_the_model(method, arch):
    m, x, data, spec, perms, mp = _setup(arch)
    mq = ws.permute(m, spec, ws.random_permutation(spec, seed=2))
    res = merging.merge(m, mp, mq, method=method, spec=spec, device="cpu")
    assert res.settings["runner"] == "merge_many"
    got, want = _finite_and_shaped(res.model, m, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    naive = merging.merge(m, mp, mq, method="average", device="cpu").model  # negative control
    assert not torch.allclose(_out(naive, x), want, atol=1e-3)


def test_ste_on_a_hugging_face_head_recovers_the_permutation():
    """STE reads ``.logits`` of a Hugging Face head and takes keyword inputs (fixed in merging.ste)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=12, num_labels=3)
    m = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, VOCAB, (16, 6), generator=g)}
    y = torch.randint(0, 3, (16,), generator=g)
    spec = ws.permutation_spec(m, x)
    perms = ws.random_permutation(spec, seed=1)
    mp = ws.permute(m, spec, perms)
    res = merging.merge(m, mp, method="ste", spec=spec, data=[(x, y)], epochs=1, device="cpu")
    inv = ws.invert_permutation(perms)
    assert all(torch.equal(res.alignment.permutations[k], inv[k]) for k in spec.groups)
    with torch.no_grad():
        want = m(**x).logits
        torch.testing.assert_close(res.model(**x).logits, want, rtol=1e-4, atol=1e-5)
        # the recorded loss is the merged model's cross-entropy on the data
        assert res.log["method"]["best_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(want, y)),
                                                               rel=1e-5)


def test_ste_on_a_base_model_with_a_loss_fn_reading_its_outputs():
    """Without logits STE refuses (asserted above) unless loss_fn reads the model's outputs itself."""
    m, x, _, spec, perms, mp = _setup("gpt2")
    y = torch.zeros(x["input_ids"].shape[0])

    def loss_fn(out, target):  # a stand-in objective on the hidden states (targets unused)
        return out.last_hidden_state.pow(2).mean() + 0 * target.sum()

    res = merging.merge(m, mp, method="ste", spec=spec, data=[(x, y)], epochs=1, loss_fn=loss_fn, device="cpu")
    inv = ws.invert_permutation(perms)
    assert all(torch.equal(res.alignment.permutations[g], inv[g]) for g in spec.groups)
    with torch.no_grad():
        want = float(loss_fn(m(**x), y))
    assert res.log["method"]["best_loss"] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------ known gaps on Hugging Face task heads
def _hf_head(kind):
    torch.manual_seed(0)
    bert = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=12)
    if kind == "gpt2_lm":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=12, bos_token_id=0, eos_token_id=0)).eval()
    if kind == "bert_mlm":
        return transformers.BertForMaskedLM(transformers.BertConfig(**bert)).eval()
    return transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **bert)).eval()


@pytest.mark.parametrize("kind", ["gpt2_lm", "bert_mlm"])
def test_tied_embedding_heads_merge_back(kind):
    m = _hf_head(kind)
    x = {"input_ids": torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))}
    spec = ws.permutation_spec(m, x)
    mp = ws.permute(m, spec, ws.random_permutation(spec, seed=1))
    # coordinate descent finds a local optimum; restarts (best objective kept) make the planted one certain here
    res = merging.merge(m, mp, method="weight_matching", example_inputs=x, device="cpu", restarts=3)
    with torch.no_grad():
        torch.testing.assert_close(res.model(**x).logits, m(**x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["activation_matching", "zipit"])
def test_activation_methods_on_a_sequence_classification_head(method):
    m = _hf_head("bert_cls")
    x = {"input_ids": torch.randint(0, VOCAB, (32, 6), generator=torch.Generator().manual_seed(0))}
    spec = ws.permutation_spec(m, x)
    attn = _attention_groups(spec) if method == "zipit" else []  # ZipIt! leaves head groups unaligned
    perms = {g: (torch.arange(p.numel()) if g in attn else p) for g, p in ws.random_permutation(spec, seed=1).items()}
    mp = ws.permute(m, spec, perms)
    res = merging.merge(m, mp, method=method, spec=spec, data=[(x, None)], device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(res.model(**x).logits, m(**x).logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ task vectors: closed forms
def _fine_tune(m, delta):
    ft = copy.deepcopy(m)
    with torch.no_grad():
        for k, p in ft.named_parameters():
            p.add_(delta[k])
    return ft


def _delta(m, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(p.shape, generator=g) for k, p in m.named_parameters()}


SUMMED = {"task_arithmetic": True, "dare_linear": True, "ties": False, "dare_ties": False}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", [n for n, i in merging.methods().items() if "base" in i.needs])
def test_task_vectors_of_equal_fine_tunes_give_the_closed_form(method, arch):
    m, x, *_ = _setup(arch)
    info = merging.methods()[method]
    delta = _delta(m, 7)
    ft1, ft2 = _fine_tune(m, delta), _fine_tune(m, delta)
    snaps = _snapshot(m, ft1, ft2)
    s = 0.7
    # task vectors add up (c_k = N w_k = 1 each: Ilharco et al. 2023, DARE + task arithmetic); TIES's disjoint
    # mean (and DARE-TIES's) averages the agreeing entries, so two equal task vectors count once
    if method not in SUMMED:
        pytest.fail(f"no closed form for {method!r}: add it to SUMMED")
    n_eff = 2 if SUMMED[method] else 1
    opts = dict(scaling=s, **({"density": 1.0} if "density" in info.options else {}))
    res = merging.merge(ft1, ft2, base=m, method=method, seed=0, device="cpu", **opts)
    _untouched((m, ft1, ft2), snaps)
    base = state_of(m)
    for k, v in base.items():
        want = v + n_eff * s * delta[k] if k in delta else v
        torch.testing.assert_close(res.state_dict[k], want, rtol=1e-5, atol=1e-6, msg=f"{method} {arch} {k}")
    # negative control: the scaling is applied (the plain fine-tune is not the answer)
    assert any(not torch.allclose(res.state_dict[k], base[k] + d, atol=1e-4) for k, d in delta.items())
    _finite_and_shaped(res.model, m, x)
    if "density" not in info.options or arch not in ("mlp", "vgg", "gpt2"):  # elementwise: a few archs suffice
        return
    # density 1/2, one fine-tune: every merged entry is 0 or the closed form (DARE: rescaled by 1/density)
    half = merging.merge(ft1, base=m, method=method, seed=0, device="cpu", scaling=s, density=0.5).state_dict
    r = 2.0 if method.startswith("dare") else 1.0
    kept_total = dropped_total = 0
    for k, d in delta.items():
        tau = half[k] - base[k]
        kept = tau != 0
        torch.testing.assert_close(tau[kept], (s * r * d)[kept], rtol=1e-4, atol=1e-6)
        kept_total += int(kept.sum())
        dropped_total += int((~kept).sum())
        if method == "ties" and kept.any() and (~kept).any():  # TIES trims the smallest magnitudes
            assert d.abs()[kept].min() >= d.abs()[~kept].max()
    assert kept_total > 0 and dropped_total > 0


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("method", ["activation_matching", "zipit", "ot_fusion", "ste"])
def test_cli_data_driven_methods_undo_a_planted_permutation(method, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from weightspace import io
    from weightspace.cli import main

    hidden = [16, 16]
    # tanh: no unit is dead on the digits, so every unit has a twin of correlation 1 (ZipIt! gives a dead
    # unit correlation 0 with everything and may then zip two live features instead of the dead twins)
    kwargs = {"hidden": hidden, "activation": "tanh"}
    a = zoo.MLP(64, seed=3, **kwargs).eval()
    spec = ws.permutation_spec(a, zoo.example_inputs(a))
    b = ws.permute(a, spec, ws.random_permutation(spec, seed=4))
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # a real permutation
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    io.save_state_dict(a, pa)
    io.save_state_dict(b, pb)
    argv = ["-q", "merge", str(pa), str(pb), "--method", method, "--model", "weightspace.zoo:MLP",
            "--model-kwargs", json.dumps(kwargs), "--input-shape", "2,64", "--data", "digits",
            "--out", str(out)]
    if method == "ste":
        argv += ["--option", "epochs=1"]
    assert main(argv) == 0, capsys.readouterr().err
    merged = zoo.MLP(64, **kwargs).eval()
    merged.load_state_dict(io.load_state_dict(out))
    X, _ = zoo.load_digits("test")
    with torch.no_grad():
        torch.testing.assert_close(merged(X), a(X), rtol=1e-4, atol=1e-4)
    assert json.loads(io.read_metadata(out)["weightspace.merge"])["method"] == method


_FACTORY = f'''
import torch, transformers

def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size={VOCAB}, n_embd=16, n_layer=1, n_head=2,
                                  n_positions=12, bos_token_id=0, eos_token_id=0))
'''


def test_cli_weight_matching_on_gpt2_from_a_factory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    from weightspace import io
    from weightspace.cli import main

    (tmp_path / "tiny_hf_factory.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    a = _hf("gpt2", seed=5)
    x = {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))}
    spec = ws.permutation_spec(a, x)
    b = ws.permute(a, spec, ws.random_permutation(spec, seed=6))
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    io.save_state_dict(a, pa)
    io.save_state_dict(b, pb)
    common = ["--model", "tiny_hf_factory:gpt2", "--input-shape", "2,6", "--input-dtype", "long",
              "--input-high", str(VOCAB)]
    out, naive = tmp_path / "m.safetensors", tmp_path / "n.safetensors"
    assert main(["-q", "merge", str(pa), str(pb), "--method", "weight_matching", *common, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    got = io.load_state_dict(out)
    for k, v in state_of(a).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)  # midpoint of A and un-permuted B is A
    assert main(["-q", "merge", str(pa), str(pb), "--method", "average", "--out", str(naive)]) == 0
    avg = io.load_state_dict(naive)  # negative control: plain averaging is not A
    assert any(not torch.allclose(avg[k], v, atol=1e-3) for k, v in state_of(a).items())
