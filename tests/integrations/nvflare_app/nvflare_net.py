"""The model and data of the NVFlare simulations under test (server and clients import it)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class Net(nn.Module):
    """Input layer, two middle layers (the tensors LIPS masks), head. Tanh, not ReLU:
    every weight gets a nonzero gradient, so no weight is exactly zero unless masked."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
            nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


MASKED = ("layers.2.weight", "layers.4.weight")
"""What ``find_layers`` picks in :class:`Net` (the test checks it)."""


def site_data(site: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A few generated samples, different per site (``site-1``, ``site-2``, ...)."""
    generator = torch.Generator().manual_seed(int(site.rsplit("-", 1)[-1]))
    inputs = torch.randn(40, 8, generator=generator)
    return inputs, torch.randint(0, 3, (40,), generator=generator)
