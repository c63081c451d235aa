"""lips-wrap: LIPS (Layer-wise Inertia Phenomenon with Sparsity) for any FL loop."""

from .clients import ClientStates
from .config import SCORES, LIPSConfig
from .detect_hf import detect_hf
from .detect_peft import detect_peft
from .detect_timm import detect_timm
from .diagnostics import InertiaTracker
from .layers import LayerPlan, TensorDecision, find_layers
from .lips import LIPS
from .optimizer import LIPSOptimizer
from .report import MaskReport
from .schedule import density_at, is_mask_round
from .server import ServerMasker, mask_global_state

__all__ = [
    "ClientStates",
    "LIPS",
    "LIPSConfig",
    "InertiaTracker",
    "LIPSOptimizer",
    "LayerPlan",
    "MaskReport",
    "SCORES",
    "ServerMasker",
    "TensorDecision",
    "density_at",
    "detect_hf",
    "detect_peft",
    "detect_timm",
    "find_layers",
    "is_mask_round",
    "mask_global_state",
]

__version__ = "0.1.0"
"""The version, defined here only: pyproject.toml reads it (``dynamic = ["version"]``)."""
