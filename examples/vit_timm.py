"""A timm Vision Transformer trained federatedly, FedAvg vs FedAvg+LIPS, on generated
32x32 shape images (10 classes, no download), with Dirichlet(0.1) label skew.

    python examples/vit_timm.py                       # a few minutes on 2 CPU cores
    python examples/vit_timm.py --clients 8 --rounds 20

LIPS finds the ViT's middle layers itself (``find_layers``: the attention and MLP
weights of the blocks; patch embedding, position embedding, norms and head exempt).
The line marked ``# LIPS`` is all that LIPS adds to the run.

A ViT trained from scratch on a few hundred images learns slowly: in the default few
minutes the accuracies stay near the label prior (chance for the aggregated model).
The example shows the integration; raise --rounds, --epochs and --samples-per-client
(and the time) for a model that learns the task.
"""

from __future__ import annotations

import argparse

import numpy as np
import timm
import torch
from _arms import compare_arms

from lips_wrap import LIPSConfig, find_layers
from lips_wrap.integrations.custom import dirichlet_split, label_distribution, matched_split
from lips_wrap.integrations.synthetic import NUM_CLASSES, make_shapes


def small_vit() -> torch.nn.Module:
    """A 4-block ViT for 32x32 images: 4x4 patches, width 64 (random initialisation)."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
        embed_dim=64, depth=4, num_heads=4, num_classes=NUM_CLASSES,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--samples-per-client", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--period", type=int, default=3, help="LIPS mask period")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_n = args.clients * args.samples_per_client
    x_train, y_train = make_shapes(train_n, seed=args.seed)
    x_test, y_test = make_shapes(1000, seed=args.seed + 10_000)
    inputs, targets = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    train = dirichlet_split(y_train, args.clients, 0.1, seed=args.seed, min_samples=5)
    dists = [label_distribution(y_train, part, NUM_CLASSES) for part in train]
    tests = [part + train_n for part in matched_split(y_test, dists, 100, seed=args.seed)]

    print(find_layers(small_vit()).summary())
    arms = {
        "FedAvg": None,
        "FedAvg+LIPS": LIPSConfig(total_rounds=args.rounds, period=args.period),  # LIPS
    }
    compare_arms(
        arms, small_vit, inputs, targets, train, tests, args.rounds, args.epochs,
        args.batch_size, lambda params: torch.optim.AdamW(params, lr=args.lr), args.seed,
    )
    sizes = [len(part) for part in train]
    print(f"{args.clients} clients, {np.mean(sizes):.0f} training samples each on average")


if __name__ == "__main__":
    main()
