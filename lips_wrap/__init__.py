"""lips-wrap: LIPS (Layer-wise Inertia Phenomenon with Sparsity) for any FL loop."""

from .config import SCORES, LIPSConfig
from .diagnostics import InertiaTracker
from .layers import LayerPlan, TensorDecision, find_layers
from .lips import LIPS, MaskReport
from .optimizer import LIPSOptimizer
from .schedule import density_at, is_mask_round
from .server import mask_global_state

__all__ = [
    "LIPS",
    "LIPSConfig",
    "InertiaTracker",
    "LIPSOptimizer",
    "LayerPlan",
    "MaskReport",
    "SCORES",
    "TensorDecision",
    "density_at",
    "find_layers",
    "is_mask_round",
    "mask_global_state",
]

__version__ = "0.1.0"
