"""Reference models, embedded digits data and training loops (weightspace.zoo)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import weightspace as ws

zoo = ws.zoo


def _sd_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20", "vit"])
def test_models_shapes_and_seed_determinism(name):
    state = torch.random.get_rng_state()
    m1, m2, m3 = zoo.make(name, seed=0), zoo.make(name, seed=0), zoo.make(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "seeded construction must not touch the global RNG"
    assert _sd_equal(m1, m2) and not _sd_equal(m1, m3)
    m1.eval()
    for batch in (1, 5):
        x = zoo.example_inputs(m1, batch=batch)
        assert torch.equal(x, m1.example_input(batch=batch))
        assert m1(x).shape == (batch, 10)


@pytest.mark.parametrize("act, fn", [("relu", F.relu), ("gelu", F.gelu), ("tanh", torch.tanh),
                                     ("sigmoid", torch.sigmoid), ("silu", F.silu),
                                     ("sine", lambda z: torch.sin(3.0 * z))])
def test_mlp_matches_manual_forward(act, fn):
    m = zoo.MLP(in_features=6, hidden=(5, 4), out_features=3, activation=act, w0=3.0, seed=0)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    h = fn(x @ m.fc[0].weight.T + m.fc[0].bias)
    h = fn(h @ m.fc[1].weight.T + m.fc[1].bias)
    torch.testing.assert_close(m(x), h @ m.head.weight.T + m.head.bias)
    # image-shaped inputs are flattened row-major
    torch.testing.assert_close(m(x.reshape(7, 1, 2, 3)), m(x))


def test_mlp_norm_dropout_and_errors():
    m = zoo.MLP(hidden=(8,), norm="batch", dropout=0.5, bias=False, seed=0)
    assert isinstance(m.norms[0], torch.nn.BatchNorm1d) and isinstance(m.drops[0], torch.nn.Dropout)
    assert m.fc[0].bias is None and m.head.bias is None
    assert isinstance(zoo.MLP(hidden=(8,), norm="layer").norms[0], torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="activation"):
        zoo.MLP(activation="swish")
    with pytest.raises(ValueError, match="norm"):
        zoo.MLP(norm="group")
    with pytest.raises(ValueError, match="dropout"):
        zoo.MLP(dropout=1.0)


def test_vgg_flatten_is_channel_major():
    """Permuting the last conv's channels and the head's input in blocks of H*W keeps the function."""
    m = zoo.VGG(cfg=(4, "M", 6, "M"), batch_norm=False, head="flatten", seed=0).eval()
    x = m.example_input(batch=3)
    conv, lin = m.features[3], m.classifier[0]
    assert lin.in_features == 6 * 2 * 2 and m.feature_shape == (6, 2, 2)
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    mp = copy.deepcopy(m)
    with torch.no_grad():
        mp.features[3].weight.copy_(conv.weight[perm])
        mp.features[3].bias.copy_(conv.bias[perm])
        mp.classifier[0].weight.copy_(lin.weight.reshape(10, 6, 4)[:, perm].reshape(10, 24))
    torch.testing.assert_close(mp(x), m(x))
    # negative control: permuting the flat axis without the block structure changes the output
    bad = copy.deepcopy(mp)
    with torch.no_grad():
        bad.classifier[0].weight.copy_(lin.weight[:, torch.cat([perm, torch.arange(6, 24)])])
    assert not torch.allclose(bad(x), m(x), atol=1e-4)


def test_vgg_gap_bn_and_errors():
    m = zoo.VGG(cfg=(8, "M", 8), head="gap", batch_norm=True, fc=(12,), seed=0)
    assert isinstance(m.features[1], torch.nn.BatchNorm2d) and m.features[0].bias is None
    assert m.classifier[0].in_features == 8
    assert m.eval()(m.example_input(2)).shape == (2, 10)
    with pytest.raises(ValueError, match="pools"):
        zoo.VGG(cfg=(4, "M", "M", "M", "M"))
    with pytest.raises(ValueError, match="head"):
        zoo.VGG(head="avg")


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_resnet20_structure(norm):
    m = zoo.ResNet20(width=2, norm=norm, seed=0).eval()
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 19 + 2  # 19 3x3 convs + 2 projection shortcuts
    assert all((c.bias is not None) == (norm == "none") for c in convs)
    kinds = {"batch": torch.nn.BatchNorm2d, "layer": torch.nn.GroupNorm, "none": torch.nn.Identity}
    assert isinstance(m.layer2[0].shortcut[1], kinds[norm])
    assert isinstance(m.layer1[0].shortcut, torch.nn.Identity)
    shapes = {}
    hooks = [getattr(m, n).register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, o.shape))
             for n in ("layer1", "layer2", "layer3")]
    m(m.example_input(2))
    for h in hooks:
        h.remove()
    assert shapes == {"layer1": (2, 32, 8, 8), "layer2": (2, 64, 4, 4), "layer3": (2, 128, 2, 2)}
    with pytest.raises(ValueError, match="norm"):
        zoo.ResNet20(norm="group")
    with pytest.raises(ValueError, match="width"):
        zoo.ResNet20(width=0)


def test_resnet20_layernorm_is_layer_norm_over_chw():
    m = zoo.ResNet20(norm="layer", seed=0)
    gn = m.layer1[0].norm1
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 1
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gn(x), F.layer_norm(x, x.shape[1:], eps=gn.eps))


def test_vit_token_permutation_equivariance():
    """Moving image patches and their positional embeddings together leaves the CLS output unchanged."""
    m = zoo.TinyViT(seed=0).eval()
    assert isinstance(m.cls_token, torch.nn.Parameter) and isinstance(m.pos_embed, torch.nn.Parameter)
    assert m.pos_embed.shape == (1, 17, 32)
    x = m.example_input(batch=3)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    patches = x.reshape(3, 1, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(3, 1, 16, 2, 2)
    xp = patches[:, :, perm].reshape(3, 1, 4, 4, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(3, 1, 8, 8)
    mp = copy.deepcopy(m)
    with torch.no_grad():
        mp.pos_embed[:, 1:] = m.pos_embed[:, 1:][:, perm]
    torch.testing.assert_close(mp(xp), m(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(xp), m(x), atol=1e-4)  # negative control: positions matter


def test_make_and_example_inputs_errors():
    with pytest.raises(ValueError, match="resnet20"):
        zoo.make("resnet")
    with pytest.raises(TypeError, match="example_input"):
        zoo.example_inputs(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="divisible"):
        zoo.TinyViT(dim=30, heads=4)


# ----------------------------------------------------------------------------- data

def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits as sk_load

    Xtr, Ytr = zoo.load_digits("train", standardize=False)
    Xte, Yte = zoo.load_digits("test", standardize=False)
    assert Xtr.shape == (1200, 64) and Xte.shape == (597, 64) and Xtr.dtype == torch.float32
    raw = sk_load()
    # train + test is exactly the data set (as a multiset of (row, label))
    ours = sorted(map(tuple, np.c_[torch.cat([Xtr, Xte]).numpy(), torch.cat([Ytr, Yte]).numpy()].tolist()))
    theirs = sorted(map(tuple, np.c_[raw.data, raw.target].tolist()))
    assert ours == theirs
    full = np.bincount(raw.target, minlength=10) / len(raw.target)
    assert np.abs(np.bincount(Ytr.numpy(), minlength=10) - 1200 * full).max() <= 1
    X2, Y2 = zoo.load_digits("train", standardize=False)
    assert torch.equal(X2, Xtr) and torch.equal(Y2, Ytr)
    X2.add_(1.0)  # callers get fresh tensors: the cache is not corrupted
    assert torch.equal(zoo.load_digits("train", standardize=False)[0], Xtr)


def test_digits_standardisation_uses_train_split_only():
    Xr, _ = zoo.load_digits("train", standardize=False)
    Xs, _ = zoo.load_digits("train")
    Ts, _ = zoo.load_digits("test")
    Tr, _ = zoo.load_digits("test", standardize=False)
    m, s = Xr.double().mean(), Xr.double().std(unbiased=False)
    torch.testing.assert_close(Xs.double(), (Xr.double() - m) / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Ts.double(), (Tr.double() - m) / s, atol=1e-5, rtol=1e-5)
    assert abs(float(Xs.mean())) < 1e-5 and abs(float(Xs.std(unbiased=False)) - 1) < 1e-4
    Xp, _ = zoo.load_digits("train", standardize="pixel")
    assert Xp.double().mean(0).abs().max() < 1e-5


def test_digits_image_shape_and_task_splits():
    X, Y = zoo.load_digits("train")
    Xi, Yi = zoo.load_digits("train", flat=False)
    assert Xi.shape == (1200, 1, 8, 8) and torch.equal(Xi.reshape(1200, 64), X) and torch.equal(Yi, Y)
    for task, classes in (("0-4", range(5)), ("5-9", range(5, 10)), ((1, 7), (1, 7))):
        Xt, Yt = zoo.load_digits("test", classes=task)
        Xa, Ya = zoo.load_digits("test")
        mask = torch.isin(Ya, torch.tensor(list(classes)))
        assert torch.equal(Xt, Xa[mask]) and torch.equal(Yt, Ya[mask])
        assert set(Yt.tolist()) == set(classes)  # labels keep their digit values
    with pytest.raises(ValueError, match="out of range"):
        zoo.load_digits(classes=(3, 12))
    with pytest.raises(ValueError, match="unknown task"):
        zoo.load_digits(classes="low")
    with pytest.raises(ValueError, match="split"):
        zoo.load_digits("val")


def test_digits_loaders_seeded_shuffling():
    state = torch.random.get_rng_state()
    a, test_a = zoo.digits_loaders(batch_size=100, seed=3)
    b, _ = zoo.digits_loaders(batch_size=100, seed=3)
    c, _ = zoo.digits_loaders(batch_size=100, seed=4)
    ya, yb, yc = (torch.cat([y for _, y in ld]) for ld in (a, b, c))
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)
    assert torch.equal(torch.sort(ya).values, torch.sort(zoo.load_digits()[1]).values)
    assert torch.equal(torch.cat([y for _, y in test_a]), zoo.load_digits("test")[1])  # not shuffled
    assert torch.equal(torch.random.get_rng_state(), state)


# ----------------------------------------------------------------------------- training

def test_train_mlp_learns_and_is_deterministic():
    data, test = zoo.load_digits("train"), zoo.load_digits("test")
    state = torch.random.get_rng_state()
    m1 = zoo.MLP(hidden=(32,), dropout=0.1, seed=0).eval()
    m2 = copy.deepcopy(m1)
    r1 = zoo.train(m1, data, epochs=4, lr=3e-3, seed=5, device="cpu", eval_data=test)
    r2 = zoo.train(m2, data, epochs=4, lr=3e-3, seed=5, device="cpu", eval_data=test)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _sd_equal(m1, m2) and r1.history == r2.history
    assert not m1.training and not m1.drops[0].training  # mode restored
    assert len(r1.history) == 4 and r1.history[-1].train_loss < r1.history[0].train_loss
    assert r1.test_accuracy > 0.9
    assert (r1.test_loss, r1.test_accuracy) == zoo.evaluate(m1, test)
    assert r1.settings["seed"] == 5 and r1.settings["optimizer"] == "adam"
    m3 = zoo.MLP(hidden=(32,), dropout=0.1, seed=0)
    zoo.train(m3, data, epochs=4, lr=3e-3, seed=6, device="cpu")
    assert not _sd_equal(m1, m3)  # negative control: the seed matters


def test_train_with_loader_sgd_cosine_and_bn():
    loader, test = zoo.digits_loaders(batch_size=64, flat=False, seed=0)
    m = zoo.VGG(cfg=(8, "M", 16, "M"), seed=0)
    r = zoo.train(m, loader, epochs=2, lr=0.05, optimizer="sgd", schedule="cosine", seed=0, device="cpu",
                  eval_data=test)
    assert m.training and r.test_accuracy > 0.5
    assert int(m.features[1].num_batches_tracked) == 2 * len(loader)


def test_evaluate_matches_manual_and_restores_mode():
    X, Y = zoo.load_digits("test")
    m = zoo.MLP(hidden=(16,), norm="batch", dropout=0.3, seed=0).train()
    before = copy.deepcopy(m.state_dict())
    loss, acc = zoo.evaluate(m, (X, Y), batch_size=100)
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m.eval()
    with torch.no_grad():
        logits = m(X)
    assert loss == pytest.approx(float(F.cross_entropy(logits, Y)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == Y).float().mean()))


def test_train_bad_inputs():
    X, Y = zoo.load_digits("test")
    m = zoo.MLP(hidden=(8,), seed=0)
    with pytest.raises(ValueError, match="labels range"):
        zoo.train(m, (X, Y + 5), epochs=1, device="cpu")
    with pytest.raises(ValueError, match="labels range"):
        zoo.evaluate(m, (X, Y - 1))
    with pytest.raises(TypeError, match="one-shot"):
        zoo.train(m, iter([(X, Y)]), epochs=1, device="cpu")
    with pytest.raises(FloatingPointError, match="lower lr"):
        zoo.train(m, (X.clone().fill_(float("nan")), Y), epochs=1, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        zoo.train(m, (X[:0], Y[:0]), epochs=1, device="cpu")
    with pytest.raises(ValueError, match="optimizer"):
        zoo.train(m, (X, Y), epochs=1, optimizer="lbfgs", device="cpu")
