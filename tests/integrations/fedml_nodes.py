"""Shared by test_fedml.py: a model, data, recording trainer/aggregator, a network guard,
and (run as a script) one node of a cross-silo FedML run over gRPC on 127.0.0.1.

    python fedml_nodes.py --rank 0 --clients 2 --rounds 3 --ipconfig ip.csv --out server.pt
    python fedml_nodes.py --rank 1 --clients 2 --rounds 3 --ipconfig ip.csv --out client1.pt
"""

from __future__ import annotations

import argparse
import copy
import csv
import faulthandler
import logging
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from fedml.core import ClientTrainer, ServerAggregator
from torch import nn

from lips_wrap.integrations.custom import local_train
from lips_wrap.integrations.fedml import (
    LIPSAggregatorMixin,
    LIPSTrainerMixin,
    fedml_dataset,
    offline_args,
)

CLIENTS, PERIOD, START = 4, 2, 0.5
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def guard_network(attempts: List[str]) -> Callable[[], None]:
    """Make every non-loopback connect or name lookup fail and be recorded in
    ``attempts``; returns a function that undoes it."""
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family != socket.AF_UNIX and address[0] not in LOOPBACK:
            attempts.append(f"connect {address!r}")
            raise OSError(f"network guard: no network ({address!r})")
        return real_connect(sock, address)

    def guarded_lookup(host, *args, **kwargs):
        if host is not None and host not in LOOPBACK:
            attempts.append(f"getaddrinfo {host!r}")
            raise OSError(f"network guard: no network ({host!r})")
        return real_lookup(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_lookup

    def undo() -> None:
        socket.socket.connect, socket.getaddrinfo = real_connect, real_lookup

    return undo


def mlp() -> nn.Module:
    torch.manual_seed(0)
    # Tanh, not ReLU: every weight gets a non-zero gradient, so masked entries regrow
    # and the model a client receives holds no zeros (exact density counts below).
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
        nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3),
    )


def synthetic_dataset(clients: int = CLIENTS, batch_size: int = 10) -> list:
    """Clients with shifted inputs (skewed labels) of one fixed random linear task."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(12, 3, generator=generator)
    parts = []
    for client in range(clients):
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
        inputs, targets = train_data.dataset.tensors
        local_train(self.model, optimizer, inputs, targets, args.epochs, args.batch_size,
                    torch.Generator().manual_seed(1000 * args.round_idx + int(self.id)))

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


class LIPSRawOptimizerTrainer(LIPSRecordingTrainer):
    """The mistake: train() wraps its optimizer with lips_optimizer, then steps the
    original one."""

    def prepare(self, optimizer, args):
        super().prepare(optimizer, args)
        return optimizer


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



def node_args(rank: int, clients: int, rounds: int, ipconfig: str):
    """Cross-silo arguments for one node, built without fedml.init (see offline_args)."""
    ids = list(range(1, clients + 1)) if rank == 0 else [rank]
    return offline_args(
        training_type="cross_silo", backend="GRPC", scenario="horizontal",
        role="server" if rank == 0 else "client", rank=rank, process_id=rank,
        worker_num=clients, comm=None, grpc_ipconfig_path=ipconfig, client_id_list=str(ids),
        client_num_in_total=clients, client_num_per_round=clients, comm_round=rounds,
        epochs=2, batch_size=10, learning_rate=0.05, frequency_of_the_test=100, run_id="0",
        n_proc_in_silo=1, proc_rank_in_silo=0, lips_period=PERIOD, lips_start_density=START,
    )


def wait_until(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s")
        time.sleep(0.2)


def server_listening(ipconfig: str) -> Callable[[], bool]:
    """Whether the server (eid 0 in the gRPC ipconfig CSV) accepts connections."""
    with open(ipconfig) as handle:
        row = next(r for r in csv.DictReader(handle) if r["eid"] == "0")
    address = (row["grpc_server_ip"], int(row["grpc_server_port"]))

    def ready() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(address) == 0

    return ready


def main() -> None:
    from fedml import FedMLRunner

    parser = argparse.ArgumentParser(description="one node of a cross-silo FedML run")
    for flag in ("--rank", "--clients", "--rounds"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--ipconfig", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=150.0,
                        help="dump every thread's stack and exit after this many seconds")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"rank {cli.rank} %(asctime)s %(message)s")
    faulthandler.dump_traceback_later(cli.timeout, exit=True)
    attempts: List[str] = []
    guard_network(attempts)
    torch.set_num_threads(1)
    args = node_args(cli.rank, cli.clients, cli.rounds, cli.ipconfig)
    model = mlp()
    dataset = synthetic_dataset(clients=cli.clients)
    # Start order: FedML's gRPC message loop busy-waits, so the server starts it once
    # every client has imported FedML; a client that cannot reach the server raises while
    # its gRPC threads keep the process alive, so clients wait for the server.
    folder = Path(cli.out).parent
    (folder / f"ready{cli.rank}").touch()
    if cli.rank == 0:
        wait_until(lambda: all((folder / f"ready{rank}").exists()
                               for rank in range(1, cli.clients + 1)), cli.timeout, "clients")
        aggregator = RecordingAggregator(model, args)
        FedMLRunner(args, "cpu", dataset, model, server_aggregator=aggregator).run()
        result = {"aggregated": aggregator.aggregated}
    else:
        wait_until(server_listening(cli.ipconfig), cli.timeout, "FedML server")
        trainer = LIPSRecordingTrainer(model, args)
        FedMLRunner(args, "cpu", dataset, model, client_trainer=trainer).run()
        result = {"starts": trainer.starts, "delivered": trainer.delivered, "id": trainer.id,
                  "reports": {k: (r.masked, r.density, r.fallback)
                              for k, r in trainer.reports.items()}}
    torch.save({**result, "attempts": attempts}, cli.out)


if __name__ == "__main__":
    main()
