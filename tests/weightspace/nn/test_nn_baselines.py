"""Baselines: StatNN features equal NumPy's statistics and are invariant; FlatMLP is not invariant."""

import numpy as np
import pytest
import torch

import weightspace as ws
from weightspace import nn as wsnn

from nn_models import batch_of


def test_stat_features_equal_numpy():
    batch, spec, sds = batch_of("cnn", n=2)
    feats = wsnn.StatFeatures(batch.keys)(batch)
    want = []
    for k in batch.keys:
        x = sds[1][k].double().numpy().ravel()
        want += [x.mean(), x.var()] + list(np.quantile(x, [0, 0.25, 0.5, 0.75, 1.0]))
    # features are ordered stat-major within a key: mean, var, q0..q100
    assert np.allclose(feats[1].numpy(), np.array(want), atol=1e-12)


def test_statnn_invariant_with_negative_control():
    batch, spec, _ = batch_of("resnet", n=3)
    torch.manual_seed(0)
    net = wsnn.StatNN(spec, hidden_channels=4, num_layers=2, out_features=2).double().eval()
    y = net(batch)
    perms = [ws.random_permutation(spec, seed=s) for s in range(3)]
    assert torch.allclose(net(batch.permute(perms)), y, atol=1e-12)
    # a change that is not a symmetry (swap one entry between two tensors) changes the output
    t = {k: v.clone() for k, v in batch.tensors.items()}
    a, b = batch.keys[0], batch.keys[-1]
    fa, fb = t[a].view(3, -1), t[b].view(3, -1)
    fa[:, 0], fb[:, 0] = fb[:, 0].clone() + 1.0, fa[:, 0].clone()
    assert (net(batch.with_tensors(t)) - y).abs().max() > 1e-6
    with pytest.raises(ValueError, match="invariant"):
        wsnn.StatNN(spec, out_features=None)


def test_flat_mlp_is_not_invariant_but_runs_both_ways():
    batch, spec, _ = batch_of("mlp", n=3)
    torch.manual_seed(0)
    net = wsnn.FlatMLP(spec, hidden_channels=2, num_layers=2, out_features=1).double()
    y = net(batch)
    assert y.shape == (3, 1)
    perms = [ws.random_permutation(spec, seed=s) for s in range(3)]
    assert (net(batch.permute(perms)) - y).abs().max() > 1e-6  # a baseline without the symmetry
    edit = wsnn.FlatMLP(spec, hidden_channels=2, num_layers=1, out_features=None).double()(batch)
    assert isinstance(edit, wsnn.WeightSpaceBatch) and len(edit.to_state_dicts()) == 3
