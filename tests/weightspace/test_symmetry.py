"""Permutation-spec discovery: every construct is checked by output invariance under random
permutations, with negative controls (a wrong spec must fail)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import weightspace as ws
from weightspace import Axis, PermutationSpec


def _randomize_norms(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def _assert_symmetric(model, x, min_groups=1):
    spec = ws.permutation_spec(model, x)
    assert len(spec.groups) >= min_groups, str(spec)
    report = ws.check_spec(model, spec, x, trials=3)
    assert all(d <= 1e-5 for d in report.max_rel_diff.values()), report
    # an explicit planted permutation gives the same outputs
    perms = ws.random_permutation(spec, seed=123)
    mp = ws.permute(model, spec, perms)
    model.eval()
    mp.eval()
    with torch.no_grad():
        a = _first(model(*x) if isinstance(x, tuple) else model(x))
        b = _first(mp(*x) if isinstance(x, tuple) else mp(x))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # and at least one parameter actually moved
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v,
                                                                                                   mp.state_dict()[k])]
    assert moved, "the permutation moved nothing"
    return spec


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _wrong_spec(spec):
    """Negative control: drop the permutation of the first column axis the first group acts on."""
    g = next(iter(spec.groups))
    for key, ax, path in spec.perm_to_axes[g]:
        if ax == 1 and not path:
            lays = list(spec.axes[key])
            lays[1] = None
            return spec.with_axes({key: lays})
    raise AssertionError("no simple column axis to break")


# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, act=nn.ReLU, sizes=(5, 7, 6, 3), dropout=0.0):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [act(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(30.0 * x)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, Sine])
def test_mlp_activations(act):
    torch.manual_seed(0)
    m = MLP(act)
    spec = _assert_symmetric(m, torch.randn(8, 5), min_groups=2)
    assert dict(spec.groups) == {"net.0": 7, "net.3": 6}
    # inputs and outputs stay fixed
    assert spec.axes["net.0.weight"][1] is None and spec.axes["net.6.weight"][0] is None
    assert spec.axes["net.6.bias"] == (None,)


def test_wrong_spec_fails_and_names_keys():
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(8, 5)
    spec = ws.permutation_spec(m, x)
    with pytest.raises(ws.SpecError, match="net.0"):
        ws.check_spec(m, _wrong_spec(spec), x)


def test_dropout_model_train_mode():
    torch.manual_seed(0)
    _assert_symmetric(MLP(dropout=0.5), torch.randn(8, 5), min_groups=2)


def test_hundred_layer_mlp():
    torch.manual_seed(0)
    m = MLP(sizes=(4,) + (6,) * 100 + (3,))
    spec = _assert_symmetric(m, torch.randn(3, 4), min_groups=99)
    assert len(spec.groups) == 100


def test_permute_state_dict_matches_module_and_leaves_input_untouched():
    torch.manual_seed(0)
    m = MLP()
    before = copy.deepcopy(m.state_dict())
    spec = ws.permutation_spec(m, torch.randn(2, 5))
    perms = ws.random_permutation(spec, seed=3)
    sd = ws.permute(m.state_dict(), spec, perms)
    mp = ws.permute(m, spec, perms)
    for k, v in mp.state_dict().items():
        assert torch.equal(v, sd[k])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_inverse_and_composition_round_trip():
    torch.manual_seed(0)
    m = MLP()
    spec = ws.permutation_spec(m, torch.randn(2, 5))
    p, q = ws.random_permutation(spec, seed=1), ws.random_permutation(spec, seed=2)
    sd = m.state_dict()
    back = ws.permute(ws.permute(sd, spec, p), spec, ws.invert_permutation(p))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    two = ws.permute(ws.permute(sd, spec, p), spec, q)
    one = ws.permute(sd, spec, ws.compose_permutations(p, q))
    assert all(torch.equal(two[k], one[k]) for k in sd)
    ident = ws.permute(sd, spec, ws.identity_permutation(spec))
    assert all(torch.equal(ident[k], sd[k]) for k in sd)


def test_random_permutation_is_seeded():
    m = MLP()
    spec = ws.permutation_spec(m, torch.randn(2, 5))
    a, b, c = (ws.random_permutation(spec, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_permutations_are_rejected():
    m = MLP()
    spec = ws.permutation_spec(m, torch.randn(2, 5))
    perms = ws.random_permutation(spec)
    perms["net.0"] = torch.zeros(7, dtype=torch.long)
    with pytest.raises(ws.SpecError, match="not a permutation"):
        ws.permute(m, spec, perms)
    with pytest.raises(ws.SpecError, match="no permutation given"):
        ws.permute(m, spec, {})


# --------------------------------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self, pool="max", head="flatten"):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool, self.head = pool, head
        self.fc = nn.Linear(6 * 4 * 4 if head == "flatten" else 6, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = {"max": F.max_pool2d, "avg": F.avg_pool2d}[self.pool](x, 2)
        x = F.relu(self.bn2(self.c2(x)))
        if self.head == "flatten":
            return self.fc(torch.flatten(x, 1))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("pool,head", [("max", "flatten"), ("avg", "gap"), ("max", "gap")])
def test_cnn_batchnorm_pooling_flatten(pool, head):
    torch.manual_seed(0)
    m = _randomize_norms(CNN(pool, head))
    spec = _assert_symmetric(m, torch.randn(4, 1, 8, 8), min_groups=2)
    # BatchNorm's running statistics move with the channels
    assert spec.axes["bn1.running_mean"][0].name == spec.axes["c1.weight"][0].name
    lay = spec.axes["fc.weight"][1]
    if head == "flatten":  # the channel permutation acts on blocks of the flattened axis
        assert lay.kind == "product" and lay.parts[0].name == spec.axes["c2.weight"][0].name
        assert lay.parts[1].kind == "fixed" and lay.parts[1].size == 16
    else:
        assert lay.kind == "group"


def test_batchnorm_running_stats_are_required_in_eval_mode():
    """The bug of a published port: permuting BN weight/bias but not running stats. Train mode
    (batch statistics) cannot see it; eval mode must."""
    torch.manual_seed(0)
    m = _randomize_norms(CNN())
    x = torch.randn(4, 1, 8, 8)
    spec = ws.permutation_spec(m, x)
    bad = spec.with_axes({"bn1.running_mean": (None,), "bn1.running_var": (None,)})
    ws.check_spec(m, bad, x, modes=("train",))
    with pytest.raises(ws.SpecError, match="eval"):
        ws.check_spec(m, bad, x, modes=("eval",))


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        N = {"bn": nn.BatchNorm2d, "ln": lambda c: nn.GroupNorm(1, c)}[norm]
        self.c1, self.n1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), N(cout)
        self.c2, self.n2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), N(cout)
        self.sc = nn.Sequential()
        if cin != cout or stride != 1:
            self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), N(cout))

    def forward(self, x):
        return F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x))))) + self.sc(x))


class ResNet(nn.Module):
    def __init__(self, norm="bn"):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1, self.b2, self.b3 = Block(8, 8, 1, norm), Block(8, 8, 1, norm), Block(8, 16, 2, norm)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(F.relu(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_residual_stages_share_one_group(norm):
    torch.manual_seed(0)
    m = _randomize_norms(ResNet(norm))
    spec = _assert_symmetric(m, torch.randn(4, 1, 8, 8), min_groups=5)
    stream = spec.axes["stem.weight"][0].name
    # the residual additions join stem, block outputs and the identity shortcuts
    assert spec.axes["b1.c2.weight"][0].name == stream and spec.axes["b2.c2.weight"][0].name == stream
    assert spec.axes["b3.c1.weight"][1].name == stream and spec.axes["b3.sc.0.weight"][1].name == stream
    # a projection shortcut joins the next stage's stream
    assert spec.axes["b3.sc.0.weight"][0].name == spec.axes["b3.c2.weight"][0].name
    # inner block dims are their own groups
    assert spec.axes["b1.c1.weight"][0].name not in (stream, spec.axes["b2.c1.weight"][0].name)
    assert len(spec.groups) == 5


def test_groupnorm_and_grouped_convs():
    """GroupNorm(G, C): groups move as blocks and the channels inside a group move jointly
    (one within-group permutation for all groups); depthwise convs tie input and output channels;
    a grouped conv meets GroupNorm's structure on the common refinement."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.gn = nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.g2 = nn.Conv2d(8, 12, 1, groups=2)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            h = F.silu(self.dw(F.gelu(self.gn(self.c1(x)))))
            return self.fc(torch.sigmoid(self.g2(h)).mean((2, 3)))

    torch.manual_seed(0)
    m = _randomize_norms(Net())
    spec = _assert_symmetric(m, torch.randn(3, 2, 6, 6), min_groups=3)
    lay = spec.axes["gn.weight"][0]
    assert lay.kind == "product" and [p.size for p in lay.parts] == [2, 2, 2]
    assert spec.axes["dw.weight"][0] == lay  # depthwise: output channels = input channels
    g2out = spec.axes["g2.weight"][0]
    assert g2out.parts[0] == lay.parts[0]  # conv groups tie input and output blocks


