"""Exact top-k selection without sorting. Pure tensor functions.

``select_top_k`` finds which ``k`` entries of a score tensor to keep, with the rule
of ``lips_wrap.masking.keep_mask``: every entry scoring above the k-th largest
score, then, among the entries equal to it, those with the lowest flat (row-major)
index. The answer is a ``Selection`` (a threshold and a flat-index cutoff), from
which any chunk of a mask can be rebuilt with two comparisons.

How it finds the k-th largest score (a sample-select, linear time, no sort):

1. A stratified random sample of the scores (fixed seed) brackets the k-th largest
   between two sample quantiles ``lo <= hi``, chosen five standard deviations apart.
2. One pass over the scores, chunk by chunk, counts the entries above ``hi`` and keeps
   the few "candidates" in ``[lo, hi]`` (a few percent of the tensor). When ``lo == hi``
   (a heavy tie at the threshold) it only counts the entries equal to it.
3. The k-th largest is found among the candidates by the same method (small inputs
   use ``torch.kthvalue``). If the bracket missed, or too many candidates came back,
   an exact ``torch.kthvalue`` over the whole tensor decides instead (rare: the bracket
   misses with probability of order 1e-6).
4. Only when ties straddle the threshold, a second pass finds the flat index up to
   which tied entries are kept.

Extra memory is bounded by one chunk and the candidates (at most ``BUDGET`` of the
tensor), except in the fallback of step 3. The same code runs on any device; it does
not call ``.item()`` inside the chunk loop.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

CPU_CHUNK = 1 << 16
"""Entries per chunk on CPU: the chunk's temporaries stay in cache."""
DEVICE_CHUNK = 1 << 24
"""Entries per chunk on accelerators: few kernel launches, bounded memory."""
SAMPLE = 8192
"""Size of the sample that brackets the threshold."""
SMALL = 8192
"""Tensors at most this large are resolved directly by ``torch.kthvalue``."""
SIGMAS = 5.0
"""Half-width of the bracket, in standard deviations of the sample rank."""
BUDGET = 0.125
"""Most candidates one bracket pass may collect, as a share of the tensor."""
_SEED = 0x11_95


class NonFiniteError(ValueError):
    """A tensor LIPS must rank (weight, stored gradient, update, score) holds NaN or
    inf. The one error type of every finiteness check; a ``ValueError``."""


def check_finite(tensor: Tensor, what: str, allow_inf: bool = False) -> None:
    """Raise ``NonFiniteError`` naming ``what`` if ``tensor`` holds NaN (or inf,
    unless ``allow_inf``).

    One float32 sum decides the common case (NaN and inf propagate into it); only a
    non-finite sum, which may also come from an overflow, is followed by the exact
    element check.
    """
    if not tensor.is_floating_point():
        return
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    bad = torch.isnan(tensor) if allow_inf else ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count:
        kind = "NaN" if allow_inf else "NaN or inf"
        raise NonFiniteError(
            f"{what} holds {count} {kind} value(s); LIPS cannot rank the entries of a "
            "non-finite tensor (check the training run for divergence)"
        )


class Selection(NamedTuple):
    """Which entries of a score tensor are kept.

    Entry ``i`` (flat, row-major) with score ``s`` is kept when ``s >= threshold`` for
    ``i < cutoff`` and when ``s > threshold`` for ``i >= cutoff``.
    """

    threshold: float
    cutoff: int
    kept: int


def default_chunk(device: torch.device) -> int:
    """Chunk length used on ``device``."""
    return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK


def select_top_k(
    score: Tensor, k: int, name: str = "score", chunk: Optional[int] = None,
    check: bool = True,
) -> Selection:
    """The ``Selection`` keeping exactly ``k`` entries of ``score``.

    Keeps the ``k`` largest scores; ties at the threshold go to the lowest flat
    indices. With ``check`` it raises ``NonFiniteError`` (a ``ValueError``)
    naming ``name`` if the score holds NaN or inf (the test is fused into the pass);
    without, the caller guarantees there is no NaN (e.g. a score of finite weights and
    gradients, where an overflow to +inf is simply ranked first).
    """
    flat = score.reshape(-1)
    numel = flat.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= numel:
        raise ValueError(f"k must be an integer in [0, {numel}] for {name}, got {k!r}")
    if not flat.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {flat.dtype}")
    step = chunk or default_chunk(flat.device)
    if k in (0, numel):
        if check:
            check_finite(flat, name)
        return Selection(math.inf, 0, 0) if k == 0 else Selection(-math.inf, numel, numel)
    threshold, above, ties = kth_largest_counts(flat, k, name, step, check)
    needed = k - above
    cutoff = numel if needed == ties else _tie_cutoff(flat, threshold, needed, step)
    return Selection(threshold, cutoff, k)


