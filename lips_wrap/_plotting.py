"""Figures for the diagnostics (matplotlib, imported only when a figure is drawn).

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never
through ``pyplot``: drawing one neither selects nor changes the user's backend and
leaves no figure open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

Groups = Sequence[Tuple[str, Sequence[int]]]
"""(label, row indices) of the lines drawn beside the heatmap."""


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'lips-wrap[plot]'"
        ) from None
    return Figure


def layer_groups(count: int) -> List[Tuple[str, range]]:
    """Label and indices of the first layer, the middle layers and the last layer of
    ``count`` layers in model order (fewer groups when there are fewer layers)."""
    if count < 3:
        return [(f"layer {i}", range(i, i + 1)) for i in range(count)]
    return [("first layer", range(0, 1)), ("middle layers (mean)", range(1, count - 1)),
            ("last layer", range(count - 1, count))]


def plot_inertia(
    layers: Sequence[str],
    updates: np.ndarray,
    path: Union[str, Path],
    title: str = "",
    groups: Optional[Groups] = None,
    rounds: Optional[Sequence[int]] = None,
) -> None:
    """Heatmap (layers x rounds, log colour) and one line per group of layers.

    Args:
        layers: row labels.
        updates: relative updates, layers x rounds.
        path: where the PNG goes.
        title: figure title.
        groups: (label, rows) of the lines; default ``layer_groups``.
        rounds: the round number of each column (default 0, 1, ...).
    """
    figure_class = _figure_class()
    from matplotlib.colors import LogNorm

    finite = updates[np.isfinite(updates) & (updates > 0)]
    low, high = (finite.min(), finite.max()) if finite.size else (1e-6, 1.0)
    shown = np.where(np.isfinite(updates) & (updates > 0), updates, low)
    columns = np.arange(updates.shape[1]) if rounds is None else np.asarray(rounds)
    if len(columns) != updates.shape[1]:
        raise ValueError(f"{len(columns)} round numbers for {updates.shape[1]} columns")
    height = min(12.0, 1.5 + 0.18 * len(layers))
    fig = figure_class(figsize=(12, height))
    heat, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    image = heat.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=LogNorm(vmin=low, vmax=max(high, low * 1.0001)))
    heat.set_yticks(range(len(layers)))
    heat.set_yticklabels(layers, fontsize=6 if len(layers) > 20 else 8)
    ticks = np.linspace(0, len(columns) - 1, num=min(len(columns), 10)).round().astype(int)
    heat.set_xticks(ticks)
    heat.set_xticklabels([str(columns[i]) for i in ticks])
    heat.set_xlabel("round")
    heat.set_title("relative update ||W_t - W_t-1|| / ||W_t-1||", fontsize=10)
    fig.colorbar(image, ax=heat, fraction=0.04)
    for label, rows in layer_groups(len(layers)) if groups is None else groups:
        if len(rows):
            lines.plot(columns, shown[list(rows)].mean(axis=0), label=label)
    lines.set_yscale("log")
    lines.set_xlabel("round")
    lines.set_title("relative update by group", fontsize=10)
    lines.legend(fontsize=8)
    lines.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
