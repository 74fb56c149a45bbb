"""Graph processors (GraphProcessor, RelationalTransformer) on NeuralGraph batches.

Oracles: invariance / equivariance under random hidden permutations of real models (ws.permute, then
the graph is rebuilt), with negative controls (a processor that embeds hidden positions, and a
decoupled permutation that changes the network's function); batch independence in mixed-architecture
batches; the exact round trip from equivariant outputs back to state dicts, equal to ws.permute of
the unpermuted outputs.
"""

import pytest
import torch

import weightspace as ws
from weightspace import nn as wsnn
from weightspace.zoo import MLP, DigitsCNN

PROCESSORS = [wsnn.GraphProcessor, wsnn.RelationalTransformer]


def _models():
    return [DigitsCNN(8, 2, seed=0), DigitsCNN(4, 3, "tanh", seed=1), MLP(3, (5, 6), 2, seed=2)]


def _make(cls, out, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(out, hidden_channels=16, num_layers=2, **kw).double()


def _permuted(model, seed):
    x = model.example_input()
    spec = ws.permutation_spec(model, x)
    perms = ws.random_permutation(spec, seed=seed)
    return x, spec, perms, ws.permute(model, spec, perms)


@pytest.mark.parametrize("cls", PROCESSORS)
@pytest.mark.parametrize("mi", [0, 1, 2])
def test_invariant_output_unchanged_by_hidden_permutation(cls, mi):
    model = _models()[mi]
    x, spec, perms, model_p = _permuted(model, seed=3)
    g, gp = ws.NeuralGraph.from_model(model, x), ws.NeuralGraph.from_model(model_p, x)
    assert not torch.equal(g.edge_attr, gp.edge_attr)  # the permutation really moved weights
    p = _make(cls, 3)
    y, yp = p(ws.NeuralGraph.batch([g])), p(ws.NeuralGraph.batch([gp]))
    torch.testing.assert_close(yp, y, rtol=1e-10, atol=1e-10)
    # negative control 1: embedding hidden positions breaks the symmetry
    q = _make(cls, 3, positions="all")
    assert (q(ws.NeuralGraph.batch([g])) - q(ws.NeuralGraph.batch([gp]))).abs().max() > 1e-6


@pytest.mark.parametrize("cls", PROCESSORS)
def test_negative_control_decoupled_permutation_changes_output(cls):
    model = DigitsCNN(8, 2, seed=0)
    x = model.example_input()
    sd = dict(model.state_dict())
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    sd["convs.0.weight"], sd["convs.0.bias"] = (
        sd["convs.0.weight"][perm],
        sd["convs.0.bias"][perm],
    )  # rows only: not a symmetry
    bad = DigitsCNN(8, 2)
    bad.load_state_dict(sd)
    assert not torch.allclose(bad(x), model(x))
    p = _make(cls, 1)
    y = p(ws.NeuralGraph.batch([ws.NeuralGraph.from_model(model, x)]))
    yb = p(ws.NeuralGraph.batch([ws.NeuralGraph.from_model(bad, x)]))
    assert (y - yb).abs().max() > 1e-6


@pytest.mark.parametrize("cls", PROCESSORS)
@pytest.mark.parametrize("mi", [0, 2])
def test_equivariant_outputs_relabelled_and_back_to_permuted_state_dicts(cls, mi):
    model = _models()[mi]
    x, spec, perms, model_p = _permuted(model, seed=5)
    g, gp = ws.NeuralGraph.from_model(model, x), ws.NeuralGraph.from_model(model_p, x)
    m = g.node_permutation(spec, perms)
    assert not torch.equal(m, torch.arange(len(m)))
    p = _make(cls, None)
    o, op = p(ws.NeuralGraph.batch([g])), p(ws.NeuralGraph.batch([gp]))
    torch.testing.assert_close(op.nodes, o.nodes[m], rtol=1e-10, atol=1e-10)
    row = {(int(s), int(d)): i for i, (s, d) in enumerate(g.edge_index.t().tolist())}
    idx = torch.tensor([row[(int(m[s]), int(m[d]))] for s, d in gp.edge_index.t().tolist()])
    torch.testing.assert_close(op.edges, o.edges[idx], rtol=1e-10, atol=1e-10)
    # through the exact round trip: outputs on the permuted graph == ws.permute(outputs on the original)
    sd = wsnn.graph_outputs_to_state_dicts([g], o)[0]
    sdp = wsnn.graph_outputs_to_state_dicts([gp], op)[0]
    expect = ws.permute(sd, spec, perms)
    assert sd.keys() == sdp.keys()
    for k in sd:
        torch.testing.assert_close(sdp[k], expect[k], rtol=1e-6, atol=1e-6)
    assert any(not torch.allclose(sd[k], sdp[k]) for k in sd if sd[k].dim() > 1)  # the relabelling is not trivial


def test_round_trip_from_outputs_is_exact_and_residual_zero_is_identity():
    models = _models()
    graphs = [ws.NeuralGraph.from_model(m, m.example_input()) for m in models]
    b = ws.NeuralGraph.batch(graphs)
    col = b.node_feature_names.index("bias")
    out = wsnn.GraphOutput(b.x[:, col : col + 1], b.edge_attr, ("bias",))
    zero = wsnn.GraphOutput(torch.zeros_like(out.nodes), torch.zeros_like(b.edge_attr), ("bias",))
    for sds in (
        wsnn.graph_outputs_to_state_dicts(graphs, out),
        wsnn.graph_outputs_to_state_dicts(graphs, zero, residual=True),
    ):
        for m, sd in zip(models, sds):
            ref = m.state_dict()
            assert sd.keys() == ref.keys()
            assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(wsnn.GraphInputError, match="order they were batched"):
        wsnn.graph_outputs_to_state_dicts(graphs[:2], out)


@pytest.mark.parametrize("cls", PROCESSORS)
def test_mixed_architecture_batch_equals_each_graph_alone(cls):
    models = _models()
    graphs = [
        ws.NeuralGraph.from_model(m, m.example_input()) for m in models[:2]
    ]  # width 8 depth 2 relu; width 4 depth 3 tanh
    p = _make(cls, 2)
    both = p(ws.NeuralGraph.batch(graphs))
    for i, g in enumerate(graphs):
        torch.testing.assert_close(both[i : i + 1], p(ws.NeuralGraph.batch([g])), rtol=1e-10, atol=1e-10)
    q = _make(cls, None)
    o = q(ws.NeuralGraph.batch(graphs))
    o0 = q(ws.NeuralGraph.batch(graphs[:1]))
    torch.testing.assert_close(o.edges[: graphs[0].num_edges], o0.edges, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(both[0], both[1])


def test_graphs_from_states_equal_from_model():
    m = DigitsCNN(8, 2, seed=0)
    others = [DigitsCNN(8, 2, seed=s) for s in (1, 2)]
    x = m.example_input()
    gs = wsnn.graphs_from_states(m, x, [o.state_dict() for o in others])
    for o, g in zip(others, gs):
        ref = ws.NeuralGraph.from_model(o, x)
        assert (
            torch.equal(g.x, ref.x)
            and torch.equal(g.edge_attr, ref.edge_attr)
            and torch.equal(g.edge_index, ref.edge_index)
        )
    with pytest.raises(wsnn.GraphInputError, match="missing keys"):
        wsnn.graphs_from_states(m, x, [{"head.weight": torch.zeros(10, 8)}])


@pytest.mark.parametrize("cls", PROCESSORS)
def test_bad_input_errors(cls):
    m = DigitsCNN(8, 2, seed=0)
    g = ws.NeuralGraph.from_model(m, m.example_input())
    p = _make(cls, 1)
    with pytest.raises(wsnn.GraphInputError, match="NeuralGraph.batch"):
        p([g])
    with pytest.raises(ValueError, match="at least one graph"):
        ws.NeuralGraph.batch([])
    nb = MLP(3, (4,), 2, bias=False, seed=0)
    with pytest.raises(wsnn.GraphInputError, match="node_features="):
        p(ws.NeuralGraph.batch([ws.NeuralGraph.from_model(nb, nb.example_input())]))
    q = _make(cls, 1, node_features=())
    assert q(ws.NeuralGraph.batch([ws.NeuralGraph.from_model(nb, nb.example_input())])).shape == (1, 1)
    with pytest.raises(wsnn.GraphInputError, match="edge_dim>=9"):
        _make(cls, 1, edge_dim=1)(ws.NeuralGraph.batch([g]))
    with pytest.raises(wsnn.GraphInputError, match="max_depth"):
        _make(cls, 1, max_depth=2)(ws.NeuralGraph.batch([g]))
    bn = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    ).eval()
    gb = ws.NeuralGraph.from_model(bn, torch.randn(2, 3))
    with pytest.raises(wsnn.GraphInputError, match="not built for"):
        p(ws.NeuralGraph.batch([gb]))
    bad = ws.NeuralGraph.batch([g])
    bad.edge_attr[0, 0] = float("nan")
    with pytest.raises(wsnn.GraphInputError, match="non-finite"):
        p(bad)
    with pytest.raises(ValueError, match="positions"):
        cls(1, positions="hidden")


def test_gradients_reach_every_parameter():
    m = DigitsCNN(8, 2, seed=0)
    b = ws.NeuralGraph.batch([ws.NeuralGraph.from_model(m, m.example_input())] * 2)
    for cls in PROCESSORS:
        p = _make(cls, 1)
        p(b).sum().backward()
        missing = [n for n, t in p.named_parameters() if t.grad is None]
        assert not missing, missing


@pytest.mark.gpu
@pytest.mark.parametrize("cls", PROCESSORS)
def test_cuda_matches_cpu(cls):
    models = _models()[:2]
    b = ws.NeuralGraph.batch([ws.NeuralGraph.from_model(m, m.example_input()) for m in models])
    p = _make(cls, 2)
    ref = p(b)
    out = p.to("cuda")(b)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-8, atol=1e-8)
    q = _make(cls, None)
    o_ref = q(b)
    o = q.to("cuda")(b)
    torch.testing.assert_close(o.edges.cpu(), o_ref.edges, rtol=1e-8, atol=1e-8)
