"""Model knowledge as data: which module types carry maskable weights, which are
norms and embeddings. Detection code (``layers.py``) reads these tables and has no
model names of its own; teaching LIPS a new layer type is adding a row here.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

from torch import nn

# Parameter-name globs (local names) of biases: never masked, in any module.
BIAS_NAMES: Tuple[str, ...] = ("bias", "*_bias")

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

# Layer types known only by class name (a glob), so the core needs no import of their
# library. transformers' Conv1D (GPT-2) is a linear layer whose weight is stored
# (in, out); timm's CondConv2d keeps one flattened kernel per expert; transformers'
# mixture-of-experts blocks (MixtralExperts, Qwen2MoeExperts, ...) hold every expert's
# projections as one 3-d parameter (DBRX's as 2-d ``[experts * ffn, hidden]``); I-BERT's
# QuantLinear and Moshi's per-codebook linear keep their own weight.
LAYER_WEIGHTS_BY_CLASS_NAME: Tuple[Tuple[str, str], ...] = (
    ("Conv1D", "weight"),
    ("CondConv2d", "weight"),
    ("*Experts", "gate_up_proj"),
    ("*Experts", "gate_proj"),
    ("*Experts", "up_proj"),
    ("*Experts", "down_proj"),
    ("*ParallelExperts", "weight"),
    ("DbrxExpertGLU", "[wv]1"),
    ("DbrxExpertGLU", "w2"),
    ("QuantLinear", "weight"),
    ("MoshiFlexibleLinear", "weight"),
)

# Wrappers that hold the user's model as one submodule and add a prefix to every
# parameter name: (class name, attribute). Matched by class name (also of a base class)
# so torch._dynamo is never imported. ``torch.compile`` returns an ``OptimizedModule``
# (names ``_orig_mod.*``); ``DistributedDataParallel`` and ``DataParallel`` keep the
# model at ``.module`` (names ``module.*``).
MODEL_WRAPPERS: Tuple[Tuple[str, str], ...] = (
    ("OptimizedModule", "_orig_mod"),
    ("DistributedDataParallel", "module"),
    ("DataParallel", "module"),
)

# Wrappers that shard parameters across ranks (FSDP1 flattens and slices them): a mask
# needs each tensor whole, so find_layers refuses models that contain one.
SHARDING_WRAPPERS: Tuple[str, ...] = ("FullyShardedDataParallel",)

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

# --- timm ---------------------------------------------------------------------------
# ``model.group_matcher()`` names its groups (``stem``, ``blocks``, ``stem1``,
# ``serial_blocks2``, ``block_types``, ``blocks_head``, ...). First matching glob on the
# group's key gives its role: a stem or head group is exempt, a block group's layer
# weights are eligible.
TIMM_GROUP_ROLES: Tuple[Tuple[str, str], ...] = (
    ("stem*", "stem"),
    ("*head*", "head"),
    ("*", "blocks"),
)

# The ordinal timm gives to a matcher entry that joins the previous group
# (``timm.models._manipulate.MATCH_PREV_GROUP``): a final norm or head conv
# (``norm``, ``conv_head``) after the blocks, or a transition between stages.
TIMM_MERGE_ORDINAL = 99999

# ``pretrained_cfg`` keys that name the input stem and the classifier: always exempt.
TIMM_CFG_EXEMPT: Tuple[Tuple[str, str], ...] = (
    ("first_conv", "input stem"),
    ("classifier", "classifier"),
)

# Group matchers for timm classes that have no ``group_matcher()`` of their own, keyed by
# class name, in timm's own format. A row here is used instead of the model's method.
TIMM_GROUP_MATCHERS: Dict[str, Dict[str, str]] = {
    "CSATv2": {"stem": r"^stem_dct", "blocks": r"^stages\.(\d+)"},
    "MetaFormer": {"stem": r"^stem", "blocks": r"^stages\.(\d+)"},
    "MobileNetV5Encoder": {"stem": r"^conv_stem", "blocks": r"^blocks\.(\d+)"},
    "PoolingVisionTransformer": {
        "stem": r"^cls_token|pos_embed|patch_embed",
        "blocks": r"^transformers\.(\d+)",
    },
}

# --- Hugging Face transformers -------------------------------------------------------
# Containers whose elements are the repeated blocks (``encoder.layer``, ``model.layers``).
BLOCK_CONTAINER_TYPES: Tuple[Type[nn.Module], ...] = (nn.ModuleList, nn.Sequential)

# Per ``config.model_type``: globs on module names that are the blocks, for models whose
# ``_no_split_modules`` is empty or names the wrong modules. Models not listed use
# ``_no_split_modules``, then the generic fallback (the outermost container of two or
# more blocks of one class that hold layer weights).
HF_BLOCK_MODULES: Dict[str, Tuple[str, ...]] = {
    "albert": ("*albert_layer_groups.*",),
    "distilbert": ("*transformer.layer.*",),
}

# --- mixture of experts ----------------------------------------------------------------
# (class-name glob, parameter glob, attribute): tensors that stack every expert's weight
# along dim 0. Without an attribute: 3-d tensors ``[experts, out, in]`` (or ``[experts,
# in, out]``), transformers' fused experts (``mlp.experts.gate_up_proj`` of Mixtral,
# Qwen-MoE, OLMoE, DeepSeek, ...) and JetMoE's ``ParallelExperts``. With one: the module
# attribute that holds the number of experts of a 2-d ``[experts * rows, cols]`` tensor
# (DBRX). Each expert is a layer: its slice is ranked and keeps its own
# ``int(d * numel)``, exactly as the same expert stored as an ``nn.Linear`` would.
FUSED_EXPERT_WEIGHTS: Tuple[Tuple[str, str, str], ...] = (
    ("*Experts", "gate_up_proj", ""),
    ("*Experts", "gate_proj", ""),
    ("*Experts", "up_proj", ""),
    ("*Experts", "down_proj", ""),
    ("*ParallelExperts", "weight", ""),
    ("DbrxExpertGLU", "[wv]1", "moe_num_experts"),
    ("DbrxExpertGLU", "w2", "moe_num_experts"),
)

# Names (module or parameter attribute) of the routers and gates of a mixture-of-experts
# block: ``gate`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek, GLM-MoE, Hunyuan's ``gate.wg``),
# ``router`` (GPT-OSS, Granite-MoE, Jamba, Llama 4, Phi-MoE, JetMoE's ``router.layer``,
# DBRX's ``router.layer``, Switch/NLLB-MoE/LongCat's ``router.classifier``, AFMoE's
# ``router.gate``), ``shared_expert_gate`` (Qwen2-MoE, Qwen3-Next: weighs the shared
# expert) and ``router_gate`` (Doge). They decide where tokens go: always exempt.
ROUTING_GATE_NAMES: Tuple[str, ...] = ("gate", "router", "shared_expert_gate", "router_gate")

# A module is a mixture-of-experts block, whose children named in ROUTING_GATE_NAMES are
# its routers, when a child has one of these names, a child's class matches one of
# these globs, or its own class matches MOE_BLOCK_CLASS_NAMES (blocks that keep their
# experts in other forms, e.g. Doge's expert embeddings). A ``gate`` elsewhere (a gated
# fusion layer, say) stays an ordinary layer.
MOE_EXPERT_CHILD_NAMES: Tuple[str, ...] = ("experts",)
MOE_EXPERT_CHILD_CLASS_NAMES: Tuple[str, ...] = ("*Experts",)
MOE_BLOCK_CLASS_NAMES: Tuple[str, ...] = ("*CDMoE",)
