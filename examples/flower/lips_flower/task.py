"""Model, data and training shared by the ServerApp and the ClientApp."""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np
import torch
from flwr.app import UserConfig
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lips_wrap import LIPSConfig
from lips_wrap.integrations.custom import dirichlet_split, label_distribution, matched_split

Split = Tuple[torch.Tensor, torch.Tensor]


class Net(nn.Module):
    """The digits CNN: three 3x3 conv blocks (BatchNorm, ReLU) and a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths = [(1, 16), (16, 32), (32, 32)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in widths)
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for _, b in widths)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = torch.relu(norm(conv(x)))
            if index == 1:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))


def lips_config(run_config: UserConfig) -> LIPSConfig:
    """LIPS settings from the run config; one LIPS round per server round."""
    return LIPSConfig(
        total_rounds=int(run_config["num-server-rounds"]),
        period=int(run_config["period"]),
        start_density=float(run_config["start-density"]),
    )


@lru_cache(maxsize=None)
def load_partition(partition_id: int, num_partitions: int, alpha: float, seed: int
                   ) -> Tuple[Split, Split]:
    """This node's share of scikit-learn's digits: a Dirichlet(alpha) label-skewed
    training set and a 60-sample test set with the same label distribution."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.3, stratify=digits.target, random_state=seed
    )
    parts = dirichlet_split(y[train_idx], num_partitions, alpha, seed=seed, min_samples=8)
    mine = train_idx[parts[partition_id]]
    test = test_idx[matched_split(
        y[test_idx], [label_distribution(y, mine, 10)], 60, seed=seed + partition_id)[0]]
    return (x[mine], y[mine]), (x[test], y[test])


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    inputs, targets = data
    return float((model(inputs).argmax(dim=1) == targets).float().mean())
