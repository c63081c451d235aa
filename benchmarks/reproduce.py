"""FedAvg vs FedAvg+LIPS in the paper's low-data regime, scaled to a small CPU machine.

    python benchmarks/reproduce.py --quick     # a few minutes: both arms, 2 seeds, small
    python benchmarks/reproduce.py             # the full run (~50 min, 1 thread)
    python benchmarks/reproduce.py --verify benchmarks/results/shapes-resnet8.json \
        --arm LIPS --seed 0                    # rerun one committed run, compare exactly

Regime (LIPS_METHOD.md, "Reference settings"): ~100 training samples per client,
Dirichlet(0.1) label split, all clients every round, 5 local epochs, SGD lr 0.1
momentum 0.9 with fresh optimizer state each round, batch up to 100, BatchNorm models,
personalized test sets (each client's follows its own label distribution), accuracy
before aggregation (each client's trained model) and after (each client's copy of the
aggregated model, masked on LIPS mask rounds). Scaled down: fewer clients and rounds
than the paper's 100 clients x 300 rounds, smaller models, and synthetic or tiny data.
Every run is deterministic given its seed with one torch thread; the JSON records the
exact configuration of each setup.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import ResNet8, vgg_bn  # noqa: E402

from lips_wrap import InertiaTracker, LIPSConfig  # noqa: E402
from lips_wrap.integrations.custom import (  # noqa: E402
    dirichlet_split,
    label_distribution,
    matched_split,
    simulate,
)
from lips_wrap.integrations.synthetic import make_shapes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAST = 5  # accuracies are averaged over the last LAST rounds

ARMS: Dict[str, Optional[dict]] = {
    "FedAvg": None,
    "LIPS": {"start_density": 0.5, "score": "sensitivity"},
    "LIPS d0=0.3": {"start_density": 0.3, "score": "sensitivity"},
    "LIPS magnitude": {"start_density": 0.5, "score": "magnitude"},
}
MAIN_ARMS = ("FedAvg", "LIPS")

FULL = {
    "digits-vgg": {"task": "digits", "model": "vgg", "clients": 10, "rounds": 30,
                   "seeds": 5, "ablation_seeds": 0, "test_per_client": 100},
    "shapes-resnet8": {"task": "shapes", "model": "resnet8", "clients": 5, "rounds": 25,
                       "seeds": 10, "ablation_seeds": 5, "test_per_client": 100},
}
QUICK = {
    "digits-vgg": {"task": "digits", "model": "vgg", "clients": 6, "rounds": 10,
                   "seeds": 2, "ablation_seeds": 0, "test_per_client": 60},
    "shapes-resnet8": {"task": "shapes", "model": "resnet8", "clients": 4, "rounds": 10,
                       "seeds": 2, "ablation_seeds": 0, "test_per_client": 60},
}
COMMON = {"alpha": 0.1, "samples_per_client": 100, "epochs": 5, "batch_size": 100,
          "lr": 0.1, "momentum": 0.9, "period": 5, "data_seed": 0}


def load_task(setup: dict, seed: int):
    """Inputs, labels, per-client training and test indices of one seed's split."""
    train_n = setup["clients"] * setup["samples_per_client"]
    if setup["task"] == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.long)
        order = np.random.default_rng(setup["data_seed"]).permutation(len(y))
        train_pool, test_pool = order[:train_n], order[train_n:]
        if len(test_pool) < 300:
            raise ValueError(f"digits has too few samples for {setup['clients']} clients")
    elif setup["task"] == "shapes":
        x_train, y_train = make_shapes(train_n, seed=setup["data_seed"])
        x_test, y_test = make_shapes(2000, seed=setup["data_seed"] + 10_000)
        x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
        train_pool, test_pool = np.arange(train_n), np.arange(train_n, len(y))
    else:
        raise ValueError(f"unknown task {setup['task']!r}; accepted: digits, shapes")
    parts = dirichlet_split(y[train_pool], setup["clients"], setup["alpha"], seed=seed,
                            min_samples=10)
    train = [train_pool[p] for p in parts]
    dists = [label_distribution(y, t, 10) for t in train]
    tests = [test_pool[p] for p in matched_split(y[test_pool], dists,
                                                 setup["test_per_client"], seed=seed)]
    return x, y, train, tests


