"""LIPS: the object a client's training loop holds (optimizer wrapper + aggregation hook)."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from .config import LIPSConfig
from .layers import LayerPlan, find_layers
from .masking import check_finite, keep_count, mask_by_score_
from .optimizer import LIPSOptimizer
from .report import MaskReport
from .schedule import check_round, density_at, is_mask_round
from .witness import TrainingWitness

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_KEYS = ("version", "last_round", "grads")
"""Keys every LIPS state holds; ``reference`` is added in the fine-tuning mode."""

__all__ = ["LIPS", "MaskReport", "STATE_VERSION"]

_TRAIN_WITH_WRAPPER = (
    "train with lips.optimizer, the wrapper (e.g. lips.optimizer.step(), "
    "scaler.step(lips.optimizer), Trainer(optimizers=(lips.optimizer, scheduler)))"
)
SUBNORMAL_WARNING_SHARE = 0.1
"""Share of a float16 stored gradient's non-zero entries that may be subnormal before
LIPS warns (once per tensor): below float16's smallest normal, 6.1e-5, entries keep
fewer significant bits, and below 6e-8 they are stored as 0."""


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


def _no_sharded_parameters(model: nn.Module) -> None:
    """Refuse DTensor parameters (FSDP2 ``fully_shard``, tensor parallel): the k-th
    largest score would have to be found across shards."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"{len(sharded)} parameters are sharded DTensors (e.g. {sharded[0]}: FSDP2 "
            "fully_shard or tensor parallelism); LIPS supports plain, DataParallel, "
            "DistributedDataParallel and torch.compile models, not sharded parameters. "
            "Use DDP, or mask on the server with lips_wrap.mask_global_state on the "
            "full state dict"
        )


