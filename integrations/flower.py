"""LIPS for Flower apps (Message API; tested with flwr 1.42): needs the ``flower`` extra.

Two ways in, one per side of the federation:

- Client side, the method as in the paper: [`lips_train`][lips_train] wraps the training part
  of a ClientApp's ``@app.train()`` handler. It masks the global model just loaded
  into the model (scores from this node's own last-step gradients) and keeps the
  node's LIPS state in ``context.state`` between rounds, since Flower rebuilds the
  ClientApp every round.
- Server side, for clients that cannot keep gradients: [`LIPSStrategy`][LIPSStrategy] wraps any
  strategy (e.g. ``FedAvg``) and, on mask rounds, sends every node a masked copy of the
  global arrays, scored from the aggregated update ``|dW * W|``.

Rounds: Flower's ``server-round`` is 1-based, the core's rounds are 0-based and count
the round a client is about to start, so server round ``s`` is LIPS round ``s - 1``.
With ``period=5`` the masked models are those sent in server rounds 2, 7, 12, ...
Set ``LIPSConfig(total_rounds=...)`` to the run's number of server rounds. Log lines
name both: ``Flower server round 2 (LIPS round 1): masked ...``.

Seeing LIPS's log lines: they go to the ``lips_wrap`` logger, which has no handler of
its own; [`show_lips_logs`][show_lips_logs] sends them to Flower's console handler.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from lips_wrap import LIPS, LayerPlan, LIPSConfig, MaskReport, ServerMasker, find_layers
from lips_wrap.received import compare_received

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

__all__ = ["LIPSStrategy", "lips_round", "lips_train", "report_metrics", "show_lips_logs"]

logger = logging.getLogger(__name__)

SERVER_ROUND_KEY = "server-round"
"""The ConfigRecord entry Flower's strategies set to the 1-based server round."""

STATE_KEY = "lips"
"""Prefix of the records [`lips_train`][lips_train] keeps in ``context.state``."""


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


def _round_label(server_round: int) -> str:
    """How log lines name a round: both numberings, so neither can be misread."""
    return f"Flower server round {server_round} (LIPS round {server_round - 1})"


def _report_text(report: MaskReport) -> str:
    """The report without its leading ``round N:`` / ``LIPS round N:`` (the 0-based
    LIPS round), which ``_round_label`` already gives."""
    text = str(report)
    for head in (f"LIPS round {report.round}: ", f"round {report.round}: "):
        if text.startswith(head):
            return text[len(head):]
    return text


def show_lips_logs(level: int = logging.INFO) -> None:
    """Show LIPS's log lines (what each round masked, fallbacks) where Flower shows its
    own: ``lips_wrap``'s logger gets Flower's console handler and ``level``.

    Call it once in the module of your ClientApp and/or ServerApp (both run in their own
    processes). Without it, Python shows only warnings of ``lips_wrap``: nothing at
    INFO. Calling it again changes nothing. A handler you add to the root logger
    (``logging.basicConfig``) also prints Flower's lines a second time; prefer this.
    """
    from flwr.common.logger import console_handler

    lips_logger = logging.getLogger("lips_wrap")
    lips_logger.setLevel(level)
    if console_handler not in lips_logger.handlers:
        lips_logger.addHandler(console_handler)


def _global_arrays(msg: Message, arrays_key: Optional[str]) -> Tuple[str, ArrayRecord]:
    """(name, record) of the message's ArrayRecord holding the global model."""
    records = msg.content.array_records
    if arrays_key is not None:
        if arrays_key not in records:
            raise ValueError(
                f"the message has no ArrayRecord {arrays_key!r} (it has: "
                f"{', '.join(map(repr, records)) or 'none'}); pass arrays_key= naming the "
                "record that holds the global model"
            )
        return arrays_key, records[arrays_key]
    if len(records) != 1:
        raise ValueError(
            f"the message carries {len(records)} ArrayRecords "
            f"({', '.join(map(repr, records)) or 'none'}); lips_train checks that the model "
            "holds the received global model: pass arrays_key= naming its record"
        )
    name = next(iter(records))
    return name, records[name]


