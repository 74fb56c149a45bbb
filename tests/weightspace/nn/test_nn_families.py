"""NFN (NP/HNP), DWSNet and NFT processors: equivariance with a random permutation per network,
negative controls, the NP io-embedding breaking exactly the surplus symmetry, scope errors."""

import pytest
import torch

import weightspace as ws
from weightspace import nn as wsnn

from nn_models import batch_of
from test_nn_span import np_spec, mlp_spec
from test_nn_unf import check_equivariant


@pytest.mark.parametrize("name", ["mlp", "cnn_gap"])
@pytest.mark.parametrize("variant", ["NP", "HNP"])
def test_nfn_processors(name, variant):
    if name == "cnn_gap":
        from weightspace import zoo

        torch.manual_seed(0)
        m = zoo.VGG(cfg=(3, 2), image_size=4, num_classes=3, head="gap", batch_norm=False, seed=0)
        spec = ws.permutation_spec(m, zoo.example_inputs(m))
        sds = []
        for i in range(3):
            mi = zoo.VGG(cfg=(3, 2), image_size=4, num_classes=3, head="gap", batch_norm=False, seed=i)
            sds.append(mi.state_dict())
        batch = wsnn.WeightSpaceBatch.from_state_dicts(sds, spec, dtype=torch.float64)
    else:
        batch, spec, _ = batch_of("mlp", n=3)
    torch.manual_seed(0)
    inv = wsnn.NFN(spec, hidden_channels=3, num_layers=2, out_features=2, variant=variant).double()
    assert inv(batch).shape == (3, 2)
    check_equivariant(inv, batch, spec, invariant=True)
    eq = wsnn.NFN(spec, hidden_channels=3, num_layers=2, out_features=None, variant=variant).double()
    check_equivariant(eq, batch, spec, invariant=False)


def test_nfn_np_layer_is_np_equivariant_and_io_embed_breaks_only_the_surplus():
    spec = mlp_spec((3, 4, 5, 2))
    nps = np_spec((3, 4, 5, 2))
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(3, *nps.shapes[k], 1, generator=g, dtype=torch.float64) for k in wsnn.default_keys(nps)}
    b_np = wsnn.WeightSpaceBatch(nps, tensors)  # NP group acting on the same keys
    b_hnp = wsnn.WeightSpaceBatch(spec, tensors)
    perms = [ws.random_permutation(nps, seed=s) for s in range(3)]
    torch.manual_seed(0)
    layer = wsnn.NFNLayer(spec, 1, 2, variant="NP").double()
    y = layer(b_hnp)
    y_p = layer(b_hnp.with_tensors(b_np.permute(perms).tensors))
    want = b_np.with_tensors(y.tensors).permute(perms)
    assert max((y_p.tensors[k] - want.tensors[k]).abs().max().item() for k in y.keys) < 1e-10  # NP-equivariant
    hnp_layer = wsnn.NFNLayer(spec, 1, 2, variant="HNP").double()
    y = hnp_layer(b_hnp)
    y_p = hnp_layer(b_hnp.with_tensors(b_np.permute(perms).tensors))
    want = b_np.with_tensors(y.tensors).permute(perms)
    assert max((y_p.tensors[k] - want.tensors[k]).abs().max().item() for k in y.keys) > 1e-6  # HNP is not
    # with io_embed the NP processor distinguishes input neurons: not invariant to input permutations
    net = wsnn.NFN(spec, 4, 2, out_features=1, variant="NP", io_embed=True).double()
    no = wsnn.NFN(spec, 4, 2, out_features=1, variant="NP", io_embed=False).double()
    moved = b_hnp.with_tensors(b_np.permute(perms).tensors)
    assert (no(moved) - no(b_hnp)).abs().max() < 1e-10
    assert (net(moved) - net(b_hnp)).abs().max() > 1e-6
    check_equivariant(net, b_hnp, spec, invariant=True)  # HNP still holds


def test_dwsnet_processor():
    batch, spec, _ = batch_of("mlp", n=3)
    torch.manual_seed(0)
    check_equivariant(wsnn.DWSNet(spec, 3, 2, out_features=2).double(), batch, spec, invariant=True)
    check_equivariant(wsnn.DWSNet(spec, 3, 2, out_features=None).double(), batch, spec, invariant=False)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "vit"])
def test_nft_processor_on_every_architecture(name):
    batch, spec, _ = batch_of(name, n=3)
    torch.manual_seed(0)
    inv = wsnn.NFT(spec, hidden_channels=4, num_layers=1, out_features=2, heads=2).double()
    # the attention's output projections start at zero (identity blocks); draw them so attention matters
    with torch.no_grad():
        for n, p in inv.named_parameters():
            if "out" in n:
                p.normal_()
    check_equivariant(inv, batch, spec, invariant=True)
    eq = wsnn.NFT(spec, hidden_channels=4, num_layers=1, out_features=None, heads=2).double()
    with torch.no_grad():
        for n, p in eq.named_parameters():
            if "out" in n:
                p.normal_()
    check_equivariant(eq, batch, spec, invariant=False)


