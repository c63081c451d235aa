"""LIPSConfig: every setting of the method, validated once on construction."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

SCORES: Tuple[str, ...] = ("sensitivity", "magnitude", "low_magnitude", "random")
"""Accepted score names: |g * W| (the paper's), |W|, smallest |W| first, uniform random."""

UNWRAPPED_TRAINING: Tuple[str, ...] = ("warn", "error", "ignore")
"""What LIPS does when the model trained without a step through ``lips.optimizer``."""

REFERENCES: Tuple[str, ...] = ("zero", "initial")
"""Where dropped entries go: to zero (the paper's method) or back to the weights the
run started from (the fine-tuning mode)."""

GRAD_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def _as_patterns(value: object, field_name: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{field_name} must be a name pattern or a sequence of them, got {value!r}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"{field_name} holds {pattern!r}; each pattern must be a non-empty string"
            )
    return patterns


@dataclass(frozen=True)
class LIPSConfig:
    """Settings of LIPS (the method is described on the docs' method page).

    Args:
        total_rounds: number of communication rounds ``T`` of the whole run (>= 1).
        period: mask every ``period``-th aggregation (``K``, reference 5; >= 1).
        start_density: share of entries kept at the first mask (``d0``, in (0, 1]);
            the density grows linearly to 1 over the run.
        score: how entries are ranked: one of ``SCORES``.
        include: name patterns (``fnmatch`` globs on parameter names) that make a
            tensor eligible, whatever the detection says.
        exclude: name patterns that make a tensor exempt; they win over ``include``.
        grad_dtype: dtype of the stored last-step gradients ``g``: ``bfloat16``
            (default: half the memory of float32, float32's range, so its ranking
            does not depend on how small the gradients are), ``float16`` (the
            reference's choice: finer steps, but gradients below 6e-5 lose precision
            and below 6e-8 become 0, which LIPS warns about) or ``float32`` (exact).
        grad_device: where stored gradients live; ``None`` keeps them beside the
            parameter, ``"cpu"`` moves them off the accelerator for large models.
        seed: seed of the ``random`` score.
        unwrapped_training: what to do when the model trained since the last
            [`on_global_model`][lips_wrap.LIPS.on_global_model] call but no step went through
            ``lips.optimizer`` (so no gradient was kept): ``"warn"`` (default),
            ``"error"`` (raise ``RuntimeError`` before any change) or ``"ignore"``.
        reference: ``"zero"`` (default, the paper's method: dropped entries become 0)
            or ``"initial"`` (fine-tuning mode: dropped entries return to the weights
            the run started from, and every score ranks ``W - W_initial`` instead of
            ``W``; with a zero reference both are the same).
    """

    total_rounds: int
    period: int = 5
    start_density: float = 0.5
    score: str = "sensitivity"
    include: Tuple[str, ...] = field(default=())
    exclude: Tuple[str, ...] = field(default=())
    grad_dtype: torch.dtype = torch.bfloat16
    grad_device: Optional[str] = None
    seed: int = 0
    unwrapped_training: str = "warn"
    reference: str = "zero"

    def __post_init__(self) -> None:
        for name, minimum in (("total_rounds", 1), ("period", 1), ("seed", None)):
            _check_int(name, getattr(self, name), minimum)
            object.__setattr__(self, name, int(getattr(self, name)))
        density = self.start_density
        if isinstance(density, bool) or not isinstance(density, numbers.Real):
            raise TypeError(f"start_density must be a number in (0, 1], got {density!r}")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"start_density must be in (0, 1], got {density!r}")
        object.__setattr__(self, "start_density", float(density))
        if self.score not in SCORES:
            raise ValueError(
                f"unknown score {self.score!r}; accepted: {', '.join(SCORES)}"
            )
        for name, accepted in (("unwrapped_training", UNWRAPPED_TRAINING),
                               ("reference", REFERENCES)):
            if getattr(self, name) not in accepted:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; accepted: {', '.join(accepted)}"
                )
        object.__setattr__(self, "include", _as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "grad_dtype", _as_grad_dtype(self.grad_dtype))
        if self.grad_device is not None:
            try:
                torch.device(self.grad_device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"grad_device {self.grad_device!r} is not a torch device; "
                    "use None (beside the parameter) or a device such as 'cpu'"
                ) from None


def _check_int(name: str, value: object, minimum: Optional[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _as_grad_dtype(value: object) -> torch.dtype:
    if isinstance(value, str) and value in GRAD_DTYPES:
        return GRAD_DTYPES[value]
    if isinstance(value, torch.dtype) and value in GRAD_DTYPES.values():
        return value
    raise ValueError(
        f"grad_dtype {value!r} is not accepted; use one of {', '.join(GRAD_DTYPES)}"
    )
