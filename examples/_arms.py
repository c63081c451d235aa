"""Shared by the examples: run FedAvg and FedAvg+LIPS through the same simulation
(``lips_wrap.integrations.custom.simulate``) with a progress bar, then print a summary."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lips_wrap import LIPSConfig
from lips_wrap.integrations.custom import RoundRecord, simulate


def compare_arms(
    arms: Dict[str, Optional[LIPSConfig]],
    model_factory: Callable[[], nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    train: Sequence[np.ndarray],
    tests: Sequence[np.ndarray],
    rounds: int,
    epochs: int,
    batch_size: int,
    optimizer_factory: Callable,
    seed: int = 0,
) -> Dict[str, List[RoundRecord]]:
    """Simulate every arm from the same initial model and split; print a summary."""
    results: Dict[str, List[RoundRecord]] = {}
    with tqdm(total=len(arms) * rounds, desc="rounds", unit="round") as bar:
        for name, config in arms.items():
            def tick(rnd, model, history, name=name):
                bar.update(1)
                bar.set_postfix(arm=name, before=f"{history[-1].before:.3f}")

            results[name] = simulate(
                model_factory, inputs, targets, train, tests, rounds, epochs, batch_size,
                optimizer_factory, config, seed=seed, callbacks=[tick],
            )
    print(f"\n{'round':>5} " + " ".join(f"| {name:^23}" for name in results))
    print(f"{'':>5} " + " ".join(f"| {'before':>7} {'after':>7} {'':>7}" for _ in results))
    for rnd in range(rounds):
        cells = []
        for history in results.values():
            record = history[rnd]
            cells.append(f"| {record.before:>7.3f} {record.after:>7.3f} "
                         f"{'masked' if record.masked else '':>7}")
        print(f"{rnd:>5} " + " ".join(cells))
    print("\nsummary (personalized accuracy of the final aggregated model; 'before' is "
          "each client's own model after its last local training):")
    for name, history in results.items():
        print(f"  {name:<12} after {history[-1].after:.3f}   before {history[-1].before:.3f}")
    return results