def _check_loaded(lips: LIPS, msg: Message, arrays_key: Optional[str]) -> None:
    """Raise unless every tensor LIPS masks equals (exactly, in the model's dtype) its
    array in the message: masking before the arrays are loaded masks weights that
    the load then overwrites, and the report describes a mask the model never had.

    Array names are matched with and without wrapper prefixes (``module.``,
    ``_orig_mod.``), so a compiled or DDP model can load a plain model's arrays.
    """
    record_name, record = _global_arrays(msg, arrays_key)
    check = compare_received(lips, {key: record[key].numpy() for key in record.keys()})
    plan, compared, differ = lips.plan, check.compared, check.differ
    if compared == 0:
        raise ValueError(
            f"none of the {len(plan.eligible)} tensors LIPS masks (e.g. "
            f"{plan.eligible_names[0]}) is in the message's ArrayRecord {record_name!r} "
            f"(it holds e.g. {', '.join(list(record.keys())[:3])}), so lips_train cannot "
            "check that the model holds the received weights. Pass arrays_key= naming the "
            "record with the global model, or check_loaded=False if its names differ "
            "from the model's on purpose and you load it yourself"
        )
    if differ:
        raise ValueError(
            f"the model does not hold the arrays this message carries: {len(differ)} of "
            f"the {compared} tensors LIPS masks differ from ArrayRecord {record_name!r} "
            f"(e.g. {', '.join(differ[:3])}). LIPS masks the weights the model holds when "
            "lips_train is entered, so load the received arrays first: "
            f"model.load_state_dict(msg.content[{record_name!r}].to_torch_state_dict()), "
            "then enter lips_train. If the model trains from other weights on purpose, "
            "pass check_loaded=False"
        )


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
    arrays_key: Optional[str] = None,
    check_loaded: bool = True,
) -> Iterator[LIPS]:
    """Client-side LIPS around a ClientApp's local training.

    Call it after loading the received global arrays into ``model``: on entry it
    checks that the tensors it masks equal the message's arrays and raises if not
    (the arrays were not loaded yet). It then restores this node's LIPS state from
    ``context.state`` and masks ``model`` if the round (``server-round`` - 1) is a mask
    round; train inside the block with ``lips.optimizer``. On a clean exit it checks
    that the training went through ``lips.optimizer`` ([`end_round`][lips_wrap.LIPS.end_round]:
    a warning, or an error with ``LIPSConfig(unwrapped_training="error")``), then writes
    the state (last-step gradients, last round) back to ``context.state``; if the block
    or the check raises, the state stays as it was. ``lips.last_report`` tells what was masked;
    [`report_metrics`][report_metrics] turns it into reply metrics.

    Args:
        state_key: prefix of the records kept in ``context.state``.
        arrays_key: the message's ArrayRecord holding the global model; by default the
            message's only ArrayRecord.
        check_loaded: compare the model with the received arrays (one exact comparison
            of the masked tensors per round). Turn off only if the model trains from
            other weights than the received ones on purpose.

    Example:
        ```python
        with lips_train(model, optimizer, msg, context, LIPSConfig(total_rounds=10)) as lips:
            train_fn(model, lips.optimizer, trainloader)
        ```
    """
    if not isinstance(msg, Message):
        raise TypeError(f"msg must be a flwr Message, got {type(msg).__name__}")
    if not isinstance(context, Context):
        raise TypeError(f"context must be a flwr Context, got {type(context).__name__}")
    server_round = _server_round(msg)
    round_index = _core_round(server_round, config)
    lips = LIPS(model, optimizer, config)
    if check_loaded:
        _check_loaded(lips, msg, arrays_key)
    _load_state(lips, context.state, state_key)
    report = lips.on_global_model(round_index)
    if report.masked:
        logger.info(
            "node %s, %s: %s", context.node_id, _round_label(server_round), _report_text(report)
        )
    yield lips
    lips.end_round(
        f"leaving lips_train (node {context.node_id}, {_round_label(server_round)})",
        "inside `with lips_train(model, optimizer, msg, context, config) as lips:` train "
        "with lips.optimizer (e.g. train_fn(model, lips.optimizer)), not with the "
        "optimizer passed to lips_train",
    )
    _save_state(lips, context.state, state_key)


def report_metrics(report: Optional[MaskReport]) -> MetricRecord:
    """A MaskReport as reply metrics: ``lips-density`` (0 when not masked),
    ``lips-zeroed`` (entries set to zero), ``lips-fallback`` (tensors scored by
    magnitude because this node had no stored gradient for them: it had not trained
    through ``lips.optimizer`` before this mask round) and ``lips-skipped`` (mask
    rounds this node missed since its previous round, or before its first)."""
    skipped = 0 if report is None else len(report.skipped)
    if report is None or not report.masked:
        return MetricRecord({"lips-density": 0.0, "lips-zeroed": 0, "lips-fallback": 0,
                             "lips-skipped": skipped})
    return MetricRecord({
        "lips-density": float(report.density),
        "lips-zeroed": report.elements_zeroed,
        "lips-fallback": len(report.fallback),
        "lips-skipped": skipped,
    })


class LIPSStrategy(Strategy):
    """Server-side LIPS around any Message-API strategy (clients stay unchanged).

    Everything is delegated to ``strategy``. On mask rounds
    [`configure_train`][LIPSStrategy.configure_train] replaces, in a new message per node, the
    global ArrayRecord with a masked copy built by
    [`lips_wrap.mask_global_state`][lips_wrap.mask_global_state] (score ``|dW * W|``, ``dW`` the
    change of the global arrays over the last round: aggregate minus what was sent; or the
    configured magnitude/random score). The inner strategy's records are never changed.

    Args:
        strategy: the strategy to wrap, e.g. ``FedAvg(...)``.
        model: the model whose ``state_dict()`` names the arrays (its layer plan is
            built once with ``find_layers``), or a ready ``LayerPlan``.
        config: LIPS settings; ``total_rounds`` is the number of server rounds.

    Example:
        ```python
        strategy = LIPSStrategy(FedAvg(fraction_train=1.0), Net(), LIPSConfig(total_rounds=10))
        ```
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
        self._server = ServerMasker(self.plan, self.config)

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
        missing = [name for name in self.plan.eligible_names if name not in arrays]
        if missing:
            raise ValueError(
                f"the global arrays lack {len(missing)} tensors the plan masks (e.g. "
                f"{', '.join(missing[:3])}; the arrays hold e.g. "
                f"{', '.join(list(arrays.keys())[:3])}): build LIPSStrategy from the model "
                "whose state_dict() names the arrays (a compiled or DDP model's names "
                "carry '_orig_mod.'/'module.')"
            )
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        current = {
            name: torch.from_numpy(arrays[name].numpy()) for name in self._names if name in arrays
        }
        masked, report = self._server(current, _core_round(server_round, self.config))
        self.reports[server_round] = report
        if not report.masked:
            return messages
        logger.info("%s: %s", _round_label(server_round), _report_text(report))
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
