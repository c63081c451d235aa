"""FedML adapter, exercised by real FedML runs (single-process simulator; cross-silo gRPC).

Runs in ``.venv-fedml`` (``make pytest-fedml``); skipped where FedML is not installed.
Every test runs offline under a socket guard that fails on any non-loopback connection,
with its own HOME and working folder.
"""

from __future__ import annotations

import copy
import socket
from collections import OrderedDict
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

fedml = pytest.importorskip("fedml")

from fedml import FedMLRunner  # noqa: E402
from fedml.core import ClientTrainer, ServerAggregator  # noqa: E402

from lips_wrap import LIPSConfig, density_at, find_layers, mask_global_state  # noqa: E402
from lips_wrap.integrations.fedml import (  # noqa: E402
    FedAvgSimulation,
    LIPSAggregatorMixin,
    LIPSTrainerMixin,
    fedml_dataset,
    lips_config_from_args,
    offline_args,
)

CLIENTS, ROUNDS, PERIOD, START = 4, 5, 2, 0.5
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Own HOME and working folder; any non-loopback connect or lookup fails the test."""
    attempts: List[str] = []
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family != socket.AF_UNIX and address[0] not in LOOPBACK:
            attempts.append(f"connect {address!r}")
            raise OSError(f"test guard: no network ({address!r})")
        return real_connect(sock, address)

    def guarded_lookup(host, *args, **kwargs):
        if host is not None and host not in LOOPBACK:
            attempts.append(f"getaddrinfo {host!r}")
            raise OSError(f"test guard: no network ({host!r})")
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield attempts
    torch.set_num_threads(threads)
    assert attempts == [], f"network attempts: {attempts}"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    # Tanh, not ReLU: every weight gets a non-zero gradient, so masked entries regrow
    # and the model a client receives holds no zeros (exact density counts below).
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
        nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3),
    )


def synthetic_dataset(batch_size: int = 10) -> list:
    """Four clients with skewed labels of a fixed random linear task."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(12, 3, generator=generator)
    parts = []
    for client in range(CLIENTS):
        x = torch.randn(60, 12, generator=generator) + 0.5 * client
        y = (x @ weights).argmax(dim=1)
        parts.append((x[:40], y[:40]))
        parts.append((x[40:], y[40:]))
    return fedml_dataset(parts[0::2], parts[1::2], class_num=3, batch_size=batch_size)


class RecordingTrainer(ClientTrainer):
    """A plain FedML trainer (SGD with momentum, fresh each round) that records what
    each client received and the weights it starts training from."""

    def __init__(self, model, args):
        super().__init__(model, args)
        self.delivered: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
        self.starts: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
        self._last_delivered = None

    def get_model_params(self):
        return copy.deepcopy(self.model.cpu().state_dict())

    def set_model_params(self, model_parameters):
        self.model.load_state_dict(model_parameters)
        self._last_delivered = copy.deepcopy(self.model.state_dict())

    def prepare(self, optimizer, args):
        return optimizer

    def train(self, train_data, device, args):
        self.model.to(device).train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=args.learning_rate, momentum=0.9)
        optimizer = self.prepare(optimizer, args)
        key = (args.round_idx, self.id)
        self.delivered[key] = self._last_delivered
        self.starts[key] = copy.deepcopy(self.model.state_dict())
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(args.epochs):
            for x, y in train_data:
                optimizer.zero_grad()
                loss_fn(self.model(x.to(device)), y.to(device)).backward()
                optimizer.step()

    @torch.no_grad()
    def test(self, test_data, device, args):
        self.model.to(device).eval()
        correct = total = 0
        loss = 0.0
        for x, y in test_data:
            logits = self.model(x.to(device))
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
        return {"test_correct": correct, "test_total": total, "test_loss": loss}


class LIPSRecordingTrainer(LIPSTrainerMixin, RecordingTrainer):
    def prepare(self, optimizer, args):
        optimizer = self.lips_optimizer(optimizer, args)
        self.reports[(args.round_idx, self.id)] = self.lips_report
        return optimizer

    def __init__(self, model, args, **kwargs):
        super().__init__(model, args, **kwargs)
        self.reports = {}


class RecordingAggregator(ServerAggregator):
    """A plain FedML aggregator that records each aggregate before any LIPS step."""

    def __init__(self, model, args):
        super().__init__(model, args)
        self.aggregated: Dict[int, Dict[str, torch.Tensor]] = {}

    def get_model_params(self):
        return self.model.cpu().state_dict()

    def set_model_params(self, model_parameters):
        self.model.load_state_dict(model_parameters)

    def on_after_aggregation(self, aggregated_model_or_grad):
        self.aggregated[self.args.round_idx] = copy.deepcopy(aggregated_model_or_grad)
        return super().on_after_aggregation(aggregated_model_or_grad)

    def test(self, test_data, device, args):
        return None


class LIPSRecordingAggregator(LIPSAggregatorMixin, RecordingAggregator):
    pass


def make_args(**extra):
    return offline_args(
        client_num_in_total=CLIENTS, client_num_per_round=CLIENTS, comm_round=ROUNDS,
        epochs=2, batch_size=10, learning_rate=0.05, frequency_of_the_test=100,
        lips_period=PERIOD, lips_start_density=START, **extra,
    )


