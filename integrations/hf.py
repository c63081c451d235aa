"""LIPS for Hugging Face ``transformers.Trainer``: needs the ``hf`` extra.

A federated client that runs ``Trainer.train()`` once per round gets LIPS from three
things: a [`LIPS`][lips_wrap.LIPS] built on its model and optimizer, the wrapped
optimizer handed to the Trainer (``optimizers=(lips.optimizer, None)``: the Trainer
still builds its LR scheduler around it), and a [`LIPSCallback`][LIPSCallback] told the round
before each ``train()``:

```python
lips = LIPS(model, torch.optim.AdamW(model.parameters(), lr=5e-5), LIPSConfig(10))
callback = LIPSCallback(lips)
trainer = Trainer(model=model, args=args, train_dataset=data,
                  optimizers=(lips.optimizer, None), callbacks=[callback])
for rnd in range(10):
    model.load_state_dict(global_state)       # the FL code's job, as before
    callback.start_round(rnd)                 # client=cid if one process plays many
    trainer.train()                           # mask (on mask rounds), then training
    upload(model.state_dict())
```

At ``on_train_begin`` (after the Trainer has prepared model and optimizer, before the
first step) the callback restores the client's LIPS state, clears the optimizer state
(each round starts from fresh moments, as the paper's clients do; switch off with
``fresh_optimizer_state=False``) and calls ``lips.on_global_model(round)``; at
``on_train_end`` it stores the client's LIPS state (its last-step gradients). The
Trainer may be built once or every round; the callback object is what must persist.
Gradient accumulation, gradient clipping, LR schedulers and PEFT (LoRA) models work as
they are: the kept gradient is the one of the last optimizer step.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Mapping, Optional

from lips_wrap import LIPS, ClientStates, MaskReport
from lips_wrap.schedule import check_round

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "lips_wrap.integrations.hf needs transformers: pip install 'lips-wrap[hf]'"
    ) from error

__all__ = ["LIPSCallback"]

_TRAINER_FIX = "build the Trainer with optimizers=(lips.optimizer, None)"


def _holds(optimizer: Any, target: Any) -> bool:
    """Whether ``optimizer`` is ``target`` or wraps it (accelerate's
    ``AcceleratedOptimizer`` and similar keep the wrapped one in ``.optimizer``)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if optimizer is target:
            return True
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return False


class LIPSCallback(TrainerCallback):
    """A ``TrainerCallback`` that applies LIPS at the start of each ``Trainer.train()``.

    Args:
        lips: the client's LIPS; the Trainer must train with ``lips.optimizer``.
        fresh_optimizer_state: clear the optimizer's state (momentum, Adam moments)
            before each round, as the reference clients do.

    Per-client LIPS states live in the callback, so one process can simulate many
    clients with one model, one Trainer and one callback (``start_round(rnd, cid)``).
    """

    def __init__(self, lips: LIPS, fresh_optimizer_state: bool = True) -> None:
        if not isinstance(lips, LIPS):
            raise TypeError(f"lips must be a lips_wrap.LIPS, got {type(lips).__name__}")
        self.lips = lips
        self.fresh_optimizer_state = fresh_optimizer_state
        self._clients = ClientStates(lips, fix=_TRAINER_FIX)
        self._round: Optional[int] = None
        self._client: Hashable = None
        self._begun = False
        self._steps_at_start = 0
        self.reports: List[MaskReport] = []

    @property
    def last_report(self) -> Optional[MaskReport]:
        """What the last ``on_global_model`` did (None before the first round)."""
        return self.reports[-1] if self.reports else None

    def start_round(self, round: int, client: Hashable = None) -> None:  # noqa: A002
        """Declare the round (0-based) and client of the next ``trainer.train()``.

        Call after loading the global weights into the model. ``client`` is any
        hashable id (an int or a str; default None, for a process that is one
        client); a process that plays several clients must name each, since each
        keeps its own stored gradients. A client's rounds must increase; they may
        skip (the report then names the skipped masks). Declaring the same round and
        client again (a retry after a failed ``train()``) is allowed.
        """
        round = check_round(round, self.lips.config)  # noqa: A001
        try:
            hash(client)
        except TypeError:
            raise TypeError(
                f"client must be a hashable id (an int or a str), got {client!r}"
            ) from None
        if self._round is not None and (self._round, self._client) != (round, client):
            raise RuntimeError(self._pending_round_error(round, client))
        last = self._clients.state_of(client)["last_round"]
        if last is not None and round <= last:
            raise ValueError(
                f"start_round({round}, client={client!r}): client {client!r} has already "
                f"trained round {last}, and a client's rounds must increase. "
                + ("If this process plays several clients, name each one: "
                   "callback.start_round(rnd, client=cid)" if client is None else
                   f"Declare a later round for it: start_round(rnd, client={client!r}) "
                   f"with rnd > {last}")
            )
        self._round, self._client = round, client
        self._begun = False
        self._steps_at_start = self.lips.optimizer.step_counts[0]

    def _pending_round_error(self, round_index: int, client: Hashable) -> str:
        declared = f"start_round({self._round}, client={self._client!r})"
        asked = f"start_round({round_index}, client={client!r})"
        if self._begun:
            return (
                f"{asked} while the training of {declared} started but did not end "
                f"(trainer.train() raised?); retry it with {declared} and "
                "trainer.train(), then go on"
            )
        steps = self.lips.optimizer.step_counts[0] - self._steps_at_start
        if steps:
            return (
                f"{asked}: the LIPSCallback is not registered with the Trainer. After "
                f"{declared}, trainer.train() took {steps} step(s) through lips.optimizer "
                "without calling this callback, so that round trained without LIPS (no "
                "mask, no gradient kept for the client). Build the Trainer with "
                "callbacks=[callback] (or call trainer.add_callback(callback))"
            )
        return (
            f"{asked} while {declared} has not been trained: call trainer.train() after "
            "each start_round, with this callback in the Trainer's callbacks=[...]"
        )

    def client_state(self, client: Hashable = None) -> Mapping[str, Any]:
        """The LIPS state kept for ``client`` (a fresh one if it has never trained)."""
        return self._clients.state_of(client)

    def state_dict(self) -> Dict[str, Any]:
        """Every client's LIPS state, e.g. to checkpoint a simulation."""
        return self._clients.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what [`state_dict`][LIPSCallback.state_dict] returned."""
        self._clients.load_state_dict(state)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Restore the client's LIPS state and mask the loaded global model."""
        if self._round is None:
            raise RuntimeError(
                "LIPSCallback: call callback.start_round(round, client=cid) after loading "
                "the global weights and before each trainer.train()"
            )
        optimizer = kwargs.get("optimizer")
        if optimizer is not None and not _holds(optimizer, self.lips.optimizer):
            raise ValueError(
                "the Trainer does not train with lips.optimizer, so LIPS would see no "
                "gradients: build it with Trainer(..., optimizers=(lips.optimizer, None))"
            )
        self._begun = True
        if self.fresh_optimizer_state:
            self.lips.optimizer.state.clear()
        # a retry of a failed round starts again from the state stored before it
        self._clients.activate(self._client, save_active=False)
        self.reports.append(self.lips.on_global_model(self._round))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep the client's LIPS state (its last-step gradients) for its next round."""
        if self._round is None:
            return
        self._clients.save()
        self._round, self._client = None, None
