"""Layer detection for PEFT-wrapped models (LoRA and other adapters).

The choice: with adapters, LIPS masks only what the clients train. The wrapped base
model is decided by the other detectors (timm, Hugging Face, generic rule), so the
adapter matrices inside its blocks (``...q_proj.lora_A.default.weight``) are eligible;
then every frozen parameter is exempt, the base weights (``...q_proj.base_layer.weight``)
first among them. Masking a frozen weight would destroy it for good: nothing trains
it back. Trainable parameters outside the blocks (``modules_to_save`` heads) stay
exempt as in the base model. peft itself is never imported.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from torch import nn

from .detection import detect, named_slots
from .rules import NamedSlot, Verdict

PEFT_LABEL = "PEFT adapters (trainable only)"


def is_peft_model(model: nn.Module) -> bool:
    """Duck-typed: PEFT models and adapter-injected modules carry ``peft_config``."""
    return hasattr(model, "peft_config")


def _base_and_prefix(model: nn.Module) -> tuple:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, module in model.named_modules():
        if module is base:
            return base, f"{name}." if name else ""
    return model, ""


def detect_peft(model: nn.Module, slots: Sequence[NamedSlot]) -> Optional[Dict[str, Verdict]]:
    """The PEFT detector (see the module docstring); None for other models."""
    if not is_peft_model(model):
        return None
    base, prefix = _base_and_prefix(model)
    label, inner = detect(base, named_slots(base))
    verdicts: Dict[str, Verdict] = {}
    for name, module, local in slots:
        param = getattr(module, local)
        inner_name = name[len(prefix):] if name.startswith(prefix) else None
        if not param.requires_grad:
            verdicts[name] = (False, "PEFT: frozen base weight, only trainable ones are masked")
        elif inner_name not in inner:
            verdicts[name] = (False, "PEFT: outside the wrapped base model")
        else:
            eligible, reason = inner[inner_name]
            verdicts[name] = (eligible, f"PEFT trainable, {label}: {reason}")
    return verdicts
