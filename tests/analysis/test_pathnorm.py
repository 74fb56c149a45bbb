"""Path-norms (Gonon et al., ICLR 2024): closed forms, brute-force path enumeration, invariances."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import analysis
from _models import mlp


def _np(t):
    return t.detach().double().numpy()


def _randomize_bn(bn, gen):
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(n, generator=gen))
        bn.bias.copy_(torch.randn(n, generator=gen))


# ---------------------------------------------------------------- closed form, one hidden layer
@pytest.mark.parametrize("q", [1, 2, 4])
def test_one_hidden_layer_closed_form(q):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    W, b, V, c = (_np(t) for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    exact = sum(abs(V[k, j]) ** q * ((np.abs(W[j]) ** q).sum() + abs(b[j]) ** q)
                for k in range(3) for j in range(7)) + (np.abs(c) ** q).sum()
    res = analysis.path_norm(net, torch.zeros(2, 5), q=q)
    assert res.q == q
    assert res.value == pytest.approx(exact ** (1 / q), rel=1e-12)
    assert res.log_value == pytest.approx(math.log(exact) / q, rel=1e-12)


# ---------------------------------------------------------------- brute force over a neuron DAG
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 4)
        self.pool = nn.MaxPool1d(2)
        self.fc3 = nn.Linear(2, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.fc1(x)))
        r = torch.relu(self.fc2(h) + h)                   # residual connection
        p = self.pool(r.unsqueeze(1)).flatten(1)          # max-pool over pairs of neurons
        return self.fc3(p)


def _brute_force(m: _Tiny, q: float) -> float:
    """Enumerate every path (input paths and bias paths) of an explicitly built neuron DAG."""
    W1, b1, W2, b2, W3, b3 = (_np(t) for t in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,
                                                m.fc3.weight, m.fc3.bias))
    bn = m.bn
    a = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
    c = _np(bn.bias) - a * _np(bn.running_mean)
    inc, bias = {}, {}
    for j in range(4):
        inc[f"z{j}"] = [(f"x{i}", W1[j, i]) for i in range(3)]
        bias[f"z{j}"] = b1[j]
        inc[f"h{j}"] = [(f"z{j}", a[j])]
        bias[f"h{j}"] = c[j]
        inc[f"u{j}"] = [(f"h{i}", W2[j, i]) for i in range(4)]
        bias[f"u{j}"] = b2[j]
        inc[f"s{j}"] = [(f"u{j}", 1.0), (f"h{j}", 1.0)]
        bias[f"s{j}"] = None
    for k in range(2):
        inc[f"m{k}"] = [(f"s{2 * k}", 1.0), (f"s{2 * k + 1}", 1.0)]
        bias[f"m{k}"] = None
    for o in range(2):
        inc[f"o{o}"] = [(f"m{k}", W3[o, k]) for k in range(2)]
        bias[f"o{o}"] = b3[o]

    def paths(node):
        if node.startswith("x"):
            return [1.0]
        out = [w * p for src, w in inc[node] for p in paths(src)]
        if bias[node] is not None:
            out.append(bias[node])
        return out

    all_paths = paths("o0") + paths("o1")
    assert len(all_paths) == 2 * (2 * (2 * (4 * 5 + 1 + 5)) + 1)
    return float(sum(abs(p) ** q for p in all_paths))


@pytest.mark.parametrize("q", [1, 2, 3])
def test_brute_force_residual_maxpool_bn(q):
    torch.manual_seed(1)
    m = _Tiny()
    _randomize_bn(m.bn, torch.Generator().manual_seed(2))
    res = analysis.path_norm(m, torch.zeros(1, 3), q=q)
    assert res.value_q == pytest.approx(_brute_force(m, q), rel=1e-12)
    assert res.settings["maxpool_to_sumpool"] == 1 and res.settings["batchnorm_folded"] == 1


# ---------------------------------------------------------------- dense-equivalent networks
def _dense_chain(layers, q):
    """||Phi||_q^q of a chain of affine maps (M, b): v <- |M|^q v + |b|^q from an all-ones input."""
    v = np.ones(layers[0][0].shape[1])
    for M, b in layers:
        v = np.abs(M) ** q @ v + (0 if b is None else np.abs(b) ** q)
    return float(v.sum())


def _jac(fn, shape):
    x = torch.zeros(shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: fn(z.reshape(shape)).reshape(-1), x.reshape(-1))
    return J.numpy()


@pytest.mark.parametrize("q", [1, 2])
def test_conv_avgpool_adaptive_match_dense_network(q):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
    ada = nn.AdaptiveAvgPool2d((2, 2))
    fc = nn.Linear(12, 2)
    net = nn.Sequential(conv, nn.ReLU(), pool, nn.Conv2d(3, 3, 1), ada, nn.Flatten(), fc)
    c2 = net[3]
    s0 = (1, 2, 9, 9)
    Wc = conv.weight.double()
    M1 = _jac(lambda z: F.conv2d(z, Wc, None, 2, 1), s0)
    b1 = np.repeat(_np(conv.bias), 25)
    M2 = _jac(lambda z: F.avg_pool2d(z, 3, 2, 1, count_include_pad=False), (1, 3, 5, 5))
    M3 = _jac(lambda z: F.conv2d(z, c2.weight.double()), (1, 3, 3, 3))
    b3 = np.repeat(_np(c2.bias), 9)
    M4 = _jac(lambda z: F.adaptive_avg_pool2d(z, (2, 2)), (1, 3, 3, 3))
    layers = [(M1, b1), (M2, None), (M3, b3), (M4, None), (_np(fc.weight), _np(fc.bias))]
    res = analysis.path_norm(net, torch.zeros(4, 2, 9, 9), q=q)
    assert res.value_q == pytest.approx(_dense_chain(layers, q), rel=1e-10)


def test_maxpool_padding_ceil_matches_window_sums():
    torch.manual_seed(4)
    net = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.Flatten(), nn.Linear(16, 1))
    # windows of a 3x3 pool, stride 2, padding 1, ceil_mode on a 6x6 input: rows/cols start at
    # -1, 1, 3, 5 (the ceil-mode window at 5 starts inside the input, so it is kept)
    assert net[0](torch.zeros(1, 1, 6, 6)).shape == (1, 1, 4, 4)
    S = np.zeros((16, 36))
    for oi, r0 in enumerate((-1, 1, 3, 5)):
        for oj, c0 in enumerate((-1, 1, 3, 5)):
            for r in range(r0, r0 + 3):
                for c in range(c0, c0 + 3):
                    if 0 <= r < 6 and 0 <= c < 6:
                        S[oi * 4 + oj, r * 6 + c] = 1
    fc = net[2]
    for q in (1, 2):
        exact = _dense_chain([(S, None), (_np(fc.weight), _np(fc.bias))], q)
        assert analysis.path_norm(net, torch.zeros(1, 1, 6, 6), q=q).value_q == pytest.approx(exact, rel=1e-12)


def test_maxpool_then_v_gives_two_abs_v():
    net = nn.Sequential(nn.MaxPool1d(2), nn.Flatten(), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net[2].weight.fill_(-1.7)
    assert analysis.path_norm(net, torch.zeros(1, 1, 2), q=1).value == pytest.approx(2 * 1.7)
    assert analysis.path_norm(net, torch.zeros(1, 1, 2), q=2).value == pytest.approx(math.sqrt(2) * 1.7)


# ---------------------------------------------------------------- invariances (with negative controls)
def _mlp(seed):
    return mlp((6, 8, 5, 3), seed, dtype=torch.float64)


@pytest.mark.parametrize("q", [1, 2])
def test_permutation_invariance(q):
    net = _mlp(5)
    ref = analysis.path_norm(net, torch.zeros(1, 6), q=q).value
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    good, bad = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        good[0].weight.copy_(net[0].weight[perm])
        good[0].bias.copy_(net[0].bias[perm])
        good[2].weight.copy_(net[2].weight[:, perm])
        bad[0].weight.copy_(net[0].weight[perm])  # rows only: a different network
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(good(x), net(x))
    assert analysis.path_norm(good, torch.zeros(1, 6), q=q).value == pytest.approx(ref, rel=1e-12)
    assert abs(analysis.path_norm(bad, torch.zeros(1, 6), q=q).value - ref) > 1e-6 * ref


@pytest.mark.parametrize("q", [1, 2, 4])
def test_rescaling_invariance(q):
    net = _mlp(6)
    ref = analysis.path_norm(net, torch.zeros(1, 6), q=q).value
    lam, j = 3.7, 2
    good, bad = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        good[2].weight[j] *= lam
        good[2].bias[j] *= lam
        good[4].weight[:, j] /= lam
        bad[2].weight[j] *= lam
        bad[2].bias[j] *= lam
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(good(x), net(x))
    assert analysis.path_norm(good, torch.zeros(1, 6), q=q).value == pytest.approx(ref, rel=1e-12)
    assert analysis.path_norm(bad, torch.zeros(1, 6), q=q).value > ref * (1 + 1e-3)


@pytest.mark.parametrize("q", [1, 2])
def test_batchnorm_equals_folded_net(q):
    torch.manual_seed(7)
    conv, bn = nn.Conv2d(2, 4, 3, bias=False).double(), nn.BatchNorm2d(4).double()
    _randomize_bn(bn, torch.Generator().manual_seed(8))
    tail = [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2).double()]
    net = nn.Sequential(conv, bn, *tail)
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_conv = nn.Conv2d(2, 4, 3).double()
    with torch.no_grad():
        folded_conv.weight.copy_(conv.weight * a[:, None, None, None])
        folded_conv.bias.copy_(bn.bias - a * bn.running_mean)
    folded = nn.Sequential(folded_conv, *tail)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    net.eval()
    torch.testing.assert_close(net(x), folded(x))
    v1 = analysis.path_norm(net, x, q=q).value
    v2 = analysis.path_norm(folded, x, q=q).value
    assert v1 == pytest.approx(v2, rel=1e-10)


def test_deep_net_no_overflow():
    torch.manual_seed(9)
    layers = [nn.Linear(30, 30, bias=False) for _ in range(40)]
    with torch.no_grad():
        for lay in layers:
            lay.weight.uniform_(0.0, 1.0)
    net = nn.Sequential(*layers)
    # independent reference: numpy chain with explicit log bookkeeping
    v, acc = np.ones(30), 0.0
    for lay in layers:
        v = _np(lay.weight) @ v
        acc += math.log(v.max())
        v /= v.max()
    expected_log = acc + math.log(v.sum())
    v32 = torch.ones(30)
    for lay in layers:
        v32 = lay.weight.detach() @ v32
    assert torch.isinf(v32).any()  # a float32 recipe overflows
    res = analysis.path_norm(net, torch.zeros(1, 30), q=1)
    assert res.log_value == pytest.approx(expected_log, rel=1e-12)
    assert math.isfinite(res.value)


def test_model_unchanged():
    torch.manual_seed(10)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(27, 2)).float()
    _randomize_bn(net[1], torch.Generator().manual_seed(11))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    analysis.path_norm(net, torch.zeros(2, 1, 8, 8), q=2)
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert isinstance(net[3], nn.MaxPool2d)


def test_bound_restores_each_modules_own_flag():
    """A train-mode model with a frozen (eval) BatchNorm keeps both flags after path_norm_bound."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    net[1].eval()  # frozen statistics, as in fine-tuning
    flags = [m.training for m in net.modules()]
    X, Y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    analysis.path_norm_bound(net, X[:1], (X, Y))
    assert [m.training for m in net.modules()] == flags
    assert flags.count(False) == 1  # the check is not vacuous: the flags differ between modules