def test_nft_attention_alone_is_equivariant_with_negative_control():
    batch, spec, _ = batch_of("mlp", n=2)
    layout = wsnn.SpaceLayout(spec, batch.keys)
    attn = wsnn.EquivariantAttention(layout, 1, heads=1).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()

    class Wrap(torch.nn.Module):
        def forward(self, b):
            return b.with_tensors(layout.assemble(attn(layout.extract(b.tensors))))

    check_equivariant(Wrap(), batch, spec, invariant=False)


def test_scope_errors_name_the_feature():
    _, vit, _ = batch_of("vit", n=1)
    with pytest.raises(wsnn.UnsupportedSpecError, match="NFN: 'cls_token'.*neither a weight nor a bias.*UNF"):
        wsnn.NFN(vit)
    with pytest.raises(wsnn.UnsupportedSpecError, match="in_proj_weight' axis 0 is concatenated"):
        wsnn.NFN(vit, keys=[k for k in wsnn.default_keys(vit) if "in_proj_weight" in k])
    _, res, _ = batch_of("resnet", n=1)
    with pytest.raises(wsnn.UnsupportedSpecError, match="'blocks.0.1.weight'.*normalisation"):
        wsnn.NFNLayer(res, 1, 1)

    class ResMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(h + torch.relu(self.b(h)))

    with pytest.raises(wsnn.UnsupportedSpecError, match="group .a. acts on 6 axes.*residual"):
        wsnn.NFNLayer(ws.permutation_spec(ResMLP(), torch.randn(2, 3)), 1, 1)
    _, cnn, _ = batch_of("cnn", n=1)  # flatten + BatchNorm
    with pytest.raises(wsnn.UnsupportedSpecError, match="NFN.*UNF"):
        wsnn.NFN(cnn)
    with pytest.raises(wsnn.UnsupportedSpecError, match="conv kernel"):
        wsnn.DWSNet(
            ws.permutation_spec(
                torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 1, 3)),
                torch.randn(1, 1, 5, 5),
            )
        )
    _, mlp, _ = batch_of("mlp", n=1)
    with pytest.raises(wsnn.UnsupportedSpecError, match="'NP' or 'HNP'"):
        wsnn.NFN(mlp, variant="hnp")
    with pytest.raises(wsnn.UnsupportedSpecError, match="io_embed"):
        wsnn.UNF(mlp, io_embed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["NFN", "DWSNet", "NFT", "StatNN", "FlatMLP"])
def test_families_cuda_match_cpu(family):
    batch, spec, _ = batch_of("mlp", n=3)
    torch.manual_seed(0)
    kw = {"heads": 2} if family == "NFT" else {}
    net = getattr(wsnn, family)(spec, 4, 2, out_features=2, **kw).double().eval()
    y = net(batch)
    y_gpu = net.cuda()(batch.to("cuda"))
    assert y_gpu.device.type == "cuda" and torch.allclose(y_gpu.cpu(), y, atol=1e-9)
    if family != "StatNN":
        eq = getattr(wsnn, family)(spec, 4, 2, out_features=None, **kw).double()
        out = eq(batch)
        out_gpu = eq.cuda()(batch.to("cuda"))
        assert all(torch.allclose(out_gpu.tensors[k].cpu(), out.tensors[k], atol=1e-9) for k in out.keys)


def test_dense_unf_is_nfn_hnp_on_chain_specs_and_permuted_unf_is_not():
    # documented in weightspace.nn._nfn: on NFN's architectures UNF(fixed_axes="dense") and NFN-HNP are
    # one model (same basis, parameters and initialisation); UNF's paper default (kernels permuted) differs
    from weightspace import zoo

    m = zoo.DigitsCNN(4, 2, seed=0)
    spec = ws.permutation_spec(m, m.example_input())
    b = wsnn.WeightSpaceBatch.from_state_dicts([zoo.DigitsCNN(4, 2, seed=s).state_dict() for s in range(3)], spec)
    kw = dict(hidden_channels=4, num_layers=2, out_features=1)
    torch.manual_seed(0)
    hnp = wsnn.NFN(spec, variant="HNP", **kw)
    torch.manual_seed(0)
    dense = wsnn.UNF(spec, fixed_axes="dense", **kw)
    torch.manual_seed(0)
    permuted = wsnn.UNF(spec, fixed_axes="permuted", **kw)
    assert torch.equal(hnp(b), dense(b))
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(permuted) < n(dense) and not torch.allclose(permuted(b), dense(b))
