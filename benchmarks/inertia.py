"""The inertia ratio: one number saying how much less the middle layers of a federated
model move, round to round, than its first and last layers.

Definition (``inertia_ratio``). Take the relative update of every weight tensor with
two or more dimensions of the global model, ``u[l, t] = ||W_l,t - W_l,t-1|| /
||W_l,t-1||`` (``InertiaTracker(model, all_layers=True).relative_update``, layers in
registration order, ``t`` the 0-based round after whose aggregation it is measured).
Skip the first ``w`` rounds (warm-up, default ``w = max(1, T // 10)`` of ``T``
recorded rounds). Then

    ratio = mean over t >= w and middle layers l of u[l, t]
            / mean over t >= w of (u[first, t] + u[last, t]) / 2

where "first" is the first tracked tensor (the input stem), "last" the last one (the
head) and "middle" every tracked tensor between them. A ratio near or above 1 means the
middle layers move as much as the ends (no inertia); well below 1 means the middle
layers have stalled relative to the ends, the phenomenon LIPS targets.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def default_warmup(rounds: int) -> int:
    """Rounds skipped before averaging: a tenth of the run, at least one."""
    return max(1, rounds // 10)


def inertia_ratio(relative_update: np.ndarray, warmup: Optional[int] = None) -> float:
    """The inertia ratio of a (layers x rounds) array of relative updates (see the module
    docstring); needs at least three layers and one round after the warm-up."""
    updates = np.asarray(relative_update, dtype=np.float64)
    if updates.ndim != 2 or updates.shape[0] < 3:
        raise ValueError(f"need a (layers x rounds) array with >= 3 layers, got {updates.shape}")
    rounds = updates.shape[1]
    skip = default_warmup(rounds) if warmup is None else warmup
    if not 0 <= skip < rounds:
        raise ValueError(f"warm-up {skip} leaves no round of {rounds}")
    kept = updates[:, skip:]
    ends = float(np.mean((kept[0] + kept[-1]) / 2.0))
    middle = float(np.mean(kept[1:-1]))
    return middle / ends if ends > 0 else float("nan")


def tracker_inertia_ratio(tracker, warmup: Optional[int] = None) -> float:
    """The inertia ratio of an ``InertiaTracker`` built with ``all_layers=True``."""
    return inertia_ratio(tracker.relative_update, warmup)


def group_means(relative_update: np.ndarray, warmup: Optional[int] = None) -> dict:
    """Mean relative update of the first layer, the middle layers and the last layer
    after the warm-up, and the ratio."""
    updates = np.asarray(relative_update, dtype=np.float64)
    skip = default_warmup(updates.shape[1]) if warmup is None else warmup
    kept = updates[:, skip:]
    return {"first": float(kept[0].mean()), "middle": float(kept[1:-1].mean()),
            "last": float(kept[-1].mean()), "ratio": inertia_ratio(updates, skip)}
