"""The inertia ratio of the benchmark runs: how much the middle layers of the global
model move, round to round, compared with its first and last layers.

Definition. Take the relative update of every weight tensor with two or more dimensions
of the global model, ``u[l, t] = ||W_l,t - W_l,t-1|| / ||W_l,t-1||`` (Frobenius norms;
``InertiaTracker(model, all_layers=True).relative_update``, layers in registration
order, ``t`` the 0-based round after whose aggregation it is measured). Skip the first
``w = floor(0.2 * T)`` of the ``T`` recorded rounds (warm-up). Then

    ratio = (mean of u[l, t] over the middle layers l and the rounds t >= w)
            / ((mean of u[first, t] over t >= w + mean of u[last, t] over t >= w) / 2)

"first" is the first tracked tensor (the input stem), "last" the last one (the head),
"middle" every tracked tensor between them (for the benchmark's ResNet-8: exactly the
tensors LIPS masks). This is ``lips_wrap.diagnostics.inertia_ratio`` with those roles
and its default warm-up, the number ``lips-wrap diagnose`` prints; a ratio near or
above 1 means the middle layers move as much as the ends, well below 1 that they stall.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lips_wrap.diagnostics import default_warmup, inertia_ratio_by_window
from lips_wrap.diagnostics import inertia_ratio as core_ratio


def roles(layers: int) -> list:
    """first, middle..., last."""
    if layers < 3:
        raise ValueError(f"the inertia ratio needs >= 3 tracked layers, got {layers}")
    return ["first"] + ["middle"] * (layers - 2) + ["last"]


def inertia_ratio(relative_update, warmup: Optional[int] = None,
                  exclude_rounds: Sequence[int] = ()) -> float:
    """The inertia ratio of a (layers x rounds) array (see the module docstring).
    ``exclude_rounds`` leaves further rounds out: e.g. the rounds whose clients started
    from a masked model, whose update includes the regrowth of the zeroed weights."""
    updates = np.asarray(relative_update, dtype=np.float64)
    if updates.ndim != 2:
        raise ValueError(f"need a (layers x rounds) array, got shape {updates.shape}")
    skip = default_warmup(updates.shape[1]) if warmup is None else warmup
    excluded = set(exclude_rounds)
    keep = [t for t in range(skip, updates.shape[1]) if t not in excluded]
    if not keep:
        raise ValueError(f"warm-up {skip} and the excluded rounds leave no round")
    return core_ratio(updates[:, keep], roles(updates.shape[0]), warmup=0).ratio


def group_means(relative_update, warmup: Optional[int] = None) -> dict:
    """Mean relative update of the first layer, the middle layers and the last layer
    after the warm-up, and the ratio."""
    updates = np.asarray(relative_update, dtype=np.float64)
    result = core_ratio(updates, roles(updates.shape[0]), warmup)
    return {"first": result.first, "middle": result.middle, "last": result.last,
            "ratio": result.ratio}


WINDOWS = 5


def ratio_by_window(relative_update, windows: int = WINDOWS) -> list:
    """The ratio over ``windows`` consecutive spans of the recorded rounds, no warm-up
    (``lips_wrap.diagnostics.inertia_ratio_by_window``, what ``lips-wrap diagnose``
    prints as "ratio over time")."""
    updates = np.asarray(relative_update, dtype=np.float64)
    return inertia_ratio_by_window(updates, roles(updates.shape[0]), windows)



def _array(rows) -> np.ndarray:
    """A stored (layers x rounds) list, null as NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows],
                    dtype=np.float64)


def cosine_drift_ratio(cosine_to_anchor, column: int = -1) -> float:
    """How far the middle layers turned away from the anchor round's weights, relative
    to the first and last layers: ``(1 - cos_middle) / (1 - cos_edges)`` at ``column``
    (the last recorded round by default), cos the cosine to the anchor, the middle
    the mean over middle layers and the edges the mean of first and last. Below 1: the
    middle layers stayed closer to the anchor. The cosine is what the authors' code
    prints; runs stored before the L2 distance was recorded have only this."""
    turn = 1.0 - _array(cosine_to_anchor)[:, column]
    return float(turn[1:-1].mean() / ((turn[0] + turn[-1]) / 2))


def drift_of(run: dict, anchor: int = 2):
    """The anchor drift (``lips_wrap.diagnostics.AnchorDrift``) of a stored run from
    the anchor round to its last round, or None for runs stored without the L2
    distance and weight norm."""
    if "distance_to_anchor" not in run:
        return None
    from lips_wrap.diagnostics import anchor_drift

    distances = _array(run["distance_to_anchor"])
    return anchor_drift(_array(run["cosine_to_anchor"]), distances,
                        _array(run["weight_norm"]), roles(distances.shape[0]), anchor)
