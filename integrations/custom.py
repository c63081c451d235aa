"""Helpers for hand-written FedAvg loops: non-IID splits, FedAvg, personalized accuracy,
and [`simulate`][simulate], a whole FedAvg(+LIPS) simulation in one call.

Needs numpy and torch only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from lips_wrap import LIPS, ClientStates, LIPSConfig, ServerMasker, find_layers

__all__ = [
    "RoundRecord", "dirichlet_split", "fedavg", "label_distribution", "local_train",
    "matched_split", "personalized_accuracy", "simulate",
]


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
                correct += int((logits.argmax(dim=1) == targets[batch].to(device)).sum())
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

    Returns the mean loss of the last epoch. The losses are summed on the model's
    device and read once per epoch, so a GPU never waits for the host between steps.
    """
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    model.train()
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(targets.numel(), generator=generator).to(inputs.device)
        total, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for start in range(0, order.numel(), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch].to(device)), targets[batch].to(device))
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        last = float(total) / steps if steps else 0.0
    return last


@dataclass
class RoundRecord:
    """Personalized accuracy of one simulated round.

    ``before``: each client's model after its local training, on its own test set.
    ``after``: each client's copy of the aggregated model as it starts the next round
    (masked on LIPS mask rounds, as the reference measures it); for the last round,
    the aggregated model itself. None until measured.
    """

    round: int
    before: float
    before_per_client: List[float]
    train_loss: float
    masked: bool = False
    after: Optional[float] = None
    after_per_client: Optional[List[float]] = None


RoundCallback = Callable[[int, nn.Module, List[RoundRecord]], None]
"""Called after each aggregation with (round, model holding the global weights, history so far)."""


def simulate(
    model_factory: Callable[[], nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    train_indices: Sequence[np.ndarray],
    test_indices: Sequence[np.ndarray],
    rounds: int,
    epochs: int,
    batch_size: int,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    lips_config: Optional[LIPSConfig] = None,
    seed: int = 0,
    callbacks: Sequence[RoundCallback] = (),
    server_side: bool = False,
) -> List[RoundRecord]:
    """FedAvg (or FedAvg+LIPS with ``lips_config``) over all clients every round.

    One model instance serves every client in turn: it loads the global weights, (with
    LIPS) restores the client's LIPS state and calls ``on_global_model(round)``, trains
    ``epochs`` local epochs with an optimizer whose state is fresh each round (as the
    reference), and uploads. The server averages the uploads weighted by client size.
    With ``server_side=True`` the clients keep no gradients: the server masks the
    global model before sending it ([`lips_wrap.ServerMasker`][lips_wrap.ServerMasker], scores
    ``|delta * W|``). Deterministic given ``seed`` (model initialisation and batch
    order) and one torch thread; every variant consumes the same random numbers, so
    runs on one seed are paired. Callbacks see the aggregated, unmasked model.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(train_indices) != len(test_indices) or not train_indices:
        raise ValueError(
            f"need one test index set per client: {len(train_indices)} training sets, "
            f"{len(test_indices)} test sets"
        )
    if lips_config is not None and lips_config.total_rounds != rounds:
        raise ValueError(
            f"lips_config.total_rounds is {lips_config.total_rounds} but the run has "
            f"{rounds} rounds"
        )
    torch.manual_seed(seed)
    model = model_factory()
    optimizer = optimizer_factory(model.parameters())
    lips = clients = server = None
    if lips_config is not None and server_side:
        plan = find_layers(model, lips_config.include, lips_config.exclude)
        server = ServerMasker(plan, lips_config)
    elif lips_config is not None:
        lips = LIPS(model, optimizer, lips_config)
        optimizer = lips.optimizer
        clients = ClientStates(lips)
    generator = torch.Generator().manual_seed(seed)
    global_state = copy.deepcopy(model.state_dict())
    sizes = [len(indices) for indices in train_indices]
    history: List[RoundRecord] = []
    for rnd in range(rounds):
        uploads, before, after, losses, masked = [], [], [], [], False
        sent = global_state
        if server is not None:
            sent, report = server(global_state, rnd)
            masked = report.masked
        for cid, indices in enumerate(train_indices):
            model.load_state_dict(sent)
            optimizer.state.clear()
            if lips is not None and clients is not None:
                clients.activate(cid)
                masked = lips.on_global_model(rnd).masked
            if rnd > 0:
                after.append(personalized_accuracy(model, inputs, targets, [test_indices[cid]])[0])
            losses.append(local_train(model, optimizer, inputs[indices], targets[indices],
                                      epochs, batch_size, generator))
            before.append(personalized_accuracy(model, inputs, targets, [test_indices[cid]])[0])
            uploads.append(copy.deepcopy(model.state_dict()))
        if rnd > 0:
            history[-1].after, history[-1].after_per_client = float(np.mean(after)), after
        history.append(RoundRecord(rnd, float(np.mean(before)), before,
                                   float(np.mean(losses)), masked))
        global_state = fedavg(uploads, sizes)
        model.load_state_dict(global_state)
        for callback in callbacks:
            callback(rnd, model, history)
    final, per_client = personalized_accuracy(model, inputs, targets, test_indices)
    history[-1].after, history[-1].after_per_client = final, per_client
    return history
