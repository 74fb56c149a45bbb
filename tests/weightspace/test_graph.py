"""NeuralGraph: exact round trips, golden counts, and permutation = node relabelling (with a
negative control)."""
import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import weightspace as ws
from weightspace import zoo

from test_symmetry import CNN, MHANet, MLP, ResNet, SeparateQKV, _randomize_norms


def _relabelled_equal(model, x, seed=5):
    g = ws.NeuralGraph.from_model(model, x)
    spec = ws.permutation_spec(model, x)
    perms = ws.random_permutation(spec, seed=seed)
    gp = ws.NeuralGraph.from_model(ws.permute(model, spec, perms), x)
    m = g.node_permutation(spec, perms)
    G, Gp = g.to_networkx(), gp.to_networkx()
    same = nx.utils.graphs_equal(G, nx.relabel_nodes(Gp, {n: int(m[n]) for n in Gp.nodes}))
    identity_same = nx.utils.graphs_equal(G, Gp)
    return g, same, identity_same, m


def _round_trip(model, g):
    sd, ref = g.to_state_dict(), model.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.dw, self.g2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 12, 1, groups=2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = F.silu(self.dw(F.gelu(self.gn(self.c1(x)))))
        return self.fc(torch.sigmoid(self.g2(h)).mean((2, 3)))


class CatEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(11, 6), nn.Parameter(torch.randn(5, 6))
        self.fa, self.fb, self.out = nn.Linear(6, 4), nn.Linear(6, 3), nn.Linear(7, 2)

    def forward(self, ids):
        e = self.emb(ids) + self.pos
        return self.out(torch.cat([torch.tanh(self.fa(e)), F.relu(self.fb(e))], -1).mean(1))


