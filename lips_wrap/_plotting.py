"""Figures for the diagnostics (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install 'lips-wrap[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_groups(count: int) -> List[Tuple[str, range]]:
    """Label and indices of the first layer, the middle layers and the last layer of
    ``count`` layers in model order (fewer groups when there are fewer layers)."""
    if count < 3:
        return [(f"layer {i}", range(i, i + 1)) for i in range(count)]
    return [("first layer", range(0, 1)), ("middle layers (mean)", range(1, count - 1)),
            ("last layer", range(count - 1, count))]


def plot_inertia(
    layers: Sequence[str], updates: np.ndarray, path: Union[str, Path], title: str = ""
) -> None:
    """Heatmap (layers x rounds, log colour) and first/middle/last group means."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    finite = updates[np.isfinite(updates) & (updates > 0)]
    low, high = (finite.min(), finite.max()) if finite.size else (1e-6, 1.0)
    shown = np.where(np.isfinite(updates) & (updates > 0), updates, low)
    height = min(12.0, 1.5 + 0.18 * len(layers))
    fig, (heat, lines) = plt.subplots(
        1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    image = heat.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=LogNorm(vmin=low, vmax=max(high, low * 1.0001)))
    heat.set_yticks(range(len(layers)))
    heat.set_yticklabels(layers, fontsize=6 if len(layers) > 20 else 8)
    heat.set_xlabel("round")
    heat.set_title("relative update ||W_t - W_t-1|| / ||W_t-1||", fontsize=10)
    fig.colorbar(image, ax=heat, fraction=0.04)
    rounds = np.arange(updates.shape[1])
    for label, group in layer_groups(len(layers)):
        lines.plot(rounds, np.nanmean(shown[list(group)], axis=0), label=label)
    lines.set_yscale("log")
    lines.set_xlabel("round")
    lines.set_title("relative update: first, middle, last", fontsize=10)
    lines.legend(fontsize=8)
    lines.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
