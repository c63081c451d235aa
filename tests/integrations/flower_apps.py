"""Flower apps under test (imported by test_flower.py and by the simulation's workers).

Every train reply reports what the node received, per state-dict tensor in order:
``zeros`` (exact zeros after LIPS, if any, was applied), ``unchanged`` (1 if the tensor
is bit-identical to the received array) and ``sums`` (float64 sums), so the test can
check the masks on the arrays the clients actually trained from. LIPS clients add
:func:`report_metrics` (``lips-density``, ``lips-zeroed``, ``lips-fallback``).
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import nn

from lips_wrap import LIPSConfig
from lips_wrap.integrations.flower import lips_train, report_metrics

NUM_NODES = 4
CONFIG = LIPSConfig(total_rounds=4, period=1, start_density=0.5)
"""Server rounds 1..4 are core rounds 0..3: the models of server rounds 2, 3, 4 are masked."""
FAILING = (0, 3)
"""(partition-id, server round) at which the LIPS client raises, inside ``lips_train``."""


def tiny_net() -> nn.Module:
    """Stem conv, two middle convs (eligible), linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def state_sums(state: Mapping[str, torch.Tensor]) -> List[float]:
    return [float(t.double().sum()) for t in state.values()]


def _observe(model: nn.Module, received: Mapping[str, torch.Tensor]) -> Dict[str, List]:
    state = model.state_dict()
    return {
        "zeros": [int((t == 0).sum()) for t in state.values()],
        "unchanged": [int(torch.equal(t, received[name])) for name, t in state.items()],
        "sums": state_sums(state),
    }


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, partition: int) -> None:
    generator = torch.Generator().manual_seed(partition)
    inputs = torch.randn(16, 1, 6, 6, generator=generator)
    targets = torch.randint(0, 3, (16,), generator=generator)
    for start in (0, 8):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[start:start + 8]),
                                           targets[start:start + 8])
        loss.backward()
        optimizer.step()


def _reply(msg: Message, model: nn.Module, observed: Dict[str, List], context: Context,
           lips_metrics: MetricRecord) -> Message:
    metrics = MetricRecord({
        "num-examples": 16,
        "partition-id": int(context.node_config["partition-id"]),
        **observed,
        **lips_metrics,
    })
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _received(msg: Message) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    received = msg.content["arrays"].to_torch_state_dict()
    model = tiny_net()
    model.load_state_dict(received)
    return model, received


lips_client = ClientApp()


@lips_client.train()
def train_with_lips(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model, received = _received(msg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    partition = int(context.node_config["partition-id"])
    with lips_train(model, optimizer, msg, context, CONFIG) as lips:
        observed = _observe(model, received)
        if (partition, int(msg.content["config"]["server-round"])) == FAILING:
            raise RuntimeError("node failure injected by the test")
        _fit(model, lips.optimizer, partition)
    return _reply(msg, model, observed, context, report_metrics(lips.last_report))


raw_client = ClientApp()
RAW_ERROR_NODES = (0, 1)
"""Partitions whose raw-optimizer client runs with unwrapped_training="error"; the
others warn, and report the warnings they caught as ``unwrapped-warnings``."""


@raw_client.train()
def train_with_the_raw_optimizer(msg: Message, context: Context) -> Message:
    """The README's mistake: inside lips_train, training steps the optimizer passed to
    lips_train, not lips.optimizer."""
    torch.set_num_threads(1)
    model, received = _received(msg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    partition = int(context.node_config["partition-id"])
    mode = "error" if partition in RAW_ERROR_NODES else "warn"
    config = LIPSConfig(total_rounds=CONFIG.total_rounds, period=1, unwrapped_training=mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lips_train(model, optimizer, msg, context, config) as lips:
            observed = _observe(model, received)
            _fit(model, optimizer, partition)  # the mistake
    said = [w for w in caught if "leaving lips_train" in str(w.message)
            and "train with lips.optimizer" in str(w.message)]
    return _reply(msg, model, observed, context,
                  MetricRecord({**report_metrics(lips.last_report),
                                "unwrapped-warnings": len(said)}))


plain_client = ClientApp()


@plain_client.train()
def train_plain(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model, received = _received(msg)
    observed = _observe(model, received)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _fit(model, optimizer, int(context.node_config["partition-id"]))
    return _reply(msg, model, observed, context, MetricRecord())


class RecordingFedAvg(FedAvg):
    """FedAvg over all nodes that keeps, per server round, the sums of the global
    arrays it was given, the replies' metrics and the number of failed replies.

    ``probe`` is called once while the federation runs (listening sockets check)."""

    def __init__(self, probe: Optional[Callable[[], object]] = None) -> None:
        super().__init__(fraction_evaluate=0.0, min_train_nodes=NUM_NODES,
                         min_available_nodes=NUM_NODES)
        self.global_sums: Dict[int, List[float]] = {}
        self.replies: Dict[int, List[Dict]] = {}
        self.failures: Dict[int, int] = {}
        self.errors: Dict[int, List[str]] = {}
        self.probe = probe
        self.probed: object = None

    def configure_train(self, server_round, arrays, config, grid):
        self.global_sums[server_round] = state_sums(arrays.to_torch_state_dict())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [dict(m.content["metrics"]) for m in replies if not m.has_error()]
        self.replies[server_round] = ok
        self.failures[server_round] = len(replies) - len(ok)
        self.errors[server_round] = [m.error.reason for m in replies if m.has_error()]
        if self.probe is not None and self.probed is None:
            self.probed = self.probe()
        return super().aggregate_train(server_round, replies)


def server_app(strategy: Strategy) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid, ArrayRecord(tiny_net().state_dict()),
                       num_rounds=CONFIG.total_rounds)

    return app


def _descendants(root: int) -> set:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening_sockets(roots: List[int]) -> List[Tuple[str, int]]:
    """(local address, pid) of every TCP socket listened on by ``roots`` or their
    descendants, from ``ss -ltnp``."""
    pids = set().union(*(_descendants(root) for root in roots))
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                            check=True).stdout
    found = []
    for line in output.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((fields[3], pid))
    return found
