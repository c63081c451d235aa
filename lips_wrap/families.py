"""Model knowledge as data: which module types carry maskable weights, which are
norms and embeddings. Detection code (``layers.py``) reads these tables and has no
model names of its own; teaching LIPS a new layer type is adding a row here.
"""

from __future__ import annotations

from typing import Tuple, Type

from torch import nn

# (module type, parameter-name glob): parameters that are a layer's weight matrix or
# kernel. A parameter of such a module that matches no glob (a bias, say) is no
# layer weight.
LAYER_WEIGHTS: Tuple[Tuple[Type[nn.Module], str], ...] = (
    (nn.Linear, "weight"),
    (nn.Bilinear, "weight"),
    (nn.Conv1d, "weight"),
    (nn.Conv2d, "weight"),
    (nn.Conv3d, "weight"),
    (nn.ConvTranspose1d, "weight"),
    (nn.ConvTranspose2d, "weight"),
    (nn.ConvTranspose3d, "weight"),
    (nn.MultiheadAttention, "*proj_weight"),
    (nn.RNNBase, "weight_*"),
)

# Layer types known only by class name, so the core needs no import of their library.
# transformers' Conv1D (GPT-2) is a linear layer whose weight is stored (in, out).
LAYER_WEIGHTS_BY_CLASS_NAME: Tuple[Tuple[str, str], ...] = (("Conv1D", "weight"),)

NORM_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Class-name fragments of normalisation layers defined by other libraries
# (LlamaRMSNorm, LayerNorm2d, T5LayerNorm, ...).
NORM_CLASS_NAME_FRAGMENTS: Tuple[str, ...] = ("Norm",)

EMBEDDING_TYPES: Tuple[Type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
EMBEDDING_CLASS_NAME_FRAGMENTS: Tuple[str, ...] = ("Embedding",)
