"""InertiaTracker: how much each layer of the global model moves, round after round.

After every aggregation, [`InertiaTracker.update`][lips_wrap.InertiaTracker.update] records per
tracked layer

* the relative update ``||W_t - W_{t-1}|| / ||W_{t-1}||`` (Frobenius norms), and
* the cosine similarity between ``W_t`` and ``W`` at an anchor round (round 2 by
  default, as the paper), NaN before the anchor round is reached,
* the L2 (Frobenius) distance ``||W_t - W_anchor||``, the anchor drift the authors'
  code prints beside the cosine (NaN before the anchor round), and
* the weight norm ``||W_t||``: with BatchNorm after a convolution and no weight decay,
  a growing norm means the same gradient moves the weight relatively less.

Rounds are the 0-based indices of the calls to [`update`][InertiaTracker.update]; ``W_{-1}`` is the
weight the model held when the tracker was built. Layer inertia (see the
documentation's *Method* and *Diagnostics* pages) shows as middle layers whose relative
update falls far below that of the first and last layers. Results are plain numpy arrays
(layers x rounds) with CSV and JSON export; [`plot`][InertiaTracker.plot] needs matplotlib (the
``plot`` extra). [`inertia_ratio`][inertia_ratio] and [`INERTIA_THRESHOLD`][INERTIA_THRESHOLD] turn
the updates into the verdict that ``lips-wrap diagnose`` prints.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .layers import find_layers

Weights = Union[nn.Module, Mapping[str, torch.Tensor]]
"""A model, or a mapping from parameter name to tensor (e.g. a state dict)."""

INERTIA_THRESHOLD: float = 0.75
"""Inertia ratio below which the middle layers count as stalled.

