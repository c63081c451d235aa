"""Helpers for hand-written FedAvg loops: non-IID splits, FedAvg, personalized accuracy.

Needs numpy and torch only.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import nn


def _as_labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D sequence of integer class ids, got shape {array.shape} "
            f"and dtype {array.dtype}"
        )
    if array.size and array.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(array.min())}")
    return array


def dirichlet_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_samples: int = 1,
    max_tries: int = 1000,
) -> List[np.ndarray]:
    """Partition sample indices among clients with Dirichlet(alpha) label skew.

    Each class's samples are dealt to the clients in proportions drawn from
    ``Dirichlet(alpha)``; small ``alpha`` gives each client few classes. Draws are
    repeated until every client holds at least ``min_samples`` samples.
    """
    y = _as_labels(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_samples * num_clients > y.size:
        raise ValueError(
            f"{y.size} samples cannot give {num_clients} clients {min_samples} each"
        )
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: List[List[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet({alpha}) split gave every one of {num_clients} clients "
        f"{min_samples} samples in {max_tries} tries; lower min_samples or raise alpha"
    )


def label_distribution(
    labels: Sequence[int] | np.ndarray | torch.Tensor, indices: np.ndarray, num_classes: int
) -> np.ndarray:
    """Share of each class among ``labels[indices]`` (sums to 1)."""
    y = _as_labels(labels)
    counts = np.bincount(y[indices], minlength=num_classes).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("cannot take the label distribution of an empty index set")
    return counts / counts.sum()


def matched_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    distributions: Sequence[np.ndarray],
    samples_per_client: int,
    seed: int = 0,
) -> List[np.ndarray]:
    """For each client, draw ``samples_per_client`` indices whose labels follow that
    client's distribution (e.g. a personalized test set matching its training labels).

    Draws are with replacement within each class, so small test pools suffice, and
    clients draw independently of each other.
    """
    y = _as_labels(labels)
    rng = np.random.default_rng(seed)
    by_class = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
    result = []
    for client, dist in enumerate(distributions):
        dist = np.asarray(dist, dtype=np.float64)
        needed = [c for c in np.flatnonzero(dist > 0) if int(c) not in by_class]
        if needed:
            raise ValueError(
                f"client {client} needs class {int(needed[0])}, which the pool lacks"
            )
        counts = rng.multinomial(samples_per_client, dist / dist.sum())
        chosen = [
            rng.choice(by_class[int(c)], size=int(n), replace=True)
            for c, n in enumerate(counts) if n
        ]
        result.append(np.concatenate(chosen).astype(np.int64))
    return result


def fedavg(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Dict[str, torch.Tensor]:
    """Sample-weighted average of state dicts (FedAvg over every entry).

    Floating-point entries are averaged in float32 (or their own dtype if wider) and
    returned in their dtype; integer entries (e.g. BatchNorm's ``num_batches_tracked``)
    are averaged and rounded.
    """
    if not states:
        raise ValueError("fedavg needs at least one state dict")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} state dicts but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0].keys())
    for index, state in enumerate(states[1:], start=1):
        if list(state.keys()) != keys:
            raise ValueError(f"state dict {index} has other keys than state dict 0")
    averaged: Dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        work = torch.float64 if first.dtype == torch.float64 else torch.float32
        acc = torch.zeros_like(first, dtype=work)
        for state, weight in zip(states, weights):
            acc.add_(state[key].to(work), alpha=float(weight) / total)
        if not first.is_floating_point():
            acc = acc.round()
        averaged[key] = acc.to(first.dtype)
    return averaged


@torch.no_grad()
def personalized_accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    client_indices: Sequence[np.ndarray],
    batch_size: int = 512,
) -> Tuple[float, List[float]]:
    """Mean and per-client accuracy of ``model`` on each client's own test indices."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        per_client = []
        for indices in client_indices:
            index = torch.as_tensor(indices, dtype=torch.long)
            correct = 0
            for start in range(0, index.numel(), batch_size):
                batch = index[start:start + batch_size]
                logits = model(inputs[batch].to(device))
                correct += int((logits.argmax(dim=1).cpu() == targets[batch]).sum())
            per_client.append(correct / max(1, index.numel()))
    finally:
        model.train(was_training)
    return float(np.mean(per_client)), per_client


def local_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    loss_fn: nn.Module | None = None,
) -> float:
    """Train ``model`` on one client's data for ``epochs`` epochs of shuffled batches.

    Returns the mean loss of the last epoch.
    """
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    model.train()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(targets.numel(), generator=generator)
        losses = []
        for start in range(0, order.numel(), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch].to(device)), targets[batch].to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        last = float(np.mean(losses)) if losses else 0.0
    return last
