"""LIPS: the object a client's training loop holds (optimizer wrapper + aggregation hook)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .config import LIPSConfig
from .layers import LayerPlan, find_layers
from .masking import check_finite, compute_score, keep_count
from .optimizer import LIPSOptimizer
from .schedule import check_round, density_at
from .selection import apply_selection_, select_top_k

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class MaskReport:
    """What :meth:`LIPS.on_global_model` did in one round.

    ``density`` is None on rounds that do not mask. ``fallback`` names the tensors
    scored by magnitude because this client had no stored gradient for them yet
    (it had never trained, e.g. with partial participation).
    """

    round: int
    density: Optional[float]
    score: Optional[str]
    tensors_masked: int
    elements_zeroed: int
    elements_eligible: int
    fallback: Tuple[str, ...] = ()

    @property
    def masked(self) -> bool:
        return self.density is not None

    def __str__(self) -> str:
        if not self.masked:
            return f"round {self.round}: no mask"
        text = (
            f"round {self.round}: masked {self.tensors_masked} tensors at density "
            f"{self.density:.3f} ({self.score}), zeroed {self.elements_zeroed:,} of "
            f"{self.elements_eligible:,} eligible entries"
        )
        if self.fallback:
            text += f"; {len(self.fallback)} tensors had no stored gradient: magnitude score"
        return text


def score_generator(
    seed: int, round_index: int, name: str, device: torch.device
) -> torch.Generator:
    """The generator of the random score for one tensor in one round: seeded from
    ``(seed, round, name)``, so the draw is reproducible and differs per tensor."""
    digest = hashlib.blake2b(f"{seed}:{round_index}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def mask_by_score_(
    targets: List[torch.Tensor],
    weight: torch.Tensor,
    signal: Optional[torch.Tensor],
    density: float,
    config: LIPSConfig,
    round_index: int,
    name: str,
) -> bool:
    """Score ``weight`` by ``config.score``, keep its ``int(density * numel)`` best
    entries and zero the others in every tensor of ``targets``, in place.

    ``signal`` is the ``g`` of the sensitivity score (a client's last-step gradient, or
    the server's global update); without one the score falls back to magnitude, and
    True is returned. The caller has checked ``weight`` and ``signal`` for NaN/inf.
    """
    kind, generator = config.score, None
    fell_back = kind == "sensitivity" and signal is None
    if fell_back:
        kind = "magnitude"
    if kind == "random":
        generator = score_generator(config.seed, round_index, name, weight.device)
    score = compute_score(kind, weight, signal, generator)
    kept = keep_count(weight.numel(), density)
    # Inputs are finite, so the score holds no NaN (an overflow to +inf ranks first).
    selection = select_top_k(score, kept, name, check=False)
    apply_selection_(targets, score, selection)
    return fell_back


def _single_device(model: nn.Module) -> None:
    devices: Dict[torch.device, str] = {}
    for name, param in model.named_parameters():
        devices.setdefault(param.device, name)
    if len(devices) > 1:
        listed = ", ".join(f"{dev} ({name})" for dev, name in devices.items())
        raise ValueError(
            f"the model's parameters lie on several devices: {listed}; LIPS needs every "
            "parameter on one device (move the model with model.to(device) first)"
        )


class LIPS:
    """Layer-wise Inertia Phenomenon with Sparsity for one federated client.

    Args:
        model: the client's model; the global weights are loaded into it each round.
        optimizer: any ``torch.optim.Optimizer`` holding the model's parameters. Train
            with :attr:`optimizer` (the wrapper) instead, so the last-step gradients
            are kept.
        config: the method's settings.

    Example::

        lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(300))
        for rnd in range(300):
            model.load_state_dict(global_state)
            lips.on_global_model(rnd)
            train_one_round(model, lips.optimizer)
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, config: LIPSConfig
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, LIPSConfig):
            raise TypeError(f"config must be a LIPSConfig, got {type(config).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        _single_device(model)
        self.model = model
        self.config = config
        self.plan: LayerPlan = find_layers(model, config.include, config.exclude)
        self._params: Dict[str, nn.Parameter] = {
            name: model.get_parameter(name) for name in self.plan.eligible_names
        }
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self._params.items() if id(p) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} of the {len(self._params)} "
                f"parameters LIPS masks (e.g. {', '.join(missing[:3])}); build the "
                "optimizer from this model's parameters"
            )
        self.optimizer = LIPSOptimizer(
            optimizer, self._params.values(), config.grad_dtype, config.grad_device
        )
        self._last_round: Optional[int] = None
        self.last_report: Optional[MaskReport] = None

    def on_global_model(self, round: int) -> MaskReport:  # noqa: A002 (contract name)
        """Call right after loading the global model, before training round ``round``.

        On mask rounds (LIPS_METHOD.md step 1) each eligible tensor keeps its
        ``int(d * numel)`` best-scoring entries; the rest, and the optimizer state at
        those entries, are set to zero. Otherwise nothing changes. Rounds must
        increase from call to call.
        """
        round = check_round(round, self.config)  # noqa: A001
        if self._last_round is not None and round <= self._last_round:
            raise ValueError(
                f"on_global_model({round}) after on_global_model({self._last_round}): "
                "rounds must increase. If one LIPS serves several clients, restore each "
                "client's state with load_state_dict() before its round"
            )
        density = density_at(round, self.config)
        report = (
            self._mask(round, density)
            if density is not None
            else MaskReport(round, None, None, 0, 0, self.plan.masked_numel)
        )
        self._last_round = round
        self.last_report = report
        logger.debug("%s", report)
        return report

    @torch.no_grad()
    def _mask(self, round_index: int, density: float) -> MaskReport:
        cfg = self.config
        grads = {name: self.optimizer.captured_grad(p) for name, p in self._params.items()}
        for name, param in self._params.items():
            check_finite(param, f"weight {name}")
            if cfg.score == "sensitivity" and grads[name] is not None:
                check_finite(grads[name], f"stored gradient of {name}")
        fallback: List[str] = []
        zeroed = 0
        for name, param in self._params.items():
            targets = [param, *self.optimizer.state_tensors(param)]
            if mask_by_score_(targets, param, grads[name], density, cfg, round_index, name):
                fallback.append(name)
            zeroed += param.numel() - keep_count(param.numel(), density)
        if fallback:
            logger.info(
                "round %d: no stored gradient for %d tensors (client has not trained "
                "yet); scored them by magnitude", round_index, len(fallback)
            )
        return MaskReport(
            round_index, density, cfg.score, len(self._params), zeroed,
            self.plan.masked_numel, tuple(fallback),
        )

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this client: stored gradients (copies) and
        round bookkeeping. Small: one ``grad_dtype`` tensor per eligible parameter."""
        grads = {}
        for name, param in self._params.items():
            grad = self.optimizer.captured_grad(param)
            if grad is not None:
                grads[name] = grad.detach().clone()
        return {"version": STATE_VERSION, "last_round": self._last_round, "grads": grads}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (a client's own, or a fresh one)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a LIPS state (expected a dict with version {STATE_VERSION}), got "
                f"{type(state).__name__}"
            )
        grads = state.get("grads", {})
        unknown = sorted(set(grads) - set(self._params))
        if unknown:
            raise ValueError(
                f"LIPS state holds gradients for tensors this model does not mask: "
                f"{', '.join(unknown[:5])}"
            )
        for name, grad in grads.items():
            if tuple(grad.shape) != tuple(self._params[name].shape):
                raise ValueError(
                    f"stored gradient of {name} has shape {tuple(grad.shape)}, the "
                    f"parameter has {tuple(self._params[name].shape)}"
                )
        last_round = state.get("last_round")
        if last_round is not None:
            last_round = check_round(last_round, self.config)
        for name, param in self._params.items():
            self.optimizer.set_captured_grad(param, grads.get(name))
        self._last_round = last_round
        self.last_report = None
