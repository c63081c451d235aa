"""Which tensors LIPS masks: ``find_layers`` builds an inspectable plan.

Precedence: the user's ``include``/``exclude`` patterns, then PEFT adapters, then a
model-family detector (the first of [`DETECTORS`][lips_wrap.detection.DETECTORS] that
recognises the model), then the generic rule for plain torch models: the weights of
the layers between the first layer (the input stem) and the last (the head), in
registration order, are eligible; stems, heads, biases, norms, embeddings and every
other parameter are exempt. A parameter shared by several modules (tied weights) is
decided once, under its first name, and is eligible only if every name it has is.

Wrapped models (``torch.compile``, ``DistributedDataParallel``, ``DataParallel``; see
``families.MODEL_WRAPPERS``) are unwrapped first: detection runs on the innermost model
and the plan names each tensor as the wrapped model does (``module._orig_mod.fc.weight``),
so ``model.get_parameter(name)`` and ``model.state_dict()`` keys match. Patterns match a
name with or without the wrappers' prefix.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import families
from .detect_peft import PEFT_LABEL, detect_peft
from .detection import DETECTORS, detect, named_slots, unwrap
from .detection import strip_wrapper_prefixes as strip_wrapper_prefixes  # re-exported
from .experts import exempt_routing_gates, slices_by_name
from .rules import Detector, Verdict


@dataclass(frozen=True)
class TensorDecision:
    """The plan's verdict on one parameter."""

    name: str
    shape: Tuple[int, ...]
    eligible: bool
    reason: str
    aliases: Tuple[str, ...] = ()
    slices: int = 1
    """Equal slices along dim 0 that are ranked and masked one by one, each keeping
    ``int(d * numel_of_slice)``: the experts of a fused mixture-of-experts tensor
    (``[experts, out, in]``); 1 ranks the tensor whole."""

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total

    @property
    def why(self) -> str:
        """The reason, with the per-expert ranking of a fused experts tensor."""
        if self.slices == 1:
            return self.reason
        shape = "x".join(map(str, self.shape[1:]))
        return f"{self.reason}; per expert, {self.slices} x {shape}"


@dataclass(frozen=True)
class LayerPlan:
    """Every parameter of a model with the decision LIPS takes on it.

    ``prefix`` is what wrappers (``wrappers``, outermost first) add in front of every
    name, e.g. ``"module._orig_mod."`` for ``DistributedDataParallel(torch.compile(m))``;
    empty for a model used as it is.
    """

    decisions: Tuple[TensorDecision, ...]
    detector: str
    prefix: str = ""
    wrappers: Tuple[str, ...] = ()

    @property
    def eligible(self) -> Tuple[TensorDecision, ...]:
        return tuple(d for d in self.decisions if d.eligible)

    @property
    def eligible_names(self) -> Tuple[str, ...]:
        return tuple(d.name for d in self.eligible)

    @property
    def masked_numel(self) -> int:
        return sum(d.numel for d in self.eligible)

    @property
    def total_numel(self) -> int:
        return sum(d.numel for d in self.decisions)

    def unwrapped_name(self, name: str) -> str:
        """``name`` without the wrappers' prefix: the name in the unwrapped model."""
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def summary(self) -> str:
        share = self.masked_numel / self.total_numel if self.total_numel else 0.0
        through = (
            f" (inside {' > '.join(self.wrappers)}: names start with {self.prefix!r})"
            if self.wrappers else ""
        )
        return (
            f"{len(self.eligible)} of {len(self.decisions)} tensors eligible, "
            f"{self.masked_numel:,} of {self.total_numel:,} parameters ({share:.1%}); "
            f"detected by: {self.detector}{through}"
        )

    def table(self) -> str:
        """A fixed-width table: name, shape, eligible or exempt, and why."""
        rows = [("tensor", "shape", "LIPS", "why")]
        for d in self.decisions:
            name = d.name + (f" (= {', '.join(d.aliases)})" if d.aliases else "")
            rows.append(
                (name, "x".join(map(str, d.shape)) or "scalar",
                 "masked" if d.eligible else "exempt", d.why)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
            for row in rows
        ]
        return "\n".join(lines + [self.summary()])

    def __str__(self) -> str:
        return self.table()


def _detectors() -> List[Tuple[str, Detector]]:
    """PEFT adapters first (a PeftModel forwards attribute look-ups to the model it
    wraps, so family detectors would take it for that model), then the registry."""
    return [(PEFT_LABEL, detect_peft), *DETECTORS]


