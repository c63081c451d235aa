"""Masking numerics: scores, exact per-tensor keep-masks, and the one score -> select
-> overwrite step used by the client and the server side. Pure tensor functions.

Every score is "higher is kept". ``keep_mask`` keeps exactly ``k`` entries: all
entries scoring above the k-th largest score, then, among the entries that tie with
it, those with the lowest flat (row-major) index. The result is deterministic and does
not depend on the device or on how the selection is computed (see
``lips_wrap.selection``, which finds it without sorting).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Optional, Sequence

import torch

from .selection import (
    NonFiniteError,
    apply_selection_,
    check_finite,
    kth_largest_counts,
    select_top_k,
    select_top_k_slices,
    selection_mask,
    split_slices,
)

__all__ = [
    "NonFiniteError", "apply_mask_", "check_finite", "compute_score", "keep_count",
    "keep_mask", "kth_largest", "mask_by_score_", "score_generator",
]

Tensor = torch.Tensor
SCORE_CHUNK = 1 << 16
"""Entries per chunk when a score is computed from contiguous CPU tensors."""


def keep_count(numel: int, density: float, slices: int = 1) -> int:
    """Entries kept in a tensor of ``numel`` entries: ``int(density * numel)``, as the
    reference computes it; for a tensor ranked in ``slices`` equal slices (the experts
    of a fused mixture-of-experts tensor), ``int(density * numel / slices)`` per slice."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1 or numel % slices:
        raise ValueError(
            f"slices must be a positive integer dividing numel={numel}, got {slices!r}"
        )
    return slices * int(density * (numel // slices))


def sensitivity_score(weight: Tensor, grad: Tensor) -> Tensor:
    """``|g * W|`` in float32 (the paper's ``sensityk``), computed as ``float32(W) *
    float32(g)``; on CPU chunk by chunk, so the conversions stay in cache.

    Infinite entries of ``g`` count as the largest finite value of ``g``'s dtype: a
    finite gradient beyond float16's range (e.g. 7e4 under loss scaling) is stored as
    inf by a float16 buffer, and is ranked as saturated, not as an error.
    """
    if grad.shape != weight.shape:
        raise ValueError(
            f"gradient shape {tuple(grad.shape)} differs from weight shape {tuple(weight.shape)}"
        )
    # Non-blocking only towards an accelerator (ordered on its stream): a non-blocking
    # copy to the CPU returns before the data is there, and the CPU reads it at once.
    grad = grad.to(weight.device, non_blocking=weight.device.type != "cpu")
    limit = torch.finfo(grad.dtype).max
    if weight.device.type != "cpu" or not (weight.is_contiguous() and grad.is_contiguous()):
        saturated = grad.to(torch.float32).clamp_(-limit, limit)
        return torch.mul(weight.to(torch.float32), saturated).abs_()
    score = torch.empty(weight.shape, dtype=torch.float32)
    flat, w_flat, g_flat = score.view(-1), weight.view(-1), grad.view(-1)
    for start in range(0, flat.numel(), SCORE_CHUNK):
        end = start + SCORE_CHUNK
        w_part, g_part = w_flat[start:end], g_flat[start:end].clamp(-limit, limit)
        if w_part.dtype != torch.float32 and g_part.dtype != torch.float32:
            w_part = w_part.to(torch.float32)
        torch.mul(w_part, g_part, out=flat[start:end]).abs_()
    return score


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


def kth_largest(score: Tensor, k: int) -> Tensor:
    """The ``k``-th largest value of ``score`` (1 <= k <= numel), without sorting;
    a 0-dim tensor of ``score``'s dtype and device."""
    flat = score.reshape(-1)
    numel = flat.numel()
    if not 1 <= k <= numel:
        raise ValueError(f"k must be in [1, {numel}], got {k}")
    value, _, _ = kth_largest_counts(flat, k)
    return torch.tensor(value, dtype=score.dtype, device=score.device)


def keep_mask(score: Tensor, k: int, name: str = "score") -> Tensor:
    """Boolean mask of ``score``'s shape with exactly ``k`` True entries.

    Keeps the ``k`` largest scores; ties at the threshold go to the lowest flat
    indices. ``name`` names the tensor in the error raised for NaN or inf scores.
    """
    numel = score.numel()
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}] for {name}, got {k}")
    return selection_mask(score, select_top_k(score, k, f"the score of {name}"))


def apply_mask_(tensor: Tensor, mask: Tensor) -> Tensor:
    """Zero ``tensor`` where ``mask`` is False, in place."""
    return tensor.masked_fill_(mask.logical_not(), 0)


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
    targets: Sequence[Tensor],
    weight: Tensor,
    signal: Optional[Tensor],
    density: float,
    kind: str,
    *,
    seed: int = 0,
    round_index: int = 0,
    name: str = "weight",
    reference: Optional[Tensor] = None,
    slices: int = 1,
) -> bool:
    """Score ``weight`` by ``kind``, keep its ``int(density * numel)`` best entries
    and overwrite the others, in place, in every tensor of ``targets``.

    ``targets[0]`` is the weight to mask (``weight`` itself, or a copy of it): its
    dropped entries become 0, or the matching entries of ``reference`` when one is
    given (then every score ranks ``W - reference`` instead of ``W``). Every other
    target (optimizer state) gets exactly 0 at dropped entries.

    ``signal`` is the ``g`` of the sensitivity score (a client's last-step gradient,
    or the server's global update); without one the score falls back to magnitude,
    and True is returned. ``seed``, ``round_index`` and ``name`` seed the random
    score. ``slices`` > 1 cuts every tensor into that many equal slices along dim 0
    (the experts of a fused ``[experts, out, in]`` tensor) and ranks each on its own:
    every slice keeps exactly ``int(density * numel_of_slice)`` entries. The caller
    has checked ``weight`` (and ``reference``) for NaN/inf and ``signal`` for NaN;
    infinite entries of ``signal`` are saturated.
    """
    fell_back = kind == "sensitivity" and signal is None
    if fell_back:
        kind = "magnitude"
    generator = (
        score_generator(seed, round_index, name, weight.device) if kind == "random" else None
    )
    moved = weight
    if reference is not None:
        moved = weight.to(torch.float32) - reference.to(weight.device, torch.float32)
    score = compute_score(kind, moved, signal, generator)
    kept = keep_count(weight.numel(), density, slices) // slices
    # Inputs are finite and the signal saturated, so the score holds no NaN (an
    # overflow to +inf ranks first).
    selections = select_top_k_slices(score, slices, kept, name, check=False)
    parts = [split_slices(tensor, slices, name) for tensor in targets]
    fills = None if reference is None else split_slices(reference, slices, name)
    for index, (part, selection) in enumerate(zip(split_slices(score, slices), selections)):
        apply_selection_(
            [tensors[index] for tensors in parts], part, selection,
            fills=None if fills is None else [fills[index]] + [None] * (len(targets) - 1),
        )
    return fell_back
