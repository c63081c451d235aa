"""Does the model hold the global model it received? Framework adapters ask before masking.

Masking before the received weights are loaded masks weights that the load then
overwrites: the round trains without the mask and the report describes a mask the
model never had. ``compare_received`` compares the tensors LIPS masks with the
received arrays, exactly, so an adapter can raise with its framework's fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

import torch

from .detection import strip_wrapper_prefixes
from .lips import LIPS


@dataclass(frozen=True)
class ReceivedCheck:
    """What ``compare_received`` found: how many tensors LIPS masks were among the
    received ones (``compared``), and which of those differ from the model's."""

    compared: int
    differ: Tuple[str, ...]


def compare_received(lips: LIPS, received: Mapping[str, Any]) -> ReceivedCheck:
    """Compare every tensor ``lips`` masks with its entry in ``received`` (name ->
    torch tensor or numpy array), exactly, in the model's dtype.

    Names are matched with and without wrapper prefixes (``module.``, ``_orig_mod.``),
    so a compiled or DDP model can be checked against a plain model's state dict.
    Eligible tensors absent from ``received`` are not compared.
    """
    keys: Dict[str, str] = {}
    for key in received:
        keys.setdefault(key, key)
    for key in received:
        keys.setdefault(strip_wrapper_prefixes(key), key)
    plan, compared, differ = lips.plan, 0, []
    for decision in plan.eligible:
        forms = [
            form for name in (decision.name,) + decision.aliases
            for form in (name, plan.unwrapped_name(name), strip_wrapper_prefixes(name))
        ]
        key = next((keys[form] for form in forms if form in keys), None)
        if key is None:
            continue
        compared += 1
        param = lips.model.get_parameter(decision.name).detach()
        value = torch.as_tensor(received[key])
        if tuple(value.shape) != tuple(param.shape) or not torch.equal(
            value.to(device=param.device, dtype=param.dtype), param
        ):
            differ.append(decision.name)
    return ReceivedCheck(compared, tuple(differ))
