"""LIPS for Flower apps (Message API; tested with flwr 1.42): needs the ``flower`` extra.

Two ways in, one per side of the federation:

- Client side, the method as in the paper: :func:`lips_train` wraps the training part
  of a ClientApp's ``@app.train()`` handler. It masks the global model just loaded
  into the model (scores from this node's own last-step gradients) and keeps the
  node's LIPS state in ``context.state`` between rounds, since Flower rebuilds the
  ClientApp every round.
- Server side, for clients that cannot keep gradients: :class:`LIPSStrategy` wraps any
  strategy (e.g. ``FedAvg``) and, on mask rounds, sends every node a masked copy of the
  global arrays, scored from the aggregated update ``|dW * W|``.

Rounds: Flower's ``server-round`` is 1-based, the core's rounds are 0-based and count
the round a client is about to start, so server round ``s`` is core round ``s - 1``.
With ``period=5`` the masked models are those sent in server rounds 2, 7, 12, ...
Set ``LIPSConfig(total_rounds=...)`` to the run's number of server rounds.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from lips_wrap import LIPS, LayerPlan, LIPSConfig, MaskReport, find_layers, mask_global_state

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as error:  # pragma: no cover - exercised only without flwr
    raise ImportError(
        "lips_wrap.integrations.flower needs Flower: pip install 'lips-wrap[flower]'"
    ) from error

logger = logging.getLogger(__name__)

SERVER_ROUND_KEY = "server-round"
"""The ConfigRecord entry Flower's strategies set to the 1-based server round."""

STATE_KEY = "lips"
"""Prefix of the records :func:`lips_train` keeps in ``context.state``."""


def _server_round(msg: Message) -> int:
    """The 1-based ``server-round`` that Flower's strategies put into the message's
    ConfigRecord (in ``configure_train``)."""
    found = [
        record[SERVER_ROUND_KEY]
        for record in msg.content.config_records.values()
        if SERVER_ROUND_KEY in record
    ]
    if len(found) != 1:
        raise ValueError(
            f"the message carries {len(found)} '{SERVER_ROUND_KEY}' entries in its "
            "ConfigRecords; LIPS needs exactly one (Flower's strategies set it in "
            "configure_train)"
        )
    value = found[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{SERVER_ROUND_KEY}' is {value!r}; expected a 1-based integer round")
    return value


def lips_round(msg: Message) -> int:
    """The core's 0-based round for a message: its ``server-round`` minus one (the
    core counts the round the client is about to start from 0)."""
    return _server_round(msg) - 1


def _core_round(flower_round: int, config: LIPSConfig) -> int:
    """Server round ``s`` (1-based) as the core's 0-based round ``s - 1``, checked."""
    if flower_round > config.total_rounds:
        raise ValueError(
            f"server round {flower_round} is past LIPSConfig(total_rounds="
            f"{config.total_rounds}); set total_rounds to the run's number of server rounds"
        )
    return flower_round - 1


def _save_state(lips: LIPS, state: RecordDict, key: str) -> None:
    saved = lips.state_dict()
    # numpy has no bfloat16: keep such gradients as float32 (restored to grad_dtype).
    grads = {
        name: grad.float() if grad.dtype == torch.bfloat16 else grad
        for name, grad in saved["grads"].items()
    }
    state[f"{key}.grads"] = ArrayRecord(grads)
    meta = ConfigRecord({"version": saved["version"]})
    if saved["last_round"] is not None:
        meta["last-round"] = saved["last_round"]
    state[f"{key}.meta"] = meta


def _load_state(lips: LIPS, state: RecordDict, key: str) -> None:
    if f"{key}.meta" not in state:
        return  # this node's first round with LIPS
    meta = state[f"{key}.meta"]
    grads = state[f"{key}.grads"].to_torch_state_dict() if f"{key}.grads" in state else {}
    lips.load_state_dict(
        {"version": meta["version"], "last_round": meta.get("last-round"), "grads": grads}
    )


@contextmanager
def lips_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    msg: Message,
    context: Context,
    config: LIPSConfig,
    *,
    state_key: str = STATE_KEY,
) -> Iterator[LIPS]:
    """Client-side LIPS around a ClientApp's local training.

    Call it after loading the received global arrays into ``model``. On entry it
    restores this node's LIPS state from ``context.state``, then masks ``model`` if the
    round (``server-round`` - 1) is a mask round; train inside the block with
    ``lips.optimizer``. On a clean exit the state (last-step gradients, last round) is
    written back to ``context.state``; if the block raises, the state stays as it was.
    ``lips.last_report`` tells what was masked.

    Example::

        with lips_train(model, optimizer, msg, context, LIPSConfig(total_rounds=10)) as lips:
            train_fn(model, lips.optimizer, trainloader)
    """
    if not isinstance(msg, Message):
        raise TypeError(f"msg must be a flwr Message, got {type(msg).__name__}")
    if not isinstance(context, Context):
        raise TypeError(f"context must be a flwr Context, got {type(context).__name__}")
    round_index = _core_round(_server_round(msg), config)
    lips = LIPS(model, optimizer, config)
    _load_state(lips, context.state, state_key)
    report = lips.on_global_model(round_index)
    if report.masked:
        logger.info("node %s: %s", context.node_id, report)
    yield lips
    _save_state(lips, context.state, state_key)


