"""Model and data shared by the server and the client script: scikit-learn's digits
(bundled with scikit-learn, nothing is downloaded), split among the sites with a
Dirichlet label skew."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lips_wrap.integrations.custom import dirichlet_split, label_distribution, matched_split

Split = Tuple[torch.Tensor, torch.Tensor]


class Net(nn.Module):
    """An MLP on the 8x8 digits: input layer, two middle layers (LIPS masks their
    weights), head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def site_data(site: str, num_sites: int, alpha: float = 0.5, seed: int = 0
              ) -> Tuple[Split, Split]:
    """Site ``site-N``'s training set (Dirichlet(alpha) label skew) and a test set
    with the same label distribution."""
    index = int(site.rsplit("-", 1)[-1]) - 1
    if not 0 <= index < num_sites:
        raise ValueError(f"site {site!r} is not one of site-1 .. site-{num_sites}")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.3, stratify=digits.target, random_state=seed
    )
    parts = dirichlet_split(y[train_idx], num_sites, alpha, seed=seed, min_samples=16)
    mine = train_idx[parts[index]]
    test = test_idx[matched_split(y[test_idx], [label_distribution(y, mine, 10)], 100,
                                  seed=seed + index)[0]]
    return (x[mine], y[mine]), (x[test], y[test])
