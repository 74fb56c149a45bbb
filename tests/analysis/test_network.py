"""Oracles for analysis.network_metrics (La Malfa et al., arXiv:2110.02628): analytic strengths,
agreement with NetworkX weighted degrees, invariance under hidden-unit permutations."""
import copy

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn

import analysis
import weightspace as ws
from _models import mlp


def _mlp(sizes, seed=0):
    return mlp(sizes, seed)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3))


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(5, 6)
        self.f1 = nn.Linear(6, 6)
        self.f2 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + self.f2(torch.relu(self.f1(h)))
        return self.out(h)


def _fill(model, fn):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(fn(name, p))
    return model


def _layer_slices(metrics):
    return [np.flatnonzero(metrics.node_layer == i) for i in range(len(metrics.layer_names))]


def test_all_ones_gives_fan_in_plus_fan_out():
    sizes = [3, 5, 4, 2]
    m = _fill(_mlp(sizes), lambda n, p: torch.ones_like(p) if n.endswith("weight") else torch.zeros_like(p))
    r = analysis.network_metrics(m, torch.zeros(1, 3), centralities=())
    sl = _layer_slices(r)
    assert len(sl) == len(sizes) and [len(s) for s in sl] == sizes
    for li, n in enumerate(sizes):
        fan_in = sizes[li - 1] if li > 0 else 0
        fan_out = sizes[li + 1] if li + 1 < len(sizes) else 0
        want = (fan_in if li > 0 else 1.0) + (fan_out if li + 1 < len(sizes) else 1.0)  # +1 boundary terms
        np.testing.assert_array_equal(r.strength[sl[li]], np.full(n, want))
        np.testing.assert_array_equal(r.in_degree[sl[li]], np.full(n, fan_in))
        np.testing.assert_array_equal(r.out_degree[sl[li]], np.full(n, fan_out))
        assert r.fluctuation[li] == 0.0 and r.per_layer[li]["strength_std"] == 0.0
        assert r.per_layer[li]["strength_mean"] == want and r.per_layer[li]["strength_hist"].sum() == n
    z = analysis.network_metrics(m, torch.zeros(1, 3), boundary="zero", centralities=())
    np.testing.assert_array_equal(z.strength[sl[0]], np.full(3, 5.0))
    np.testing.assert_array_equal(z.strength[sl[3]], np.full(2, 4.0))
    # a bias is added to the in-strength
    mb = _fill(copy.deepcopy(m), lambda n, p: torch.ones_like(p) if n.endswith("weight") else torch.full_like(p, 0.5))
    rb = analysis.network_metrics(mb, torch.zeros(1, 3), centralities=())
    np.testing.assert_array_equal(rb.in_strength[sl[1]], np.full(5, 3.5))
    np.testing.assert_array_equal(rb.in_strength[sl[0]], np.ones(3))


def test_balanced_signs_give_zero_strength():
    def checker(n, p):  # (-1)^(i+j) on even-sized matrices: every row and column sums to 0
        if n.endswith("bias"):
            return torch.zeros_like(p)
        i, j = torch.meshgrid(torch.arange(p.shape[0]), torch.arange(p.shape[1]), indexing="ij")
        return ((-1.0) ** (i + j)).to(p.dtype)

    m = _fill(_mlp([4, 6, 4, 2]), checker)
    x = torch.zeros(1, 4)
    z = analysis.network_metrics(m, x, boundary="zero", centralities=())
    np.testing.assert_array_equal(z.strength, np.zeros(16))
    np.testing.assert_array_equal(z.fluctuation, np.zeros(4))
    u = analysis.network_metrics(m, x, centralities=())
    sl = _layer_slices(u)
    np.testing.assert_array_equal(u.strength[np.concatenate(sl[1:3])], np.zeros(10))
    np.testing.assert_array_equal(u.strength[np.concatenate([sl[0], sl[3]])], np.ones(6))
    # unsigned variants are not zero: |+-1| summed = fan_in + fan_out
    a = analysis.network_metrics(m, x, weight="abs_sum", boundary="zero", centralities=())
    np.testing.assert_array_equal(a.strength[sl[1]], np.full(6, 8.0))
    assert a.settings["weight"] == "abs_sum"


def _nx_strengths(G, vec=lambda v: v):
    n = G.number_of_nodes()
    H = nx.DiGraph()
    H.add_nodes_from(G.nodes)
    H.add_weighted_edges_from((a, b, float(np.sum(vec(np.asarray(d["value"], dtype=np.float64)))))
                              for a, b, d in G.edges(data=True))
    ins = np.array([H.in_degree(i, weight="weight") for i in range(n)], dtype=np.float64)
    outs = np.array([H.out_degree(i, weight="weight") for i in range(n)], dtype=np.float64)
    bias = np.array([G.nodes[i].get("bias", 0.0) for i in range(n)])
    return ins, outs, bias


