"""INR classification with the equivariant processors: the standardised invariant readout.

Oracles: with ``feature_norm=True`` the pooled features reaching the head are standardised over the
batch (mean 0, variance 1 per feature, BatchNorm's closed form) and the processor stays invariant to
a random permutation per network (negative control: a tensor moved without its coupled partners
changes the output); and an NFN-NP processor with it fits shared-initialisation, randomly permuted
digit INRs (training accuracy), which the unnormalised readout did not within the same budget.
"""

import pytest
import torch

import weightspace as ws
from weightspace import nn as wsnn
from weightspace import zoo

from nn_models import batch_of
from test_nn_unf import check_equivariant


@pytest.mark.parametrize("family", ["UNF", "NFN", "NFT"])
def test_feature_norm_standardises_the_pooled_features_and_keeps_invariance(family):
    batch, spec, _ = batch_of("mlp", n=5)
    torch.manual_seed(0)
    kw = dict(hidden_channels=4, num_layers=2, out_features=3, feature_norm=True)
    model = {"UNF": wsnn.UNF, "NFN": wsnn.NFN, "NFT": wsnn.NFT}[family](spec, **kw).double()
    feats = {}
    model.feature_norm.register_forward_hook(lambda m, i, o: feats.update(inp=i[0], out=o))
    for mode in (True, False):  # batch statistics in training, running statistics in eval
        model.train(mode)
        check_equivariant(model, batch, spec, invariant=True)
    model.train()
    model(batch)
    x, y = feats["inp"], feats["out"]
    want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + model.feature_norm.eps)
    torch.testing.assert_close(y, want)
    spread = x.var(0, unbiased=False) > 1e-3  # (features of units that ReLU switched off are constant)
    assert int(spread.sum()) >= 3
    assert float(y.detach()[:, spread].std(0, unbiased=False).min()) > 0.99  # unit spread between networks
    # without the option the head reads the raw pooled features and there is no normalisation module
    plain = {"UNF": wsnn.UNF, "NFN": wsnn.NFN, "NFT": wsnn.NFT}[family](spec, **{**kw, "feature_norm": False})
    assert isinstance(plain.feature_norm, torch.nn.Identity)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if not k.startswith("feature_norm.")}
    with pytest.raises(ValueError, match="feature_norm"):
        wsnn.UNF(spec, hidden_channels=2, num_layers=1, out_features=None, feature_norm=True)


@pytest.fixture(scope="module")
def shared_permuted_inrs():
    z = zoo.digits_inrs("shared_permuted", limit=40, steps=40, device="cpu", cache=False)
    tr = [i for i, s in enumerate(z.column("split")) if s == "train"]
    stats = wsnn.weight_statistics([z.states[i] for i in tr])
    states = wsnn.standardize_states(z.states, stats)
    spec = ws.permutation_spec(z.model(0), torch.zeros(3, 2))
    batch = wsnn.WeightSpaceBatch.from_state_dicts(states, spec)
    return batch, torch.tensor(z.column("label")), tr


def _train_accuracy(batch, y, tr, feature_norm):
    torch.manual_seed(0)
    model = wsnn.NFN(batch, hidden_channels=16, num_layers=2, out_features=10, variant="NP", feature_norm=feature_norm)
    wsnn.fit_processor(
        model, tr, y[tr], collate=batch.select, task="classification", epochs=60, batch_size=10, seed=0, device="cpu"
    )
    pred = wsnn.predict(model, tr, collate=batch.select)
    return float((pred.argmax(-1) == y[tr]).float().mean())


def test_nfn_fits_shared_permuted_inrs_with_the_standardised_readout(shared_permuted_inrs):
    batch, y, tr = shared_permuted_inrs
    assert len(tr) == 40 and len(set(y[tr].tolist())) == 10
    # the INRs share one initialisation up to a hidden permutation: the pooled features barely differ
    assert _train_accuracy(batch, y, tr, feature_norm=True) >= 0.9
    assert _train_accuracy(batch, y, tr, feature_norm=False) < 0.6
