"""The detector registry: which model-family detector decides a model's tensors.

[`DETECTORS`][lips_wrap.detection.DETECTORS] lists the family detectors (timm, Hugging
Face) tried before the generic rule; [`detect`][lips_wrap.detection.detect] runs them.
Wrapped models (``torch.compile``, ``DistributedDataParallel``, ``DataParallel``; see
``families.MODEL_WRAPPERS``) are unwrapped first. PEFT adapters are handled one level
up, in ``find_layers``: the PEFT detector runs this registry on the model the adapters
wrap, so it imports this module and this module does not import it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from . import families
from .detect_hf import detect_hf
from .detect_timm import detect_timm
from .rules import Detector, NamedSlot, Verdict, generic_rule

DETECTORS: List[Tuple[str, Detector]] = [
    ("timm metadata", detect_timm),
    ("Hugging Face metadata", detect_hf),
]
"""Model-family detectors tried before the generic rule, in order: (label, detector).
Teaching LIPS a new family is adding a detector here."""

GENERIC_LABEL = "generic rule (plain torch)"


def named_slots(model: nn.Module) -> List[NamedSlot]:
    """Every (name, owning module, local name) of ``model``'s parameters, tied names too."""
    slots = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for local, _ in module.named_parameters(recurse=False):
            slots.append((f"{prefix}.{local}" if prefix else local, module, local))
    return slots


def _wrapper_attribute(model: nn.Module) -> Optional[str]:
    """The attribute holding the wrapped model if ``model`` is a known wrapper."""
    class_names = {cls.__name__ for cls in type(model).__mro__}
    for class_name, attribute in families.MODEL_WRAPPERS:
        inner = model._modules.get(attribute)
        if (
            class_name in class_names
            and isinstance(inner, nn.Module)
            and list(model._modules) == [attribute]
            and not model._parameters
        ):
            return attribute
    return None


def unwrap(model: nn.Module) -> Tuple[nn.Module, str, Tuple[str, ...]]:
    """(innermost model, the prefix wrappers add to its names, the wrappers' class
    names outermost first), peeling ``families.MODEL_WRAPPERS`` as often as they nest."""
    prefix, wrappers = "", []
    attribute = _wrapper_attribute(model)
    while attribute is not None:
        wrappers.append(type(model).__name__)
        prefix += attribute + "."
        model = model._modules[attribute]
        attribute = _wrapper_attribute(model)
    return model, prefix, tuple(wrappers)


def strip_wrapper_prefixes(name: str) -> str:
    """``name`` without leading wrapper attributes (``module.``, ``_orig_mod.``), as
    a state-dict key saved from a wrapped model carries them."""
    attributes = tuple(attribute + "." for _, attribute in families.MODEL_WRAPPERS)
    while name.startswith(attributes):
        name = name.split(".", 1)[1]
    return name


def detect(
    model: nn.Module,
    slots: Sequence[NamedSlot],
    detectors: Optional[Sequence[Tuple[str, Detector]]] = None,
) -> Tuple[str, Dict[str, Verdict]]:
    """(label, verdicts) from the first detector that recognises ``model``, else the
    generic rule. ``detectors`` defaults to [`DETECTORS`][lips_wrap.detection.DETECTORS],
    read at call time.

    A wrapped ``model`` ([`unwrap`][lips_wrap.detection.unwrap]) is detected as the
    model it wraps, on the slots under the wrappers' prefix; the verdicts carry the
    prefix again.
    """
    inner, prefix, _ = unwrap(model)
    if prefix:
        inner_slots = [
            (name[len(prefix):], module, local)
            for name, module, local in slots if name.startswith(prefix)
        ]
        label, verdicts = detect(inner, inner_slots, detectors)
        return label, {prefix + name: verdict for name, verdict in verdicts.items()}
    for label, detector in DETECTORS if detectors is None else detectors:
        verdicts = detector(model, slots)
        if verdicts is not None:
            return label, verdicts
    return GENERIC_LABEL, generic_rule(model, slots)