def find_layers(
    model: nn.Module,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_empty: bool = False,
) -> LayerPlan:
    """Decide, for every parameter of ``model``, whether LIPS masks it and why.

    Args:
        model: any ``nn.Module``; a ``torch.compile``/``DistributedDataParallel``/
            ``DataParallel`` wrapper is detected as the model it wraps, and the plan
            names tensors as the wrapper does (``_orig_mod.``/``module.`` prefixes).
        include: ``fnmatch`` globs on parameter names that make a tensor eligible;
            a glob matches a name with or without the wrappers' prefix.
        exclude: globs that make a tensor exempt; they win over ``include``.
        allow_empty: return a plan with nothing eligible instead of raising.

    Raises:
        ValueError: a pattern matches no parameter, an included tensor is not a
            floating-point tensor, the model contains an FSDP wrapper
            (``families.SHARDING_WRAPPERS``), or (unless ``allow_empty``) nothing is
            eligible.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_sharded(model)
    include, exclude = tuple(include), tuple(exclude)
    inner, prefix, wrappers = unwrap(model)
    slots = named_slots(model)
    label, verdicts = detect(model, slots, _detectors())
    verdicts = exempt_routing_gates(model, slots, verdicts)
    slices = slices_by_name(slots)

    names_of: Dict[int, List[str]] = {}
    params: Dict[int, nn.Parameter] = {}
    for name, module, local in slots:
        param = getattr(module, local)
        names_of.setdefault(id(param), []).append(name)
        params[id(param)] = param

    _check_patterns_match(include, "include", [s[0] for s in slots], prefix)
    _check_patterns_match(exclude, "exclude", [s[0] for s in slots], prefix)

    decisions = []
    for key, names in names_of.items():
        param = params[key]
        eligible, reason = _decide(names, verdicts, param, include, exclude, prefix)
        decisions.append(TensorDecision(
            names[0], tuple(param.shape), eligible, reason, tuple(names[1:]),
            slices.get(names[0], 1) if eligible else 1,
        ))
    plan = LayerPlan(tuple(decisions), label, prefix, wrappers)
    if not plan.eligible and not allow_empty:
        raise ValueError(
            f"no eligible layer found in {type(inner).__name__}: LIPS masks the weights "
            "of middle layers (between the input stem and the head). Name tensors with "
            "include=[...] patterns, or check the plan:\n" + plan.table()
        )
    return plan


def _refuse_sharded(model: nn.Module) -> None:
    for name, module in model.named_modules():
        class_names = {cls.__name__ for cls in type(module).__mro__}
        found = class_names.intersection(families.SHARDING_WRAPPERS)
        if found:
            raise ValueError(
                f"{name or 'the model'} is a {found.pop()}: its parameters are flattened "
                "and sharded across ranks, and LIPS needs every tensor whole to rank its "
                "entries. Use DistributedDataParallel, or mask on the server with "
                "lips_wrap.mask_global_state on the full state dict"
            )


def _forms(name: str, prefix: str) -> Tuple[str, ...]:
    """The names a pattern may match: as the (wrapped) model has it, and unprefixed."""
    return (name, name[len(prefix):]) if prefix and name.startswith(prefix) else (name,)


def _first_match(names: Sequence[str], patterns: Sequence[str], prefix: str) -> Optional[str]:
    for name in names:
        for pattern in patterns:
            if any(fnmatch.fnmatchcase(form, pattern) for form in _forms(name, prefix)):
                return pattern
    return None


def _check_patterns_match(
    patterns: Sequence[str], label: str, names: Sequence[str], prefix: str
) -> None:
    for pattern in patterns:
        if _first_match(names, [pattern], prefix) is None:
            raise ValueError(
                f"{label} pattern {pattern!r} matches no parameter name; names look like "
                f"{', '.join(repr(n) for n in names[:3])}"
                + (f" (the prefix {prefix!r} may be left out)" if prefix else "")
            )


def _decide(
    names: Sequence[str],
    verdicts: Dict[str, Verdict],
    param: torch.Tensor,
    include: Sequence[str],
    exclude: Sequence[str],
    prefix: str,
) -> Verdict:
    excluded = _first_match(names, exclude, prefix)
    if excluded is not None:
        return False, f"exclude pattern {excluded!r}"
    included = _first_match(names, include, prefix)
    if included is not None:
        if not param.is_floating_point():
            raise ValueError(
                f"include pattern {included!r} selects {names[0]}, a {param.dtype} tensor; "
                "only floating-point tensors can be masked"
            )
        return True, f"include pattern {included!r}"
    first_eligible, first_reason = verdicts[names[0]]
    for name in names[1:]:
        eligible, reason = verdicts[name]
        if not eligible and first_eligible:
            return False, f"tied with exempt {name} ({reason})"
    if first_eligible and not param.requires_grad:
        return False, "frozen (requires_grad=False)"
    return first_eligible, first_reason
