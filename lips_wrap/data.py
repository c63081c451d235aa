"""Procedurally generated 32x32 colour images for offline federated benchmarks.

``make_shapes(n, seed)`` draws ``n`` images of 10 classes (numpy only, no download).
A class is a (shape, fill texture) pair: five shapes (disk, square, triangle, ring,
cross) times two textures (stripes at a random angle, checks). Everything else is
nuisance that a model must learn to ignore: position, size and rotation of the
object, its colours and the background's, a smooth background gradient, a solid
distractor shape of a random kind, and pixel noise. The same seed always gives the
same images.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["NUM_CLASSES", "SHAPES", "TEXTURES", "make_shapes"]

SHAPES = ("disk", "square", "triangle", "ring", "cross")
TEXTURES = ("stripes", "checks")
NUM_CLASSES = len(SHAPES) * len(TEXTURES)
SIZE = 32

_GRID = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="xy"), 0) + 0.5


def _shape_mask(kind: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    dx, dy = _GRID[0] - cx, _GRID[1] - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radius
    r = np.hypot(u, v)
    name = SHAPES[kind]
    if name == "disk":
        return r < 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if name == "triangle":
        return (v < 0.5) & (v > 2.0 * np.abs(u) - 1.0)
    if name == "ring":
        return (r < 1.0) & (r > 0.6)
    return ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0))


def _texture(kind: int, angle: float, period: float, phase: float) -> np.ndarray:
    x, y = _GRID
    if TEXTURES[kind] == "stripes":
        return np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase) > 0
    return (np.sin(np.pi * x / (period / 2) + phase) * np.sin(np.pi * y / (period / 2))) > 0


def make_shapes(n: int, seed: int = 0, noise: float = 0.12) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float32, shape ``(n, 3, 32, 32)``, roughly in [0, 1]) and labels
    (balanced, ``n // 10`` or one more per class), generated from ``seed`` alone."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i, label in enumerate(labels):
        shape, texture = divmod(int(label), len(TEXTURES))
        background = rng.uniform(0.0, 1.0, 3)
        slope = rng.normal(0.0, 0.015, (3, 2))
        image = background[:, None, None] + slope[:, :1, None] * (_GRID[0] - 16) \
            + slope[:, 1:, None] * (_GRID[1] - 16)
        distractor = _shape_mask(int(rng.integers(len(SHAPES))), *rng.uniform(4, 28, 2),
                                 rng.uniform(3, 6), rng.uniform(0, np.pi))
        image[:, distractor] = rng.uniform(0.0, 1.0, 3)[:, None]
        mask = _shape_mask(shape, *rng.uniform(10, 22, 2), rng.uniform(7, 12),
                           rng.uniform(0, 2 * np.pi))
        pattern = _texture(texture, rng.uniform(0, np.pi), rng.uniform(3.5, 6.0),
                           rng.uniform(0, 2 * np.pi))
        light, dark = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.45, 3)
        fill = np.where(pattern[None], light[:, None, None], dark[:, None, None])
        image[:, mask] = fill[:, mask]
        image += rng.normal(0.0, noise, image.shape)
        images[i] = image
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
