"""A class, a function or a state dict passed where a module is expected, and NumPy arrays passed as
data or example inputs, give one clear error that says what to pass (weightspace.checks), from every
public entry point of weightspace and analysis. Positive controls run the same calls correctly."""
import numpy as np
import pytest
import torch

import analysis
import weightspace as ws
from weightspace import checks, features, state, zoo


def _factory():
    return zoo.MLP(8, (6,), 3, seed=0)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)


MODEL_CALLS = {
    "path_norm": lambda m, X, Y: analysis.path_norm(m, X[:2]),
    "hessian_eigenvalues": lambda m, X, Y: analysis.hessian_eigenvalues(m, (X, Y)),
    "spectral_metrics": lambda m, X, Y: analysis.spectral_metrics(m),
    "landscape": lambda m, X, Y: analysis.landscape(m, (X, Y), grid=3, dims=1),
    "interpolate": lambda m, X, Y: analysis.interpolate(m, _factory(), (X, Y), alphas=3),
    "information_plane": lambda m, X, Y: analysis.information_plane(m, (X, Y)),
    "network_metrics": lambda m, X, Y: analysis.network_metrics(m, X[:2]),
    "activation_stats": lambda m, X, Y: features.activation_stats(m, (X, Y), ["fc.0"]),
    "zoo.train": lambda m, X, Y: zoo.train(m, (X, Y), epochs=1, seed=0),
    "state.evaluate": lambda m, X, Y: state.evaluate(m, (X, Y)),
}


@pytest.mark.parametrize("name", sorted(MODEL_CALLS))
def test_class_function_or_state_dict_instead_of_a_module(name, data):
    X, Y = data
    call = MODEL_CALLS[name]
    with pytest.raises(checks.InputTypeError,
                       match=r"the class MLP, not a model; pass an instance, e\.g\. MLP\(\.\.\.\)"):
        call(zoo.MLP, X, Y)
    with pytest.raises(checks.InputTypeError, match=r"the function _factory, not a model; call it"):
        call(_factory, X, Y)
    with pytest.raises(checks.InputTypeError, match="state dict"):
        call(_factory().state_dict(), X, Y)
    call(_factory(), X, Y)  # positive control


DATA_CALLS = {
    "hessian_eigenvalues": lambda m, d: analysis.hessian_eigenvalues(m, d),
    "landscape": lambda m, d: analysis.landscape(m, d, grid=3, dims=1),
    "interpolate": lambda m, d: analysis.interpolate(m, _factory(), d, alphas=3),
    "interpolate (splits)": lambda m, d: analysis.interpolate(m, _factory(), {"train": d}, alphas=3),
    "information_plane": lambda m, d: analysis.information_plane(m, d),
    "neural_collapse_of": lambda m, d: analysis.neural_collapse_of(m, d),
    "cross_stats": lambda m, d: features.cross_stats(m, m, d, ["fc.0"]),
    "zoo.train": lambda m, d: zoo.train(m, d, epochs=1, seed=0),
    "state.evaluate": lambda m, d: state.evaluate(m, d),
}


@pytest.mark.parametrize("name", sorted(DATA_CALLS))
def test_numpy_data_is_refused_with_the_conversion(name, data):
    X, Y = data
    m = _factory()
    with pytest.raises(checks.InputTypeError,
                       match=r"NumPy array of shape \(20, 8\); convert it with torch\.from_numpy"):
        DATA_CALLS[name](m, (X.numpy(), Y.numpy()))
    with pytest.raises(checks.InputTypeError, match=r"Y is a NumPy array"):
        DATA_CALLS[name](m, (X, Y.numpy()))
    DATA_CALLS[name](m, (X, Y))  # positive control


def test_numpy_example_inputs_are_refused(data):
    X, _ = data
    with pytest.raises(checks.InputTypeError, match=r"example_inputs is a NumPy array of shape \(2, 8\)"):
        analysis.path_norm(_factory(), X[:2].numpy())
    with pytest.raises(checks.InputTypeError, match=r"example_inputs\[1\] is a NumPy array"):
        checks.check_inputs((X, np.zeros(3)))
    with pytest.raises(checks.InputTypeError, match=r"example_inputs\['mask'\] is a NumPy"):
        checks.check_inputs({"x": X, "mask": np.zeros(3)})
    assert checks.check_inputs({"x": X, "flag": True, "opt": None}) is not None


def test_errors_are_weightspace_errors_and_keep_builtin_bases():
    for cls in (checks.InputTypeError, checks.NonFiniteError):
        assert issubclass(cls, ws.WeightspaceError) and issubclass(cls, ValueError)
    assert issubclass(checks.InputTypeError, TypeError)
    with pytest.raises(checks.InputTypeError, match="path or string"):
        checks.check_module("model.safetensors")


@pytest.mark.parametrize("name", ["permutation_spec", "check_spec", "permute", "NeuralGraph.from_model"])
def test_symmetry_and_graph_entry_points(name, data):
    X, _ = data
    m = _factory()
    spec = ws.permutation_spec(m, X[:2])
    calls = {
        "permutation_spec": lambda mod, x: ws.permutation_spec(mod, x),
        "check_spec": lambda mod, x: ws.check_spec(mod, spec, x, perturbed=1),
        "permute": lambda mod, x: ws.permute(mod, spec, ws.random_permutation(spec, seed=0)),
        "NeuralGraph.from_model": lambda mod, x: ws.NeuralGraph.from_model(mod, x),
    }
    call = calls[name]
    with pytest.raises(checks.InputTypeError, match=r"the class MLP, not a model"):
        call(zoo.MLP, X[:2])
    with pytest.raises(checks.InputTypeError, match=r"the function _factory"):
        call(_factory, X[:2])
    if name != "permute":
        with pytest.raises(checks.InputTypeError, match=r"example_inputs is a NumPy array of shape \(2, 8\)"):
            call(m, X[:2].numpy())
    call(m, X[:2])  # positive control
    assert issubclass(ws.SpecError, ws.WeightspaceError) and issubclass(ws.TraceError, ws.WeightspaceError)
