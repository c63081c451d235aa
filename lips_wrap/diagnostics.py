"""InertiaTracker: how much each layer of the global model moves, round after round.

After every aggregation, :meth:`InertiaTracker.update` records per tracked layer

* the relative update ``||W_t - W_{t-1}|| / ||W_{t-1}||`` (Frobenius norms), and
* the cosine similarity between ``W_t`` and ``W`` at an anchor round (round 2 by
  default, as the paper), NaN before the anchor round is reached.

Rounds are the 0-based indices of the calls to :meth:`update`; ``W_{-1}`` is the
weight the model held when the tracker was built. Layer inertia (LIPS_METHOD.md) shows
as middle layers whose relative update falls to near zero while the first and last
layers keep moving. Results are plain numpy arrays (layers x rounds) with CSV and JSON
export; :meth:`plot` needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .layers import find_layers

Weights = Union[nn.Module, Mapping[str, torch.Tensor]]
"""A model, or a mapping from parameter name to tensor (e.g. a state dict)."""


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


def _tracked_names(model: nn.Module, all_layers: bool) -> List[str]:
    if all_layers:
        return [name for name, p in model.named_parameters() if p.dim() >= 2]
    return list(find_layers(model).eligible_names)


class InertiaTracker:
    """Per-layer relative update and cosine-to-anchor of a model, one column per round.

    Args:
        model: the (global) model; its current weights are the reference of round 0.
        all_layers: track every weight tensor with two or more dimensions (stem, head
            and embeddings included) instead of the layers LIPS masks
            (``find_layers(model)``).
        anchor_round: the round whose weights the cosine similarity compares with.

    Example::

        tracker = InertiaTracker(global_model, all_layers=True)
        for rnd in range(rounds):
            ...                                  # train clients, aggregate
            tracker.update(global_model)         # or tracker.update(global_state)
        tracker.to_csv("inertia.csv"); tracker.plot("inertia.png")
    """

    def __init__(self, model: nn.Module, all_layers: bool = False, anchor_round: int = 2) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(anchor_round, bool) or not isinstance(anchor_round, int) or anchor_round < 0:
            raise ValueError(f"anchor_round must be an integer >= 0, got {anchor_round!r}")
        self.layers: List[str] = _tracked_names(model, all_layers)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no weight tensor to track")
        self.anchor_round = anchor_round
        self._previous: Optional[Dict[str, torch.Tensor]] = self._snapshot(model)
        self._anchor: Optional[Dict[str, torch.Tensor]] = None
        self._updates: List[List[float]] = []
        self._cosines: List[List[float]] = []

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
        self._previous = current

    # -- results ------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        """Number of rounds recorded."""
        return len(self._updates)

    @property
    def relative_update(self) -> np.ndarray:
        """Array (layers x rounds) of ``||W_t - W_{t-1}|| / ||W_{t-1}||``."""
        return np.asarray(self._updates, dtype=np.float64).reshape(self.rounds, -1).T.copy()

    @property
    def cosine_to_anchor(self) -> np.ndarray:
        """Array (layers x rounds) of ``cos(W_t, W_anchor)``; NaN before the anchor."""
        return np.asarray(self._cosines, dtype=np.float64).reshape(self.rounds, -1).T.copy()

    def to_json(self, path: Union[str, Path]) -> None:
        """Write layers, anchor round and both arrays (NaN and inf as null)."""

        def clean(rows: np.ndarray) -> List[List[Optional[float]]]:
            return [[float(v) if math.isfinite(v) else None for v in row] for row in rows]

        data = {
            "layers": self.layers,
            "anchor_round": self.anchor_round,
            "relative_update": clean(self.relative_update),
            "cosine_to_anchor": clean(self.cosine_to_anchor),
        }
        Path(path).write_text(json.dumps(data, indent=1))

    def to_csv(self, path: Union[str, Path]) -> None:
        """Write one row per (layer, round): layer, round, relative_update, cosine."""
        updates, cosines = self.relative_update, self.cosine_to_anchor
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "round", "relative_update", "cosine_to_anchor"])
            for i, name in enumerate(self.layers):
                for t in range(self.rounds):
                    writer.writerow([name, t, repr(float(updates[i, t])),
                                     repr(float(cosines[i, t]))])

    @classmethod
    def _from_arrays(
        cls, layers: Sequence[str], anchor_round: int,
        updates: np.ndarray, cosines: np.ndarray,
    ) -> "InertiaTracker":
        tracker = cls.__new__(cls)
        tracker.layers = list(layers)
        tracker.anchor_round = int(anchor_round)
        tracker._previous = None
        tracker._anchor = None
        tracker._updates = updates.T.tolist()
        tracker._cosines = cosines.T.tolist()
        return tracker

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "InertiaTracker":
        """A tracker holding the results of :meth:`to_json` (for plotting, export)."""
        data = json.loads(Path(path).read_text())

        def array(rows: List[List[Optional[float]]]) -> np.ndarray:
            values = [[math.nan if v is None else v for v in row] for row in rows]
            return np.asarray(values, dtype=np.float64).reshape(len(data["layers"]), -1)

        return cls._from_arrays(data["layers"], data["anchor_round"],
                                array(data["relative_update"]), array(data["cosine_to_anchor"]))

    @classmethod
    def from_csv(cls, path: Union[str, Path], anchor_round: int = 2) -> "InertiaTracker":
        """A tracker holding the results of :meth:`to_csv` (the CSV has no anchor
        round: pass the one it was recorded with)."""
        layers: List[str] = []
        cells: Dict[str, Dict[int, tuple]] = {}
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                name = row["layer"]
                if name not in cells:
                    layers.append(name)
                    cells[name] = {}
                cells[name][int(row["round"])] = (
                    float(row["relative_update"]), float(row["cosine_to_anchor"])
                )
        rounds = max((len(c) for c in cells.values()), default=0)
        updates = np.array([[cells[n][t][0] for t in range(rounds)] for n in layers])
        cosines = np.array([[cells[n][t][1] for t in range(rounds)] for n in layers])
        return cls._from_arrays(layers, anchor_round, updates.reshape(len(layers), rounds),
                                cosines.reshape(len(layers), rounds))

    def plot(self, path: Union[str, Path], title: str = "") -> None:
        """Write a PNG: layer x round heatmap of the relative update (log colour
        scale) beside a line plot of the update of the first layer, the mean of the
        middle layers, and the last layer. Needs matplotlib: ``pip install 'lips-wrap[plot]'``."""
        from ._plotting import plot_inertia

        plot_inertia(self.layers, self.relative_update, path, title)
