"""FedAvg + LIPS in FedML's single-process simulator, fully offline: scikit-learn's digits,
20 clients with Dirichlet(0.1) label skew (the data and CNN of digits_cnn.py).

    .venv-fedml/bin/python examples/fedml_sp.py             # about a minute on 2 CPU cores
    .venv-fedml/bin/python examples/fedml_sp.py --rounds 40 --server-side

The lines marked ``# LIPS`` are all that LIPS adds to a FedML ClientTrainer (client side,
the default) or ServerAggregator (``--server-side``). ``offline_args`` and
``FedAvgSimulation`` are the FedML glue: arguments without ``fedml.init`` (no network,
nothing in ~/.fedml or ./logs), and FedML's SP FedAvg running *these* trainer and
aggregator (FedML's own builds a default trainer and ignores them).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from digits_cnn import load_data, run_options, small_cnn  # beside this file
from fedml.core import ClientTrainer, ServerAggregator
from torch import nn
from tqdm import tqdm

from lips_wrap import density_at
from lips_wrap.integrations.custom import personalized_accuracy
from lips_wrap.integrations.fedml import (
    FedAvgSimulation,
    LIPSAggregatorMixin,
    LIPSTrainerMixin,
    fedml_dataset,
    offline_args,
)


class DigitsTrainer(ClientTrainer):
    """A usual FedML trainer: SGD with momentum, built fresh each round."""

    def get_model_params(self):
        return copy.deepcopy(self.model.cpu().state_dict())

    def set_model_params(self, model_parameters):
        self.model.load_state_dict(model_parameters)

    def wrap(self, optimizer, args):
        """Where the LIPS subclass wraps the optimizer; here nothing."""
        return optimizer

    def train(self, train_data, device, args):
        self.model.to(device).train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=args.learning_rate, momentum=0.9)
        optimizer = self.wrap(optimizer, args)
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(args.epochs):
            for inputs, targets in train_data:
                optimizer.zero_grad()
                loss_fn(self.model(inputs.to(device)), targets.to(device)).backward()
                optimizer.step()

    @torch.no_grad()
    def test(self, test_data, device, args):
        self.model.to(device).eval()
        inputs, targets = test_data.dataset.tensors
        logits = self.model(inputs.to(device))
        return {"test_correct": int((logits.argmax(1).cpu() == targets).sum()),
                "test_total": len(targets),
                "test_loss": float(nn.functional.cross_entropy(logits.cpu(), targets,
                                                               reduction="sum"))}


class LIPSDigitsTrainer(LIPSTrainerMixin, DigitsTrainer):    # LIPS
    def wrap(self, optimizer, args):                          # LIPS
        return self.lips_optimizer(optimizer, args)           # LIPS


class DigitsAggregator(ServerAggregator):
    """A usual FedML aggregator; it scores each new global model on every client's
    personalized test set."""

    def __init__(self, model, args, data, progress):
        super().__init__(model, args)
        self.data, self.progress, self.history = data, progress, []

    def get_model_params(self):
        return self.model.cpu().state_dict()

    def set_model_params(self, model_parameters):
        self.model.load_state_dict(model_parameters)
        x, y, _, tests = self.data
        self.history.append(personalized_accuracy(self.model, x, y, tests)[0])
        self.progress.update(1)
        self.progress.set_postfix(acc=f"{self.history[-1]:.3f}")

    def test(self, test_data, device, args):
        return None


class LIPSDigitsAggregator(LIPSAggregatorMixin, DigitsAggregator):   # LIPS
    pass                                                              # LIPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     parents=[run_options(rounds=30)])
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--start-density", type=float, default=0.5)
    parser.add_argument("--server-side", action="store_true",
                        help="mask on the server (|dW * W|) instead of on each client")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(cli)
    x, y, clients, tests = data
    dataset = fedml_dataset([(x[c], y[c]) for c in clients], [(x[t], y[t]) for t in tests],
                            class_num=10, batch_size=cli.batch_size, seed=cli.seed)
    args = offline_args(
        client_num_in_total=cli.clients, client_num_per_round=cli.clients,
        comm_round=cli.rounds, epochs=cli.epochs, batch_size=cli.batch_size,
        learning_rate=cli.lr, frequency_of_the_test=cli.rounds, random_seed=cli.seed,
        lips_period=cli.period, lips_start_density=cli.start_density,   # LIPS (or lips_config=)
    )
    torch.manual_seed(cli.seed)
    model = small_cnn()
    start = time.perf_counter()
    with tqdm(total=cli.rounds, desc="FedML SP rounds", unit="round") as progress:
        if cli.server_side:
            trainer = DigitsTrainer(model, args)
            aggregator = LIPSDigitsAggregator(model, args, data, progress)   # LIPS
        else:
            trainer = LIPSDigitsTrainer(model, args)                         # LIPS
            aggregator = DigitsAggregator(model, args, data, progress)
        FedAvgSimulation(args, "cpu", dataset, model, trainer, aggregator).run()
    side = "server" if cli.server_side else "client"
    print(f"\nLIPS on the {side} side, {cli.clients} clients, {cli.rounds} rounds "
          f"({time.perf_counter() - start:.0f} s)")
    config = (aggregator if cli.server_side else trainer).lips_config
    print("accuracy: the global model after each round's aggregation, mean over the clients'")
    print("personalized test sets; * = the model for the next round is masked" + (
        " (this row scores the masked model)" if cli.server_side else " by each client"))
    for rnd, acc in enumerate(aggregator.history):
        mark = " *" if rnd + 1 < cli.rounds and density_at(rnd + 1, config) else ""
        print(f"round {rnd:>3}: {acc:.3f}{mark}")


if __name__ == "__main__":
    main()
