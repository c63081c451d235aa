"""A timm Vision Transformer trained federatedly from scratch, FedAvg vs FedAvg+LIPS, on
scikit-learn's handwritten digits (8x8, 10 classes, ships with scikit-learn), with
Dirichlet label skew across clients.

    python examples/vit_timm.py                       # ~2 minutes on 2 CPU cores
    python examples/vit_timm.py --clients 10 --rounds 30 --compile

The ViT is built from its config (``pretrained=False``): 2x2 patches of the 8x8 image
(16 tokens), width 64, 4 blocks, average pooling. LIPS finds its middle layers itself
(``find_layers``: the attention and MLP weights of the blocks; patch embedding, position
embedding, norms and head exempt). The line marked ``# LIPS`` is all that LIPS adds.

Why digits and not the generated 32x32 shapes of the benchmark: a ViT trained from
scratch on a few thousand of those images stays near chance for minutes of CPU time
(it lacks a CNN's locality prior), so an example on them shows nothing.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import numpy as np
import timm
import torch
from _arms import compare_arms

from lips_wrap import LIPSConfig, find_layers
from lips_wrap.integrations.custom import dirichlet_split, label_distribution, matched_split

NUM_CLASSES = 10


def small_vit() -> torch.nn.Module:
    """A 4-block ViT for 8x8 grey images: 2x2 patches, width 64 (random initialisation)."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
        embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=NUM_CLASSES,
        global_pool="avg", class_token=False,
    )


def load_digits_tensors() -> tuple:
    """scikit-learn's 1797 digits as float images in [0, 1], shape (n, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--train-samples", type=int, default=1200,
                        help="training pool shared out among the clients")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--period", type=int, default=3, help="LIPS mask period")
    parser.add_argument("--compile", action="store_true", help="train torch.compile(vit)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    inputs, targets = load_digits_tensors()
    order = np.random.default_rng(args.seed).permutation(len(targets))
    train_pool, test_pool = order[:args.train_samples], order[args.train_samples:]
    labels = targets.numpy()
    train = [train_pool[p] for p in dirichlet_split(labels[train_pool], args.clients,
                                                    args.alpha, seed=args.seed, min_samples=8)]
    dists = [label_distribution(labels, part, NUM_CLASSES) for part in train]
    tests = [test_pool[p] for p in matched_split(labels[test_pool], dists, 100,
                                                 seed=args.seed)]

    def factory() -> torch.nn.Module:
        model = small_vit()
        return torch.compile(model, backend=args.backend) if args.compile else model

    print(find_layers(factory()).summary())
    arms = {
        "FedAvg": None,
        "FedAvg+LIPS": LIPSConfig(total_rounds=args.rounds, period=args.period),  # LIPS
    }
    results = compare_arms(
        arms, factory, inputs, targets, train, tests, args.rounds, args.epochs,
        args.batch_size, lambda params: torch.optim.AdamW(params, lr=args.lr), args.seed,
    )
    prior = float(np.mean([d.max() for d in dists]))
    print(f"  chance {1 / NUM_CLASSES:.3f}; label prior (each client's most frequent class) "
          f"{prior:.3f}")
    sizes = [len(part) for part in train]
    print(f"{args.clients} clients holding {', '.join(map(str, sizes))} training images")
    return results


if __name__ == "__main__":
    main()