The ratio ([`inertia_ratio`][inertia_ratio]) is the middle layers' mean relative update over the
mean of the first and last layers'. Calibrated on the committed FedAvg runs of
``benchmarks/reproduce.py``: with the paper's own ResNet-8 (``shapes-paper-resnet8``, 20
clients, 100 rounds) the ratio is 0.41-0.49 and stays below 0.75 in every fifth of the
run; with 5 clients and 25 rounds (``shapes-resnet8``) 0.71; with the narrow ResNet-8
(``shapes-resnet8-many``, ``shapes-resnet8-wide``) 0.95-1.39 and ``digits-vgg`` 1.11, no
stall after the first 20 rounds. The threshold sits between the two groups. It
describes a run; on those setups it did not predict LIPS's gain (see the results
page), so the verdict says whether the middle layers stall, not whether LIPS will help.
"""

DEFAULT_WARMUP_FRACTION: float = 0.2
"""Share of the recorded rounds (rounded down) that [`inertia_ratio`][inertia_ratio] skips by
default: the first rounds of training move every layer a lot."""


class InertiaRatio(NamedTuple):
    """The numbers behind a verdict: means of the relative update over the rounds
    after the warm-up, and ``ratio = middle / edges``."""

    ratio: float
    middle: float
    first: float
    last: float
    edges: float
    warmup: int
    rounds_used: int


class AnchorDrift(NamedTuple):
    """How far each group of layers has moved from the anchor round's weights by the
    last recorded round (the authors' own measure of inertia), per group the mean over
    its layers:

    * ``*_cosine``: cosine similarity to the anchor weights (1: not moved),
    * ``*_drift``: ``||W_last - W_anchor|| / ||W_anchor||``,
    * ``*_norm_growth``: ``||W_last|| / ||W_anchor||``.

    ``edges`` is the mean of the first and last layers' values (or the one that exists);
    ``ratio = middle_drift / edges_drift``: well below 1 when the middle layers have
    stayed near the anchor while the ends moved on.
    """

    anchor: int
    last: int
    middle_cosine: float
    edges_cosine: float
    middle_drift: float
    edges_drift: float
    middle_norm_growth: float
    edges_norm_growth: float
    ratio: float


class WindowRatio(NamedTuple):
    """The inertia ratio over one span of recorded rounds: columns ``start`` to
    ``stop - 1`` of the updates (NaN where the span has no finite middle or edge
    update)."""

    start: int
    stop: int
    ratio: float


def default_warmup(rounds: int) -> int:
    """Rounds skipped by default: ``floor(DEFAULT_WARMUP_FRACTION * rounds)``."""
    return int(math.floor(DEFAULT_WARMUP_FRACTION * rounds))


def inertia_ratio(
    updates: np.ndarray, roles: Sequence[str], warmup: Optional[int] = None
) -> InertiaRatio:
    """Middle layers' mean relative update over the mean of the first and last layers'.

    Args:
        updates: relative updates, layers x rounds (as
            [`InertiaTracker.relative_update`][lips_wrap.InertiaTracker.relative_update]).
        roles: one of ``"first"``, ``"middle"``, ``"last"`` or ``"other"`` per layer
            (``"other"`` rows are ignored); at least one middle layer and one of first
            or last are needed.
        warmup: rounds skipped at the start; default ``default_warmup``.

    ``edges`` is the mean of the first layers' mean and the last layers' mean (or the
    one that exists). Non-finite cells (a layer that was all zeros) are left out. The
    ratio is inf when only the middle layers move, NaN when nothing moves.
    """
    updates = np.asarray(updates, dtype=np.float64)
    if updates.ndim != 2 or updates.shape[0] != len(roles):
        raise ValueError(
            f"updates must be layers x rounds with one role per layer; got shape "
            f"{updates.shape} and {len(roles)} roles"
        )
    unknown = sorted(set(roles) - {"first", "middle", "last", "other"})
    if unknown:
        raise ValueError(f"unknown roles {unknown}; accepted: first, middle, last, other")
    rounds = updates.shape[1]
    skip = default_warmup(rounds) if warmup is None else warmup
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < rounds:
        raise ValueError(
            f"warmup must be an integer in [0, {rounds - 1}] for {rounds} recorded rounds, "
            f"got {warmup!r}"
        )
    kept = updates[:, skip:]

    def mean_of(role: str) -> float:
        rows = kept[[i for i, r in enumerate(roles) if r == role]]
        cells = rows[np.isfinite(rows)]
        return float(cells.mean()) if cells.size else math.nan

    middle, first, last = mean_of("middle"), mean_of("first"), mean_of("last")
    if math.isnan(middle):
        raise ValueError("the inertia ratio needs at least one middle layer with finite updates")
    present = [value for value in (first, last) if not math.isnan(value)]
    if not present:
        raise ValueError("the inertia ratio needs a first or a last layer with finite updates")
    edges = float(np.mean(present))
    if edges > 0.0:
        ratio = middle / edges
    else:
        ratio = math.inf if middle > 0.0 else math.nan
    return InertiaRatio(ratio, middle, first, last, edges, skip, rounds - skip)


def anchor_drift(
    cosines: np.ndarray, distances: np.ndarray, norms: np.ndarray, roles: Sequence[str],
    anchor: int, last: Optional[int] = None,
) -> AnchorDrift:
    """Anchor drift of the middle layers against the first and last layers.

    Args:
        cosines: layers x rounds, as
            [`InertiaTracker.cosine_to_anchor`][lips_wrap.InertiaTracker.cosine_to_anchor].
        distances: layers x rounds, as ``InertiaTracker.distance_to_anchor``.
        norms: layers x rounds, as ``InertiaTracker.weight_norm``.
        roles: ``"first"``, ``"middle"``, ``"last"`` or ``"other"`` per layer.
        anchor: the anchor round's column.
        last: the column to compare with the anchor; default the last one.
    """
    cosines, distances, norms = (np.asarray(a, dtype=np.float64)
                                 for a in (cosines, distances, norms))
    if not cosines.shape == distances.shape == norms.shape or cosines.ndim != 2 or \
            cosines.shape[0] != len(roles):
        raise ValueError(
            f"cosines, distances and norms must be layers x rounds arrays of one shape with "
            f"one role per layer; got {cosines.shape}, {distances.shape}, {norms.shape} and "
            f"{len(roles)} roles"
        )
    rounds = cosines.shape[1]
    last = rounds - 1 if last is None else last
    for label, value in (("anchor", anchor), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                not 0 <= value < rounds:
            raise ValueError(f"{label} must be a column in [0, {rounds - 1}], got {value!r}")
    if last <= anchor:
        raise ValueError(f"last ({last}) must come after the anchor ({anchor})")
    base = norms[:, anchor]
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = distances[:, last] / base
        growth = norms[:, last] / base

    def group(values: np.ndarray, role: str) -> float:
        cells = values[[i for i, r in enumerate(roles) if r == role]]
        cells = cells[np.isfinite(cells)]
        return float(cells.mean()) if cells.size else math.nan

    def middle_and_edges(values: np.ndarray) -> tuple:
        ends = [v for v in (group(values, "first"), group(values, "last"))
                if not math.isnan(v)]
        return group(values, "middle"), float(np.mean(ends)) if ends else math.nan

    if math.isnan(group(drift, "middle")) or not any(r in ("first", "last") for r in roles):
        raise ValueError("the anchor drift needs a middle layer and a first or last layer "
                         "with finite values")
    middle_cos, edges_cos = middle_and_edges(cosines[:, last])
    middle_drift, edges_drift = middle_and_edges(drift)
    middle_growth, edges_growth = middle_and_edges(growth)
    ratio = middle_drift / edges_drift if edges_drift > 0 else math.nan
    return AnchorDrift(int(anchor), int(last), middle_cos, edges_cos, middle_drift,
                       edges_drift, middle_growth, edges_growth, ratio)


def relative_update(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``||current - previous|| / ||previous||``; inf when ``previous`` is all zeros
    and ``current`` is not, 0 when both are."""
    prev = previous.detach().to(torch.float64)
    change = float(torch.linalg.vector_norm(current.detach().to(torch.float64) - prev))
    base = float(torch.linalg.vector_norm(prev))
    if base == 0.0:
        return 0.0 if change == 0.0 else math.inf
    return change / base


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two tensors seen as flat vectors (NaN if either
    is all zeros)."""
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(torch.float64)
    norms = float(torch.linalg.vector_norm(x)) * float(torch.linalg.vector_norm(y))
    return float(torch.dot(x, y)) / norms if norms > 0.0 else math.nan


def distance(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> float:
    """``||a - b||`` (Frobenius, in float64), or ``||a||`` without ``b``."""
    x = a.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(x if b is None else x - b.detach().to(torch.float64)))


MEASURES = ("relative_update", "cosine_to_anchor", "distance_to_anchor", "weight_norm")
"""The per-(layer, round) measures of [`InertiaTracker`][lips_wrap.InertiaTracker], in file column
order."""


def _layers_by_rounds(rows: List[List[float]], rounds: int) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(rounds, -1).T.copy()


def _tracked_names(model: nn.Module, all_layers: bool) -> List[str]:
    if all_layers:
        return [name for name, p in model.named_parameters() if p.dim() >= 2]
    return list(find_layers(model).eligible_names)


class InertiaTracker:
    """Per-layer relative update, anchor drift (cosine and L2 distance to the weights
    of an anchor round) and weight norm of a model, one column per round.

    Args:
        model: the (global) model; its current weights are the reference of round 0.
        all_layers: track every weight tensor with two or more dimensions (stem, head
            and embeddings included) instead of the layers LIPS masks
            (``find_layers(model)``).
        anchor_round: the round whose weights the cosine similarity compares with.

    Example:
        ```python
        tracker = InertiaTracker(global_model, all_layers=True)
        for rnd in range(rounds):
            ...                                  # train clients, aggregate
            tracker.update(global_model)         # or tracker.update(global_state)
        tracker.to_csv("inertia.csv"); tracker.plot("inertia.png")
        ```
    """

    def __init__(self, model: nn.Module, all_layers: bool = False, anchor_round: int = 2) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(anchor_round, bool) or not isinstance(anchor_round, int) or anchor_round < 0:
            raise ValueError(f"anchor_round must be an integer >= 0, got {anchor_round!r}")
        layers = _tracked_names(model, all_layers)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no weight tensor to track")
        self._start(layers, anchor_round, model)

    def _start(self, layers: Sequence[str], anchor_round: int, initial: Weights) -> None:
        self.layers: List[str] = list(layers)
        self.anchor_round = anchor_round
        self._previous: Optional[Dict[str, torch.Tensor]] = self._snapshot(initial)
        self._anchor: Optional[Dict[str, torch.Tensor]] = None
        self._updates: List[List[float]] = []
        self._cosines: List[List[float]] = []
        self._distances: List[List[float]] = []
        self._norms: List[List[float]] = []

    @classmethod
    def from_weights(
        cls, initial: Mapping[str, torch.Tensor], layers: Sequence[str], anchor_round: int = 2
    ) -> "InertiaTracker":
        """A tracker of the named tensors of a state dict, without a model: ``initial``
        is the reference of round 0 (e.g. the first saved checkpoint)."""
        if isinstance(anchor_round, bool) or not isinstance(anchor_round, int) or anchor_round < 0:
            raise ValueError(f"anchor_round must be an integer >= 0, got {anchor_round!r}")
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of names, got {layers!r}")
        tracker = cls.__new__(cls)
        tracker._start(layers, anchor_round, initial)
        return tracker

    # -- recording ----------------------------------------------------------------
    def _snapshot(self, weights: Weights) -> Dict[str, torch.Tensor]:
        if isinstance(weights, nn.Module):
            source: Mapping[str, torch.Tensor] = dict(weights.named_parameters())
        elif isinstance(weights, Mapping):
            source = weights
        else:
            raise TypeError(
                f"weights must be an nn.Module or a mapping of name to tensor, got "
                f"{type(weights).__name__}"
            )
        missing = [name for name in self.layers if name not in source]
        if missing:
            raise KeyError(
                f"the weights lack {len(missing)} tracked layers, e.g. {missing[:3]}"
            )
        return {name: source[name].detach().to("cpu", torch.float32, copy=True)
                for name in self.layers}

    def update(self, weights: Weights) -> None:
        """Record one round: ``weights`` is the model (or its state dict) after it."""
        if self._previous is None:
            raise RuntimeError(
                "this tracker was loaded from a file and holds no weights to compare "
                "with; build a new InertiaTracker(model) to record rounds"
            )
        current = self._snapshot(weights)
        round_index = len(self._updates)
        if round_index == self.anchor_round:
            self._anchor = current
        self._updates.append(
            [relative_update(current[n], self._previous[n]) for n in self.layers]
        )
        self._cosines.append(
            [cosine_similarity(current[n], self._anchor[n]) if self._anchor else math.nan
             for n in self.layers]
        )
        self._distances.append(
            [distance(current[n], self._anchor[n]) if self._anchor else math.nan
             for n in self.layers]
        )
        self._norms.append([distance(current[n]) for n in self.layers])
        self._previous = current

    # -- results ------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        """Number of rounds recorded."""
        return len(self._updates)

    @property
    def relative_update(self) -> np.ndarray:
        """Array (layers x rounds) of ``||W_t - W_{t-1}|| / ||W_{t-1}||``."""
        return _layers_by_rounds(self._updates, self.rounds)

    @property
    def cosine_to_anchor(self) -> np.ndarray:
        """Array (layers x rounds) of ``cos(W_t, W_anchor)``; NaN before the anchor."""
        return _layers_by_rounds(self._cosines, self.rounds)

    @property
    def distance_to_anchor(self) -> np.ndarray:
        """Array (layers x rounds) of ``||W_t - W_anchor||``; NaN before the anchor."""
        return _layers_by_rounds(self._distances, self.rounds)

    @property
    def weight_norm(self) -> np.ndarray:
        """Array (layers x rounds) of ``||W_t||``."""
        return _layers_by_rounds(self._norms, self.rounds)

    def to_json(self, path: Union[str, Path]) -> None:
        """Write layers, anchor round and the four arrays (NaN and inf as null)."""

        def clean(rows: np.ndarray) -> List[List[Optional[float]]]:
            return [[float(v) if math.isfinite(v) else None for v in row] for row in rows]

        data = {
            "layers": self.layers,
            "anchor_round": self.anchor_round,
            **{measure: clean(getattr(self, measure)) for measure in MEASURES},
        }
        Path(path).write_text(json.dumps(data, indent=1))

    def to_csv(self, path: Union[str, Path]) -> None:
        """Write one row per (layer, round): layer, round and the four measures."""
        arrays = [getattr(self, column) for column in MEASURES]
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "round", *MEASURES])
            for i, name in enumerate(self.layers):
                for t in range(self.rounds):
                    writer.writerow([name, t, *(repr(float(a[i, t])) for a in arrays)])

    @classmethod
    def _from_arrays(
        cls, layers: Sequence[str], anchor_round: int, arrays: Mapping[str, np.ndarray]
    ) -> "InertiaTracker":
        """A tracker holding ``arrays`` (measure name to layers x rounds); a measure a
        file written by an older version lacks is all NaN."""
        tracker = cls.__new__(cls)
        tracker.layers = list(layers)
        tracker.anchor_round = int(anchor_round)
        tracker._previous = None
        tracker._anchor = None
        shape = np.asarray(arrays["relative_update"]).shape
        columns = [np.asarray(arrays.get(m, np.full(shape, math.nan)), dtype=np.float64).T
                   .tolist() for m in MEASURES]
        tracker._updates, tracker._cosines, tracker._distances, tracker._norms = columns
        return tracker

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "InertiaTracker":
        """A tracker holding the results of [`to_json`][InertiaTracker.to_json] (for plotting,
        export)."""
        data = json.loads(Path(path).read_text())

        def array(rows: List[List[Optional[float]]]) -> np.ndarray:
            values = [[math.nan if v is None else v for v in row] for row in rows]
            return np.asarray(values, dtype=np.float64).reshape(len(data["layers"]), -1)

        return cls._from_arrays(data["layers"], data["anchor_round"],
                                {m: array(data[m]) for m in MEASURES if m in data})

    @classmethod
    def from_csv(cls, path: Union[str, Path], anchor_round: int = 2) -> "InertiaTracker":
        """A tracker holding the results of [`to_csv`][InertiaTracker.to_csv] (the CSV has no anchor
        round: pass the one it was recorded with)."""
        layers: List[str] = []
        cells: Dict[str, Dict[int, Dict[str, str]]] = {}
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            present = [m for m in MEASURES if m in (reader.fieldnames or ())]
            for row in reader:
                name = row["layer"]
                if name not in cells:
                    layers.append(name)
                    cells[name] = {}
                cells[name][int(row["round"])] = row
        rounds = max((len(c) for c in cells.values()), default=0)
        arrays = {m: np.array([[float(cells[n][t][m]) for t in range(rounds)] for n in layers],
                              dtype=np.float64).reshape(len(layers), rounds)
                  for m in present}
        return cls._from_arrays(layers, anchor_round, arrays)

    def drift(self, roles: Sequence[str]) -> AnchorDrift:
        """``anchor_drift`` of the recorded rounds, from the anchor round to the
        last; needs at least one round after the anchor."""
        if self.rounds <= self.anchor_round + 1:
            raise ValueError(
                f"the anchor drift needs a round after the anchor round {self.anchor_round}; "
                f"{self.rounds} rounds recorded"
            )
        return anchor_drift(self.cosine_to_anchor, self.distance_to_anchor, self.weight_norm,
                            roles, self.anchor_round)

    def plot(self, path: Union[str, Path], title: str = "") -> None:
        """Write a PNG: layer x round heatmap of the relative update (log colour
        scale) beside a line plot of the update of the first layer, the mean of the
        middle layers, and the last layer. Needs matplotlib: ``pip install 'lips-wrap[plot]'``."""
        from ._plotting import plot_inertia

        plot_inertia(self.layers, self.relative_update, path, title)


def inertia_ratio_by_window(
    updates: np.ndarray, roles: Sequence[str], windows: int = 5
) -> List[WindowRatio]:
    """The inertia ratio over ``windows`` consecutive spans of the recorded rounds.

    The rounds are cut into ``windows`` contiguous spans of near-equal length (the
    first ones one round longer when they do not divide evenly), and
    [`inertia_ratio`][inertia_ratio] is taken over each with no warm-up. The ratio can change a
    lot during a run (in the benchmark's FedAvg runs it starts well below 1 and ends
    above), which one number over the whole run hides.
    """
    updates = np.asarray(updates, dtype=np.float64)
    rounds = updates.shape[1] if updates.ndim == 2 else 0
    if isinstance(windows, bool) or not isinstance(windows, int) or not 1 <= windows <= rounds:
        raise ValueError(
            f"windows must be an integer in [1, {rounds}] (the recorded rounds), got "
            f"{windows!r}"
        )
    inertia_ratio(updates, roles, warmup=0)  # the roles and the whole run are valid
    middle = np.array([r == "middle" for r in roles])
    edges = np.array([r in ("first", "last") for r in roles])
    result = []
    for span in np.array_split(np.arange(rounds), windows):
        start, stop = int(span[0]), int(span[-1]) + 1
        part = updates[:, start:stop]
        measurable = np.isfinite(part[middle]).any() and np.isfinite(part[edges]).any()
        ratio = inertia_ratio(part, roles, warmup=0).ratio if measurable else math.nan
        result.append(WindowRatio(start, stop, ratio))
    return result
