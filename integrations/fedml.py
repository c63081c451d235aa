"""LIPS for FedML 0.9.6 (``ClientTrainer`` / ``ServerAggregator``): needs the ``fedml`` extra.

Two mixins, one per side of the federation; each goes *first* in the class's bases:

- [`LIPSTrainerMixin`][LIPSTrainerMixin], client side (the method as in the paper). The trainer's
  ``train()`` wraps the optimizer it builds with ``self.lips_optimizer(optimizer, args)``.
  That call masks, on mask rounds, the global model ``set_model_params`` just delivered
  (scores ``|g * W|`` from this client's last-step gradients of its previous training)
  and returns the LIPS optimizer, which keeps this round's last-step gradients. The
  trainer keeps one LIPS state per client id (``self.id``), so one trainer object can
  serve every client of FedML's single-process simulator.
- [`LIPSAggregatorMixin`][LIPSAggregatorMixin], server side (clients unchanged):
  ``on_after_aggregation`` masks the aggregated model with
  [`lips_wrap.mask_global_state`][lips_wrap.mask_global_state]
  (score ``|dW * W|``, ``dW`` = aggregate minus the global model sent last round), the same core
  function the Flower adapter uses.

Rounds: both sides read FedML's ``args.round_idx`` (0-based), the round being trained or
aggregated. Cross-silo FedML sets it on the client right before ``train()`` and on the
server during aggregation; it is *stale* when ``set_model_params`` runs on a client,
which is why the client-side mask lands when ``train()`` wraps its optimizer (before
the first step, on the weights just delivered). The single-process simulator does not
set it: [`FedAvgSimulation`][FedAvgSimulation] does. ``LIPSConfig.total_rounds`` is
``args.comm_round`` (see [`lips_config_from_args`][lips_config_from_args]).

FedML's single-process FedAvg (``FedMLRunner`` with ``backend: sp``) ignores the trainer
and aggregator it is given: [`FedAvgSimulation`][FedAvgSimulation] is that same simulator, training
with the given ``ClientTrainer`` and aggregating with the given ``ServerAggregator``.

Offline: do not call ``fedml.init`` (it asks FedML's cloud config service, with no
timeout, and writes to ``~/.fedml`` and ``./logs``). Build ``args`` with
[`offline_args`][offline_args], which also points FedML's tracking at these args so that its
``mlops`` calls are no-ops.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, MutableMapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from lips_wrap import LIPS, ClientStates, LIPSConfig, MaskReport, ServerMasker, find_layers

try:
    from fedml import mlops
    from fedml.simulation.sp.fedavg import FedAvgAPI
except ImportError as error:  # pragma: no cover - exercised only without fedml
    raise ImportError(
        "lips_wrap.integrations.fedml needs FedML: pip install 'lips-wrap[fedml]' "
        "(FedML 0.9.6 pins protobuf/requests/typer: give it its own venv)"
    ) from error

logger = logging.getLogger(__name__)

ARG_SETTINGS: Dict[str, str] = {
    "lips_period": "period",
    "lips_start_density": "start_density",
    "lips_score": "score",
    "lips_include": "include",
    "lips_exclude": "exclude",
    "lips_seed": "seed",
}
"""FedML ``args`` attributes (e.g. from the YAML's ``train_args``) read by
[`lips_config_from_args`][lips_config_from_args], and the [`LIPSConfig`][lips_wrap.LIPSConfig] field
each sets."""

_TRAINER_FIX = (
    "in train(), step the optimizer that self.lips_optimizer(optimizer, args) returns "
    "(optimizer = self.lips_optimizer(optimizer, args)), not the one passed to it"
)
"""The fix the warning names when a client's training bypassed LIPS's optimizer."""

Dataset = List[Any]
"""FedML's 8-item dataset list (see [`fedml_dataset`][fedml_dataset])."""


def lips_config_from_args(args: Any) -> LIPSConfig:
    """``LIPSConfig(total_rounds=args.comm_round)`` plus any ``lips_*`` settings in
    ``args`` ([`ARG_SETTINGS`][ARG_SETTINGS]), so a FedML YAML file can configure LIPS."""
    rounds = getattr(args, "comm_round", None)
    if rounds is None:
        raise ValueError(
            "args has no comm_round; pass lips_config=LIPSConfig(total_rounds=...) "
            "or set comm_round in the FedML arguments"
        )
    settings = {
        field: getattr(args, key)
        for key, field in ARG_SETTINGS.items()
        if getattr(args, key, None) is not None
    }
    return LIPSConfig(total_rounds=rounds, **settings)


def lips_round(args: Any) -> int:
    """FedML's 0-based ``args.round_idx``, checked."""
    value = getattr(args, "round_idx", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"args.round_idx is {value!r}; LIPS needs FedML's 0-based round index there. "
            "Cross-silo FedML sets it; in the single-process simulator use "
            "FedAvgSimulation, which sets it each round"
        )
    return value


class LIPSTrainerMixin:
    """Client-side LIPS for a ``fedml.core.ClientTrainer``: add it to the bases.

    ``__init__`` takes the keyword ``lips_config`` (default:
    [`lips_config_from_args`][lips_config_from_args] of ``args``) and passes the rest on. In
    ``train()``, wrap the optimizer:

    ```python
    class Trainer(LIPSTrainerMixin, ClientTrainer):
        def train(self, train_data, device, args):
            optimizer = torch.optim.SGD(self.model.parameters(), lr=args.learning_rate)
            optimizer = self.lips_optimizer(optimizer, args)   # LIPS
            ...  # the usual loop, stepping `optimizer`
    ```

    Without that call LIPS does nothing. ``self.lips_report`` is the
    [`MaskReport`][lips_wrap.MaskReport] of the round just started.
    """

    def __init__(self, model: Any, args: Any, *rest: Any,
                 lips_config: Optional[LIPSConfig] = None, **kwargs: Any) -> None:
        super().__init__(model, args, *rest, **kwargs)  # type: ignore[call-arg]
        self.lips_config = _checked_config(lips_config, args)
        self.lips: Optional[LIPS] = None
        self.lips_report: Optional[MaskReport] = None
        self._lips_clients: Optional[ClientStates] = None

    def lips_optimizer(self, optimizer: torch.optim.Optimizer, args: Any) -> torch.optim.Optimizer:
        """Mask the global model that ``set_model_params`` delivered, if round
        ``args.round_idx`` is a mask round, and return ``optimizer`` wrapped so that
        it keeps its last-step gradients for this client's next mask.

        Call it once per ``train()``, after moving the model to its device and before
        the first step; ``args`` is the one FedML passed to ``train()``. The client is
        ``self.id`` (FedML's ``set_id``): each client has its own stored gradients. A
        fresh optimizer per round is FedML's idiom; passing the same optimizer every
        round works too (its state is masked with the weights).

        The call also checks the previous client's training: if it stepped another
        optimizer than the returned one, no gradient was kept, and LIPS warns (or
        raises, with ``LIPSConfig(unwrapped_training="error")``) naming the fix.
        """
        round_index = lips_round(args)
        client = getattr(self, "id", 0)
        if self.lips is None or self.lips.optimizer.original_optimizer is not optimizer:
            # a fresh optimizer per round (FedML's idiom): a new LIPS around it, the
            # clients' states carried over
            previous = self._lips_clients
            if previous is not None:
                previous.save()
            self.lips = LIPS(self.model, optimizer, self.lips_config)  # type: ignore[attr-defined]
            self._lips_clients = ClientStates(self.lips, carry=previous, fix=_TRAINER_FIX)
        assert self._lips_clients is not None
        self._lips_clients.activate(client)
        self.lips_report = self.lips.on_global_model(round_index)
        if self.lips_report.masked:
            logger.info("client %s: %s", client, self.lips_report)
        return self.lips.optimizer


class LIPSAggregatorMixin:
    """Server-side LIPS for a ``fedml.core.ServerAggregator``: list it first in the bases.

    After FedML aggregates round ``args.round_idx = t``,
    [`on_after_aggregation`][LIPSAggregatorMixin.on_after_aggregation] masks, on mask rounds (rounds
    1, 1 + K, ...), the model sent for round ``t + 1`` with
    [`lips_wrap.mask_global_state`][lips_wrap.mask_global_state]. The previous global model is the
    one this method returned last time (what FedML sent), at first the model's weights at
    construction. ``self.lips_reports`` maps each round to its report. A subclass that overrides
    ``on_after_aggregation`` must call ``super()`` in it.

    Keyword ``lips_config`` as in [`LIPSTrainerMixin`][LIPSTrainerMixin].
    """

    def __init__(self, model: Any, args: Any, *rest: Any,
                 lips_config: Optional[LIPSConfig] = None, **kwargs: Any) -> None:
        super().__init__(model, args, *rest, **kwargs)  # type: ignore[call-arg]
        self.lips_config = _checked_config(lips_config, args)
        self.lips_plan = find_layers(model, self.lips_config.include, self.lips_config.exclude)
        self.lips_reports: Dict[int, MaskReport] = {}
        self._lips_server = ServerMasker(self.lips_plan, self.lips_config,
                                         initial=model.state_dict())

    def on_after_aggregation(self, aggregated_model_or_grad: MutableMapping) -> MutableMapping:
        """The aggregator's own step, then the server-side mask for the next round."""
        aggregated = super().on_after_aggregation(aggregated_model_or_grad)  # type: ignore[misc]
        next_round = lips_round(self.args) + 1  # type: ignore[attr-defined]
        if next_round >= self.lips_config.total_rounds:
            self._lips_server.remember(aggregated)
            return aggregated
        masked, report = self._lips_server(aggregated, next_round)
        self.lips_reports[next_round] = report
        if report.masked:
            logger.info("server, model for round %d: %s", next_round, report)
            # FedML tells a per-client dict of models from one model by `type(x) is dict`.
            aggregated = type(aggregated)(masked)
        return aggregated


def _checked_config(config: Optional[LIPSConfig], args: Any) -> LIPSConfig:
    if config is None:
        return lips_config_from_args(args)
    if not isinstance(config, LIPSConfig):
        raise TypeError(f"lips_config must be a LIPSConfig, got {type(config).__name__}")
    return config


class FedAvgSimulation(FedAvgAPI):
    """FedML's single-process FedAvg, training with ``client_trainer`` and aggregating
    with ``server_aggregator`` (FedML's own builds a default trainer and averages by
    itself, whatever ``FedMLRunner`` is given).

    Everything else is FedML's ``FedAvgAPI``: client sampling, the round loop,
    evaluation with ``client_trainer.test``. Each round it sets ``args.round_idx``
    (which FedML's simulator leaves unset) and aggregates as cross-silo FedML does:
    ``on_before_aggregation``, ``aggregate``, ``on_after_aggregation``; the result goes
    to ``server_aggregator.set_model_params``. Build the trainer and the aggregator
    around the same model object (FedML's evaluation then scores the global model).
    Run it with ``.run()``, or as ``FedMLRunner(..., algorithm_flow=simulation).run()``.
    """

    def __init__(self, args: Any, device: Any, dataset: Dataset, model: torch.nn.Module,
                 client_trainer: Any, server_aggregator: Any) -> None:
        if client_trainer is None or server_aggregator is None:
            raise ValueError(
                "FedAvgSimulation needs both a ClientTrainer and a ServerAggregator; "
                f"got {type(client_trainer).__name__} and {type(server_aggregator).__name__}"
            )
        self.client_trainer = client_trainer
        self.server_aggregator = server_aggregator
        super().__init__(args, device, dataset, model)
        self.model_trainer = server_aggregator  # the loop's global-model get/set

    def _setup_clients(self, train_data_local_num_dict, train_data_local_dict,
                       test_data_local_dict, model_trainer):
        super()._setup_clients(train_data_local_num_dict, train_data_local_dict,
                               test_data_local_dict, self.client_trainer)

    def _client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        self.args.round_idx = round_idx  # the loop's first call of each round
        return super()._client_sampling(round_idx, client_num_in_total, client_num_per_round)

    def _aggregate(self, w_locals):
        aggregator = self.server_aggregator
        w_locals, _ = aggregator.on_before_aggregation(w_locals)
        return aggregator.on_after_aggregation(aggregator.aggregate(w_locals))

    def run(self) -> None:
        """Train for ``args.comm_round`` rounds (what ``FedMLRunner.run`` calls)."""
        self.train()


SP_DEFAULTS: Dict[str, Any] = {
    "training_type": "simulation",
    "backend": "sp",
    "federated_optimizer": "FedAvg",
    "dataset": "custom",
    "client_num_in_total": 4,
    "client_num_per_round": 4,
    "comm_round": 10,
    "epochs": 1,
    "batch_size": 32,
    "client_optimizer": "sgd",
    "learning_rate": 0.05,
    "weight_decay": 0.0,
    "frequency_of_the_test": 1,
    "random_seed": 0,
    "rank": 0,
    "enable_wandb": False,
    "enable_tracking": False,
    "using_mlops": False,
    "sys_perf_profiling": False,
}
"""Defaults of [`offline_args`][offline_args]: a single-process FedAvg simulation, tracking off."""


def offline_args(**settings: Any) -> argparse.Namespace:
    """FedML arguments for a run without ``fedml.init`` (no network, no ``~/.fedml``).

    Starts from [`SP_DEFAULTS`][SP_DEFAULTS], applies ``settings`` (any FedML argument, e.g.
    ``comm_round=20`` or cross-silo keys), forces wandb and MLOps tracking off, and
    registers the arguments with ``fedml.mlops`` (``mlops.pre_setup``): FedML's
    tracking calls then see ``using_mlops=False`` and return at once, instead of
    initialising FedML against its cloud service on first use.
    """
    forced = ("enable_wandb", "enable_tracking", "using_mlops")
    turned_on = [key for key in forced if settings.get(key)]
    if turned_on:
        raise ValueError(
            f"offline_args keeps {', '.join(turned_on)} off (they need FedML's cloud or "
            "wandb); use fedml.init for tracked runs"
        )
    args = argparse.Namespace(**{**SP_DEFAULTS, **settings})
    mlops.pre_setup(args)
    return args


def fedml_dataset(
    train: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    test: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    class_num: int,
    batch_size: int,
    seed: int = 0,
) -> Dataset:
    """FedML's 8-item dataset list from per-client ``(inputs, labels)`` tensors.

    Returns ``[train_data_num, test_data_num, train_data_global, test_data_global,
    train_data_local_num_dict, train_data_local_dict, test_data_local_dict,
    class_num]``, with shuffled training loaders (seeded) and ordered test loaders.
    """
    if len(train) != len(test) or not train:
        raise ValueError(
            f"need the same positive number of client training and test sets, got "
            f"{len(train)} and {len(test)}"
        )
    generator = torch.Generator().manual_seed(seed)

    def loader(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], shuffle: bool) -> DataLoader:
        data = TensorDataset(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                          generator=generator if shuffle else None)

    for index, (x, y) in enumerate(list(train) + list(test)):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"client set {index % len(train)} has {len(x)} inputs and {len(y)} labels; "
                "each needs the same positive number"
            )
    return [
        sum(len(y) for _, y in train),
        sum(len(y) for _, y in test),
        loader(train, shuffle=True),
        loader(test, shuffle=False),
        {cid: len(y) for cid, (_, y) in enumerate(train)},
        {cid: loader([part], shuffle=True) for cid, part in enumerate(train)},
        {cid: loader([part], shuffle=False) for cid, part in enumerate(test)},
        class_num,
    ]


__all__ = [
    "ARG_SETTINGS",
    "FedAvgSimulation",
    "LIPSAggregatorMixin",
    "LIPSTrainerMixin",
    "SP_DEFAULTS",
    "fedml_dataset",
    "lips_config_from_args",
    "lips_round",
    "offline_args",
]
