"""When LIPS masks, and at what density (the docs' method page, "The schedule").

Rounds are 0-based. The global model produced by aggregating round ``t`` is masked
when ``t % period == 0``, at density ``d(t) = min(1, d0 + (1 - d0) * t / T)``. A client
sees that model as it starts round ``r = t + 1``, so in terms of the round about to
start: mask when ``r >= 1`` and ``(r - 1) % period == 0``, at ``d(r - 1)``. The initial
model (before round 0) is never masked.
"""

from __future__ import annotations

import numbers
from typing import Optional

from .config import LIPSConfig


def aggregation_density(aggregated_round: int, config: LIPSConfig) -> float:
    """Density ``d(t)`` for the model aggregated at the end of round ``t``."""
    t, total = aggregated_round, config.total_rounds
    return min(1.0, config.start_density + (1.0 - config.start_density) * t / total)


def check_round(round_index: int, config: LIPSConfig) -> int:
    """Return ``round_index`` as an int; raise unless it is an integer (Python or
    numpy) in ``[0, total_rounds)``."""
    if isinstance(round_index, bool) or not isinstance(round_index, numbers.Integral):
        raise TypeError(f"round must be an integer, got {round_index!r}")
    round_index = int(round_index)
    if not 0 <= round_index < config.total_rounds:
        raise ValueError(
            f"round {round_index} is outside [0, {config.total_rounds}); rounds are "
            f"0-based and total_rounds is {config.total_rounds}"
        )
    return round_index


def density_at(round_index: int, config: LIPSConfig) -> Optional[float]:
    """Density of the mask applied to the model received before ``round_index``.

    Returns ``None`` when that model is not masked. ``round_index`` is the 0-based
    index of the local round about to start and must lie in ``[0, total_rounds)``.
    """
    aggregated = check_round(round_index, config) - 1
    if aggregated < 0 or aggregated % config.period != 0:
        return None
    return aggregation_density(aggregated, config)


def is_mask_round(round_index: int, config: LIPSConfig) -> bool:
    """Whether the model received before ``round_index`` is masked."""
    return density_at(round_index, config) is not None
