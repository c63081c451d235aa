"""Evidence that a client trained without ``lips.optimizer`` between two LIPS calls.

Training through the wrapped optimizer directly, or through another optimizer, keeps
no gradient: the next mask would silently score by magnitude instead of ``|g * W|``.
Two signals, both cheap:

- steps on the wrapped optimizer that did not go through the wrapper (a step hook);
- a backward pass reached the eligible weights (their ``.grad`` was replaced or
  updated) and the weights were changed in place at least twice (loading the global
  model is one change; an optimizer step is another), while no step went through
  the wrapper.
"""

from __future__ import annotations

import weakref
from typing import Dict, Mapping, Optional, Tuple

import torch

from .optimizer import LIPSOptimizer

_GradMark = Optional[Tuple["weakref.ref[torch.Tensor]", int]]


class TrainingWitness:
    """Remembers the state of the eligible weights at ``mark``, and tells at
    ``unwrapped_training`` whether they were trained since without the wrapper."""

    def __init__(
        self, params: Mapping[str, torch.nn.Parameter], optimizer: LIPSOptimizer
    ) -> None:
        self._params = params
        self._optimizer = optimizer
        self.mark()

    def mark(self) -> None:
        """Take the current state as the baseline."""
        self._steps = self._optimizer.step_counts
        self._versions: Dict[str, int] = {n: p._version for n, p in self._params.items()}
        self._grads: Dict[str, _GradMark] = {
            n: None if p.grad is None else (weakref.ref(p.grad), p.grad._version)
            for n, p in self._params.items()
        }

    def unwrapped_training(self) -> Optional[str]:
        """What shows training without the wrapper since ``mark``, or None."""
        wrapped, raw = self._optimizer.step_counts
        if wrapped > self._steps[0]:
            return None
        if raw > self._steps[1]:
            return (
                f"{raw - self._steps[1]} optimizer step(s) went to the wrapped optimizer "
                "directly, not through lips.optimizer"
            )
        for name, param in self._params.items():
            changes = param._version - self._versions[name]
            if changes >= 2 and self._backward_reached(name, param):
                return (
                    f"the model was trained ({name} got a gradient and {changes} in-place "
                    "updates) by an optimizer other than lips.optimizer"
                )
        return None

    def _backward_reached(self, name: str, param: torch.nn.Parameter) -> bool:
        grad = param.grad
        if grad is None:
            return False
        before = self._grads[name]
        return before is None or before[0]() is not grad or before[1] != grad._version
