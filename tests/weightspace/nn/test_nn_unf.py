"""UNF processors on every architecture the tracer describes: equivariance with one random
permutation per network, invariance of the readout, negative controls, training, errors."""

import pytest
import torch

import weightspace as ws
from weightspace import Axis, PermutationSpec
from weightspace import nn as wsnn

from nn_models import batch_of, move_one, permuted_key

ARCHS = ["mlp", "cnn", "resnet", "vit"]


def max_diff(a, b):
    if isinstance(a, wsnn.WeightSpaceBatch):
        return max((a.tensors[k] - b.tensors[k]).abs().max().item() for k in a.keys)
    return (a - b).abs().max().item()


def check_equivariant(model, batch, spec, invariant, seed=0):
    perms = [ws.random_permutation(spec, seed=seed + i) for i in range(batch.batch_size)]
    out = model(batch)
    out_p = model(batch.permute(perms))
    want = out if invariant else out.permute(perms)
    scale = max(max_diff(out, out.map(torch.zeros_like) if not invariant else torch.zeros_like(out)), 1e-12)
    assert max_diff(out_p, want) <= 1e-9 * scale + 1e-12
    # negative control: one tensor moved without its coupled partners changes the result
    key = permuted_key(spec, batch.keys)
    moved = model(move_one(batch, key, perms[0] if False else ws.random_permutation(spec, seed=seed + 99)))
    assert max_diff(moved, out) > 1e-6 * scale, f"moving {key} alone left the output unchanged"
    return out


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("fixed_axes", ["dense", "permuted"])
def test_unf_invariant_and_equivariant_on_every_architecture(name, fixed_axes):
    batch, spec, _ = batch_of(name, n=3)
    torch.manual_seed(0)
    inv = wsnn.UNF(spec, hidden_channels=3, num_layers=2, out_features=2, fixed_axes=fixed_axes).double()
    y = check_equivariant(inv, batch, spec, invariant=True)
    assert y.shape == (3, 2)
    eq = wsnn.UNF(spec, hidden_channels=3, num_layers=2, out_features=None, fixed_axes=fixed_axes).double()
    out = check_equivariant(eq, batch, spec, invariant=False)
    assert isinstance(out, wsnn.WeightSpaceBatch) and out.num_channels == 1
    sds = out.to_state_dicts()
    assert sds[0].keys() == batch.to_state_dicts()[0].keys()


def test_unf_layer_channels_and_bottleneck():
    batch, spec, _ = batch_of("mlp", n=2)
    lift = batch.map(lambda t: torch.cat([t, t**2], -1))
    layer = wsnn.UNFLayer(spec, 2, 5, bottleneck=3).double()
    check_equivariant(layer, lift, spec, invariant=False)
    assert layer(lift).num_channels == 5


def test_unf_residual_output_is_the_identity_at_init():
    batch, spec, sds = batch_of("cnn", n=2, dtype=None)
    torch.manual_seed(0)
    net = wsnn.UNF(spec, 3, 2, out_features=None, residual=True)
    back = net(batch).to_state_dicts()
    for sd, b in zip(sds, back):
        assert all(torch.equal(sd[k], b[k]) for k in sd)
    with pytest.raises(ValueError, match="residual"):
        wsnn.UNF(spec, 3, 2, out_features=1, residual=True)


def test_unf_trains_end_to_end():
    # target: an invariant function of the weights (sum of squared first-layer weights); the loss falls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared machine
    try:
        _train_once()
    finally:
        torch.set_num_threads(threads)


def _train_once():
    batch, spec, _ = batch_of("mlp", n=16)
    batch = batch.to(torch.float32)
    target = batch.tensors["fc.0.weight"].pow(2).sum(dim=(1, 2, 3)).unsqueeze(1)
    torch.manual_seed(0)
    net = wsnn.UNF(spec, hidden_channels=8, num_layers=2, out_features=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(net(batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]  # about 0.02 after 20 Adam steps


def test_unf_errors():
    batch, spec, _ = batch_of("mlp", n=2)
    net = wsnn.UNF(spec, 4, 1)
    with pytest.raises(wsnn.BatchError, match="WeightSpaceBatch"):
        net(torch.zeros(2, 10))
    other, _, _ = batch_of("cnn", n=2)
    with pytest.raises(wsnn.BatchError, match="other keys"):
        net(other)
    with pytest.raises(wsnn.BatchError, match=r"float32 parameters but the batch holds torch.float64.*batch.to"):
        net(batch)
    batch = batch.to(torch.float32)
    with pytest.raises(wsnn.BatchError, match="input channels"):
        net(batch.map(lambda t: torch.cat([t, t], -1)))
    with pytest.raises(wsnn.UnsupportedSpecError, match="fixed_axes"):
        wsnn.UNFLayer(spec, 1, 1, fixed_axes="np")
    a, b = Axis.group("a", 2), Axis.group("b", 2)
    weird = PermutationSpec({"a": 2, "b": 2}, {"w": (Axis.product(Axis.concat(a, b), Axis.fixed(2)),)}, {"w": (8,)})
    with pytest.raises(wsnn.UnsupportedSpecError, match="concatenated factor"):
        wsnn.UNFLayer(weird, 1, 1)


@pytest.mark.gpu
def test_unf_cuda_matches_cpu():
    batch, spec, _ = batch_of("vit", n=2)
    net = wsnn.UNF(spec, 3, 2, out_features=2).double()
    y = net(batch)
    y_gpu = net.cuda()(batch.to("cuda"))
    assert y_gpu.device.type == "cuda" and torch.allclose(y_gpu.cpu(), y, atol=1e-10)


def test_unf_on_a_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=6,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    spec = ws.permutation_spec(model, {"input_ids": torch.randint(0, 20, (2, 5))})
    assert any(l is not None and l.kind == "product" for v in spec.axes.values() for l in v)  # (heads x head_dim)
    sds = [transformers.BertModel(cfg).state_dict() for _ in range(2)]
    batch = wsnn.WeightSpaceBatch.from_state_dicts(sds, spec, dtype=torch.float64)
    batch = batch.map(lambda t: 30 * t + torch.randn(t.shape, dtype=t.dtype))  # BERT's init is tiny (std 0.02)
    net = wsnn.UNF(spec, 2, 1, out_features=1, fixed_axes="permuted").double()
    check_equivariant(net, batch, spec, invariant=True)
