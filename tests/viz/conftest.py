"""Real result objects for the viz tests: analysis functions run on two tiny digits MLPs (a few seconds)."""

import numpy as np
import pytest
import torch

import analysis
import weightspace as ws
from weightspace import zoo


@pytest.fixture(scope="session")
def digits():
    Xtr, Ytr = zoo.load_digits("train")
    Xte, Yte = zoo.load_digits("test")
    return (Xtr[:400], Ytr[:400]), (Xte[:300], Yte[:300])


@pytest.fixture(scope="session")
def models(digits):
    """Two MLPs 64-16-16-10 trained from different seeds, with checkpoints and trackers recorded per epoch."""
    train, test = digits
    out = {}
    traj = []
    ct = analysis.CollapseTracker(test_data=test)
    it = analysis.InformationPlaneTracker(estimator="binning")
    for seed in (0, 1):
        m = zoo.MLP(64, (16, 16), 10, seed=seed)
        for epoch in range(4):
            zoo.train(m, train, epochs=3, lr=1e-2, seed=10 * seed + epoch, device="cpu")
            if seed == 0:
                traj.append({k: v.clone() for k, v in m.state_dict().items()})
                ct.update(3 * (epoch + 1), m, train)
                it.update(3 * (epoch + 1), m, train)
        out["A" if seed == 0 else "B"] = m
    out["trajectory"] = traj
    out["collapse"] = ct
    out["infoplane"] = it
    return out


@pytest.fixture(scope="session")
def results(models, digits):
    """One of every analysis result type viz draws, computed for real."""
    train, test = digits
    A, B = models["A"], models["B"]
    data = {"train": train, "test": test}
    x = train[0][:2]
    perm = ws.permute(A, ws.permutation_spec(A, x), ws.random_permutation(ws.permutation_spec(A, x), seed=3))
    r = {
        "curves": {
            "naive": analysis.interpolate(A, B, data, alphas=9),
            "permuted": analysis.interpolate(A, perm, data, alphas=9),
        },
        "layerwise": analysis.layerwise_barriers(A, B, test),
        "landscape": analysis.landscape(A, test, grid=9, span=(-0.5, 0.5), trajectory=models["trajectory"]),
        "landscape1d": analysis.landscape(A, test, grid=9, dims=1),
        "plane": analysis.plane(A, perm, B, test, grid=7),
        "pathnorm": {
            "A": analysis.path_norm(A, x, q=1),
            "B": analysis.path_norm(B, x, q=1),
            "permuted": analysis.path_norm(perm, x, q=1),
        },
        "spectral": {"A": analysis.spectral_metrics(A, min_size=8), "B": analysis.spectral_metrics(B, min_size=8)},
        "norms": {"A": analysis.norm_measures(A, test), "B": analysis.norm_measures(B, test)},
        "collapse": models["collapse"],
        "infoplane": models["infoplane"],
        "graph": ws.NeuralGraph.from_model(A, x),
        "network": analysis.network_metrics(A, x),
        "nc": analysis.neural_collapse_of(A, train),
        "hessian": analysis.hessian_trace(A, test, n_samples=3, seed=0),
        "models": {"A": A, "B": B},
        "perm": perm,
    }
    return r


@pytest.fixture(scope="session")
def planted():
    """A cost matrix whose unique optimum is a planted permutation."""
    g = np.random.default_rng(0)
    n = 12
    p = g.permutation(n)
    C = g.uniform(1.0, 2.0, (n, n))
    C[np.arange(n), p] = 0.0
    return C, p


def pytest_configure(config):
    torch.set_num_threads(1)
