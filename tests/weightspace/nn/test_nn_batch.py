"""WeightSpaceBatch: exact round trips, the group action agrees with ws.permute, clear errors."""

import pytest
import torch

import weightspace as ws
from weightspace import nn as wsnn

from nn_models import batch_of, make, randomize


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "vit"])
def test_round_trip_is_exact_and_keeps_buffers_aside(name):
    batch, spec, sds = batch_of(name, n=3, dtype=None)
    back = batch.to_state_dicts()
    assert len(back) == 3
    for sd, bk in zip(sds, back):
        assert list(bk) == list(sd)
        for k in sd:
            assert bk[k].dtype == sd[k].dtype and torch.equal(bk[k], sd[k]), k
    if name in ("cnn", "resnet"):  # BatchNorm statistics are kept aside, the counter too
        assert any(k.endswith("running_var") for k in batch.aside[0]) and not any(
            k.endswith("running_var") for k in batch.keys
        )


def test_round_trip_mixed_dtypes_and_buffers_processed():
    model, x = make("cnn")
    spec = ws.permutation_spec(model, x)
    sd = {k: (v.to(torch.float16) if k.endswith("bias") else v) for k, v in randomize(model, 1).state_dict().items()}
    b = wsnn.WeightSpaceBatch.from_state_dicts([sd, sd], spec, buffers=True)
    assert any(k.endswith("running_mean") for k in b.keys) and not any(
        k.endswith("num_batches_tracked") for k in b.keys
    )
    assert b.dtype == torch.float32
    for k, v in b.to_state_dicts()[1].items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k])


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "vit"])
def test_batch_permute_equals_ws_permute_per_network(name):
    batch, spec, sds = batch_of(name, n=3, dtype=None)
    perms = [ws.random_permutation(spec, seed=s) for s in (1, 2, 3)]
    got = batch.permute(perms).to_state_dicts()
    for sd, p, g in zip(sds, perms, got):
        want = ws.permute(sd, spec, p)
        for k in sd:
            assert torch.equal(g[k], want[k]), k  # aside buffers (running stats) move too
    # negative control: the identity leaves it, a real permutation changes it
    assert not all(torch.equal(got[0][k], sds[0][k]) for k in sds[0])


def test_permuted_networks_compute_the_same_function():
    batch, spec, _ = batch_of("vit", n=2, dtype=None)
    model, x = make("vit")
    perms = [ws.random_permutation(spec, seed=s) for s in (5, 6)]
    for sd, sdp in zip(batch.to_state_dicts(), batch.permute(perms).to_state_dicts()):
        model.load_state_dict(sd)
        y = model.eval()(x)
        model.load_state_dict(sdp)
        assert torch.allclose(model(x), y, atol=1e-5)


def test_select_cat_flatten_and_channels():
    batch, spec, sds = batch_of("mlp", n=4)
    assert batch.flatten().shape == (4, sum(v.numel() for v in sds[0].values()))
    two = wsnn.WeightSpaceBatch.cat([batch.select([2, 0]), batch.select(slice(1, 2))])
    assert torch.equal(two.flatten(), batch.flatten()[[2, 0, 1]])
    multi = batch.map(lambda t: torch.cat([t, 2 * t], -1))
    with pytest.raises(wsnn.BatchError, match="channel="):
        multi.to_state_dicts()
    assert torch.equal(multi.to_state_dicts(channel=1)[3]["head.bias"], 2 * sds[3]["head.bias"].double())


def test_bad_inputs_have_clear_errors():
    batch, spec, sds = batch_of("mlp", n=2, dtype=None)
    with pytest.raises(wsnn.BatchError, match="empty batch"):
        wsnn.WeightSpaceBatch.from_state_dicts([], spec)
    bad = dict(sds[0])
    bad["fc.0.weight"] = torch.zeros(7, 4)
    with pytest.raises(wsnn.BatchError, match=r"'fc.0.weight' has shape \(7, 4\).*\(5, 4\)"):
        wsnn.WeightSpaceBatch.from_state_dicts([bad], spec)
    other = make("cnn")[0].state_dict()
    with pytest.raises(wsnn.BatchError, match="another architecture"):
        wsnn.WeightSpaceBatch.from_state_dicts([other], spec)
    wide = zoo_mlp_wider()
    with pytest.raises(wsnn.BatchError, match="mixed architectures.*graph processors"):
        wsnn.WeightSpaceBatch.from_state_dicts([sds[0], wide], spec)
    with pytest.raises(wsnn.BatchError, match="sequence of state dicts"):
        wsnn.WeightSpaceBatch.from_state_dicts(sds[0], spec)


def zoo_mlp_wider():
    from weightspace import zoo

    return zoo.MLP(4, (6, 3), 2, seed=0).state_dict()