def select_top_k_slices(
    score: Tensor, slices: int, k: int, name: str = "score", check: bool = True,
) -> List[Selection]:
    """One ``Selection`` per slice of ``score``, cut into ``slices`` equal slices
    along dim 0 (the experts of a fused ``[experts, out, in]`` tensor): each keeps
    exactly ``k`` entries of its slice by the rule of ``select_top_k``, its cutoff
    a flat index within the slice. Small slices are resolved together (one batched
    ``torch.kthvalue``, no per-slice synchronisation), large ones one by one. With
    ``slices=1`` this is ``[select_top_k(score, k)]``.
    """
    rows = split_slices(score, slices, name)
    width = score.numel() // slices
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= width:
        raise ValueError(
            f"k must be an integer in [0, {width}] for each slice of {name}, got {k!r}"
        )
    if slices == 1 or width > SMALL or k in (0, width):
        return [
            select_top_k(row, k, name if slices == 1 else f"{name} (slice {index})",
                         check=check)
            for index, row in enumerate(rows)
        ]
    if not score.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {score.dtype}")
    table = score.reshape(slices, width)
    if check:
        check_finite(table, name)
    thresholds = torch.kthvalue(table, width - k + 1, dim=1).values.unsqueeze(1)
    above = torch.gt(table, thresholds).sum(dim=1)
    equal = torch.eq(table, thresholds)
    needed = k - above  # how many entries tied with the threshold are kept, >= 1
    position = torch.lt(equal.cumsum(dim=1), needed.unsqueeze(1)).sum(dim=1)
    cutoffs = torch.where(needed == equal.sum(dim=1), width, position + 1)
    return [
        Selection(threshold, cutoff, k)
        for threshold, cutoff in zip(thresholds.view(-1).tolist(), cutoffs.tolist())
    ]


