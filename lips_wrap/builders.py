"""Model builders for ``python -m lips_wrap inspect timm:NAME`` and ``hf:MODEL_TYPE``.

Specs take comma-separated ``key=value`` options after the name, passed to the
constructor (values are Python literals): ``timm:vit_tiny_patch16_224,img_size=64``,
``hf:gpt2,n_layer=4``, ``hf:bert,task=base``. Nothing is downloaded: timm models are
built with ``pretrained=False``; Hugging Face models from ``AutoConfig.for_model`` with
small sizes (``HF_SMALL_SIZES``, each overridable), or from a local folder.
"""

from __future__ import annotations

import ast
import importlib
import os
from typing import Any, Dict, Tuple

from torch import nn

# Size settings that make an inspected Hugging Face model small; each is applied only
# if the model type's config has that setting (or an alias of it).
HF_SMALL_SIZES: Dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "d_ff": 128,
    "hidden_dim": 128,
    "d_kv": 16,
    "vocab_size": 1000,
    "image_size": 32,
    "patch_size": 8,
}

# task option -> transformers auto class; "auto" picks the first that knows the config.
HF_TASKS: Dict[str, str] = {
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed ({error}); install it with: pip install lips-wrap[{extra}]"
        ) from error


def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"name,key=value,..."`` -> (name, options); values are Python literals."""
    name, *pairs = spec.split(",")
    options: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {pair!r} in {spec!r} must look like key=value")
        try:
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = text.strip()
    if not name:
        raise ValueError(f"model spec {spec!r} names no model")
    return name, options


def build_timm(spec: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **options)``."""
    timm = _require("timm", "timm")
    name, options = parse_spec(spec)
    if not timm.list_models(name):
        raise ValueError(
            f"timm has no model {name!r}; see timm.list_models('*{name.split('_')[0]}*')"
        )
    return timm.create_model(name, pretrained=False, **options)


def _small_config(transformers: Any, model_type: str, options: Dict[str, Any]) -> Any:
    try:
        default = transformers.AutoConfig.for_model(model_type)
    except ValueError as error:
        raise ValueError(
            f"transformers knows no model type {model_type!r}: pass one of "
            "transformers.CONFIG_MAPPING (gpt2, bert, llama, t5, vit, ...) or a local folder"
        ) from error
    aliases = getattr(default, "attribute_map", {})
    known = set(default.to_dict()) | set(aliases)
    chosen = {aliases.get(key, key) for key in options}
    sizes = {
        key: value for key, value in HF_SMALL_SIZES.items()
        if key in known and aliases.get(key, key) not in chosen
    }
    config = transformers.AutoConfig.for_model(model_type, **{**sizes, **options})
    for key, value in vars(config).items():  # composite models: shrink each sub-model
        sub_type = getattr(value, "model_type", None)
        if key not in options and isinstance(value, transformers.PretrainedConfig) and (
            sub_type in transformers.CONFIG_MAPPING
        ):
            setattr(config, key, _small_config(transformers, sub_type, {}))
    return config


def _auto_class(transformers: Any, config: Any, task: str) -> Any:
    if task not in HF_TASKS and task != "auto":
        raise ValueError(f"task {task!r} is not one of: auto, {', '.join(HF_TASKS)}")
    names = list(HF_TASKS.values()) if task == "auto" else [HF_TASKS[task]]
    for class_name in names:
        auto = getattr(transformers, class_name)
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(
        f"no transformers auto class among {', '.join(names)} builds a model from "
        f"{type(config).__name__}; name another task= or a model type that has a model"
    )


def build_hf(spec: str) -> nn.Module:
    """A small randomly initialised model of a model type, or a local folder (offline)."""
    transformers = _require("transformers", "hf")
    name, options = parse_spec(spec)
    task = str(options.pop("task", "auto"))
    if os.path.isdir(name):
        auto = getattr(transformers, HF_TASKS.get(task, "AutoModel"))
        return auto.from_pretrained(name, local_files_only=True, **options)
    config = _small_config(transformers, name, options)
    return _auto_class(transformers, config, task).from_config(config)
