"""Every linear layer family spans exactly the commutant of its group (numerical oracle: orbits of
the group on coordinate pairs), which equals the Bell-number count when the groups are large enough."""

import pytest
import torch
import torch.nn as nn

import weightspace as ws
from weightspace import Axis, PermutationSpec
from weightspace import nn as wsnn

from nn_commutant import coordinate_orbit_count, index_batch, layer_span, orbit_count


def mlp_spec(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    return ws.permutation_spec(net, torch.randn(2, sizes[0]))


def np_spec(sizes):
    """The NP group written out: the input and output neurons are permuted too."""
    L = len(sizes) - 1
    axes, shapes = {}, {}
    for i in range(L):
        out = "out" if i == L - 1 else f"h{i}"
        inp = "in" if i == 0 else f"h{i - 1}"
        m = 2 * i  # the keys of mlp_spec's nn.Sequential (Linear, ReLU, Linear, ...)
        axes[f"{m}.weight"], shapes[f"{m}.weight"] = (out, inp), (sizes[i + 1], sizes[i])
        axes[f"{m}.bias"], shapes[f"{m}.bias"] = (out,), (sizes[i + 1],)
    return PermutationSpec.from_axes_to_perm(axes, shapes)


def check_span(make_layer, spec, expected=None):
    """``make_layer(k)``: the layer with 1 input and k output channels, bias off."""
    keys = wsnn.default_keys(spec)
    plan = make_layer(1).plan
    terms = plan.num_terms()
    orbits = orbit_count(spec, keys)
    rank, defect = layer_span(make_layer, spec, keys, draws=orbits + 6)
    assert defect < 1e-10, "a layer map does not commute with the group"
    assert rank == orbits, f"span {rank} != commutant {orbits}"
    assert terms == plan.bell_count() == orbits
    if expected is not None:
        assert orbits == expected
    return orbits


@pytest.mark.parametrize("sizes,hnp,npc", [((3, 4, 5, 2), 142, 62)])
def test_unf_mlp_spans_hnp_and_np_commutants(sizes, hnp, npc):
    spec = mlp_spec(sizes)
    check_span(lambda k: wsnn.UNFLayer(spec, 1, k, bias=False), spec, hnp)  # HNP: the true symmetry
    nps = np_spec(sizes)
    check_span(lambda k: wsnn.UNFLayer(nps, 1, k, bias=False), nps, npc)  # NP, all axes permuted
    # "permuted" fixed axes on the HNP spec is the NP layer: it commutes with the NP group and spans its commutant
    make = lambda k: wsnn.UNFLayer(spec, 1, k, bias=False, fixed_axes="permuted")
    rank, defect = layer_span(make, nps, wsnn.default_keys(nps), draws=npc + 6)
    assert rank == make(1).plan.num_terms() == npc and defect < 1e-10


def test_unf_deeper_mlp_matches_published_counts():
    spec = mlp_spec((2, 3, 4, 3, 3))
    check_span(lambda k: wsnn.UNFLayer(spec, 1, k, bias=False), spec, 221)
    nps = np_spec((2, 3, 4, 3, 3))
    assert wsnn.UNFLayer(nps, 1, 1, bias=False).plan.num_terms() == orbit_count(nps, wsnn.default_keys(nps)) == 100


def test_unf_square_weight_has_bell4_terms():
    # W -> P W P^T (a recurrent/square weight) and a vector of the same group: Bell(4)+2 Bell(3)+Bell(2) = 36
    spec = PermutationSpec.from_axes_to_perm({"W": ("g", "g"), "v": ("g",)}, {"W": (4, 4), "v": (4,)})
    check_span(lambda k: wsnn.UNFLayer(spec, 1, k, bias=False), spec, 15 + 5 + 5 + 2)


def test_unf_structured_axes_span():
    # heads x head_dim product, a concat (q|k) and a flatten-like (c x ~3) with a dense part
    h, d = Axis.group("heads", 2), Axis.group("hd", 2)
    e = Axis.group("e", 2)
    spec = PermutationSpec(
        {"heads": 2, "hd": 2, "e": 2},
        {
            "qk": (Axis.concat(Axis.product(h, d), Axis.product(h, d)), e),
            "o": (e, Axis.product(h, d)),
            "fc": (None, Axis.product(e, Axis.fixed(3))),
        },
        {"qk": (8, 2), "o": (2, 4), "fc": (1, 6)},
    )
    check_span(lambda k: wsnn.UNFLayer(spec, 1, k, bias=False), spec)


def test_unf_conv_spec_span():
    # a kernel (dense kernel positions) and a flatten (channels x ~H*W) into a Linear
    net = nn.Sequential(nn.Conv2d(1, 3, (2, 1)), nn.ReLU(), nn.Flatten(), nn.Linear(6, 2))
    spec = ws.permutation_spec(net, torch.randn(2, 1, 3, 1))
    assert any(l is not None and not l.is_simple for v in spec.axes.values() for l in v), spec  # a flatten
    check_span(lambda k: wsnn.UNFLayer(spec, 1, k, bias=False), spec)


def test_bias_spans_invariant_vectors():
    # the affine part is constant on every orbit of output coordinates; their number = orbits on coordinates
    spec = mlp_spec((2, 3, 4, 2))
    keys = wsnn.default_keys(spec)
    layer = wsnn.UNFLayer(spec, 1, 1).double()
    assert layer.plan.num_bias_terms() == coordinate_orbit_count(spec, keys) == 9
    zero, D = index_batch(spec, keys)
    zero = zero.map(torch.zeros_like)
    vecs = []
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            out = layer(zero)
        assert torch.allclose(out.permute(ws.random_permutation(spec, 3)).flatten(), out.flatten())  # invariant
        vecs.append(out.flatten()[0])
    assert torch.linalg.matrix_rank(torch.stack(vecs)).item() == 9


@pytest.mark.parametrize("variant,expected", [("NP", 62), ("HNP", 142)])
def test_nfn_layer_spans_full_commutant(variant, expected):
    # the published HNP layer reaches 140/142 here; ours must reach all 142
    spec = mlp_spec((3, 4, 5, 2))
    make = lambda k: wsnn.NFNLayer(spec, 1, k, variant=variant, bias=False)
    if variant == "HNP":
        check_span(make, spec, expected)
    else:  # NP: the group permutes the I/O neurons too; its orbits are counted on the NP spec
        nps = np_spec((3, 4, 5, 2))
        rank, defect = layer_span(make, nps, wsnn.default_keys(nps), draws=expected + 6)  # NP generators
        assert rank == orbit_count(nps, wsnn.default_keys(nps)) == make(1).plan.num_terms() == expected
        assert defect < 1e-10


def test_dws_layer_spans_full_hnp_commutant():
    # published DWS: 139/142 on [3,4,5,2]
    spec = mlp_spec((3, 4, 5, 2))
    check_span(lambda k: wsnn.DWSLayer(spec, 1, k, bias=False), spec, 142)


def test_span_oracle_detects_a_missing_term():
    # negative control for the oracle: drop the terms of one signature and the rank falls by exactly their number
    spec = mlp_spec((3, 4, 5, 2))
    keys = wsnn.default_keys(spec)
    plan = wsnn.UNFLayer(spec, 1, 1, bias=False).plan
    s = plan.signatures[1]
    missing = plan.in_width(s) * plan.out_width(s)

    class Pruned(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.inner = wsnn.UNFLayer(spec, 1, k, bias=False)

        def forward(self, batch):
            with torch.no_grad():
                self.inner.thetas[1].zero_()
            return self.inner(batch)

    rank, defect = layer_span(lambda k: Pruned(k), spec, keys, draws=148)
    assert defect < 1e-10 and rank == 142 - missing < 142


def test_fixed_axis_modes_on_a_cnn():
    # "io" promotes only neuron axes (NFN's NP for CNNs: kernels folded into channels), "permuted" also kernels
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    spec = ws.permutation_spec(net, torch.randn(1, 2, 6, 6))
    keys = wsnn.default_keys(spec)
    F = {m: {p.key: p.F for p in wsnn.SpaceLayout(spec, keys, m).pieces} for m in ("dense", "io", "permuted")}
    assert F["dense"]["0.weight"] == 2 * 9 and F["dense"]["5.weight"] == 5 and F["dense"]["5.bias"] == 5
    assert F["io"]["0.weight"] == 9 and F["io"]["2.weight"] == 9 and F["io"]["5.weight"] == 1 and F["io"]["5.bias"] == 1
    assert set(F["permuted"].values()) == {1}
    io = wsnn.SpaceLayout(spec, keys, "io")
    assert io.groups["5:out"] == 5 and io.groups["0.weight:1"] == 2  # the output rows and bias share one group