def test_groupnorm_single_channel_cannot_move_alone():
    """Negative control: a plain channel permutation is NOT a symmetry of GroupNorm(G>1)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    _randomize_norms(m)
    x = torch.randn(2, 1, 4, 4)
    shapes = m.state_dict()
    naive = PermutationSpec.from_axes_to_perm(
        {"0.weight": ("P", None, None, None), "0.bias": ("P",), "1.weight": ("P",), "1.bias": ("P",),
         "3.weight": (None, "P", None, None)},
        shapes,
    )
    with pytest.raises(ws.SpecError):
        ws.check_spec(m, naive, x, trials=5)
    _assert_symmetric(m, x)


def test_concatenation_embeddings_positional_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(11, 6), nn.Parameter(torch.randn(5, 6))
            self.fa, self.fb = nn.Linear(6, 4), nn.Linear(6, 3)
            self.out = nn.Linear(7, 2)

        def forward(self, ids):
            e = self.emb(ids) + self.pos
            h = torch.cat([torch.tanh(self.fa(e)), F.relu(self.fb(e))], dim=-1)
            return self.out(h.mean(1))

    torch.manual_seed(0)
    m = Net()
    spec = _assert_symmetric(m, torch.randint(0, 11, (3, 5)), min_groups=3)
    assert spec.axes["emb.weight"][0] is None  # vocabulary rows are addressed by token ids
    assert spec.axes["emb.weight"][1].name == spec.axes["pos"][1].name
    assert spec.axes["pos"][0] is None  # positions are fixed
    cat = spec.axes["out.weight"][1]
    assert cat.kind == "concat" and [p.name for p in cat.parts] == [spec.axes["fa.weight"][0].name,
                                                                    spec.axes["fb.weight"][0].name]


class MHANet(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, bias=bias)
        self.ln = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(self.ln(h + a).mean(1))


def test_multihead_attention_heads_and_head_dims():
    torch.manual_seed(0)
    m = _randomize_norms(MHANet())
    spec = _assert_symmetric(m, torch.randn(2, 7, 5), min_groups=4)
    packed = spec.axes["attn.in_proj_weight"][0]
    assert packed.kind == "concat"
    q, k, v = packed.parts
    assert q == k  # query and key share heads and the within-head permutation
    assert q.parts[0] == v.parts[0] and q.parts[1] != v.parts[1]  # heads shared; v/o has its own
    assert [p.size for p in q.parts] == [4, 4]
    assert spec.axes["attn.out_proj.weight"][1] == v


class SeparateQKV(nn.Module):
    """Attention written with separate q/k/v Linear layers and reshapes (BERT style)."""

    def __init__(self, d=12, h=3):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.emb = nn.Linear(4, d)
        self.ff1, self.ff2 = nn.Linear(d, 20), nn.Linear(20, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def split(self, x):
        b, s, d = x.shape
        return x.view(b, s, self.h, d // self.h).transpose(1, 2)

    def forward(self, x):
        x = self.emb(x)
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(x.shape)
        x = self.ln1(x + self.o(y))
        x = self.ln2(x + self.ff2(F.gelu(self.ff1(x))))
        return self.head(x[:, 0])


def test_separate_qkv_attention_with_reshapes():
    torch.manual_seed(0)
    m = _randomize_norms(SeparateQKV())
    spec = _assert_symmetric(m, torch.randn(2, 5, 4), min_groups=5)
    q, k, v = (spec.axes[f"{n}.weight"][0] for n in "qkv")
    assert q.kind == "product" and q == k and q.parts[0] == v.parts[0] and q.parts[1] != v.parts[1]
    assert spec.axes["o.weight"][1] == v
    with pytest.raises(ws.SpecError):
        # negative control: heads of v moved but not those of the output projection
        ws.check_spec(m, spec.with_axes({"o.weight": (spec.axes["o.weight"][0], None)}), torch.randn(2, 5, 4))


def test_sdpa_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o, self.inp, self.out = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            x = self.inp(x)
            b, s, _ = x.shape
            q, k, v = self.qkv(x).split(8, dim=-1)
            q, k, v = (t.view(b, s, 2, 4).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 8)
            return self.out(x + self.o(y)).sum(1)

    torch.manual_seed(0)
    m = Net()
    spec = _assert_symmetric(m, torch.randn(2, 5, 3), min_groups=3)
    assert spec.axes["qkv.weight"][0].kind == "concat"


def test_bert_encoder_from_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=32,
        max_position_embeddings=12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    spec = ws.permutation_spec(m, inputs)
    assert len(spec.groups) == 1 + 2 * 4 + 1  # stream, per layer (heads, qk, vo, ffn), pooler
    report = ws.check_spec(m, spec, inputs, trials=2)
    assert max(report.max_rel_diff.values()) <= 1e-5
    q = spec.axes["bert.encoder.layer.0.attention.self.query.weight"][0]
    assert [p.size for p in q.parts] == [3, 8]
    assert spec.axes["classifier.weight"][0] is None  # classes stay fixed
    assert spec.axes["bert.embeddings.word_embeddings.weight"][0] is None


# --------------------------------------------------------------------------------------------
def test_unknown_operation_fixes_what_it_touches_and_is_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.cumsum(F.relu(self.a(x)), dim=-1)  # not equivariant along the hidden dim
            return self.c(F.relu(self.b(h)))

    m = Net()
    x = torch.randn(4, 3)
    spec = ws.permutation_spec(m, x)
    assert dict(spec.groups) == {"b": 4}
    assert dict(spec.info["blocked_ops"]) == {"cumsum": 1}
    ws.check_spec(m, spec, x)
    with pytest.raises(ws.TraceError, match="cumsum"):
        ws.permutation_spec(m, x, strict=True)


def test_positional_indexing_fixes_the_dim():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + h[:, :1]  # unit 0 is singled out

    m = Net()
    spec = ws.permutation_spec(m, torch.randn(2, 3))
    assert len(spec.groups) == 0


def test_untraceable_and_bad_inputs_raise_with_context():
    m = MLP()
    with pytest.raises(ws.TraceError, match="example inputs"):
        ws.permutation_spec(m, torch.randn(2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ws.TraceError, match="by hand"):
        ws.permutation_spec(scripted, torch.randn(2, 3))


def test_tracing_does_not_change_the_model():
    m = _randomize_norms(CNN())
    m.train()
    before = copy.deepcopy(m.state_dict())
    ws.permutation_spec(m, torch.randn(4, 1, 8, 8))
    ws.check_spec(m, ws.permutation_spec(m, torch.randn(4, 1, 8, 8)), torch.randn(4, 1, 8, 8))
    assert m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------------------------
def test_hand_written_spec_validation_and_rebasin_export():
    sd = MLP().state_dict()
    spec = PermutationSpec.from_axes_to_perm(
        {"net.0.weight": ("P0", None), "net.0.bias": ("P0",), "net.3.weight": ("P1", "P0"), "net.3.bias": ("P1",),
         "net.6.weight": (None, "P1")},
        sd,
    )
    assert dict(spec.groups) == {"P0": 7, "P1": 6}
    p2a, a2p = spec.to_rebasin()
    assert p2a["P0"] == [("net.0.weight", 0), ("net.0.bias", 0), ("net.3.weight", 1)]
    assert a2p["net.6.bias"] == (None,)
    ws.check_spec(MLP(), spec, torch.randn(4, 5))
    with pytest.raises(ws.SpecError, match=r"'net.3.weight' axis 1 of size 7|net.3.weight"):
        PermutationSpec.from_axes_to_perm({"net.0.weight": ("P0", None), "net.3.weight": ("P0", None)}, sd)
    with pytest.raises(ws.SpecError, match="no shape"):
        PermutationSpec.from_axes_to_perm({"nope": ("P0",)}, sd)
    text = str(spec)
    assert "P0" in text and "size     7" in text and "net.3.weight[1]" in text


def test_structured_axes_export_refused_and_index_math():
    torch.manual_seed(0)
    spec = ws.permutation_spec(CNN(), torch.randn(2, 1, 8, 8))
    with pytest.raises(ws.SpecError, match="fc.weight"):
        spec.to_rebasin()
    lay = Axis.product(Axis.group("a", 2), Axis.fixed(3))
    idx = lay.index({"a": torch.tensor([1, 0])})
    assert idx.tolist() == [3, 4, 5, 0, 1, 2]
    cat = Axis.concat(Axis.group("a", 2), Axis.group("b", 3))
    assert cat.index({"a": torch.tensor([1, 0]), "b": torch.tensor([2, 0, 1])}).tolist() == [1, 0, 4, 2, 3]
    kron = Axis.product(Axis.group("a", 2),
                        Axis.group("b", 3)).index({"a": torch.tensor([1, 0]), "b": torch.tensor([2, 0, 1])})
    assert kron.tolist() == [5, 3, 4, 2, 0, 1]


def test_spec_patching():
    m = MLP()
    spec = ws.permutation_spec(m, torch.randn(2, 5))
    fewer = spec.without("net.3")
    assert list(fewer.groups) == ["net.0"] and fewer.axes["net.3.weight"] == (None, spec.axes["net.3.weight"][1])
    ws.check_spec(m, fewer, torch.randn(3, 5))
    renamed = spec.rename({"net.0": "hidden1"})
    assert "hidden1" in renamed.groups and renamed.axes["net.0.weight"][0].name == "hidden1"


def test_activation_points_carry_the_group_permutation():
    """At every recorded point, the permuted model's activation is the original one permuted by the
    group along the recorded axis."""
    torch.manual_seed(0)
    for model, x in ((MLP(), torch.randn(6, 5)), (_randomize_norms(ResNet()), torch.randn(3, 1, 8, 8))):
        spec = ws.permutation_spec(model, x)
        perms = ws.random_permutation(spec, seed=4)
        mp = ws.permute(model, spec, perms)
        pts = spec.activation_points()
        assert set(pts) == set(spec.groups)
        for g, where in pts.items():
            for module, dim in where:
                acts = []
                for m in (model, mp):
                    store = {}
                    h = dict(m.named_modules())[module].register_forward_hook(
                        lambda mod, i, o, store=store: store.setdefault("o", o))
                    m.eval()
                    with torch.no_grad():
                        m(x)
                    h.remove()
                    acts.append(store["o"])
                expected = acts[0].index_select(dim, perms[g])
                assert torch.allclose(acts[1], expected, atol=1e-5), (g, module)
                assert not torch.allclose(acts[1], acts[0], atol=1e-5)  # negative control: it did move
    hand = PermutationSpec.from_axes_to_perm({"net.0.weight": ("P", None)}, MLP().state_dict())
    with pytest.raises(ws.SpecError, match="not traced"):
        hand.activation_points()


ZOO_CASES = [
    ("mlp", {"activation": a}) for a in ("relu", "gelu", "tanh", "sigmoid", "silu", "sine")
] + [
    ("mlp", {"norm": "batch", "dropout": 0.2}),
    ("mlp", {"norm": "layer"}),
    ("vgg", {"batch_norm": True, "head": "flatten"}),
    ("vgg", {"batch_norm": False, "head": "gap"}),
    ("resnet20", {"norm": "batch"}),
    ("resnet20", {"norm": "layer", "width": 2}),
    ("resnet20", {"norm": "none"}),
    ("vit", {}),
]


@pytest.mark.parametrize("name,kw", ZOO_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in ZOO_CASES])
def test_every_reference_model(name, kw):
    from weightspace import zoo

    model = _randomize_norms(zoo.make(name, seed=0, **kw))
    x = zoo.example_inputs(model, batch=4)
    spec = _assert_symmetric(model, x, min_groups=2)
    assert not spec.info["blocked_ops"], spec.info["blocked_ops"]
    with pytest.raises(ws.SpecError):  # negative control: one broken axis must be caught
        ws.check_spec(model, _wrong_spec(spec), x, trials=2)


def test_grouped_query_attention_sdpa():
    """enable_gqa: query heads are (kv heads x group); moving a whole kv group, or query heads within
    their group, is a symmetry."""

    class GQA(nn.Module):
        def __init__(self, d=16, hq=4, hkv=2):
            super().__init__()
            self.hq, self.hkv, self.dh = hq, hkv, d // hq
            self.inp, self.out = nn.Linear(3, d), nn.Linear(d, 2)
            self.q = nn.Linear(d, hq * self.dh)
            self.k, self.v = nn.Linear(d, hkv * self.dh), nn.Linear(d, hkv * self.dh)
            self.o = nn.Linear(hq * self.dh, d)

        def forward(self, x):
            x = self.inp(x)
            b, s, _ = x.shape
            q = self.q(x).view(b, s, self.hq, self.dh).transpose(1, 2)
            k = self.k(x).view(b, s, self.hkv, self.dh).transpose(1, 2)
            v = self.v(x).view(b, s, self.hkv, self.dh).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.out(x + self.o(y.transpose(1, 2).reshape(b, s, -1))).sum(1)

    torch.manual_seed(0)
    m = GQA()
    spec = _assert_symmetric(m, torch.randn(2, 5, 3), min_groups=4)
    assert not spec.info["blocked_ops"]
    q, k = spec.axes["q.weight"][0], spec.axes["k.weight"][0]
    heads = q.parts[0]  # ((kv heads x group) x head_dim)
    assert heads.kind == "product" and [p.size for p in heads.parts] == [2, 2] and heads.parts[0] == k.parts[0]


class Recurrent(nn.Module):
    def __init__(self, kind, layers, bidirectional):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.rnn = getattr(nn, kind)(5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.out = nn.Linear(6 * (2 if bidirectional else 1), 2)

    def forward(self, x):
        h, _ = self.rnn(F.relu(self.inp(x)))
        return self.out(h[:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_recurrent_layers(kind, layers, bidirectional):
    """Hidden units permute the gate blocks of W_ih/W_hh rows, W_hh's columns and the biases."""
    torch.manual_seed(0)
    m = Recurrent(kind, layers, bidirectional)
    x = torch.randn(2, 4, 3)
    spec = _assert_symmetric(m, x, min_groups=2)
    assert not spec.info["blocked_ops"]
    rows = spec.axes["rnn.weight_ih_l0"][0]
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    hidden = spec.axes["rnn.weight_hh_l0"][1]
    assert (rows == hidden) if gates == 1 else (rows.kind == "concat" and list(rows.parts) == [hidden] * gates)
    with pytest.raises(ws.SpecError):  # negative control: recurrent columns left in place
        ws.check_spec(m, spec.with_axes({"rnn.weight_hh_l0": (spec.axes["rnn.weight_hh_l0"][0], None)}), x)


