"""Mixture-of-experts models: which tensors hold one slice per expert, and which
modules are routing gates. The knowledge is data in ``lips_wrap.families``
(``FUSED_EXPERT_WEIGHTS``, ``ROUTING_GATE_NAMES``, ``MOE_*``); this module applies it
to a model's named parameters. Nothing here imports a framework.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import families
from .rules import NamedSlot, Verdict


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def expert_slices(
    module: nn.Module, local_name: str, param: torch.Tensor, name: str = ""
) -> int:
    """How many experts ``module.<local_name>`` (the parameter ``name``) stacks along
    dim 0 (a fused experts tensor, ``families.FUSED_EXPERT_WEIGHTS``), or 1 for any
    other tensor."""
    class_name = type(module).__name__
    for class_glob, param_glob, attribute in families.FUSED_EXPERT_WEIGHTS:
        if not (fnmatch.fnmatchcase(class_name, class_glob)
                and fnmatch.fnmatchcase(local_name, param_glob)):
            continue
        if not attribute:
            return int(param.shape[0]) if param.dim() == 3 else 1
        count = getattr(module, attribute, None)
        if isinstance(count, int) and count >= 1 and param.dim() and param.shape[0] % count == 0:
            return count
        warnings.warn(
            f"{name or local_name} ({class_name}.{local_name}) of shape "
            f"{tuple(param.shape)} stacks experts "
            f"along dim 0, but {class_name}.{attribute} = {count!r} is no number of "
            "experts that divides it, so LIPS ranks it as one tensor, not per expert. "
            "Fix: correct the row of lips_wrap.families.FUSED_EXPERT_WEIGHTS",
            UserWarning, stacklevel=2,
        )
    return 1


def slices_by_name(slots: Sequence[NamedSlot]) -> Dict[str, int]:
    """Parameter name -> expert slices, for the fused expert tensors among ``slots``."""
    found = {}
    for name, module, local in slots:
        slices = expert_slices(module, local, getattr(module, local), name)
        if slices > 1:
            found[name] = slices
    return found


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` is a mixture-of-experts block (see ``families``)."""
    if _matches(type(module).__name__, families.MOE_BLOCK_CLASS_NAMES):
        return True
    return any(
        child_name in families.MOE_EXPERT_CHILD_NAMES
        or _matches(type(child).__name__, families.MOE_EXPERT_CHILD_CLASS_NAMES)
        for child_name, child in module.named_children()
    )


def _routing_gate(name: str, modules: Mapping[str, nn.Module]) -> Optional[str]:
    """The reason ``name`` (a parameter) belongs to a routing gate, or None: some
    component of its name is in ``ROUTING_GATE_NAMES`` and its parent is an MoE block."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        if parts[end - 1] not in families.ROUTING_GATE_NAMES:
            continue
        parent_name = ".".join(parts[:end - 1])
        parent = modules.get(parent_name)
        if parent is not None and is_moe_block(parent):
            return (
                f"routing gate of the mixture-of-experts block {parent_name or 'model'} "
                f"({type(parent).__name__}): it decides which experts see each token"
            )
    return None


def exempt_routing_gates(
    model: nn.Module, slots: Sequence[NamedSlot], verdicts: Dict[str, Verdict]
) -> Dict[str, Verdict]:
    """``verdicts`` with every parameter of a routing gate exempt, with the reason."""
    modules = dict(model.named_modules(remove_duplicate=False))
    result = dict(verdicts)
    for name, _, _ in slots:
        reason = _routing_gate(name, modules)
        if reason is not None:
            result[name] = (False, reason)
    return result
