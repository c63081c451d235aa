"""FedML adapter, exercised by real FedML runs (single-process simulator; cross-silo gRPC).

Runs in ``.venv-fedml`` (``make pytest-fedml``); skipped where FedML is not installed.
Every test runs offline under a socket guard that fails on any non-loopback connection,
with its own HOME and working folder.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

fedml = pytest.importorskip("fedml")

from fedml import FedMLRunner  # noqa: E402
from fedml_nodes import (  # noqa: E402  (beside this file)
    CLIENTS,
    PERIOD,
    START,
    LIPSRawOptimizerTrainer,
    LIPSRecordingAggregator,
    LIPSRecordingTrainer,
    RecordingAggregator,
    RecordingTrainer,
    guard_network,
    mlp,
    synthetic_dataset,
)

from lips_wrap import LIPSConfig, density_at, find_layers, mask_global_state  # noqa: E402
from lips_wrap.integrations.custom import local_train  # noqa: E402
from lips_wrap.integrations.fedml import (  # noqa: E402
    FedAvgSimulation,
    lips_config_from_args,
    offline_args,
)

ROUNDS = 5


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Own HOME and working folder; any non-loopback connect or lookup fails the test."""
    attempts: List[str] = []
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    undo = guard_network(attempts)
    yield attempts
    undo()
    torch.set_num_threads(threads)
    assert attempts == [], f"network attempts: {attempts}"


def make_args(**extra):
    settings = dict(
        client_num_in_total=CLIENTS, client_num_per_round=CLIENTS, comm_round=ROUNDS,
        epochs=2, batch_size=10, learning_rate=0.05, frequency_of_the_test=100,
        lips_period=PERIOD, lips_start_density=START,
    )
    return offline_args(**{**settings, **extra})


def eligible_names(model: nn.Module) -> Tuple[str, ...]:
    return find_layers(model).eligible_names