def eligible_names(model: nn.Module) -> Tuple[str, ...]:
    return find_layers(model).eligible_names


def assert_masked(start: Dict[str, torch.Tensor], delivered: Dict[str, torch.Tensor],
                  names, density):
    """``start`` is ``delivered`` with exactly numel - int(d * numel) entries zeroed per
    eligible tensor (density None: unchanged), and equal to it everywhere else."""
    for name, value in delivered.items():
        if name not in names or density is None:
            assert torch.equal(start[name], value), name
            continue
        assert int((value == 0).sum()) == 0, f"{name}: delivered model already has zeros"
        zeros = start[name] == 0
        assert int(zeros.sum()) == value.numel() - int(density * value.numel()), name
        assert torch.equal(start[name][~zeros], value[~zeros]), name


def test_config_from_args_reads_lips_settings():
    args = make_args(lips_score="magnitude")
    assert lips_config_from_args(args) == LIPSConfig(
        total_rounds=ROUNDS, period=PERIOD, start_density=START, score="magnitude")
    with pytest.raises(ValueError, match="enable_tracking"):
        offline_args(enable_tracking=True)


def test_sp_simulation_client_side_lips_masks_exactly_on_mask_rounds(tmp_path):
    args, model = make_args(), mlp()
    trainer = LIPSRecordingTrainer(model, args)
    aggregator = RecordingAggregator(model, args)
    simulation = FedAvgSimulation(args, "cpu", synthetic_dataset(), model, trainer, aggregator)
    FedMLRunner(args, "cpu", None, model, algorithm_flow=simulation).run()

    names = eligible_names(model)
    assert len(names) == 2 and sorted(aggregator.aggregated) == list(range(ROUNDS))
    assert sorted(trainer.starts) == [(r, c) for r in range(ROUNDS) for c in range(CLIENTS)]
    config = trainer.lips_config
    mask_rounds = [r for r in range(ROUNDS) if density_at(r, config) is not None]
    assert mask_rounds == [1, 3]
    for (rnd, client), start in trainer.starts.items():
        delivered = trainer.delivered[(rnd, client)]
        if rnd > 0:  # every client receives FedML's aggregate of the previous round
            assert all(torch.equal(delivered[k], v) for k, v in aggregator.aggregated[rnd - 1].items())
        assert_masked(start, delivered, names, density_at(rnd, config))
        report = trainer.reports[(rnd, client)]
        assert report.masked == (rnd in mask_rounds) and report.fallback == ()
    for rnd in mask_rounds:  # each client scores with its own gradients: masks differ
        masks = {tuple((trainer.starts[(rnd, c)][names[0]] == 0).flatten().tolist())
                 for c in range(CLIENTS)}
        assert len(masks) == CLIENTS
    assert (tmp_path / "home" / ".fedml" / "fedml_trace").is_dir()  # FedMLRunner's trace


def test_sp_simulation_server_side_lips_masks_the_sent_model():
    args, model = make_args(), mlp()
    trainer = RecordingTrainer(model, args)
    aggregator = LIPSRecordingAggregator(model, args)
    initial = copy.deepcopy(model.state_dict())
    FedAvgSimulation(args, "cpu", synthetic_dataset(), model, trainer, aggregator).run()

    names, config = eligible_names(model), aggregator.lips_config
    sent = {0: initial}
    for rnd in range(1, ROUNDS):
        received = [trainer.delivered[(rnd, c)] for c in range(CLIENTS)]
        assert all(all(torch.equal(r[k], received[0][k]) for k in r) for r in received)
        sent[rnd] = received[0]
        assert_masked(sent[rnd], aggregator.aggregated[rnd - 1], names, density_at(rnd, config))
        # the core's scoring, |(aggregate - model sent last round) * aggregate|
        expected, report = mask_global_state(
            aggregator.aggregated[rnd - 1], sent[rnd - 1], aggregator.lips_plan, rnd, config)
        assert all(torch.equal(expected[k], sent[rnd][k]) for k in expected)
        assert aggregator.lips_reports[rnd] == report and report.fallback == ()
    assert [r for r, rep in aggregator.lips_reports.items() if rep.masked] == [1, 3]
    assert isinstance(sent[1], OrderedDict)


def test_trainer_needs_round_index_and_config():
    args, model = make_args(), mlp()
    trainer = LIPSRecordingTrainer(model, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="round_idx"):
        trainer.lips_optimizer(optimizer, args)
    with pytest.raises(TypeError, match="LIPSConfig"):
        LIPSRecordingTrainer(model, args, lips_config={"total_rounds": 3})
    del args.comm_round
    with pytest.raises(ValueError, match="comm_round"):
        LIPSRecordingAggregator(model, args)


def test_guard_sees_the_cloud_request_that_fedml_init_makes(offline):
    """The socket guard catches FedML's HTTP stack: the config fetch ``fedml.init``
    runs (``mlops.fetch_config``) is refused and recorded, which the recipe avoids."""
    from fedml.core.mlops.mlops_configs import MLOpsConfigs

    with pytest.raises(KeyError):  # FedML swallows the connection error, then lacks configs
        MLOpsConfigs.fetch_all_configs()
    assert offline and all("fedml.ai" in attempt or "tensoropera" in attempt
                           for attempt in offline), offline
    offline.clear()