def report_metrics(report: Optional[MaskReport]) -> MetricRecord:
    """A MaskReport as reply metrics: ``lips-density`` (0 when not masked) and
    ``lips-zeroed`` (entries set to zero)."""
    if report is None or not report.masked:
        return MetricRecord({"lips-density": 0.0, "lips-zeroed": 0})
    return MetricRecord(
        {"lips-density": float(report.density), "lips-zeroed": report.elements_zeroed}
    )


class LIPSStrategy(Strategy):
    """Server-side LIPS around any Message-API strategy (clients stay unchanged).

    Everything is delegated to ``strategy``. On mask rounds :meth:`configure_train`
    replaces, in a new message per node, the global ArrayRecord with a masked copy
    built by :func:`lips_wrap.mask_global_state` (score ``|dW * W|``, ``dW`` the change
    of the global arrays over the last round: aggregate minus what was sent; or the
    configured magnitude/random score). The inner strategy's records are never changed.

    Args:
        strategy: the strategy to wrap, e.g. ``FedAvg(...)``.
        model: the model whose ``state_dict()`` names the arrays (its layer plan is
            built once with ``find_layers``), or a ready ``LayerPlan``.
        config: LIPS settings; ``total_rounds`` is the number of server rounds.

    Example::

        strategy = LIPSStrategy(FedAvg(fraction_train=1.0), Net(), LIPSConfig(total_rounds=10))
    """

    def __init__(
        self, strategy: Strategy, model: Union[nn.Module, LayerPlan], config: LIPSConfig
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"strategy must be a flwr.serverapp.strategy.Strategy, got "
                f"{type(strategy).__name__}"
            )
        if not isinstance(config, LIPSConfig):
            raise TypeError(f"config must be a LIPSConfig, got {type(config).__name__}")
        if isinstance(model, LayerPlan):
            self.plan = model
        elif isinstance(model, nn.Module):
            self.plan = find_layers(model, config.include, config.exclude)
        else:
            raise TypeError(
                f"model must be a torch.nn.Module or a LayerPlan, got {type(model).__name__}"
            )
        self.strategy = strategy
        self.config = config
        self.reports: Dict[int, MaskReport] = {}
        self._names: Tuple[str, ...] = tuple(
            name for d in self.plan.eligible for name in (d.name,) + d.aliases
        )
        self._sent: Optional[Dict[str, torch.Tensor]] = None

    def __repr__(self) -> str:
        return f"LIPSStrategy({self.strategy!r})"

    def summary(self) -> None:
        """Log the LIPS settings, then the inner strategy's summary."""
        cfg = self.config
        logger.info(
            "LIPS (server side): period %d, start density %.2f, score %s, %s",
            cfg.period, cfg.start_density, cfg.score, self.plan.summary(),
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages; on mask rounds each carries masked arrays."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        current = {
            name: torch.from_numpy(arrays[name].numpy()) for name in self._names if name in arrays
        }
        masked, report = mask_global_state(
            current, self._sent, self.plan, _core_round(server_round, self.config), self.config
        )
        self._sent = masked
        self.reports[server_round] = report
        if not report.masked:
            return messages
        logger.info("server round %d: %s", server_round, report)
        record = ArrayRecord()
        for name, array in arrays.items():
            record[name] = Array(masked[name].numpy()) if name in masked else array
        return [_with_arrays(message, arrays, record) for message in messages]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Delegated to the inner strategy."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to the inner strategy (evaluation sees the unmasked global model)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> Optional[MetricRecord]:
        """Delegated to the inner strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def _with_arrays(message: Message, arrays: ArrayRecord, record: ArrayRecord) -> Message:
    """A new message like ``message`` whose copy of ``arrays`` is ``record``."""
    content = RecordDict()
    replaced: List[str] = []
    for key, value in message.content.items():
        if value is arrays or (
            isinstance(value, ArrayRecord) and list(value.keys()) == list(arrays.keys())
        ):
            value = record
            replaced.append(key)
        content[key] = value
    if not replaced:
        raise ValueError(
            f"a message to node {message.metadata.dst_node_id} does not carry the global "
            "ArrayRecord; LIPSStrategy needs an inner strategy that sends it in "
            "configure_train"
        )
    return Message(
        content=content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        ttl=message.metadata.ttl,
        group_id=message.metadata.group_id,
    )
