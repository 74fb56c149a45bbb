"""A NaN or inf weight never passes silently: every analysis entry point raises NonFiniteError naming
the parameter (it used to give a path-norm of 0.0, a raw LinAlgError, NaN statistics or a misleading
'clean the data' message). Positive controls: the same calls succeed on the finite model."""
import pytest
import torch

import analysis
from weightspace import features, zoo
from weightspace.checks import NonFiniteError
from weightspace.results import WeightspaceError


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 8, generator=g)
    Y = torch.randint(0, 3, (40,), generator=g)
    good = zoo.MLP(8, (12,), 3, seed=0)
    return good, X, Y


def _poisoned(model, value):
    bad = __import__("copy").deepcopy(model)
    with torch.no_grad():
        bad.head.weight[1, 2] = value
    return bad


CALLS = {
    "path_norm": lambda m, X, Y, o: analysis.path_norm(m, X[:2], q=1),
    "path_norm_bound": lambda m, X, Y, o: analysis.path_norm_bound(m, X[:2], (X, Y)),
    "hessian_eigenvalues": lambda m, X, Y, o: analysis.hessian_eigenvalues(m, (X, Y), k=1, seed=0),
    "hessian_trace": lambda m, X, Y, o: analysis.hessian_trace(m, (X, Y), n_samples=2, seed=0),
    "spectral_metrics": lambda m, X, Y, o: analysis.spectral_metrics(m, min_size=2),
    "norm_measures": lambda m, X, Y, o: analysis.norm_measures(m, (X, Y)),
    "network_metrics": lambda m, X, Y, o: analysis.network_metrics(m, X[:2]),
    "information_plane": lambda m, X, Y, o: analysis.information_plane(m, (X, Y), estimator="binning"),
    "neural_collapse_of": lambda m, X, Y, o: analysis.neural_collapse_of(m, (X, Y)),
    "interpolate": lambda m, X, Y, o: analysis.interpolate(m, o, (X, Y), alphas=3),
    "layerwise_barriers": lambda m, X, Y, o: analysis.layerwise_barriers(m, o, (X, Y)),
    "landscape": lambda m, X, Y, o: analysis.landscape(m, (X, Y), grid=3, dims=1),
    "train_curve": lambda m, X, Y, o: analysis.train_curve(m, o, (X, Y), epochs=1),
    "train_curve (B)": lambda m, X, Y, o: analysis.train_curve(o, m, (X, Y), epochs=1),
    "plane": lambda m, X, Y, o: analysis.plane(m, o, zoo.MLP(8, (12,), 3, seed=2), (X, Y), grid=2),
    "interpolate (B)": lambda m, X, Y, o: analysis.interpolate(o, m, (X, Y), alphas=3),
    "random_directions": lambda m, X, Y, o: analysis.random_directions(m, n=1),
    "cross_stats": lambda m, X, Y, o: features.cross_stats(m, o, (X, Y), ["fc.0"]),
    "activation_stats": lambda m, X, Y, o: features.activation_stats(m, (X, Y), ["fc.0"]),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_nonfinite_weight_raises_naming_the_key(setup, name, value):
    good, X, Y = setup
    other = zoo.MLP(8, (12,), 3, seed=1)
    CALLS[name](good, X, Y, other)  # positive control: the finite model works
    bad = _poisoned(good, value)
    kind = "NaN" if value != value else "inf"
    with pytest.raises(NonFiniteError, match=rf"head\.weight.*1 {kind}") as e:
        CALLS[name](bad, X, Y, other)
    assert isinstance(e.value, WeightspaceError) and isinstance(e.value, ValueError)
    assert torch.isnan(bad.head.weight).any() or torch.isinf(bad.head.weight).any()  # input left as given


def test_path_norm_of_nan_model_used_to_be_zero(setup):
    """The motivating case: the old code returned 0.0 here."""
    good, X, _ = setup
    with pytest.raises(NonFiniteError, match="head.weight"):
        analysis.path_norm(_poisoned(good, float("nan")), X[:2])


def test_nan_inputs_in_streaming_statistics_are_named(setup):
    good, X, Y = setup
    Xn = X.clone()
    Xn[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="cross_stats point 'fc.0'.*NaN"):
        features.cross_stats(good, good, (Xn, Y), ["fc.0"])
    with pytest.raises(NonFiniteError, match="activation_stats point 'fc.0'"):
        features.activation_stats(good, (Xn, Y), ["fc.0"])
    ok = features.cross_stats(good, good, (X, Y), ["fc.0"])["fc.0"]
    assert torch.isfinite(ok.corr).all()