# ---------------------------------------------------------------- unsupported operations and bad input
class _Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return torch.tanh(self.fc(x))


@pytest.mark.parametrize("net,needle", [
    (nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 1)), "GELU"),
    (_Tanh(), "tanh"),
    (nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), "LayerNorm"),
    (nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()), "Sigmoid"),
])
def test_unsupported_operations_raise(net, needle):
    with pytest.raises(ValueError, match=needle) as info:
        analysis.path_norm(net, torch.zeros(1, 2))
    assert "ReLU" in str(info.value)


def test_bad_arguments():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="q must be"):
        analysis.path_norm(net, torch.zeros(1, 2), q=0.5)
    with pytest.raises(TypeError):
        analysis.path_norm(net, [1.0, 2.0])
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="running"):
        analysis.path_norm(bn, torch.zeros(1, 2))


# ---------------------------------------------------------------- the generalization bound
def test_path_norm_bound_constants():
    torch.manual_seed(12)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))
    X = torch.randn(40, 1, 8, 8) * 0.5
    Y = torch.randint(0, 3, (40,))
    res = analysis.path_norm_bound(net, X[:1], (X, Y), gamma=0.5)
    D, P, K, d_in, d_out = 3, 1, 4, 64, 3
    C = math.sqrt(D * math.log((3 + 2 * P) * K) + math.log((3 + 2 * P) / (1 + P) * (d_in + 1) * d_out))
    assert (res.depth, res.n_pool_types, res.kernel_size, res.d_in, res.d_out) == (D, P, K, d_in, d_out)
    assert res.constant_C == pytest.approx(C)
    B = max(1.0, float(X.abs().max()))
    r = analysis.path_norm(net, X[:1], q=1).value
    assert res.generalization_term == pytest.approx(4 * C * B / math.sqrt(40) * math.sqrt(2) / 0.5 * r)
    # ramp loss on hand-computed margins
    with torch.no_grad():
        out = net(X)
    fy = out.gather(1, Y[:, None]).squeeze(1)
    other = out.clone()
    other[torch.arange(40), Y] = -float("inf")
    M = fy - other.max(1).values
    assert res.empirical_risk == pytest.approx(float((1 - M / 0.5).clamp(0, 1).mean()), rel=1e-6)
    assert res.bound == pytest.approx(res.empirical_risk + res.generalization_term)
    res4 = analysis.path_norm_bound(net, X[:1], (X, Y), gamma=0.5, n=160)
    assert res4.generalization_term == pytest.approx(res.generalization_term / 2)


