"""Layer detection for Hugging Face transformers models, from the model's own metadata.

The blocks are the elements of the containers (``ModuleList``/``Sequential``) whose
elements are all classes named in ``_no_split_modules`` (``encoder.layer.3`` of BERT,
``transformer.h.0`` of GPT-2, ``encoder.block.1`` and ``decoder.block.1`` of T5). A
row of ``families.HF_BLOCK_MODULES`` overrides that for a ``config.model_type``; a model
with neither falls back to the outermost container of two or more blocks of one class
that hold layer weights, and says so in each reason. Eligible: layer weights
(``families.LAYER_WEIGHTS``, GPT-2's ``Conv1D``) inside a block. Exempt: the input and
output embeddings (``get_input_embeddings()``/``get_output_embeddings()``, tied or
not), everything outside the blocks (position embeddings, pooler, task heads), and
norms, biases and embeddings inside them. transformers itself is never imported.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from torch import nn

from . import families
from .rules import NamedSlot, Verdict, generic_rule, layer_weight_verdict

Blocks = Dict[str, str]
"""Module name of each block -> how it was found."""


def is_hf_model(model: nn.Module) -> bool:
    """Duck-typed: transformers' PreTrainedModel API."""
    return hasattr(model, "_no_split_modules") and hasattr(model, "get_input_embeddings")


def _outermost(names: Iterable[str]) -> List[str]:
    kept: List[str] = []
    for name in sorted(set(names), key=lambda n: (n.count("."), n)):
        if not any(name.startswith(outer + ".") for outer in kept):
            kept.append(name)
    return kept


def _containers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, families.BLOCK_CONTAINER_TYPES) and len(module) > 0
    ]


def _holds_layer_weight(module: nn.Module) -> bool:
    return any(
        layer_weight_verdict(owner, local) is None
        for owner in module.modules()
        for local, _ in owner.named_parameters(recurse=False)
    )


def _elements(name: str, container: nn.Module) -> List[Tuple[str, nn.Module]]:
    prefix = f"{name}." if name else ""
    return [(prefix + child_name, child) for child_name, child in container.named_children()]


def _blocks_from_table(model: nn.Module) -> Blocks:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    globs = families.HF_BLOCK_MODULES.get(model_type, ())
    found = [
        name for name, _ in model.named_modules(remove_duplicate=False)
        if name and any(fnmatch.fnmatchcase(name, glob) for glob in globs)
    ]
    modules = dict(model.named_modules(remove_duplicate=False))
    return {
        name: f"{type(modules[name]).__name__}, family table row {model_type!r}"
        for name in _outermost(found)
    }


def _blocks_from_no_split(model: nn.Module) -> Blocks:
    classes: Set[str] = set(getattr(model, "_no_split_modules", None) or ())
    found: Dict[str, str] = {}
    for name, container in _containers(model):
        elements = _elements(name, container)
        if all(type(child).__name__ in classes for _, child in elements):
            for element_name, child in elements:
                found[element_name] = f"{type(child).__name__} in _no_split_modules"
    return {name: found[name] for name in _outermost(found)}


def _blocks_from_repetition(model: nn.Module) -> Blocks:
    found: Dict[str, str] = {}
    for name, container in _containers(model):
        elements = _elements(name, container)
        kinds = {type(child) for _, child in elements}
        if len(elements) >= 2 and len(kinds) == 1 and _holds_layer_weight(container):
            for element_name, child in elements:
                found[element_name] = (
                    f"{type(child).__name__}; no _no_split_modules: repeated blocks of one class"
                )
    return {name: found[name] for name in _outermost(found)}


def find_blocks(model: nn.Module) -> Blocks:
    """The model's blocks: family table, then ``_no_split_modules``, then repetition."""
    for finder in (_blocks_from_table, _blocks_from_no_split, _blocks_from_repetition):
        blocks = finder(model)
        if blocks:
            return blocks
    return {}


def _enclosing(name: str, blocks: Blocks) -> Optional[str]:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in blocks:
            return prefix
    return None


def _embedding_ids(model: nn.Module, getter: str) -> Set[int]:
    try:
        module = getattr(model, getter)()
    except (NotImplementedError, AttributeError):
        return set()
    return {id(p) for p in module.parameters()} if isinstance(module, nn.Module) else set()


def embedding_reason(param: nn.Parameter, inputs: Set[int], outputs: Set[int]) -> Optional[str]:
    """Why a parameter is an input/output embedding (and whether they are tied)."""
    key = id(param)
    if key in inputs and key in outputs:
        return "input embeddings (get_input_embeddings()), tied with get_output_embeddings()"
    if key in inputs:
        return "input embeddings (get_input_embeddings())"
    if key in outputs:
        return "output embeddings (get_output_embeddings())"
    return None


def detect_hf(model: nn.Module, slots: Sequence[NamedSlot]) -> Optional[Dict[str, Verdict]]:
    """The Hugging Face detector (see the module docstring); None for other models."""
    if not is_hf_model(model):
        return None
    inputs = _embedding_ids(model, "get_input_embeddings")
    outputs = _embedding_ids(model, "get_output_embeddings")
    blocks = find_blocks(model)
    verdicts: Dict[str, Verdict] = {}
    if not blocks:
        for name, (eligible, reason) in generic_rule(model, slots).items():
            verdicts[name] = (eligible, f"no blocks found from metadata; generic rule: {reason}")
    for name, module, local in slots:
        param = getattr(module, local)
        embedding = embedding_reason(param, inputs, outputs)
        block = _enclosing(name, blocks)
        exempt = layer_weight_verdict(module, local)
        if embedding is not None:
            verdicts[name] = (False, embedding)
        elif not blocks:
            continue
        elif block is None:
            verdicts[name] = (False, "outside the blocks (embeddings, pooler or head)")
        elif exempt is not None:
            verdicts[name] = exempt
        else:
            verdicts[name] = (True, f"inside block {block} ({blocks[block]})")
    return verdicts