def model_factory(setup: dict):
    channels = 1 if setup["task"] == "digits" else 3
    if setup["model"] == "vgg":
        layout = (16, 32, "M", 64, 64, "M") if setup["task"] == "digits" else \
            (32, "M", 64, "M", 128, 128, "M")
        return lambda: vgg_bn(channels, 10, layout)
    if setup["model"] == "resnet8":
        return lambda: ResNet8(channels, 10, (8, 16, 32))
    raise ValueError(f"unknown model {setup['model']!r}; accepted: vgg, resnet8")


def run_one(setup: dict, arm: str, seed: int, progress: Optional[tqdm] = None,
            tracker_out: Optional[Path] = None) -> dict:
    """One simulation; returns its curves and summary metrics."""
    x, y, train, tests = load_task(setup, seed)
    factory = model_factory(setup)
    lips = None
    if ARMS[arm] is not None:
        lips = LIPSConfig(total_rounds=setup["rounds"], period=setup["period"], seed=seed,
                          **ARMS[arm])
    callbacks = []
    tracker = None
    if tracker_out is not None:
        torch.manual_seed(seed)  # the same initial weights as simulate() builds
        tracker = InertiaTracker(factory(), all_layers=True)
        callbacks.append(lambda rnd, model, history: tracker.update(model))
    if progress is not None:
        def tick(rnd, model, history):
            progress.update(1)
            progress.set_postfix(arm=arm, seed=seed, before=f"{history[-1].before:.3f}")
        callbacks.append(tick)
    start = time.process_time()
    history = simulate(
        factory, x, y, train, tests, setup["rounds"], setup["epochs"], setup["batch_size"],
        lambda params: torch.optim.SGD(params, lr=setup["lr"], momentum=setup["momentum"]),
        lips, seed=seed, callbacks=callbacks,
    )
    if tracker is not None:
        tracker.to_json(tracker_out.with_suffix(".json"))
        tracker.plot(tracker_out.with_suffix(".png"),
                         title=f"{setup['name']}: {arm} (seed {seed}), global model")
    before = [r.before for r in history]
    after = [r.after for r in history]
    return {
        "seed": seed,
        "before": before,
        "after": after,
        "masked_rounds": [r.round for r in history if r.masked],
        "before_last": float(np.mean(before[-LAST:])),
        "after_last": float(np.mean(after[-LAST:])),
        "after_final": after[-1],
        "cpu_seconds": round(time.process_time() - start, 1),
    }