@pytest.mark.parametrize("make,x", [(lambda: _mlp([5, 7, 6, 3]), torch.zeros(2, 5)), (_cnn, torch.zeros(2, 3, 6, 6))])
def test_matches_networkx_weighted_degree(make, x):
    model = make()
    g = ws.NeuralGraph.from_model(model, x)
    G = g.to_networkx()
    ins, outs, bias = _nx_strengths(G)
    r = analysis.network_metrics(g, boundary="zero", centralities=("degree", "in_degree", "out_degree"))
    np.testing.assert_allclose(r.in_strength, ins + bias, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.out_strength, outs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(r.strength, ins + bias + outs, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(r.in_degree, [G.in_degree(i) for i in range(g.num_nodes)])
    dc = nx.degree_centrality(G)
    np.testing.assert_allclose(r.centralities["degree"], [dc[i] for i in range(g.num_nodes)], atol=1e-12)
    nb = analysis.network_metrics(g, boundary="zero", bias=False, weight="l2", centralities=())
    ins2, _, _ = _nx_strengths(G, vec=lambda v: np.sqrt(np.sum(v * v)))
    np.testing.assert_allclose(nb.in_strength, ins2, atol=1e-10)


def test_include_structural_matches_networkx_on_residual_model():
    model = _Res()
    g = ws.NeuralGraph.from_model(model, torch.zeros(1, 5))
    G = g.to_networkx()
    ins, outs, bias = _nx_strengths(G)
    r = analysis.network_metrics(g, boundary="zero", include_structural=True, centralities=())
    np.testing.assert_allclose(r.strength, ins + outs + bias, atol=1e-10)
    kinds = r.layer_kinds
    s_idx = kinds.index("sum")
    assert r.per_layer[s_idx]["in_degree_mean"] == 2.0  # two value-1 residual edges per sum node
    d = analysis.network_metrics(g, boundary="zero", centralities=())  # default drops them
    assert d.per_layer[s_idx]["in_degree_mean"] == 0.0 and d.settings["dropped_structural_edges"] == 12
    assert d.num_edges == r.num_edges - 12


def test_conv_kernel_summed():
    model = _cnn(seed=3)
    x = torch.zeros(2, 3, 6, 6)
    r = analysis.network_metrics(model, x, boundary="zero", centralities=())
    sl = _layer_slices(r)
    assert r.layer_kinds[:4] == ("input", "conv", "norm", "conv")
    W0, b0 = model[0].weight.detach().double(), model[0].bias.detach().double()
    gamma, beta = model[1].weight.detach().double(), model[1].bias.detach().double()
    W3 = model[3].weight.detach().double()
    L6 = model[6].weight.detach().double().reshape(6, 5, 16)
    np.testing.assert_allclose(r.out_strength[sl[0]], W0.sum((0, 2, 3)).numpy(), atol=1e-12)
    np.testing.assert_allclose(r.in_strength[sl[1]], (W0.sum((1, 2, 3)) + b0).numpy(), atol=1e-12)
    np.testing.assert_allclose(r.out_strength[sl[1]], gamma.numpy(), atol=1e-12)  # norm edges carry gamma
    np.testing.assert_allclose(r.in_strength[sl[2]], (gamma + beta).numpy(), atol=1e-12)
    np.testing.assert_allclose(r.out_strength[sl[2]], W3.sum((0, 2, 3)).numpy(), atol=1e-12)
    np.testing.assert_allclose(r.out_strength[sl[3]], L6.sum((0, 2)).numpy(), atol=1e-12)  # H*W block summed
    a = analysis.network_metrics(model, x, weight="abs_sum", boundary="zero", bias=False, centralities=())
    np.testing.assert_allclose(a.in_strength[sl[1]], W0.abs().sum((1, 2, 3)).numpy(), atol=1e-12)
    l2 = analysis.network_metrics(model, x, weight="l2", boundary="zero", bias=False, centralities=())
    np.testing.assert_allclose(l2.in_strength[sl[1]], W0.flatten(2).norm(dim=2).sum(1).numpy(), atol=1e-12)


_STATS = ("strength_mean", "strength_std", "strength_min", "strength_max", "in_strength_mean", "out_strength_mean",
          "in_degree_mean", "out_degree_mean", "pagerank_mean", "degree_mean")


def _assert_rows_close(r1, r2):
    assert len(r1.per_layer) == len(r2.per_layer)
    np.testing.assert_allclose(r1.hist_edges, r2.hist_edges, rtol=1e-12, atol=1e-12)
    for a, b in zip(r1.per_layer, r2.per_layer):
        assert (a["name"], a["kind"], a["size"]) == (b["name"], b["kind"], b["size"])
        for k in _STATS:
            tol = 1e-6 if k == "pagerank_mean" else 1e-12
            assert a[k] == pytest.approx(b[k], rel=tol, abs=tol), (a["layer"], k)
        np.testing.assert_array_equal(a["strength_hist"], b["strength_hist"])
    np.testing.assert_allclose(r1.fluctuation, r2.fluctuation, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,x", [(lambda: _mlp([5, 8, 7, 3]), torch.randn(2, 5)), (_cnn, torch.randn(2, 3, 6, 6)),
                                    (_Res, torch.randn(2, 5))])
def test_permutation_invariance_with_negative_control(make, x):
    model = make()
    spec = ws.permutation_spec(model, x)
    perms = ws.random_permutation(spec, seed=7)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    model_p = ws.permute(model, spec, perms)
    r = analysis.network_metrics(model, x)
    rp = analysis.network_metrics(model_p, x)
    _assert_rows_close(r, rp)
    # node level: the permuted graph's node n is node m[n] of the original graph
    mperm = ws.NeuralGraph.from_model(model, x).node_permutation(spec, perms).numpy()
    np.testing.assert_allclose(rp.strength, r.strength[mperm], atol=1e-12)
    np.testing.assert_array_equal(rp.in_degree, r.in_degree[mperm])
    # negative control: change one hidden weight
    bad = copy.deepcopy(model_p)
    w = next(p for n, p in bad.named_parameters() if n.endswith("weight") and p.dim() >= 2)
    with torch.no_grad():
        w.view(-1)[1] += 0.75
    rb = analysis.network_metrics(bad, x)
    with pytest.raises(AssertionError):
        _assert_rows_close(r, rb)


def test_betweenness_on_chain_and_size_guard():
    m = _fill(_mlp([1, 1, 1]), lambda n, p: torch.full_like(p, 2.0))
    r = analysis.network_metrics(m, torch.zeros(1, 1), centralities=("betweenness",))
    # directed chain 0 -> 1 -> 2: only pair (0, 2) routes through node 1; normalised by (n-1)(n-2) = 2
    np.testing.assert_allclose(r.centralities["betweenness"], [0.0, 0.5, 0.0])
    assert r.per_layer[1]["betweenness_mean"] == 0.5
    big = _mlp([20, 30, 30, 10])
    with pytest.raises(ValueError, match="betweenness_k"):
        analysis.network_metrics(big, torch.zeros(1, 20), centralities=("betweenness",), betweenness_max_work=1e3)
    ok = analysis.network_metrics(big, torch.zeros(1, 20), centralities=("betweenness",), betweenness_k=5,
                                  betweenness_max_work=1e4, seed=0)
    assert ok.centralities["betweenness"].shape == (90,) and ok.settings["betweenness_k"] == 5


def test_pagerank_and_eigenvector_are_distributions_and_table():
    model = _mlp([4, 6, 3])
    r = analysis.network_metrics(model, torch.zeros(1, 4), centralities=("pagerank", "eigenvector"), bins=5)
    assert r.centralities["pagerank"].sum() == pytest.approx(1.0, abs=1e-8)
    assert np.all(r.centralities["eigenvector"] >= -1e-12)
    t = r.layer_table()
    assert t["size"] == [4, 6, 3] and t["kind"] == ["input", "linear", "output"] and len(t["strength_hist"][0]) == 5
    np.testing.assert_array_equal(r.degree_distribution("in"), np.bincount([0] * 4 + [4] * 6 + [6] * 3))
    assert sum(sum(h) for h in t["strength_hist"]) == 13  # every node falls in the global-range bins


def test_bad_inputs_are_rejected():
    model = _mlp([3, 4, 2])
    with pytest.raises(ValueError, match="example_inputs"):
        analysis.network_metrics(model)
    with pytest.raises(TypeError, match="nn.Module or a weightspace.NeuralGraph"):
        analysis.network_metrics({"w": torch.ones(2, 2)}, torch.zeros(1, 2))
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="weight must be one of"):
        analysis.network_metrics(model, x, weight="max")
    with pytest.raises(ValueError, match="unknown centralities"):
        analysis.network_metrics(model, x, centralities=("katz",))
    with pytest.raises(ValueError, match="boundary"):
        analysis.network_metrics(model, x, boundary="one")
    with pytest.raises(ValueError, match="bins"):
        analysis.network_metrics(model, x, bins=[1.0, 0.0])
    nan = _fill(copy.deepcopy(model), lambda n, p: torch.full_like(p, float("nan")) if n == "2.weight" else p)
    with pytest.raises(ValueError, match="NaN"):
        analysis.network_metrics(nan, x)


def test_model_is_not_modified():
    model = _cnn(seed=5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analysis.network_metrics(model, torch.randn(2, 3, 6, 6), centralities=("degree", "pagerank"))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
