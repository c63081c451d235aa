"""Masking numerics: scores and exact per-tensor keep-masks. Pure tensor functions.

Every score is "higher is kept". :func:`keep_mask` keeps exactly ``k`` entries: all
entries scoring above the k-th largest score, then, among the entries that tie with
it, those with the lowest flat (row-major) index. The result is deterministic and does
not depend on the device or on how the selection is computed.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

Tensor = torch.Tensor


def keep_count(numel: int, density: float) -> int:
    """Entries kept in a tensor of ``numel`` entries: ``int(density * numel)``, as the
    reference computes it."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return int(density * numel)


def sensitivity_score(weight: Tensor, grad: Tensor) -> Tensor:
    """``|g * W|`` in float32 (the paper's ``sensityk``)."""
    if grad.shape != weight.shape:
        raise ValueError(
            f"gradient shape {tuple(grad.shape)} differs from weight shape {tuple(weight.shape)}"
        )
    return torch.mul(weight.to(torch.float32), grad.to(weight.device)).abs_()


def magnitude_score(weight: Tensor) -> Tensor:
    """``|W|`` (the reference's ``topk``)."""
    return weight.abs()


def low_magnitude_score(weight: Tensor) -> Tensor:
    """``-|W|``: keeps the smallest magnitudes (the reference's ``lowk``)."""
    return weight.abs().neg_()


def random_score(weight: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform random scores from ``generator`` (the reference's ``randomk``).

    The generator must live on the weight's device type.
    """
    return torch.rand(
        weight.shape, generator=generator, device=weight.device, dtype=torch.float32
    )


def compute_score(
    kind: str,
    weight: Tensor,
    grad: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Score ``weight`` by ``kind`` (one of ``lips_wrap.config.SCORES``)."""
    if kind == "sensitivity":
        if grad is None:
            raise ValueError("the sensitivity score needs a gradient")
        return sensitivity_score(weight, grad)
    if kind == "random":
        if generator is None:
            raise ValueError("the random score needs a generator")
        return random_score(weight, generator)
    plain: Dict[str, Callable[[Tensor], Tensor]] = {
        "magnitude": magnitude_score,
        "low_magnitude": low_magnitude_score,
    }
    if kind not in plain:
        raise ValueError(
            f"unknown score {kind!r}; accepted: sensitivity, magnitude, low_magnitude, random"
        )
    return plain[kind](weight)


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``tensor`` holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{what} holds {bad} NaN or inf value(s); LIPS cannot rank entries of a "
            "non-finite tensor (check the training run for divergence)"
        )


def kth_largest(score: Tensor, k: int) -> Tensor:
    """The ``k``-th largest value of ``score`` (1 <= k <= numel), without a full sort."""
    flat = score.reshape(-1)
    numel = flat.numel()
    if not 1 <= k <= numel:
        raise ValueError(f"k must be in [1, {numel}], got {k}")
    return torch.kthvalue(flat, numel - k + 1).values


def keep_mask(score: Tensor, k: int, name: str = "score") -> Tensor:
    """Boolean mask of ``score``'s shape with exactly ``k`` True entries.

    Keeps the ``k`` largest scores; ties at the threshold go to the lowest flat
    indices. ``name`` names the tensor in the error raised for NaN or inf scores.
    """
    numel = score.numel()
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}] for {name}, got {k}")
    check_finite(score, f"the score of {name}")
    if k == numel:
        return torch.ones_like(score, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = kth_largest(score, k)
    mask = score > threshold
    missing = k - int(mask.sum())
    ties = score == threshold
    if int(ties.sum()) > missing:
        flat_ties = ties.reshape(-1)
        first = flat_ties.cumsum(0) <= missing
        ties = (flat_ties & first).reshape(score.shape)
    return mask.logical_or_(ties)


def apply_mask_(tensor: Tensor, mask: Tensor) -> Tensor:
    """Zero ``tensor`` where ``mask`` is False, in place."""
    return tensor.masked_fill_(mask.logical_not(), 0)