class LIPS:
    """Layer-wise Inertia Phenomenon with Sparsity for one federated client.

    Args:
        model: the client's model; the global weights are loaded into it each round.
        optimizer: any ``torch.optim.Optimizer`` holding the model's parameters. Train
            with ``lips.optimizer`` (the wrapper) instead, so the last-step gradients
            are kept.
        config: the method's settings.

    Example:
        ```python
        lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(300))
        for rnd in range(300):
            model.load_state_dict(global_state)
            lips.on_global_model(rnd)
            train_one_round(model, lips.optimizer)
        ```
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
        _no_sharded_parameters(model)
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
        self._reference: Dict[str, torch.Tensor] = {}
        if config.reference == "initial":
            self.set_reference({name: p.detach() for name, p in self._params.items()})
        self._witness = TrainingWitness(self._params, self.optimizer)
        self._last_round: Optional[int] = None
        self.last_report: Optional[MaskReport] = None
        self._fallback_warned = False
        self._precision_warned: Set[str] = set()

    def set_reference(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Set the weights dropped entries return to in the fine-tuning mode
        (``LIPSConfig(reference="initial")``); by default the model's eligible
        weights when LIPS was built. ``weights`` maps every eligible name to a finite
        tensor of its shape; copies are kept in the parameter's dtype, on
        ``config.grad_device`` or beside the parameter (memory: one copy of the
        eligible weights)."""
        if self.config.reference != "initial":
            raise ValueError(
                f"set_reference needs LIPSConfig(reference='initial'), this LIPS has "
                f"reference={self.config.reference!r}"
            )
        self._reference = self._checked_tensors(weights, "reference", "weight", exact=True)

    def _checked_tensors(
        self, tensors: object, key: str, what: str, exact: bool
    ) -> Dict[str, torch.Tensor]:
        """Validate a name -> tensor mapping for the eligible parameters. ``exact``
        (reference weights): every eligible name, finite, returned as copies in the
        parameter's dtype. Otherwise (stored gradients): any subset, no NaN, returned
        as given (``set_captured_grad`` copies them into their buffers)."""
        if not isinstance(tensors, Mapping):
            raise ValueError(
                f"{key} must be a dict of parameter name -> tensor, got "
                f"{type(tensors).__name__}"
            )
        unknown = sorted(set(tensors) - set(self._params))
        if unknown:
            raise ValueError(
                f"{key} holds tensors for names this LIPS does not mask: "
                f"{', '.join(map(str, unknown[:5]))}"
            )
        if exact:
            absent = [name for name in self._params if name not in tensors]
            if absent:
                raise ValueError(
                    f"{key} lacks {len(absent)} of the eligible tensors, e.g. {absent[0]}"
                )
        checked = {}
        for name, tensor in tensors.items():
            param = self._params[name]
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise ValueError(
                    f"{key}[{name!r}] must be a floating-point tensor, got "
                    f"{type(tensor).__name__}"
                )
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{key}[{name!r}]: {what} of shape {tuple(tensor.shape)}, the "
                    f"parameter has {tuple(param.shape)}"
                )
            if exact and tensor is self._reference.get(name):
                checked[name] = tensor  # our own reference, restored: already checked
                continue
            check_finite(tensor, f"{key}[{name!r}]", allow_inf=not exact)
            if exact:
                device = self.config.grad_device or param.device
                tensor = tensor.detach().to(device=device, dtype=param.dtype, copy=True)
            checked[name] = tensor
        return checked

    def on_global_model(self, round: int) -> MaskReport:  # noqa: A002 (contract name)
        """Call right after loading the global model, before training round ``round``.

        On mask rounds (rounds 1, 1 + K, 1 + 2K, ...; see the docs' method page)
        each eligible tensor keeps its ``int(d * numel)`` best-scoring entries; the
        rest are set to zero (or to the reference in the fine-tuning mode), and the
        optimizer state at those entries to exactly zero. Otherwise nothing changes.
        Rounds must increase from call to call; they may skip (a client that missed
        rounds), and the report's ``skipped`` names the mask rounds it missed. On any
        error nothing is changed.
        """
        round = check_round(round, self.config)  # noqa: A001
        if self._last_round is not None and round <= self._last_round:
            raise ValueError(
                f"on_global_model({round}) after on_global_model({self._last_round}): "
                "rounds must increase. If one LIPS serves several clients, restore each "
                "client's state with load_state_dict() before its round"
            )
        self._check_parameters()
        self._check_training(f"on_global_model({round})", _TRAIN_WITH_WRAPPER)
        self.optimizer.before_next_step = None
        density = density_at(round, self.config)
        skipped = self._skipped_masks(round)
        report = (
            self._mask(round, density, skipped)
            if density is not None
            else MaskReport(round, None, None, 0, 0, self.plan.masked_numel,
                            skipped=skipped)
        )
        self._last_round = round
        self.last_report = report
        self._witness.mark()
        if report.masked:
            self._guard_mask(round)
        if skipped:
            logger.info("%s", report)
        else:
            logger.debug("%s", report)
        return report

    def end_round(self, where: str = "lips.end_round()", fix: Optional[str] = None) -> None:
        """Call when this round's local training is over: checks that it went through
        ``lips.optimizer`` and warns or raises (``LIPSConfig.unwrapped_training``) if
        the model was trained some other way. The next [`on_global_model`][LIPS.on_global_model]
        checks the same; callers that build a new LIPS every round (the Flower and FedML adapters)
        never reach it and call this instead. ``where`` and ``fix`` name
        the caller and the fix in the caller's terms in the message."""
        self._check_training(where, fix or _TRAIN_WITH_WRAPPER)

    def _skipped_masks(self, round_index: int) -> Tuple[int, ...]:
        """Mask rounds before ``round_index`` that this client's LIPS never saw:
        since its last round, or since the start of the run for its first."""
        first = 0 if self._last_round is None else self._last_round + 1
        return tuple(r for r in range(first, round_index) if is_mask_round(r, self.config))

    def _guard_mask(self, round_index: int) -> None:
        """Warn at the next step if the masked weights were overwritten before it,
        e.g. by loading the global model after on_global_model instead of before."""
        versions = {name: p._version for name, p in self._params.items()}

        def check() -> None:
            changed = [n for n, p in self._params.items() if p._version != versions[n]]
            if changed:
                warnings.warn(
                    f"the weights LIPS masked in on_global_model({round_index}) were "
                    f"overwritten before training started ({len(changed)} tensors, e.g. "
                    f"{changed[0]}), so this round trained without the mask. Load the "
                    "global model first, then call on_global_model, then train",
                    UserWarning, stacklevel=4,
                )

        self.optimizer.before_next_step = check

    def _check_parameters(self) -> None:
        for name, param in self._params.items():
            try:
                current = self.model.get_parameter(name)
            except AttributeError:
                current = None
            if current is not param:
                raise RuntimeError(
                    f"the model's parameter {name} is no longer the one LIPS was built "
                    "with (it was replaced, e.g. by sharding, re-initialisation or "
                    "assigning a new nn.Parameter); build LIPS after the model is final"
                )

    def _check_training(self, where: str, fix: str) -> None:
        """Warn or raise (per ``unwrapped_training``) if the model was trained without
        the wrapper since the last mark; after a warning, the evidence is said once."""
        evidence = self._witness.unwrapped_training()
        if evidence is None or self.config.unwrapped_training == "ignore":
            return
        since = (
            "since LIPS was built" if self._last_round is None
            else f"since on_global_model({self._last_round})"
        )
        message = (
            f"{where}: {evidence} {since}. LIPS kept no gradient from that training, so "
            "its masks score by magnitude (or by stale gradients) instead of |g * W|. "
            f"Fix: {fix}"
        )
        if self.config.unwrapped_training == "error":
            raise RuntimeError(message)
        self._witness.mark()
        warnings.warn(message, UserWarning, stacklevel=3)

    @torch.no_grad()
    def _mask(self, round_index: int, density: float, skipped: Tuple[int, ...]) -> MaskReport:
        cfg = self.config
        grads = {name: self.optimizer.captured_grad(p) for name, p in self._params.items()}
        for name, param in self._params.items():
            check_finite(param, f"weight {name}")
            if cfg.score == "sensitivity" and grads[name] is not None:
                # inf: a finite gradient beyond grad_dtype's range, ranked saturated
                check_finite(grads[name], f"stored gradient of {name}", allow_inf=True)
        if cfg.score == "sensitivity":
            self._check_precision(grads)
        fallback: List[str] = []
        zeroed = 0
        slices = {d.name: d.slices for d in self.plan.eligible}  # experts of fused tensors
        for name, param in self._params.items():
            targets = [param, *self.optimizer.state_tensors(param)]
            if mask_by_score_(targets, param, grads[name], density, cfg.score,
                              seed=cfg.seed, round_index=round_index, name=name,
                              reference=self._reference.get(name), slices=slices[name]):
                fallback.append(name)
            zeroed += param.numel() - keep_count(param.numel(), density, slices[name])
        if fallback:
            self._say_fallback(round_index, len(fallback))
        return MaskReport(
            round_index, density, cfg.score, len(self._params), zeroed,
            self.plan.masked_numel, tuple(fallback), skipped,
        )

    def _say_fallback(self, round_index: int, count: int) -> None:
        """The magnitude fallback: a warning the first time for this LIPS, then INFO."""
        message = (
            f"LIPS round {round_index}: no stored gradient for {count} of the "
            f"{len(self._params)} tensors, so they were scored by magnitude |W|, not "
            "|g * W|: this client has not trained through lips.optimizer yet (its first "
            "round is a mask round, e.g. with partial participation). Expected once per "
            "client that joins late; on every mask round it means the training does "
            "not go through lips.optimizer (or the client's LIPS state is not restored)"
        )
        if self._fallback_warned:
            logger.info("%s", message)
            return
        self._fallback_warned = True
        warnings.warn(message + ". Said once per LIPS; later ones are logged at INFO",
                      UserWarning, stacklevel=5)  # _mask's no_grad wrapper is a frame

    def _check_precision(self, grads: Mapping[str, Optional[torch.Tensor]]) -> None:
        """Warn once per tensor when a float16 stored gradient is mostly too small for
        float16: its ranking lost precision, and smaller entries were flushed to 0."""
        tiny = torch.finfo(torch.float16).tiny
        for name, grad in grads.items():
            if grad is None or grad.dtype != torch.float16 or name in self._precision_warned:
                continue
            nonzero = int(grad.count_nonzero())
            subnormal = int(((grad != 0) & (grad.abs() < tiny)).sum())
            if nonzero and subnormal <= SUBNORMAL_WARNING_SHARE * nonzero:
                continue
            self._precision_warned.add(name)
            found = (
                f"{subnormal / nonzero:.1%} of its non-zero entries are subnormal (|g| < "
                f"{tiny:.1e}, fewer significant bits), and entries below 6e-8 were "
                "stored as 0" if nonzero else
                "every entry is 0 (entries below 6e-8 are stored as 0; or no gradient "
                "reached this tensor)"
            )
            warnings.warn(
                f"the stored float16 gradient of {name} is too small for float16: {found}, "
                "so its |g * W| ranking differs from the true gradient's. Fix: "
                "LIPSConfig(grad_dtype=torch.bfloat16) (same memory, float32's range) "
                "or grad_dtype=torch.float32. Said once per tensor",
                UserWarning, stacklevel=5,  # _mask's no_grad wrapper is a frame
            )

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this client: stored gradients (copies),
        round bookkeeping, and in the fine-tuning mode the reference weights (shared,
        not copied: they do not change). Small: one ``grad_dtype`` tensor per
        eligible parameter."""
        grads = {}
        for name, param in self._params.items():
            grad = self.optimizer.captured_grad(param)
            if grad is not None:
                grads[name] = grad.detach().clone()
        state: Dict[str, Any] = {
            "version": STATE_VERSION, "last_round": self._last_round, "grads": grads,
        }
        if self.config.reference == "initial":
            state["reference"] = dict(self._reference)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from [`state_dict`][LIPS.state_dict] (a client's own, or a fresh one).

        The whole dict is checked first; on any error this LIPS is left unchanged.
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a LIPS state (expected a dict with version {STATE_VERSION}, as "
                f"LIPS.state_dict() returns), got {_describe(state)}"
            )
        expected = STATE_KEYS + (("reference",) if self.config.reference == "initial" else ())
        missing = [key for key in expected if key not in state]
        extra = sorted(str(key) for key in state if key not in expected)
        if missing or extra:
            raise ValueError(
                f"LIPS state: missing keys {missing}, unexpected keys {extra}; a state "
                f"holds exactly {', '.join(expected)} (as LIPS.state_dict() returns)"
            )
        last_round = state["last_round"]
        if last_round is not None:
            if isinstance(last_round, bool) or not isinstance(last_round, int):
                raise ValueError(
                    f"LIPS state: last_round must be None or a round index, got "
                    f"{last_round!r}"
                )
            last_round = check_round(last_round, self.config)
        grads = self._checked_tensors(state["grads"], "LIPS state grads", "gradient",
                                      exact=False)
        reference = (
            self._checked_tensors(state["reference"], "LIPS state reference", "weight",
                                  exact=True)
            if "reference" in expected else {}
        )
        for name, param in self._params.items():
            self.optimizer.set_captured_grad(param, grads.get(name))
        self._reference = reference
        self._last_round = last_round
        self.last_report = None
        self.optimizer.before_next_step = None
        self._witness.mark()


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))} and version {value.get('version')!r}"
    return type(value).__name__
