"""isofast: fast geometry-preserving (isometric) regularisation for PyTorch decoders.

The regulariser of Lee et al., "Regularized Autoencoders for Isometric Representation Learning"
(ICLR 2022), and the other measures of the geometry-preserving hierarchy, as a first-order graph:
fused multi-stream kernels for MLP decoders, forward-mode AD for any other decoder.
"""

from isofast import backends, geometry, metrics
from isofast.api import IsometricRegularizer, distortion, path_lengths, pullback_metric, relaxed_distortion
from isofast.measures import MEASURES, PATH_MEASURES
from isofast.mixup import mixup
from isofast.planning import Plan, plan

__version__ = "0.1.0"

__all__ = [
    "MEASURES",
    "PATH_MEASURES",
    "IsometricRegularizer",
    "Plan",
    "__version__",
    "backends",
    "distortion",
    "geometry",
    "metrics",
    "mixup",
    "path_lengths",
    "plan",
    "pullback_metric",
    "relaxed_distortion",
]
