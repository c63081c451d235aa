"""The eligibility rule, written once: what counts as a layer weight, what is always
exempt (norms, embeddings, biases), and the generic rule for plain torch models.
Every detector (``detect_timm``, ``detect_hf``, the generic rule) decides a
parameter's kind through ``layer_weight_verdict``; the knowledge itself is data
in ``lips_wrap.families``.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

from torch import nn

from . import families

Verdict = Tuple[bool, str]
"""(eligible, reason) for one parameter name."""

NamedSlot = Tuple[str, nn.Module, str]
"""(full parameter name, owning module, local parameter name)."""

Detector = Callable[[nn.Module, Sequence[NamedSlot]], Optional[Dict[str, Verdict]]]
"""Decides every slot of a model it recognises, or returns None to pass."""


def _matches_any(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def is_layer_weight(module: nn.Module, local_name: str) -> bool:
    """Whether ``module.<local_name>`` is a layer's weight matrix or kernel."""
    for module_type, glob in families.LAYER_WEIGHTS:
        if isinstance(module, module_type) and fnmatch.fnmatchcase(local_name, glob):
            return True
    class_name = type(module).__name__
    return any(
        fnmatch.fnmatchcase(class_name, known) and fnmatch.fnmatchcase(local_name, glob)
        for known, glob in families.LAYER_WEIGHTS_BY_CLASS_NAME
    )


def exempt_kind(module: nn.Module, local_name: str) -> Optional[str]:
    """Why a parameter is never a layer weight (norm, embedding, bias), or None."""
    class_name = type(module).__name__
    if isinstance(module, families.NORM_TYPES) or any(
        fragment in class_name for fragment in families.NORM_CLASS_NAME_FRAGMENTS
    ):
        return f"normalisation ({class_name})"
    if isinstance(module, families.EMBEDDING_TYPES) or any(
        fragment in class_name for fragment in families.EMBEDDING_CLASS_NAME_FRAGMENTS
    ):
        return f"embedding ({class_name})"
    if _matches_any(local_name, families.BIAS_NAMES):
        return "bias"
    return None


def layer_weight_verdict(module: nn.Module, local_name: str) -> Optional[Verdict]:
    """The exempt verdict of a parameter that is no layer weight (norm, embedding,
    bias, or any other parameter), or None for a layer weight."""
    kind = exempt_kind(module, local_name)
    if kind is not None:
        return False, kind
    if not is_layer_weight(module, local_name):
        return False, f"not a layer weight ({type(module).__name__}.{local_name})"
    return None


def generic_rule(model: nn.Module, slots: Sequence[NamedSlot]) -> Dict[str, Verdict]:
    """The rule for plain torch models: middle layer weights, in registration order."""
    kinds = {name: layer_weight_verdict(module, local) for name, module, local in slots}
    layer_names = [name for name, _, _ in slots if kinds[name] is None]
    stem = layer_names[0] if layer_names else None
    head = layer_names[-1] if layer_names else None
    verdicts: Dict[str, Verdict] = {}
    for name, module, _ in slots:
        class_name = type(module).__name__
        exempt = kinds[name]
        if exempt is not None:
            verdicts[name] = exempt
        elif name == stem:
            verdicts[name] = (False, f"input stem: first layer ({class_name})")
        elif name == head:
            verdicts[name] = (False, f"head: last layer ({class_name})")
        else:
            verdicts[name] = (True, f"middle layer weight ({class_name})")
    return verdicts