def same_state(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


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
            assert same_state(delivered, aggregator.aggregated[rnd - 1])
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
        assert all(same_state(r, received[0]) for r in received)
        sent[rnd] = received[0]
        assert_masked(sent[rnd], aggregator.aggregated[rnd - 1], names, density_at(rnd, config))
        # the core's scoring, |(aggregate - model sent last round) * aggregate|
        expected, report = mask_global_state(
            aggregator.aggregated[rnd - 1], sent[rnd - 1], aggregator.lips_plan, rnd, config)
        assert same_state(expected, sent[rnd])
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cross_silo_grpc_on_localhost_with_client_side_lips(tmp_path):
    """A server and two clients as processes, FedML's gRPC backend on 127.0.0.1 only;
    the clients use LIPSTrainerMixin (round index from FedML's args.round_idx)."""
    clients, rounds = 2, 3
    ports = [free_port() for _ in range(clients + 1)]
    ipconfig = tmp_path / "grpc_ipconfig.csv"
    ipconfig.write_text("eid,rank,grpc_server_ip,grpc_server_port\n" + "".join(
        f"{rank},{rank},127.0.0.1,{port}\n" for rank, port in enumerate(ports)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    node = Path(__file__).with_name("fedml_nodes.py")
    processes = []
    try:
        for rank in range(clients + 1):
            command = [sys.executable, str(node), "--rank", str(rank), "--clients", str(clients),
                       "--rounds", str(rounds), "--ipconfig", str(ipconfig),
                       "--out", str(tmp_path / f"node{rank}.pt"), "--timeout", "150"]
            with open(tmp_path / f"node{rank}.log", "w") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env, cwd=tmp_path))
        codes = [process.wait(timeout=170) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = {rank: (tmp_path / f"node{rank}.log").read_text()[-3000:] for rank in range(clients + 1)}
    assert codes == [0] * (clients + 1), logs

    results = [torch.load(tmp_path / f"node{rank}.pt", weights_only=False)
               for rank in range(clients + 1)]
    assert all(result["attempts"] == [] for result in results)
    aggregated = results[0]["aggregated"]
    assert sorted(aggregated) == list(range(rounds))
    config = LIPSConfig(total_rounds=rounds, period=PERIOD, start_density=START)
    names = eligible_names(mlp())
    for rank, result in enumerate(results[1:], start=1):
        client = rank - 1  # FedML's trainer id in cross-silo
        assert result["id"] == client
        assert sorted(result["starts"]) == [(r, client) for r in range(rounds)]
        for (rnd, _), start in result["starts"].items():
            delivered = result["delivered"][(rnd, client)]
            if rnd > 0:
                assert same_state(delivered, aggregated[rnd - 1])
            assert_masked(start, delivered, names, density_at(rnd, config))
            assert result["reports"][(rnd, client)] == (
                (True, START, ()) if rnd == 1 else (False, None, ()))
    traces = tmp_path / "home" / ".fedml" / "fedml_trace"  # FedMLRunner writes to HOME
    assert len(list(traces.iterdir())) == clients + 1


def test_sp_partial_participation_keeps_each_clients_own_state():
    """6 clients, 3 sampled per round by FedML: each client masks with its own stored
    gradients, and one that never trained before a mask round falls back to magnitude."""
    total = 6
    args, model = make_args(client_num_in_total=total, client_num_per_round=3), mlp()
    trainer = LIPSRecordingTrainer(model, args)
    aggregator = RecordingAggregator(model, args)
    dataset = synthetic_dataset(clients=total)
    FedAvgSimulation(args, "cpu", dataset, model, trainer, aggregator).run()

    names, config = eligible_names(model), trainer.lips_config
    assert len(trainer.starts) == 3 * ROUNDS
    trained_before = set()
    fallbacks = 0
    for rnd in range(ROUNDS):
        for client in sorted(c for r, c in trainer.starts if r == rnd):
            key = (rnd, client)
            assert_masked(trainer.starts[key], trainer.delivered[key], names,
                          density_at(rnd, config))
            report = trainer.reports[key]
            if report.masked:
                expected = () if client in trained_before else names
                assert report.fallback == expected, key
                fallbacks += client not in trained_before
        trained_before |= {c for r, c in trainer.starts if r == rnd}
    assert len({c for _, c in trainer.starts}) > 3 and fallbacks >= 1


def test_optimizer_kept_across_rounds_has_its_state_masked_with_the_weights():
    args, model = make_args(), mlp()
    trainer = LIPSRecordingTrainer(model, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, targets = torch.randn(20, 12), torch.randint(0, 3, (20,))
    lips_objects = []
    for rnd in range(2):
        args.round_idx = rnd
        wrapped = trainer.lips_optimizer(optimizer, args)
        lips_objects.append(trainer.lips)
        if rnd == 1:
            assert trainer.lips_report.masked
            for name in eligible_names(model):
                weight = model.get_parameter(name)
                momentum = optimizer.state[weight]["momentum_buffer"]
                assert torch.equal(momentum == 0, weight == 0) and (weight == 0).any(), name
        local_train(model, wrapped, inputs, targets, 1, 10, torch.Generator().manual_seed(rnd))
    assert lips_objects[0] is lips_objects[1]


def test_training_that_bypasses_the_lips_optimizer_is_said():
    """Issue 20: train() wraps its optimizer but steps the original. Each client's
    round is checked when the trainer next calls lips_optimizer: a warning naming the
    client and the fix, or an error in the "error" mode."""
    args, model = make_args(comm_round=3), mlp()
    trainer = LIPSRawOptimizerTrainer(model, args)
    simulation = FedAvgSimulation(args, "cpu", synthetic_dataset(), model, trainer,
                                  RecordingAggregator(model, args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulation.run()
    said = [str(w.message) for w in caught
            if "self.lips_optimizer(optimizer, args) returns" in str(w.message)]
    assert len(said) == CLIENTS * 3 - 1  # every client round but the very last
    assert all("went to the wrapped optimizer directly" in text for text in said)
    assert {text.split(":")[0] for text in said} == {
        f"the round of client {c!r}" for c in range(CLIENTS)}
    assert all(r.fallback for r in trainer.reports.values() if r.masked)

    args, model = make_args(comm_round=3), mlp()
    config = LIPSConfig(total_rounds=3, unwrapped_training="error")
    trainer = LIPSRawOptimizerTrainer(model, args, lips_config=config)
    simulation = FedAvgSimulation(args, "cpu", synthetic_dataset(), model, trainer,
                                  RecordingAggregator(model, args))
    with pytest.raises(RuntimeError, match=r"the round of client 0: .*self\.lips_optimizer"):
        simulation.run()