def test_path_norm_bound_bad_labels():
    net = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(ValueError, match="labels out of range"):
        analysis.path_norm_bound(net, None, (torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])))


# ---------------------------------------------------------------- models torch.fx cannot trace (zoo)
from weightspace import zoo  # noqa: E402
import weightspace as ws  # noqa: E402


def _randomize_all_bn(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            _randomize_bn(mod, gen)
    return model


def _mlp_chain(m, q):
    """Closed form for an MLP: v <- |W|^q v + |b|^q from ones, summed (= the sum over all paths)."""
    return _dense_chain([(_np(fc.weight), _np(fc.bias)) for fc in list(m.fc) + [m.head]], q)


@pytest.mark.parametrize("q", [1, 2])
def test_zoo_mlp_closed_form_and_fx_failure(q):
    m = zoo.make("mlp", seed=0)
    with pytest.raises(torch.fx.proxy.TraceError):  # the motivation: `if x.dim() != 2` defeats symbolic tracing
        torch.fx.symbolic_trace(m)
    exact = _mlp_chain(m, q)
    assert analysis.path_norm(m, torch.randn(2, 64), q=q).value_q == pytest.approx(exact, rel=1e-12)
    # the other branch of the control flow (flatten of (N, 1, 8, 8) digits) gives the same network
    assert analysis.path_norm(m, torch.randn(2, 1, 8, 8), q=q).value_q == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("q", [1, 3])
def test_zoo_tiny_mlp_brute_force_paths(q):
    m = zoo.make("mlp", in_features=3, hidden=(4, 3), out_features=2, seed=1)
    W1, b1, W2, b2, W3, b3 = (_np(t) for t in (m.fc[0].weight, m.fc[0].bias, m.fc[1].weight, m.fc[1].bias,
                                                m.head.weight, m.head.bias))
    paths = []
    for o in range(2):
        paths.append(b3[o])
        for k in range(3):
            paths.append(W3[o, k] * b2[k])
            for j in range(4):
                paths.append(W3[o, k] * W2[k, j] * b1[j])
                paths += [W3[o, k] * W2[k, j] * W1[j, i] for i in range(3)]
    assert len(paths) == 2 * (1 + 3 * (1 + 4 * 4))
    brute = float(sum(abs(p) ** q for p in paths))
    assert analysis.path_norm(m, torch.zeros(1, 3), q=q).value_q == pytest.approx(brute, rel=1e-12)


def _conv_matrix(conv, shape):
    """Dense matrix (out, in) of a bias-free conv on one sample of ``shape`` (C, H, W)."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(shape))
    out = F.conv2d(basis, conv.weight.detach().double(), None, conv.stride, conv.padding)
    return out.reshape(n, -1).T.numpy(), tuple(out.shape[1:])


def _bn_fold_np(bn, hw):
    a = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
    return np.repeat(a, hw), np.repeat(_np(bn.bias) - a * _np(bn.running_mean), hw)


def _sum_pool_matrix(c, h, w):
    """2x2 stride-2 window sums over a (c, h, w) map: the max-pool neurons with every edge weight 1."""
    S = np.zeros((c * (h // 2) * (w // 2), c * h * w))
    for ch in range(c):
        for i in range(h // 2):
            for j in range(w // 2):
                for di in range(2):
                    for dj in range(2):
                        S[(ch * (h // 2) + i) * (w // 2) + j, (ch * h + 2 * i + di) * w + 2 * j + dj] = 1
    return S


@pytest.mark.parametrize("q", [1, 2])
def test_zoo_vgg_batchnorm_equals_dense_network(q):
    m = _randomize_all_bn(zoo.make("vgg", batch_norm=True, seed=2), 3)
    layers, shape = [], (1, 8, 8)
    for mod in m.features:
        if isinstance(mod, nn.Conv2d):
            M, shape = _conv_matrix(mod, shape)
        elif isinstance(mod, nn.BatchNorm2d):  # conv -> BN: paths |W|^q |a|^q, bias |beta - a mu|^q
            a, b = _bn_fold_np(mod, shape[1] * shape[2])
            layers.append((a[:, None] * M, b))
        elif isinstance(mod, nn.MaxPool2d):
            layers.append((_sum_pool_matrix(*shape), None))
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
    layers += [(_np(lin.weight), _np(lin.bias)) for lin in m.classifier if isinstance(lin, nn.Linear)]
    res = analysis.path_norm(m, m.example_input(), q=q)
    assert res.value_q == pytest.approx(_dense_chain(layers, q), rel=1e-10)
    assert res.settings["batchnorm_folded"] == 2 and res.settings["maxpool_to_sumpool"] == 2


@torch.no_grad()
def _resnet_reference(m, q):
    """The recipe written out by hand for zoo.ResNet20 (conv+BN folded as |a W|^q, |beta - a mu|^q)."""
    def cbn(v, conv, bn):
        a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        b = bn.bias.double() - a * bn.running_mean.double()
        W = (conv.weight.double() * a[:, None, None, None]).abs() ** q
        return F.conv2d(v, W, None, conv.stride, conv.padding) + (b.abs() ** q)[:, None, None]

    v = cbn(torch.ones(1, 1, 8, 8, dtype=torch.float64), m.conv1, m.norm1)
    for stage in (m.layer1, m.layer2, m.layer3):
        for blk in stage:
            h = cbn(cbn(v, blk.conv1, blk.norm1), blk.conv2, blk.norm2)
            v = h + (v if isinstance(blk.shortcut, nn.Identity) else cbn(v, blk.shortcut[0], blk.shortcut[1]))
    hw = v.shape[2] * v.shape[3]
    v = v.sum((2, 3)) * hw ** (-q)  # global average pool: edges 1/hw
    out = v @ (m.linear.weight.double().abs() ** q).T + m.linear.bias.double().abs() ** q
    return float(out.sum())


@pytest.mark.parametrize("q", [1, 2])
def test_zoo_resnet20_batchnorm_matches_handwritten_recipe(q):
    m = _randomize_all_bn(zoo.make("resnet20", norm="batch", seed=4), 5)
    res = analysis.path_norm(m, m.example_input(), q=q)
    assert res.value_q == pytest.approx(_resnet_reference(m, q), rel=1e-10)
    assert res.settings["batchnorm_folded"] == 21 and res.settings["conv"] == 21
    assert res.settings["depth"] == 20  # 19 convs on the longest chain + the linear head


@pytest.mark.parametrize("name,kw", [("mlp", {}), ("vgg", {"batch_norm": True}), ("resnet20", {"norm": "batch"})])
def test_zoo_permutation_invariance_with_negative_control(name, kw):
    m = _randomize_all_bn(zoo.make(name, seed=6, **kw), 7)
    x = m.example_input()
    spec = ws.permutation_spec(m, x)
    assert len(spec.groups) > 0
    mp = ws.permute(m, spec, ws.random_permutation(spec, seed=8))
    m.eval(), mp.eval()
    with torch.no_grad():
        torch.testing.assert_close(mp(x), m(x), rtol=1e-4, atol=1e-5)
        moved = [k for k, v in mp.state_dict().items()
                 if v.is_floating_point() and not torch.equal(v, m.state_dict()[k])]
    assert moved  # the permutation really moved weights
    for q in (1, 2):
        ref = analysis.path_norm(m, x, q=q)
        assert analysis.path_norm(mp, x, q=q).log_value == pytest.approx(ref.log_value, abs=1e-10)
    bad = copy.deepcopy(m)
    first = next(p for p in bad.parameters() if p.dim() > 1)
    with torch.no_grad():
        first.view(-1)[0] += 1.0
    assert abs(analysis.path_norm(bad, x, q=1).log_value - analysis.path_norm(m, x, q=1).log_value) > 1e-6


# ---------------------------------------------------------------- control flow and hand-written layers
class _ControlFlow(nn.Module):
    """Shape-dependent branches, a loop with a shared layer, x @ W.t(), in-place ops and dtype casts."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 5)
        self.w3 = nn.Parameter(torch.randn(4, 5))
        self.b3 = nn.Parameter(torch.randn(4))
        self.repeats = 2

    def forward(self, x):
        if x.dim() > 2:
            x = x.reshape(x.shape[0], -1)
        x = x.float()
        h = F.relu(self.fc1(x))
        for _ in range(self.repeats if h.shape[-1] == 5 else 0):
            r = self.fc2(h)
            r += h                      # in-place residual
            h = r.relu_()
        if h.size(1) % 2 == 1:
            h = h * 0.5
        return h @ self.w3.t() + self.b3


def test_shape_control_flow_loops_inplace_and_matmul():
    torch.manual_seed(13)
    m = _ControlFlow()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(m)
    W1, b1, W2, b2, W3, b3 = (_np(t) for t in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.w3, m.b3))
    for q in (1, 2):
        v = np.abs(W1) ** q @ np.ones(6) + np.abs(b1) ** q
        for _ in range(2):  # shared weights: the unrolled DAG uses |W2|^q twice; skip edges weigh 1
            v = np.abs(W2) ** q @ v + np.abs(b2) ** q + v
        v = 0.5 ** q * v
        exact = float((np.abs(W3) ** q @ v + np.abs(b3) ** q).sum())
        assert analysis.path_norm(m, torch.zeros(3, 2, 3), q=q).value_q == pytest.approx(exact, rel=1e-12)


