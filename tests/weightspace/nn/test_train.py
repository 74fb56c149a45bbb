"""fit_processor's model selection on a validation split, and the per-key weight standardisation.

Oracles: after ``monitor=`` the processor's validation score equals the best score of the recorded
history (and its first argmax is ``best_epoch``); per-key statistics equal NumPy's over all
coordinates, are invariant to hidden-unit permutations of every network, and standardisation
commutes with those permutations (a per-coordinate standardisation, the negative control, does not).
"""

import numpy as np
import pytest
import torch

import weightspace as ws
from weightspace import nn as wsnn
from weightspace import zoo


def _mlps(n, seed=0):
    models = [zoo.MLP(4, (6, 5), 3, seed=seed + i) for i in range(n)]
    spec = ws.permutation_spec(models[0], torch.zeros(2, 4))
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models], spec


def _random_perms(spec, g):
    return {name: torch.randperm(n, generator=g) for name, n in spec.groups.items()}


def _dense_task(n=48, seed=0):
    states, spec = _mlps(n, seed)
    batch = wsnn.WeightSpaceBatch.from_state_dicts(states, spec)
    # a label that the weights determine: the sign of the head bias sum, plus its magnitude bucket
    s = torch.stack([sd["head.bias"].sum() for sd in states])
    y = (s > s.median()).long() + 2 * (s.abs() > s.abs().median()).long()
    return batch, y


@pytest.mark.parametrize("task,monitor", [("classification", "eval_accuracy"), ("regression", "eval_loss")])
def test_monitor_restores_the_best_validation_epoch(task, monitor):
    batch, y = _dense_task()
    if task == "regression":
        y = torch.stack([t.sum() for t in batch.tensors["head.bias"]]).unsqueeze(1)
    tr, va = list(range(32)), list(range(32, 48))
    torch.manual_seed(0)
    out = 4 if task == "classification" else 1
    model = wsnn.FlatMLP(batch, hidden_channels=4, num_layers=1, out_features=out)
    fit = wsnn.fit_processor(
        model,
        tr,
        y[tr],
        collate=batch.select,
        task=task,
        epochs=12,
        batch_size=8,
        lr=3e-2,
        seed=0,
        device="cpu",
        eval_inputs=va,
        eval_targets=y[va],
        monitor=monitor,
    )
    scores = [h[monitor] for h in fit.history]
    best = (max if monitor == "eval_accuracy" else min)(scores)
    assert fit.best_epoch == scores.index(best) + 1
    assert fit.settings["monitor"] == monitor and any("restored epoch" in line for line in fit.log)
    pred = wsnn.predict(model, va, collate=batch.select)
    if task == "classification":
        assert float((pred.argmax(-1) == y[va]).float().mean()) == best
    else:
        assert float(((pred - y[va]) ** 2).sum()) / len(va) == pytest.approx(best, rel=1e-6)
    # the loss trajectory is the one without monitoring (selection only reads the model)
    torch.manual_seed(0)
    plain = wsnn.FlatMLP(batch, hidden_channels=4, num_layers=1, out_features=out)
    fit2 = wsnn.fit_processor(
        plain, tr, y[tr], collate=batch.select, task=task, epochs=12, batch_size=8, lr=3e-2, seed=0, device="cpu"
    )
    assert [h["train_loss"] for h in fit2.history] == [h["train_loss"] for h in fit.history]
    assert fit2.best_epoch is None
    if fit.best_epoch != 12:  # then the restored model differs from the last epoch's
        assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_monitor_errors():
    batch, y = _dense_task(8)
    m = wsnn.FlatMLP(batch, hidden_channels=2, num_layers=1, out_features=4)
    kw = dict(collate=batch.select, task="classification", epochs=1, device="cpu")
    with pytest.raises(wsnn.TrainingError, match="needs validation data"):
        wsnn.fit_processor(m, list(range(8)), y, monitor="eval_accuracy", **kw)
    with pytest.raises(wsnn.TrainingError, match="eval_kendall_tau.*not available"):
        wsnn.fit_processor(m, list(range(8)), y, monitor="eval_kendall_tau", eval_inputs=[0], eval_targets=y[:1], **kw)


