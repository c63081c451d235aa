"""FedAvg vs FedAvg+LIPS on scikit-learn's digits: 20 clients, Dirichlet(0.1) label skew.

    python examples/digits_cnn.py            # about a minute on 2 CPU cores
    python examples/digits_cnn.py --rounds 60 --clients 30 --out curves.png

The lines marked ``# LIPS`` are all that LIPS adds to a hand-written FedAvg loop.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from lips_wrap import LIPS, LIPSConfig
from lips_wrap.integrations.custom import (
    dirichlet_split,
    fedavg,
    label_distribution,
    local_train,
    matched_split,
    personalized_accuracy,
)


def small_cnn(num_classes: int = 10) -> nn.Module:
    """A 3-conv CNN with BatchNorm for 8x8 images."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def load_data(args: argparse.Namespace):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.3, stratify=digits.target, random_state=args.seed
    )
    parts = dirichlet_split(y[train_idx], args.clients, args.alpha, seed=args.seed, min_samples=8)
    clients = [train_idx[p] for p in parts]
    tests = [test_idx[p] for p in matched_split(
        y[test_idx], [label_distribution(y, c, 10) for c in clients], 60, seed=args.seed)]
    return x, y, clients, tests


def run_arm(args, data, use_lips: bool, progress: tqdm) -> dict:
    x, y, clients, tests = data
    torch.manual_seed(args.seed)
    model = small_cnn()
    global_state = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if use_lips:
        lips = LIPS(model, optimizer, LIPSConfig(total_rounds=args.rounds))  # LIPS
        optimizer = lips.optimizer                                            # LIPS
        client_states = [lips.state_dict() for _ in clients]                 # LIPS
    generator = torch.Generator().manual_seed(args.seed)
    history = {"global": [], "local": [], "masked_rounds": []}
    for rnd in range(args.rounds):
        uploads, sizes, local_acc = [], [], []
        for cid, indices in enumerate(clients):
            model.load_state_dict(global_state)
            optimizer.state.clear()  # fresh momentum every round, as the reference
            if use_lips:
                lips.load_state_dict(client_states[cid])                     # LIPS
                report = lips.on_global_model(rnd)                           # LIPS
            local_train(model, optimizer, x[indices], y[indices], args.epochs,
                        args.batch_size, generator)
            if use_lips:
                client_states[cid] = lips.state_dict()                       # LIPS
            local_acc.append(personalized_accuracy(model, x, y, [tests[cid]])[0])
            uploads.append(copy.deepcopy(model.state_dict()))
            sizes.append(len(indices))
        if use_lips and report.masked:
            history["masked_rounds"].append(rnd)
        global_state = fedavg(uploads, sizes)
        model.load_state_dict(global_state)
        history["global"].append(personalized_accuracy(model, x, y, tests)[0])
        history["local"].append(float(np.mean(local_acc)))
        progress.update(1)
        progress.set_postfix(arm="LIPS" if use_lips else "FedAvg",
                             acc=f"{history['global'][-1]:.3f}")
    return history


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("global", "local"),
                              ("global model on each client's test set",
                               "client model after local training")):
        for arm, hist in results.items():
            ax.plot(range(1, len(hist[key]) + 1), hist[key], label=arm)
        for rnd in results["FedAvg+LIPS"]["masked_rounds"]:
            ax.axvline(rnd + 0.5, color="grey", alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("personalized accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_options(rounds: int) -> argparse.ArgumentParser:
    """The digits run's options (also used by fedml_sp.py), as a parent parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     parents=[run_options(rounds=40)])
    parser.add_argument("--out", default="digits_lips.png", help="PNG of the two curves")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves a core free
    data = load_data(args)
    start = time.perf_counter()
    results = {}
    with tqdm(total=2 * args.rounds, desc="rounds", unit="round") as progress:
        results["FedAvg"] = run_arm(args, data, False, progress)
        results["FedAvg+LIPS"] = run_arm(args, data, True, progress)
    print(f"\n{'round':>5} | {'FedAvg global':>13} {'local':>6} | {'LIPS global':>11} {'local':>6}")
    for rnd in range(args.rounds):
        mark = " *mask" if rnd in results["FedAvg+LIPS"]["masked_rounds"] else ""
        fa, li = results["FedAvg"], results["FedAvg+LIPS"]
        print(f"{rnd:>5} | {fa['global'][rnd]:>13.3f} {fa['local'][rnd]:>6.3f} | "
              f"{li['global'][rnd]:>11.3f} {li['local'][rnd]:>6.3f}{mark}")
    last = max(1, args.rounds // 5)
    for arm, hist in results.items():
        print(f"{arm:<12} mean over the last {last} rounds: global "
              f"{np.mean(hist['global'][-last:]):.3f}, local {np.mean(hist['local'][-last:]):.3f}")
    plot(results, args.out)
    print(f"curves written to {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
