"""Client API script under test: a stock PyTorch training loop plus LIPS.

Each round it saves a trace to ``--trace``: the params received, the model as LIPS left
it (masked or not), the LIPS report and state, what it sends, its process id and working
directory. ``--lips none`` trains without LIPS (for the server-side test);
``--skip-load-round R`` forgets ``model.load_state_dict`` in round R (a failing client).
"""

import argparse
import dataclasses
import os
from pathlib import Path

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare_net import Net, site_data
from torch import nn

from lips_wrap import LIPSConfig
from lips_wrap.integrations.nvflare import lips_train


def snapshot(state):
    return {name: torch.as_tensor(value).detach().clone() for name, value in state.items()}


def train(model, optimizer, inputs, targets):
    steps = 0
    for start in range(0, len(targets), 10):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[start:start + 10]),
                                           targets[start:start + 10])
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", required=True)
    parser.add_argument("--lips", choices=("client", "none"), default="client")
    parser.add_argument("--period", type=int, default=2)
    parser.add_argument("--skip-load-round", type=int, default=-1)
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    torch.manual_seed(1)  # not the server's initial weights
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = site_data(site)
    while flare.is_running():
        input_model = flare.receive()
        rnd = input_model.current_round
        if rnd != args.skip_load_round:
            model.load_state_dict(input_model.params)
        record = {"pid": os.getpid(), "cwd": os.getcwd(),
                  "received": snapshot(input_model.params)}
        density = 0.0
        if args.lips == "client":
            config = LIPSConfig(total_rounds=input_model.total_rounds, period=args.period)
            with lips_train(model, optimizer, input_model, config) as lips:
                record["masked"] = snapshot(model.state_dict())
                record["report"] = dataclasses.asdict(lips.last_report)
                steps = train(model, lips.optimizer, inputs, targets)
            record["grads"] = lips.state_dict()["grads"]
            density = lips.last_report.density or 0.0
        else:
            steps = train(model, optimizer, inputs, targets)
        record["sent"] = snapshot(model.state_dict())
        torch.save(record, Path(args.trace) / f"{site}-round{rnd}.pt")
        flare.send(FLModel(params=model.state_dict(), metrics={"lips_density": density},
                           meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