class _Token(nn.Module):
    """A parameter concatenated to the hidden units is a set of bias neurons (a cls token)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(6, 2)
        self.tok = nn.Parameter(torch.randn(1, 2))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.cat([h, self.tok.expand(x.shape[0], -1)], dim=1))


def test_concatenated_parameter_counts_as_bias_paths():
    torch.manual_seed(14)
    m = _Token()
    W1, b1, W2, b2, tok = (_np(t) for t in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.tok))
    for q in (1, 2):
        v = np.concatenate([np.abs(W1) ** q @ np.ones(3) + np.abs(b1) ** q, np.abs(tok[0]) ** q])
        exact = float((np.abs(W2) ** q @ v + np.abs(b2) ** q).sum())
        assert analysis.path_norm(m, torch.zeros(1, 3), q=q).value_q == pytest.approx(exact, rel=1e-12)


# ---------------------------------------------------------------- unsupported operations are named
def _raises_unsupported(match):
    """UnsupportedOperationError (a ValueError; not exported by name) whose message matches."""
    return pytest.raises(ValueError, match=match)


def _check_unsupported(info):
    assert type(info.value).__name__ == "UnsupportedOperationError"
    assert "ReLU" in str(info.value)


def test_zoo_vit_raises_naming_the_operation_and_module():
    vit = zoo.make("vit", seed=0)
    x = vit.example_input()
    with _raises_unsupported(r"'layer_norm'.*'blocks\.0\.norm1' \(LayerNorm\)") as info:
        analysis.path_norm(vit, x)
    _check_unsupported(info)
    no_ln = copy.deepcopy(vit)
    for blk in no_ln.blocks:
        blk.norm1, blk.norm2 = nn.Identity(), nn.Identity()
    with _raises_unsupported(r"'multi_head_attention_forward'.*blocks\.0\.attn") as info:
        analysis.path_norm(no_ln, x)
    _check_unsupported(info)
    with _raises_unsupported(r"'gelu'.*'acts\.0' \(Activation\)") as info:
        analysis.path_norm(zoo.make("mlp", activation="gelu", seed=0), torch.zeros(1, 64))
    _check_unsupported(info)
    with _raises_unsupported(r"'group_norm'.*norm1") as info:
        analysis.path_norm(zoo.make("resnet20", norm="layer", seed=0), x)
    _check_unsupported(info)


class _Product(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fc, self.op = nn.Linear(4, 4), op

    def forward(self, x):
        h = self.fc(x)
        if self.op == "mul":
            return h * torch.relu(h)
        if self.op == "attn":
            return torch.softmax(h @ h.transpose(-1, -2), -1) @ h
        return F.softmax(h, -1)


@pytest.mark.parametrize("op,needle", [("mul", "two activations"), ("attn", "two activations"), ("softmax", "softmax")])
def test_products_and_softmax_raise(op, needle):
    with _raises_unsupported(needle) as info:
        analysis.path_norm(_Product(op), torch.zeros(1, 3, 4))
    _check_unsupported(info)


def test_zoo_resnet_unchanged_and_bad_shape_reports_module():
    m = _randomize_all_bn(zoo.make("resnet20", norm="batch", seed=9), 10).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    analysis.path_norm(m, m.example_input(), q=2)
    assert m.training and all(mod.training for mod in m.modules())
    for k, v in m.state_dict().items():  # BN running stats would move if the model itself had run
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"'fc\.0'.*example_inputs"):
        analysis.path_norm(zoo.make("mlp", seed=0), torch.zeros(1, 10))


# ---------------------------------------------------------------- 1d pools and uneven adaptive max-pools
def _window_matrix(windows, L):
    """0/1 matrix of window memberships (a max-pool neuron per window, every edge weight 1)."""
    S = np.zeros((len(windows), L))
    for j, (a, b) in enumerate(windows):
        S[j, max(a, 0):min(b, L)] = 1
    return S


def _adaptive_windows(L, o):  # PyTorch's definition: [floor(i L / o), ceil((i + 1) L / o))
    return [(i * L // o, -((-(i + 1) * L) // o)) for i in range(o)]


@pytest.mark.parametrize("q", [1, 2])
def test_1d_pools_and_uneven_adaptive_max_match_window_sums(q):
    torch.manual_seed(15)
    conv, fc = nn.Conv1d(1, 1, 3, padding=1), nn.Linear(3, 2)
    net = nn.Sequential(conv, nn.ReLU(), nn.MaxPool1d(3, stride=2, padding=1),
                        nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False),
                        nn.AdaptiveMaxPool1d(3), nn.Flatten(), fc)
    M1 = _jac(lambda z: F.conv1d(z, conv.weight.double(), None, 1, 1), (1, 1, 9))
    S_max = _window_matrix([(2 * j - 1, 2 * j + 2) for j in range(5)], 9)       # 9 -> 5, padding 1
    A = _jac(lambda z: F.avg_pool1d(z, 3, 1, 1, count_include_pad=False), (1, 1, 5))  # 1/2 at borders, 1/3 inside
    S_ada = _window_matrix(_adaptive_windows(5, 3), 5)                            # windows of 2, 3, 2
    assert S_ada.sum(1).tolist() == [2, 3, 2]
    layers = [(M1, np.repeat(_np(conv.bias), 9)), (S_max, None), (A, None), (S_ada, None),
              (_np(fc.weight), _np(fc.bias))]
    assert analysis.path_norm(net, torch.zeros(1, 1, 9), q=q).value_q == pytest.approx(_dense_chain(layers, q),
                                                                                       rel=1e-12)
    fc2 = nn.Linear(6, 1)
    net2 = nn.Sequential(nn.AdaptiveMaxPool2d((2, 3)), nn.Flatten(), fc2)
    S2 = np.kron(_window_matrix(_adaptive_windows(5, 2), 5), _window_matrix(_adaptive_windows(7, 3), 7))
    exact = _dense_chain([(S2, None), (_np(fc2.weight), _np(fc2.bias))], q)
    assert analysis.path_norm(net2, torch.zeros(1, 1, 5, 7), q=q).value_q == pytest.approx(exact, rel=1e-12)