def t_quantile(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarise(runs: Dict[str, List[dict]]) -> dict:
    """Mean/std per arm and the paired difference to FedAvg (same seeds) with a 95% CI."""
    summary = {}
    base = {r["seed"]: r for r in runs.get("FedAvg", [])}
    for arm, arm_runs in runs.items():
        entry = {"n": len(arm_runs)}
        for metric in ("after_last", "before_last", "after_final"):
            values = np.array([r[metric] for r in arm_runs])
            entry[metric] = {"mean": float(values.mean()),
                             "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            pairs = [r[metric] - base[r["seed"]][metric] for r in arm_runs if r["seed"] in base]
            if arm != "FedAvg" and pairs:
                diff = np.array(pairs)
                half = (t_quantile(len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
                        if len(diff) > 1 else math.nan)
                entry[metric]["diff_vs_fedavg"] = {
                    "mean": float(diff.mean()), "ci95": [float(diff.mean() - half),
                                                         float(diff.mean() + half)],
                    "n_pairs": len(diff)}
        summary[arm] = entry
    return summary


def table(name: str, summary: dict) -> str:
    lines = [f"\n{name}  (personalized accuracy, mean over the last {LAST} rounds; "
             "diff = paired vs FedAvg, 95% CI)",
             f"{'arm':<15} {'n':>2}  {'after aggregation':>18}  {'diff [95% CI]':>26}  "
             f"{'before aggregation':>18}  {'diff [95% CI]':>26}"]
    for arm, entry in summary.items():
        cells = []
        for metric in ("after_last", "before_last"):
            m = entry[metric]
            cells.append(f"{m['mean']:>10.3f} ± {m['std']:.3f}")
            d = m.get("diff_vs_fedavg")
            cells.append(f"{d['mean']:>+8.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                         if d else f"{'':>26}")
        lines.append(f"{arm:<15} {entry['n']:>2}  {cells[0]:>18}  {cells[1]:>26}  "
                     f"{cells[2]:>18}  {cells[3]:>26}")
    return "\n".join(lines)


def plot_curves(name: str, runs: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("after", "before"),
                              ("after aggregation", "before aggregation")):
        for arm, arm_runs in runs.items():
            curves = np.array([r[key] for r in arm_runs])
            mean = curves.mean(axis=0)
            rounds = np.arange(1, len(mean) + 1)
            line, = ax.plot(rounds, mean, label=f"{arm} (n={len(arm_runs)})")
            if len(arm_runs) > 1:
                ax.fill_between(rounds, curves.min(axis=0), curves.max(axis=0),
                                color=line.get_color(), alpha=0.12)
        ax.set_title(f"{name}: {title}", fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("personalized accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan_runs(setups: Dict[str, dict]) -> List[tuple]:
    """Main arms for every seed first, then the ablations."""
    runs = []
    for name, setup in setups.items():
        for seed in range(setup["seeds"]):
            runs += [(name, arm, seed) for arm in MAIN_ARMS]
    for name, setup in setups.items():
        for seed in range(setup["ablation_seeds"]):
            runs += [(name, arm, seed) for arm in ARMS if arm not in MAIN_ARMS]
    return runs


SEED_COUNTS = ("seeds", "ablation_seeds")


def load_finished(setups: Dict[str, dict], out: Path) -> Dict[str, dict]:
    """Results already in ``out`` whose setup matches (all but the seed counts): a
    resumed run keeps them, since a run is determined by its setup and seed."""
    results = {name: {"config": setup, "runs": {}} for name, setup in setups.items()}
    for name, setup in setups.items():
        path = out / f"{name}.json"
        if not path.exists():
            continue
        stored = json.loads(path.read_text())
        same = {k: v for k, v in stored["config"].items() if k not in SEED_COUNTS} == \
            {k: v for k, v in setup.items() if k not in SEED_COUNTS}
        if not same:
            raise SystemExit(f"{path} was made with another setup; move it away or "
                             "run without --resume")
        results[name]["runs"] = stored["runs"]
    return results


def run_all(setups: Dict[str, dict], out: Path, resume: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = (load_finished(setups, out) if resume
               else {name: {"config": setup, "runs": {}} for name, setup in setups.items()})
    done = {(name, arm, run["seed"]) for name, result in results.items()
            for arm, runs in result["runs"].items() for run in runs}
    plan = [job for job in plan_runs(setups) if job not in done]
    total_rounds = sum(setups[name]["rounds"] for name, _, _ in plan)
    with tqdm(total=total_rounds, desc="rounds", unit="round") as progress:
        for name, arm, seed in plan:
            setup = setups[name]
            tracker = (out / f"{name}_{arm}_inertia" if seed == 0 and arm in MAIN_ARMS
                       else None)
            run = run_one(setup, arm, seed, progress, tracker)
            results[name]["runs"].setdefault(arm, []).append(run)
            results[name]["config"] = setup
            results[name]["summary"] = summarise(results[name]["runs"])
            (out / f"{name}.json").write_text(json.dumps(results[name], indent=1))
    replot(out)
    print(f"\nresults in {out}")


def inertia_summary(out: Path, name: str, last: int = 10) -> Dict[str, Dict[str, float]]:
    """Mean relative update over the last ``last`` rounds of the first layer, the
    middle layers and the last layer of the global model, per tracked arm."""
    summary = {}
    for arm in MAIN_ARMS:
        path = out / f"{name}_{arm}_inertia.json"
        if path.exists():
            updates = InertiaTracker.from_json(path).relative_update[:, -last:]
            summary[arm] = {"first": float(updates[0].mean()),
                            "middle": float(updates[1:-1].mean()),
                            "last": float(updates[-1].mean())}
    return summary


def plot_inertia_comparison(out: Path, name: str) -> None:
    """One panel: mean relative update of the middle layers, FedAvg vs LIPS, with the
    first and last layers dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for arm in MAIN_ARMS:
        path = out / f"{name}_{arm}_inertia.json"
        if not path.exists():
            continue
        updates = InertiaTracker.from_json(path).relative_update
        rounds = np.arange(updates.shape[1])
        line, = ax.plot(rounds, updates[1:-1].mean(axis=0), label=f"{arm}: middle layers")
        ax.plot(rounds, updates[0], ":", color=line.get_color(), alpha=0.7,
                label=f"{arm}: first layer")
        ax.plot(rounds, updates[-1], "--", color=line.get_color(), alpha=0.7,
                label=f"{arm}: last layer")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("||W_t - W_t-1|| / ||W_t-1||")
    ax.set_title(f"{name}: global model, seed 0", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_inertia_compare.png", dpi=110)
    plt.close(fig)


def replot(out: Path) -> None:
    """Redraw every figure and reprint every table from the JSON files in ``out``."""
    for path in sorted(out.glob("*.json")):
        if path.stem.endswith("_inertia"):
            continue
        result = json.loads(path.read_text())
        name = result["config"]["name"]
        plot_curves(name, result["runs"], out / f"{name}_accuracy.png")
        for arm in MAIN_ARMS:
            inertia = out / f"{name}_{arm}_inertia.json"
            if inertia.exists():
                InertiaTracker.from_json(inertia).plot(
                    inertia.with_suffix(".png"),
                    title=f"{name}: {arm} (seed 0), global model")
        plot_inertia_comparison(out, name)
        print(table(name, summarise(result["runs"])))
        for arm, groups in inertia_summary(out, name).items():
            print(f"  inertia, {arm:<7} mean relative update over the last 10 rounds: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in groups.items()))


def verify(path: Path, arm: str, seed: int) -> int:
    stored = json.loads(path.read_text())
    match = [r for r in stored["runs"].get(arm, []) if r["seed"] == seed]
    if not match:
        print(f"{path} holds no run of arm {arm!r} with seed {seed}", file=sys.stderr)
        return 2
    with tqdm(total=stored["config"]["rounds"], desc="rerun", unit="round") as progress:
        rerun = run_one(stored["config"], arm, seed, progress)
    for key in ("before", "after"):
        same = np.allclose(rerun[key], match[0][key], atol=1e-9)
        print(f"{key:>6}: stored {match[0][key][-1]:.4f}, rerun {rerun[key][-1]:.4f} "
              f"(last round); every round identical: {same}")
    ok = all(np.allclose(rerun[k], match[0][k], atol=1e-9) for k in ("before", "after"))
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings, a few minutes")
    parser.add_argument("--setup", action="append", choices=sorted(FULL),
                        help="run only these setups (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result folder (default {RESULTS}, or its quick/ for --quick)")
    parser.add_argument("--verify", type=Path, help="a results JSON to rerun one run of")
    parser.add_argument("--arm", default="LIPS", choices=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs found in --out, run only the missing")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw figures and tables from the JSON files in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: exact reruns)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.verify:
        return verify(args.verify, args.arm, args.seed)
    if args.replot:
        replot(args.out or RESULTS)
        return 0
    chosen = QUICK if args.quick else FULL
    names = args.setup or list(chosen)
    setups = {name: {"name": name, **COMMON, **chosen[name]} for name in names}
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    run_all(setups, out, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
