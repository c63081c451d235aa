"""The server-side variant, for clients that cannot keep gradients.

The server masks the global model once, before sending it, scoring each eligible
tensor by ``|delta * W|`` with ``delta = W_t - W_{t-1}`` the change of the global
weights over the last round (``score="sensitivity"``), or by the configured
magnitude/random score. Works on state dicts keyed by parameter name, so any
framework that moves named arrays can use it; tied names are masked together.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from .config import LIPSConfig
from .layers import LayerPlan
from .masking import check_finite, keep_count, mask_by_score_
from .report import MaskReport
from .schedule import density_at


def mask_global_state(
    state: Mapping[str, torch.Tensor],
    previous: Optional[Mapping[str, torch.Tensor]],
    plan: LayerPlan,
    round_index: int,
    config: LIPSConfig,
    reference: Optional[Mapping[str, torch.Tensor]] = None,
) -> Tuple[Dict[str, torch.Tensor], MaskReport]:
    """Return the global state to send for ``round_index`` and what was done.

    ``state`` is the freshly aggregated global model, ``previous`` the global model of
    the round before (None if unknown: magnitude scores are used). ``round_index`` is
    the 0-based round the clients are about to start. ``reference`` (fine-tuning
    mode, ``LIPSConfig(reference="initial")``) maps every eligible name to the
    weights dropped entries return to, e.g. the pretrained model the run started
    from; scores then rank ``W - reference``. The input mappings are never
    modified: masked tensors are new, the others are the same objects. Everything is
    checked before anything is computed.
    """
    density = density_at(round_index, config)
    result = dict(state)
    if density is None:
        return result, MaskReport(round_index, None, None, 0, 0, plan.masked_numel)
    missing = [d.name for d in plan.eligible if d.name not in state]
    if missing:
        raise KeyError(
            f"the global state lacks {len(missing)} tensors the plan masks, e.g. "
            f"{', '.join(missing[:3])}; was the plan built from the same model?"
        )
    if config.reference == "initial" and reference is None:
        raise ValueError(
            "LIPSConfig(reference='initial') needs mask_global_state(..., reference=...): "
            "the weights the run started from, keyed like the state"
        )
    if config.reference == "zero" and reference is not None:
        raise ValueError(
            "a reference was given but the config has reference='zero'; use "
            "LIPSConfig(reference='initial') for the fine-tuning mode"
        )
    for decision in plan.eligible:
        weight = state[decision.name]
        check_finite(weight, f"global weight {decision.name}")
        for what, others in (("previous", previous), ("reference", reference)):
            if others is not None and decision.name in others:
                _check_like(others[decision.name], weight, f"{what}[{decision.name!r}]")
        if reference is not None and decision.name not in reference:
            raise KeyError(f"the reference lacks {decision.name}, which the plan masks")
    fallback = []
    zeroed = 0
    with torch.no_grad():
        for decision in plan.eligible:
            weight = state[decision.name]
            delta = None
            known = previous is not None and decision.name in previous
            if config.score == "sensitivity" and known:
                delta = weight.to(torch.float32) - previous[decision.name].to(
                    device=weight.device, dtype=torch.float32)
                check_finite(delta, f"global update of {decision.name}")
            masked = weight.clone()
            if mask_by_score_(
                [masked], weight, delta, density, config.score, seed=config.seed,
                round_index=round_index, name=decision.name,
                reference=None if reference is None else reference[decision.name],
                slices=decision.slices,
            ):
                fallback.append(decision.name)
            for name in (decision.name,) + decision.aliases:
                if name in result:
                    result[name] = masked
            zeroed += weight.numel() - keep_count(weight.numel(), density, decision.slices)
    report = MaskReport(round_index, density, config.score, len(plan.eligible), zeroed,
                        plan.masked_numel, tuple(fallback))
    return result, report


def _check_like(tensor: object, weight: torch.Tensor, what: str) -> None:
    """``tensor`` must be a finite floating-point tensor of ``weight``'s shape."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{what} must be a floating-point tensor, got {kind}")
    if tuple(tensor.shape) != tuple(weight.shape):
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)}, the global weight has "
            f"{tuple(weight.shape)}; pass the state of the same model"
        )
    check_finite(tensor, what)


class ServerMasker:
    """The server side's memory between rounds: the global model it sent last, so the
    next mask scores ``|delta * W|`` against it.

    Call it with each freshly aggregated state and the round the clients are about to
    start; it returns what to send (masked on mask rounds) and remembers it. Give the
    model's state at construction as ``initial`` when clients start from it.
    """

    def __init__(
        self,
        plan: LayerPlan,
        config: LIPSConfig,
        initial: Optional[Mapping[str, torch.Tensor]] = None,
        reference: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        self.plan = plan
        self.config = config
        self.reference = None if reference is None else self.snapshot(reference)
        self.previous: Optional[Dict[str, torch.Tensor]] = (
            None if initial is None else self.snapshot(initial)
        )

    def snapshot(self, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Detached copies of the eligible tensors of ``state``."""
        return {
            name: state[name].detach().clone()
            for name in self.plan.eligible_names if name in state
        }

    def __call__(
        self, state: Mapping[str, torch.Tensor], round_index: int
    ) -> Tuple[Dict[str, torch.Tensor], MaskReport]:
        """[`mask_global_state`][lips_wrap.mask_global_state] against the remembered previous model;
        what is returned becomes the new previous model."""
        masked, report = mask_global_state(
            state, self.previous, self.plan, round_index, self.config, self.reference
        )
        self.remember(masked)
        return masked, report

    def remember(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take ``state`` as the model sent (e.g. on rounds the server did not mask)."""
        self.previous = self.snapshot(state)
