"""FedAvg with LIPS on the server side (``mask_global_state``), for the benchmark.

The loop is ``lips_wrap.integrations.custom.simulate`` with one change: clients keep no
gradients and hold no LIPS state; instead the server masks the aggregated global model
before sending it on mask rounds, scoring each eligible entry by ``|delta * W|`` with
``delta`` the change of the global weights since what it sent the round before (as the
Flower adapter does). Seeding, batch order, evaluation and the meaning of "before" and
"after" aggregation are those of ``simulate``, so with ``config=None`` the two give the
same numbers, and arms run on the same seed are paired.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from lips_wrap import LIPSConfig, find_layers, mask_global_state
from lips_wrap.integrations.custom import (
    RoundCallback,
    RoundRecord,
    fedavg,
    local_train,
    personalized_accuracy,
)


def simulate_server(
    model_factory: Callable[[], nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    train_indices: Sequence[np.ndarray],
    test_indices: Sequence[np.ndarray],
    rounds: int,
    epochs: int,
    batch_size: int,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    config: Optional[LIPSConfig] = None,
    seed: int = 0,
    callbacks: Sequence[RoundCallback] = (),
) -> List[RoundRecord]:
    """All clients every round; the global model is masked by the server on LIPS mask
    rounds (none with ``config=None``). Callbacks see the aggregated, unmasked model."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(train_indices) != len(test_indices) or not train_indices:
        raise ValueError("need one test index set per client")
    if config is not None and config.total_rounds != rounds:
        raise ValueError(f"config.total_rounds is {config.total_rounds}, the run has {rounds}")
    torch.manual_seed(seed)
    model = model_factory()
    optimizer = optimizer_factory(model.parameters())
    plan = find_layers(model, config.include, config.exclude) if config is not None else None
    generator = torch.Generator().manual_seed(seed)
    global_state = copy.deepcopy(model.state_dict())
    sent_before = None
    sizes = [len(indices) for indices in train_indices]
    history: List[RoundRecord] = []
    for rnd in range(rounds):
        sent, masked = global_state, False
        if config is not None:
            sent, report = mask_global_state(global_state, sent_before, plan, rnd, config)
            sent_before, masked = sent, report.masked
        if rnd > 0:
            # every client starts from the same sent model: evaluate it on each test set
            model.load_state_dict(sent)
            mean, per_client = personalized_accuracy(model, inputs, targets, test_indices)
            history[-1].after, history[-1].after_per_client = mean, per_client
        uploads, before, losses = [], [], []
        for indices, tests in zip(train_indices, test_indices):
            model.load_state_dict(sent)
            optimizer.state.clear()
            losses.append(local_train(model, optimizer, inputs[indices], targets[indices],
                                      epochs, batch_size, generator))
            before.append(personalized_accuracy(model, inputs, targets, [tests])[0])
            uploads.append(copy.deepcopy(model.state_dict()))
        history.append(RoundRecord(rnd, float(np.mean(before)), before,
                                   float(np.mean(losses)), masked))
        global_state = fedavg(uploads, sizes)
        model.load_state_dict(global_state)
        for callback in callbacks:
            callback(rnd, model, history)
    final, per_client = personalized_accuracy(model, inputs, targets, test_indices)
    history[-1].after, history[-1].after_per_client = final, per_client
    return history