CASES = {
    "mlp": (lambda: MLP(), lambda: torch.randn(2, 5)),
    "cnn_flatten_bn": (lambda: _randomize_norms(CNN()), lambda: torch.randn(2, 1, 8, 8)),
    "resnet_bn": (lambda: _randomize_norms(ResNet("bn")), lambda: torch.randn(2, 1, 8, 8)),
    "resnet_ln": (lambda: _randomize_norms(ResNet("ln")), lambda: torch.randn(2, 1, 8, 8)),
    "mha": (lambda: _randomize_norms(MHANet()), lambda: torch.randn(2, 7, 5)),
    "separate_qkv": (lambda: _randomize_norms(SeparateQKV()), lambda: torch.randn(2, 5, 4)),
    "grouped": (lambda: _randomize_norms(GroupedNet()), lambda: torch.randn(2, 2, 6, 6)),
    "cat_embed": (lambda: CatEmbed(), lambda: torch.randint(0, 11, (3, 5))),
    "zoo_vit": (lambda: zoo.make("vit"), None),
    "zoo_resnet20": (lambda: zoo.make("resnet20", norm="batch"), None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_and_permutation_relabels_nodes(name):
    torch.manual_seed(0)
    make_model, make_x = CASES[name]
    model = make_model()
    x = make_x() if make_x else zoo.example_inputs(model)
    g, same, identity_same, m = _relabelled_equal(model, x)
    _round_trip(model, g)
    assert same, "the permuted model's graph is not this graph relabelled by node_permutation"
    assert not identity_same, "negative control: without the relabelling the graphs must differ"
    assert sorted(m.tolist()) == list(range(g.num_nodes))


def test_golden_counts_linear_ln_linear():
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.LayerNorm(3), nn.Linear(3, 1))
    g = ws.NeuralGraph.from_model(net, torch.randn(4, 2))
    # nodes: 2 inputs, 3 hidden, 3 normalised, 1 output; edges: W1 (6), gamma (3), W2 (3)
    assert g.num_nodes == 9 and g.num_edges == 12
    assert [l.kind for l in g.layers] == ["input", "linear", "norm", "output"]
    G = g.to_networkx()
    assert nx.is_directed_acyclic_graph(G) and nx.is_weakly_connected(G)
    # every parameter entry is stored once: 6 + 3 + 3 edge values, 3 + 1 node biases
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 6 + 3 + 3 + 3 + 1
    assert G.edges[0, 2]["value"] == pytest.approx(net[0].weight[0, 0].item())
    assert G.nodes[8]["bias"] == pytest.approx(net[3].bias[0].item())
    assert G.nodes[5]["bias"] == pytest.approx(net[2].bias[0].item())
    assert G.nodes[3]["activation"] == "relu"


def test_conv_kernels_are_edge_vectors_and_flatten_blocks():
    torch.manual_seed(0)
    m = _randomize_norms(CNN())
    g = ws.NeuralGraph.from_model(m, torch.randn(2, 1, 8, 8))
    G = g.to_networkx()
    conv_edges = [(s, d) for s, d, t in G.edges(data="type") if t == "conv"]
    assert len(conv_edges) == 1 * 8 + 8 * 6
    s, d = conv_edges[0]
    assert G.edges[s, d]["value"] == pytest.approx(tuple(m.c1.weight[0, 0].flatten().tolist()))
    # the Linear after the flatten: one edge per (channel, output) carrying the 4x4 block
    lin = [(s, d, v) for s, d, v in G.edges(data="value") if G.edges[s, d]["type"] == "linear"]
    assert len(lin) == 6 * 10 and len(lin[0][2]) == 16
    t = g.to_tensors()
    assert t.edge_attr.shape == (g.num_edges, 16) and t.x.shape[0] == g.num_nodes
    # BN running statistics are node features of the normalised layer
    assert "running_mean" in t.node_feature_names and "running_var" in t.node_feature_names


def test_residual_and_attention_are_represented():
    torch.manual_seed(0)
    g = ws.NeuralGraph.from_model(_randomize_norms(ResNet()), torch.randn(2, 1, 8, 8))
    kinds = [l.kind for l in g.layers]
    assert kinds.count("sum") == 3  # one per residual addition
    assert "residual" in {t for _, _, t in g.to_networkx().edges(data="type")}
    ga = ws.NeuralGraph.from_model(_randomize_norms(MHANet()), torch.randn(2, 7, 5))
    G = ga.to_networkx()
    att = [(s, d) for s, d, t in G.edges(data="type") if t == "attention"]
    # 4 heads of 4 query dims x 4 value dims each: heads are encoded
    assert len(att) == 4 * 4 * 4
    q_layer = next(i for i, l in enumerate(ga.layers) if l.kind == "query")
    heads_of = {G.nodes[s]["layer"] for s, _ in att}
    assert heads_of == {q_layer}


def test_batched_tensor_form():
    torch.manual_seed(0)
    g1 = ws.NeuralGraph.from_model(MLP(), torch.randn(2, 5))
    g2 = ws.NeuralGraph.from_model(_randomize_norms(CNN()), torch.randn(2, 1, 8, 8))
    b = ws.NeuralGraph.batch([g1, g2, g1])
    assert b.num_graphs == 3
    assert b.x.shape[0] == 2 * g1.num_nodes + g2.num_nodes
    assert b.batch.bincount().tolist() == [g1.num_nodes, g2.num_nodes, g1.num_nodes]
    # edges of graph 2 point into graph 2's node range
    e0 = g1.num_edges
    sub = b.edge_index[:, e0:e0 + g2.num_edges]
    assert int(sub.min()) >= g1.num_nodes and int(sub.max()) < g1.num_nodes + g2.num_nodes
    assert torch.equal(b.edge_attr[e0:e0 + g2.num_edges, : g2.edge_attr.shape[1]], g2.edge_attr)
    # feature columns align by name across graphs
    col = b.node_feature_names.index("bias")
    assert torch.equal(b.x[: g1.num_nodes, col], g1.x[:, g1.node_feature_names.index("bias")])


def test_edits_in_the_graph_reach_the_state_dict():
    torch.manual_seed(0)
    net = MLP()
    g = ws.NeuralGraph.from_model(net, torch.randn(2, 5))
    g.edge_attr[0, 0] = 123.0
    sd = g.to_state_dict()
    assert sd["net.0.weight"][0, 0].item() == 123.0


def test_bert_graph_from_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
                                  intermediate_size=16, max_position_embeddings=10)
    torch.manual_seed(0)
    m = transformers.BertModel(cfg)
    x = {"input_ids": torch.randint(0, 30, (2, 6))}
    g, same, identity_same, _ = _relabelled_equal(m, x)
    _round_trip(m, g)
    assert same and not identity_same
    assert [l.kind for l in g.layers].count("attention") == 1


def test_unsupported_operations_fail_clearly_or_are_kept_verbatim():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), -1))

    with pytest.raises(ws.graph.GraphError, match="cumsum"):
        ws.NeuralGraph.from_model(Odd(), torch.randn(2, 3))


def test_gpt2_conv1d_and_grouped_query_attention_graphs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=4, n_positions=12, bos_token_id=0,
                                  eos_token_id=0)
    gpt = transformers.GPT2Model(cfg)
    x = {"input_ids": torch.randint(0, 30, (2, 6))}
    g, same, identity_same, _ = _relabelled_equal(gpt, x)
    _round_trip(gpt, g)
    assert same and not identity_same

    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.q, self.k = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 4)
            self.v, self.o, self.out = nn.Linear(8, 4), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            b, s, _ = h.shape
            q = self.q(h).view(b, s, 4, 2).transpose(1, 2)
            k, v = (t(h).view(b, s, 2, 2).transpose(1, 2) for t in (self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(b, s, 8)
            return self.out(h + self.o(y)).sum(1)

    g, same, identity_same, _ = _relabelled_equal(GQA(), torch.randn(2, 5, 3))
    assert same and not identity_same
    G = g.to_networkx()
    qk = [(s, d) for s, d, t in G.edges(data="type") if t == "qk"]
    assert len(qk) == 8 and len({d for _, d in qk}) == 4  # two query heads share each key head
