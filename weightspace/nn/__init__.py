"""weightspace.nn: permutation-equivariant processors that learn on weights.

Networks of one architecture are batched as a :class:`WeightSpaceBatch` (``(B, *shape, C)`` per
tensor, channels last); the processors are ``torch.nn.Module`` s, batched over networks, trainable
end to end on any device, and equivariant (or invariant) to the permutation group of a
:class:`~weightspace.PermutationSpec`.

>>> from weightspace import nn as wsnn                                            # doctest: +SKIP
>>> batch = wsnn.WeightSpaceBatch.from_state_dicts(state_dicts, spec)             # doctest: +SKIP
>>> wsnn.UNF(spec, hidden_channels=16, num_layers=3, out_features=1)(batch)       # doctest: +SKIP

Layer families and the spec features they support
(every linear family spans the full space of equivariant linear maps of its group):

=============  =====================  ==========================================================
family         group                  architectures
=============  =====================  ==========================================================
UNFLayer/UNF   the spec's (exact) or  anything the tracer describes: MLPs, CNNs, flatten,
               + fixed axes permuted  residual groups, attention heads, packed q|k|v, norms
NFNLayer/NFN   NP or HNP              MLPs and conv -> pool -> dense CNNs (no residuals, norms,
                                      attention, flatten)
DWSLayer/      HNP                    MLPs (Linear layers only)
DWSNet
NFT            the spec's (or + I/O   anything UNF takes (attention over the tokens of each
               axes permuted)         group, plus pooled per-tensor tokens)
FlatMLP        none (baseline)        any: an MLP on the concatenated weights
StatNN         invariant to any       any: per-tensor statistics (Unterthiner et al. 2020)
               per-tensor permutation
=============  =====================  ==========================================================
"""
from weightspace.lazy import lazy_dir, lazy_getattr

_EXPORTS = {
    # batches of networks
    "WeightSpaceBatch": "weightspace.nn._batch",
    "BatchError": "weightspace.nn._batch",
    "default_keys": "weightspace.nn._batch",
    # the basis engine
    "UnsupportedSpecError": "weightspace.nn._basis",
    "SpaceLayout": "weightspace.nn._basis",
    "BasisPlan": "weightspace.nn._basis",
    "bell": "weightspace.nn._basis",
    # universal neural functionals
    "UNFLayer": "weightspace.nn._unf",
    "UNF": "weightspace.nn._unf",
    "InvariantPool": "weightspace.nn._unf",
    "EquivariantActivation": "weightspace.nn._unf",
    # NFN (NP/HNP), DWS, NFT
    "NFNLayer": "weightspace.nn._nfn",
    "NFN": "weightspace.nn._nfn",
    "DWSLayer": "weightspace.nn._dws",
    "DWSNet": "weightspace.nn._dws",
    "NFT": "weightspace.nn._nft",
    "NFTBlock": "weightspace.nn._nft",
    "EquivariantAttention": "weightspace.nn._nft",
    # baselines
    "FlatMLP": "weightspace.nn._baselines",
    "StatNN": "weightspace.nn._baselines",
    "StatFeatures": "weightspace.nn._baselines",
    # graph processors, training loops
    "GraphProcessor": "weightspace.nn._graph",
    "GraphOutput": "weightspace.nn._graph",
    "GraphInputError": "weightspace.nn._graph",
    "graph_outputs_to_state_dicts": "weightspace.nn._graph",
    "graphs_from_states": "weightspace.nn._graph",
    "RelationalTransformer": "weightspace.nn._rt",
    "fit_processor": "weightspace.nn._train",
    "predict": "weightspace.nn._train",
    "ProcessorFit": "weightspace.nn._train",
    "TrainingError": "weightspace.nn._train",
    "kendall_tau": "weightspace.nn._train",
    "weight_statistics": "weightspace.nn._train",
    "standardize_states": "weightspace.nn._train",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