def test_tied_aliases_are_optional_and_permuted_like_their_tensor():
    """GPT-2's LM head is tied to the token embedding: the spec records the alias, a state dict may
    hold it or not, and where it does the alias is permuted exactly like the tensor it names."""
    transformers = pytest.importorskip("transformers")
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=8, bos_token_id=0, eos_token_id=0)).eval()
    x = {"input_ids": torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))}
    spec = ws.permutation_spec(m, x)
    assert spec.info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" in spec.optional_keys()
    perms = ws.random_permutation(spec, seed=3)
    full = ws.permute(m.state_dict(), spec, perms)  # state_dict() holds both names
    assert torch.equal(full["lm_head.weight"], full["transformer.wte.weight"])
    assert not torch.equal(full["transformer.wte.weight"], m.state_dict()["transformer.wte.weight"])  # control
    deduped = ws.permute(dict(m.named_parameters()), spec, perms)  # parameters once, as state_of
    assert "lm_head.weight" not in deduped
    torch.testing.assert_close(deduped["transformer.wte.weight"], full["transformer.wte.weight"])
    # a permuted copy computes the same logits (the alias followed its tensor)
    mp = ws.permute(m, spec, perms)
    with torch.no_grad():
        torch.testing.assert_close(mp(**x).logits, m(**x).logits, rtol=1e-4, atol=1e-5)