def split_slices(tensor: Tensor, slices: int, name: str = "tensor") -> Tuple[Tensor, ...]:
    """``tensor`` cut into ``slices`` equal views along dim 0 (each of shape
    ``(rows, *tensor.shape[1:])``); writes to a view write to ``tensor``."""
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"slices must be a positive integer for {name}, got {slices!r}")
    if slices == 1:
        return (tensor,)
    rows = tensor.shape[0] if tensor.dim() else 1
    if tensor.dim() == 0 or rows % slices:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} cannot be cut into {slices} equal "
            "slices along dim 0"
        )
    return tensor.unflatten(0, (slices, rows // slices)).unbind(0)


def kth_largest_counts(
    flat: Tensor, k: int, name: str = "score", chunk: Optional[int] = None,
    check: bool = True,
) -> Tuple[float, int, int]:
    """``(t, above, ties)``: the k-th largest value ``t`` of the 1-D ``flat`` (1 <= k <=
    numel), how many entries exceed it and how many equal it. ``check`` as in
    ``select_top_k``."""
    step = chunk or default_chunk(flat.device)
    numel = flat.numel()
    if numel <= SMALL:
        if check:
            check_finite(flat, name)
        return _direct(flat, k)
    lo, hi = _bracket(flat, k)
    found = _bracket_pass(flat, lo, hi, step, name, check)
    if found is not None:
        above, inside = found
        if isinstance(inside, int):  # lo == hi: ``inside`` counts the entries equal to it
            if above < k <= above + inside:
                return lo, above, inside
        elif above < k <= above + inside.numel():
            value, more, ties = kth_largest_counts(inside, k - above, name, step, check=False)
            return value, above + more, ties
    elif check:  # the pass stopped early (too many candidates) before its finiteness test
        check_finite(flat, name)
    return _fallback(flat, k, step)


def keep_factor(
    score: Tensor, selection: Selection, start: int, out: Optional[Tensor] = None
) -> Tensor:
    """The keep decision (1 kept, 0 dropped) for a 1-D chunk ``score`` of a flat score
    starting at flat index ``start``, as ``out``'s dtype (bool if ``out`` is None)."""
    if out is None:
        out = torch.empty(score.shape, dtype=torch.bool, device=score.device)
    split = min(max(selection.cutoff - start, 0), score.numel())
    if split:
        torch.ge(score[:split], selection.threshold, out=out[:split])
    if split < score.numel():
        torch.gt(score[split:], selection.threshold, out=out[split:])
    return out


def selection_mask(score: Tensor, selection: Selection) -> Tensor:
    """Boolean mask of ``score``'s shape, True where ``selection`` keeps."""
    return keep_factor(score.reshape(-1), selection, 0).reshape(score.shape)


def apply_selection_(
    tensors: Sequence[Tensor], score: Tensor, selection: Selection,
    chunk: Optional[int] = None, fills: Optional[Sequence[Optional[Tensor]]] = None,
) -> None:
    """Set, in place, the entries of each tensor (all of ``score``'s shape) that
    ``selection`` drops: to exactly ``+0.0``, or to the matching entries of
    ``fills[i]`` where one is given. Kept entries are unchanged; dropped entries are
    overwritten whatever they held (inf and NaN included).

    Any memory format or stride works: the selection is made on the logical
    (row-major) order of ``score`` and applied to each tensor's logical entries.
    """
    flat = score.reshape(-1)
    step = chunk or default_chunk(flat.device)
    fills = [None] * len(tensors) if fills is None else list(fills)
    if len(fills) != len(tensors):
        raise ValueError(f"got {len(fills)} fills for {len(tensors)} tensors")
    chunked: List[Tuple[Tensor, Optional[Tensor]]] = []
    direct: List[Tuple[Tensor, Optional[Tensor]]] = []
    for tensor, fill in zip(tensors, fills):
        for checked in (tensor, fill):
            if checked is not None and checked.shape != score.shape:
                raise ValueError(
                    f"tensor of shape {tuple(checked.shape)} cannot take a selection made "
                    f"on a score of shape {tuple(score.shape)}"
                )
        if fill is not None:
            fill = fill.to(device=tensor.device, dtype=tensor.dtype)
        flat_layout = tensor.is_contiguous() and tensor.device == flat.device
        if flat_layout and (fill is None or fill.is_contiguous()):
            chunked.append((tensor.view(-1), None if fill is None else fill.view(-1)))
        else:
            direct.append((tensor, fill))
    if chunked:
        keep = torch.empty(min(step, flat.numel()), dtype=torch.bool, device=flat.device)
        for start in range(0, flat.numel(), step):
            part = flat[start:start + step]
            part_keep = keep_factor(part, selection, start, keep[:part.numel()])
            bits = _KeepBits(part_keep)
            for tensor, fill in chunked:
                _drop_(tensor[start:start + step], bits,
                       None if fill is None else fill[start:start + step])
    if direct:
        bits = _KeepBits(selection_mask(score, selection))
        for tensor, fill in direct:
            _drop_(tensor, bits, fill)


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _KeepBits:
    """A keep mask as all-ones / all-zeros integers of each element size, made once
    and shared by every tensor masked with it. ``x & bits`` keeps an entry's bits or
    clears them to ``+0.0``, whatever the entry held (inf, NaN), in any layout and
    several times faster than ``masked_fill_`` on CPU."""

    def __init__(self, keep: Tensor) -> None:
        self.keep = keep
        self._bits: dict = {}

    def of(self, tensor: Tensor) -> Tensor:
        key = (tensor.element_size(), tensor.device)
        if key not in self._bits:
            integer = _INTEGER_OF_SIZE[tensor.element_size()]
            self._bits[key] = self.keep.to(tensor.device, integer).neg_()
        return self._bits[key]


def _drop_(tensor: Tensor, bits: _KeepBits, fill: Optional[Tensor]) -> None:
    """Overwrite ``tensor`` where ``bits.keep`` is False: with +0, or with ``fill``."""
    if fill is not None:
        tensor.copy_(torch.where(bits.keep.to(tensor.device), tensor, fill))
    elif tensor.is_floating_point() and tensor.element_size() in _INTEGER_OF_SIZE:
        integer = _INTEGER_OF_SIZE[tensor.element_size()]
        tensor.view(integer).bitwise_and_(bits.of(tensor))
    else:
        tensor.masked_fill_(bits.keep.to(tensor.device).logical_not(), 0)


# -- internals -------------------------------------------------------------------------
def _direct(flat: Tensor, k: int) -> Tuple[float, int, int]:
    value = torch.kthvalue(flat, flat.numel() - k + 1).values
    above = int(torch.gt(flat, value).sum())
    ties = int(torch.eq(flat, value).sum())
    return float(value), above, ties


def _bracket(flat: Tensor, k: int) -> Tuple[float, float]:
    """Two sample quantiles ``lo <= hi`` that hold the k-th largest with high odds."""
    numel = flat.numel()
    size = min(SAMPLE, numel)
    stride = numel // size
    generator = torch.Generator().manual_seed(_SEED)
    index = torch.arange(size) * stride + torch.randint(stride, (size,), generator=generator)
    sample = flat[index.to(flat.device)]
    share = k / numel
    rank = share * size
    margin = SIGMAS * math.sqrt(size * share * (1.0 - share)) + 2.0
    top = math.floor(rank - margin)  # rank (from the top) of hi in the sample
    bottom = math.ceil(rank + margin)
    hi = math.inf if top < 1 else float(torch.kthvalue(sample, size - top + 1).values)
    lo = -math.inf if bottom > size else float(torch.kthvalue(sample, size - bottom + 1).values)
    return lo, hi


def _bracket_pass(
    flat: Tensor, lo: float, hi: float, step: int, name: str, check: bool
) -> Optional[Tuple[int, Union[int, Tensor]]]:
    """Count entries above ``hi``; collect entries in ``[lo, hi]`` (or count them when
    ``lo == hi``). None if the candidates outgrow their budget."""
    numel = flat.numel()
    budget = max(int(numel * BUDGET), SMALL)
    work = torch.empty(min(step, numel), dtype=torch.float32, device=flat.device)
    flags = torch.empty(work.shape, dtype=torch.bool, device=flat.device)
    above: List[Tensor] = []
    equal: List[Tensor] = []
    sums: List[Tensor] = []
    pieces: List[Tensor] = []
    held = 0
    near = _Nearness(lo, hi, flat.dtype)
    for start in range(0, numel, step):
        part = flat[start:start + step]
        buf = work[:part.numel()]
        if check:
            sums.append(part.sum(dtype=torch.float32))
        above.append(torch.gt(part, hi, out=buf).sum())
        if lo == hi:
            equal.append(torch.eq(part, hi, out=buf).sum())
            continue
        inside = near.superset(part, buf, flags[:part.numel()])
        held += inside.numel()
        if held > budget:
            return None
        pieces.append(inside)
    if check and not bool(torch.isfinite(torch.stack(sums).sum())):
        check_finite(flat, name)  # NaN/inf, or a sum that overflowed: look closer
    count = _total(above)
    if lo == hi:
        return count, _total(equal)
    candidates = torch.cat(pieces) if pieces else flat[:0]
    return count, candidates[torch.ge(candidates, lo).logical_and_(torch.le(candidates, hi))]


def _total(counts: List[Tensor]) -> int:
    """Sum of per-chunk float32 counts (each exact: a chunk has < 2**24 entries)."""
    return int(torch.stack(counts).to(torch.int64).sum())


class _Nearness:
    """A fast test for ``lo <= x <= hi`` that may only err by including: ``|x - mid|
    <= reach``, with ``reach`` widened by the rounding of the dtype's arithmetic. The
    exact test runs afterwards on the few entries it lets through."""

    def __init__(self, lo: float, hi: float, dtype: torch.dtype) -> None:
        self.lo, self.hi = lo, hi
        self.finite = math.isfinite(lo) and math.isfinite(hi)
        if self.finite:
            info = torch.finfo(dtype)
            self.mid = (lo + hi) / 2
            slack = 4 * max(info.eps, torch.finfo(torch.float32).eps)
            self.reach = (hi - lo) / 2 * (1 + slack) + abs(self.mid) * slack + info.tiny

    def superset(self, part: Tensor, buf: Tensor, flags: Tensor) -> Tensor:
        """The entries of ``part`` that may lie in ``[lo, hi]``; ``buf`` (float32) and
        ``flags`` (bool) are work buffers of ``part``'s length."""
        if not self.finite:
            keep = torch.ge(part, self.lo).logical_and_(torch.le(part, self.hi))
            return part[keep]
        torch.sub(part, self.mid, out=buf).abs_()
        torch.le(buf, self.reach, out=flags)
        return torch.masked_select(part, flags)


def _fallback(flat: Tensor, k: int, step: int) -> Tuple[float, int, int]:
    value = float(torch.kthvalue(flat, flat.numel() - k + 1).values)
    counter = torch.empty(min(step, flat.numel()), dtype=torch.float32, device=flat.device)
    above = torch.zeros((), dtype=torch.int64, device=flat.device)
    ties = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        buf = counter[:part.numel()]
        above += torch.gt(part, value, out=buf).sum().to(torch.int64)
        ties += torch.eq(part, value, out=buf).sum().to(torch.int64)
    return value, int(above), int(ties)


def _tie_cutoff(flat: Tensor, value: float, needed: int, step: int) -> int:
    """One past the flat index of the ``needed``-th entry equal to ``value``."""
    seen = 0
    for start in range(0, flat.numel(), step):
        equal = torch.eq(flat[start:start + step], value)
        count = int(equal.sum())
        if seen + count >= needed:
            position = torch.nonzero(equal).view(-1)[needed - seen - 1]
            return start + int(position) + 1
        seen += count
    raise AssertionError("fewer ties than counted")  # pragma: no cover