def test_weight_statistics_closed_form_and_invariance():
    states, spec = _mlps(7)
    stats = wsnn.weight_statistics(states)
    assert set(stats) == set(states[0])
    for k, (mu, sd) in stats.items():
        allv = np.concatenate([s[k].double().numpy().ravel() for s in states])
        assert mu == pytest.approx(allv.mean(), abs=1e-12) and sd == pytest.approx(allv.std(), rel=1e-12)
    scale = wsnn.weight_statistics(states, center=False)
    assert all(m == 0.0 for m, _ in scale.values())
    k = "fc.0.weight"
    assert scale[k][1] == pytest.approx(float(torch.stack([s[k] for s in states]).double().pow(2).mean().sqrt()))
    # invariant: permuting the hidden units of every network (each its own permutation) changes no statistic
    g = torch.Generator().manual_seed(1)
    permuted = [ws.permute(s, spec, _random_perms(spec, g)) for s in states]
    for k, (mu, sd) in wsnn.weight_statistics(permuted).items():
        assert mu == pytest.approx(stats[k][0], abs=1e-12) and sd == pytest.approx(stats[k][1], rel=1e-12)
    # a constant tensor gets std 1 (only shifted), and errors name the key
    const = [{"w": torch.full((3,), 2.0)} for _ in range(3)]
    assert wsnn.weight_statistics(const) == {"w": (2.0, 1.0)}
    with pytest.raises(wsnn.TrainingError, match="'w'.*missing"):
        wsnn.weight_statistics([{"w": torch.ones(2)}, {"v": torch.ones(2)}])
    with pytest.raises(wsnn.TrainingError, match="no state dicts"):
        wsnn.weight_statistics([])


def test_standardize_commutes_with_permutations_and_round_trips():
    states, spec = _mlps(6, seed=3)
    stats = wsnn.weight_statistics(states)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    z = wsnn.standardize_states(states, stats)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states, before) for k in a)  # inputs untouched
    for k in stats:  # standardised: mean 0, std 1 per key over the set
        t = torch.stack([s[k] for s in z]).double()
        assert float(t.mean()) == pytest.approx(0.0, abs=1e-6) and float(t.std(unbiased=False)) == pytest.approx(1.0)
    back = [{k: v * stats[k][1] + stats[k][0] for k, v in s.items()} for s in z]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for a, b in zip(back, states) for k in a)
    g = torch.Generator().manual_seed(5)
    perms = [_random_perms(spec, g) for _ in states]
    lhs = wsnn.standardize_states([ws.permute(s, spec, p) for s, p in zip(states, perms)], stats)
    rhs = [ws.permute(s, spec, p) for s, p in zip(z, perms)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(lhs, rhs) for k in a)
    # negative control: a per-coordinate standardisation does not commute with the permutations
    mu = {k: torch.stack([s[k] for s in states]).mean(0) for k in stats}
    sd = {k: torch.stack([s[k] for s in states]).std(0) + 1e-3 for k in stats}
    coord = lambda ss: [{k: (v - mu[k]) / sd[k] for k, v in s.items()} for s in ss]  # noqa: E731
    lhs_c = coord([ws.permute(s, spec, p) for s, p in zip(states, perms)])
    rhs_c = [ws.permute(s, spec, p) for s, p in zip(coord(states), perms)]
    assert max(float((a[k] - b[k]).abs().max()) for a, b in zip(lhs_c, rhs_c) for k in a) > 1e-2
    with pytest.raises(wsnn.TrainingError, match="lacks the key 'fc.0.weight'"):
        wsnn.standardize_states([{"head.bias": torch.zeros(3)}], stats)
