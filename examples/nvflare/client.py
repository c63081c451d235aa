"""client.py: a stock NVFlare PyTorch Client API script, plus client-side LIPS.

The lines marked ``# LIPS`` are all that LIPS adds. NVFlare runs this script at every
site (see job.py); ``--lips off`` trains plain FedAvg (for the server-side variant).
"""

import argparse

import nvflare.client as flare
import torch
from digits_task import Net, site_data
from nvflare.app_common.abstract.fl_model import FLModel
from torch import nn

from lips_wrap import LIPSConfig  # LIPS
from lips_wrap.integrations.nvflare import lips_train  # LIPS


def train(model, optimizer, inputs, targets, epochs=2, batch_size=16):
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(targets)).split(batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
            steps += 1
    return steps


@torch.no_grad()
def accuracy(model, inputs, targets):
    model.eval()
    return (model(inputs).argmax(1) == targets).float().mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-sites", type=int, required=True)
    parser.add_argument("--lips", choices=("on", "off"), default="on")
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--start-density", type=float, default=0.5)
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    (train_x, train_y), (test_x, test_y) = site_data(site, args.num_sites)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    while flare.is_running():
        input_model = flare.receive()
        model.load_state_dict(input_model.params)
        received_accuracy = accuracy(model, test_x, test_y)
        metrics = {"accuracy": received_accuracy}
        if args.lips == "on":
            config = LIPSConfig(total_rounds=input_model.total_rounds,  # LIPS
                                period=args.period, start_density=args.start_density)
            with lips_train(model, optimizer, input_model, config) as lips:  # LIPS
                steps = train(model, lips.optimizer, train_x, train_y)  # LIPS: lips.optimizer
            metrics["lips_density"] = lips.last_report.density or 0.0  # LIPS
        else:
            steps = train(model, optimizer, train_x, train_y)
        metrics["local_accuracy"] = accuracy(model, test_x, test_y)
        flare.send(FLModel(params=model.state_dict(), metrics=metrics,
                           meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
