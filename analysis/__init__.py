"""analysis: connectivity and generalization metrics of trained networks (imports ``weightspace`` only).

Every metric that the literature defines in several ways takes the variant as an explicit option and
records it (with its settings) in the result it returns. No function mutates the user's model.
"""
from weightspace.lazy import lazy_dir, lazy_getattr

_EXPORTS = {
    # connectivity
    "interpolate": "analysis.connectivity",
    "InterpolationCurve": "analysis.connectivity",
    "Barrier": "analysis.connectivity",
    "layerwise_barriers": "analysis.layerwise",
    "LayerwiseBarriers": "analysis.layerwise",
    "train_curve": "analysis.curves",
    "ModeCurve": "analysis.curves",
    "plane": "analysis.curves",
    "PlaneResult": "analysis.curves",
    # landscapes
    "landscape": "analysis.landscapes",
    "Landscape": "analysis.landscapes",
    "random_directions": "analysis.landscapes",
    "pca_directions": "analysis.landscapes",
    "PCADirections": "analysis.landscapes",
    # path-norms
    "path_norm": "analysis.pathnorm",
    "path_norm_bound": "analysis.pathnorm",
    "PathNorm": "analysis.pathnorm",
    "PathNormBound": "analysis.pathnorm",
    "UnsupportedOperationError": "analysis.pathnorm",
    # neural collapse
    "neural_collapse": "analysis.collapse",
    "neural_collapse_of": "analysis.collapse",
    "NeuralCollapse": "analysis.collapse",
    "CollapseTracker": "analysis.collapse",
    # information plane
    "information_plane": "analysis.infoplane",
    "InformationPlane": "analysis.infoplane",
    "InformationPlaneTracker": "analysis.infoplane",
    "mutual_information": "analysis.infoplane",
    "entropy": "analysis.infoplane",
    # network science on NeuralGraph
    "network_metrics": "analysis.network",
    "NetworkMetrics": "analysis.network",
    # sharpness and spectra
    "hessian_eigenvalues": "analysis.sharpness",
    "hessian_trace": "analysis.sharpness",
    "HessianEigen": "analysis.sharpness",
    "HessianTrace": "analysis.sharpness",
    "spectral_metrics": "analysis.spectral",
    "fit_power_law": "analysis.spectral",
    "norm_measures": "analysis.norms",
    "SpectralMetrics": "analysis.spectral",
    "PowerLawFit": "analysis.spectral",
    "NormMeasures": "analysis.norms",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__dir__ = lazy_dir(_EXPORTS)
