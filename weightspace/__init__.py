"""weightspace: a model as a weight space.

The base package of the toolkit. It discovers a model's permutation symmetries by tracing it,
applies and checks permutations, builds neural computational graphs, captures activations, ships
reference models and embedded data (scikit-learn digits), and reads and writes checkpoints.

>>> import weightspace as ws                                  # doctest: +SKIP
>>> spec = ws.permutation_spec(model, example_inputs)         # doctest: +SKIP
>>> model_p = ws.permute(model, spec, ws.random_permutation(spec, seed=0))  # doctest: +SKIP
"""
from weightspace.lazy import lazy_dir, lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    # symmetry discovery and permutations
    "permutation_spec": "weightspace.symmetry",
    "PermutationSpec": "weightspace.symmetry",
    "Axis": "weightspace.symmetry",
    "random_permutation": "weightspace.symmetry",
    "identity_permutation": "weightspace.symmetry",
    "invert_permutation": "weightspace.symmetry",
    "compose_permutations": "weightspace.symmetry",
    "permute": "weightspace.symmetry",
    "transform": "weightspace.symmetry",
    "check_spec": "weightspace.symmetry",
    "SpecError": "weightspace.symmetry",
    "TraceError": "weightspace.symmetry",
    # neural computational graph
    "NeuralGraph": "weightspace.graph",
    # devices and data plumbing
    "resolve_device": "weightspace.utils",
    "iter_batches": "weightspace.utils",
    # subpackages / modules
    "zoo": "weightspace.zoo",
    "io": "weightspace.io",
    "features": "weightspace.features",
    "symmetry": "weightspace.symmetry",
    "graph": "weightspace.graph",
    "state": "weightspace.state",
    "results": "weightspace.results",
    "WeightspaceError": "weightspace.results",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
