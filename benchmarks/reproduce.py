"""FedAvg vs FedAvg+LIPS in the paper's low-data regime, scaled to a small CPU machine.

    python benchmarks/reproduce.py --quick     # a few minutes: every setup, small sizes
    python benchmarks/reproduce.py --setup shapes-resnet8-many --workers 2 --resume
                                               # issue 12: 20 clients x 100 rounds, 5 arms,
                                               # 40 runs, ~100 min on 2 free cores
    python benchmarks/reproduce.py --replot    # figures and tables from the JSON files
    python benchmarks/reproduce.py --verify benchmarks/results/shapes-resnet8.json \
        --arm LIPS --seed 0                    # rerun one committed run, compare exactly

Regime (the paper's reference settings, see docs/method.md): ~100 training samples per client,
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
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paper  # noqa: E402
from inertia import WINDOWS, group_means, inertia_ratio, ratio_by_window  # noqa: E402
from models import ResNet8, resnet8_reference, vgg11_bn_reference, vgg_bn  # noqa: E402

from lips_wrap import InertiaTracker, LIPSConfig  # noqa: E402
from lips_wrap.data import make_shapes  # noqa: E402
from lips_wrap.integrations.custom import (  # noqa: E402
    dirichlet_split,
    label_distribution,
    local_train,
    matched_split,
    personalized_accuracy,
    simulate,
)

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_MODELS = {"resnet8-reference": resnet8_reference, "vgg11-reference": vgg11_bn_reference}
"""The paper's own models (benchmarks/models.py), by setup name."""
LAST = 5  # accuracies are averaged over the last LAST rounds
EARLY = 20  # the early inertia ratio is taken over rounds 1 .. EARLY - 1

ARMS: Dict[str, Optional[dict]] = {
    "FedAvg": None,
    "LIPS": {"start_density": 0.5, "score": "sensitivity"},
    "LIPS d0=0.3": {"start_density": 0.3, "score": "sensitivity"},
    "LIPS magnitude": {"start_density": 0.5, "score": "magnitude"},
    # the server masks the global model (mask_global_state); clients keep no gradients
    "LIPS server": {"start_density": 0.5, "score": "sensitivity", "side": "server"},
    # the same schedule with random scores: any transient perturbation, no selection
    "LIPS random": {"start_density": 0.5, "score": "random"},
    # the server-side and random controls at the reference ResNet-8's density
    "LIPS server d0=0.3": {"start_density": 0.3, "score": "sensitivity", "side": "server"},
    "LIPS random d0=0.3": {"start_density": 0.3, "score": "random"},
}
MAIN_ARMS = ("FedAvg", "LIPS")
OLD_ABLATIONS = ("LIPS d0=0.3", "LIPS magnitude")
# paired contrasts reported beside "vs FedAvg": (arm, reference arm)
CONTRASTS = (("LIPS random", "LIPS"), ("LIPS server", "LIPS"), ("LIPS d0=0.3", "LIPS"),
             ("LIPS random d0=0.3", "LIPS d0=0.3"), ("LIPS server d0=0.3", "LIPS d0=0.3"))

FULL = {
    "digits-vgg": {"task": "digits", "model": "vgg", "clients": 10, "rounds": 30,
                   "seeds": 5, "ablation_seeds": 0, "test_per_client": 100},
    "shapes-resnet8": {"task": "shapes", "model": "resnet8", "clients": 5, "rounds": 25,
                       "seeds": 10, "ablation_seeds": 5, "test_per_client": 100},
    # the paper's regime scaled down: many clients, little data each, many rounds
    "shapes-resnet8-many": {"task": "shapes", "model": "resnet8", "clients": 20,
                            "rounds": 100, "seeds": 10, "ablation_seeds": 5,
                            "test_per_client": 100, "resolution": 16,
                            "widths": [8, 16, 32],
                            "arms": ["FedAvg", "LIPS", "LIPS server"],
                            "ablations": ["LIPS random", "LIPS d0=0.3"]},
}
QUICK = {
    "digits-vgg": {"task": "digits", "model": "vgg", "clients": 6, "rounds": 10,
                   "seeds": 2, "ablation_seeds": 0, "test_per_client": 60},
    "shapes-resnet8": {"task": "shapes", "model": "resnet8", "clients": 4, "rounds": 10,
                       "seeds": 2, "ablation_seeds": 0, "test_per_client": 60},
    "shapes-resnet8-many": {"task": "shapes", "model": "resnet8", "clients": 10,
                            "rounds": 20, "seeds": 2, "ablation_seeds": 1,
                            "test_per_client": 60, "resolution": 16,
                            "widths": [8, 16, 32],
                            "arms": ["FedAvg", "LIPS", "LIPS server"],
                            "ablations": ["LIPS random", "LIPS d0=0.3"]},
}
# the many-clients setup with the narrow ResNet-8 at twice the width (16/32/64; not the
# paper's ResNet-8, see shapes-paper-resnet8); channels_last only makes the convolutions
# faster (the same model and numbers up to float rounding)
WIDE = {"widths": [16, 32, 64], "channels_last": True}
FULL["shapes-resnet8-wide"] = {**FULL["shapes-resnet8-many"], **WIDE}
QUICK["shapes-resnet8-wide"] = {**QUICK["shapes-resnet8-many"], **WIDE,
                               "clients": 6, "rounds": 10, "seeds": 1, "ablation_seeds": 1}
# the paper's ResNet-8 (benchmarks/models.py: 7x7 stem, 64/128/256) in the many-clients
# protocol; 16x16 shapes keep a run near 8 CPU-minutes. d0 0.3 is the paper's density
# for this model; the controls run at that density.
PAPER_RESNET8_ARMS = {"model": "resnet8-reference", "channels_last": True,
                      "arms": ["FedAvg", "LIPS d0=0.3", "LIPS"],
                      "ablations": ["LIPS server d0=0.3", "LIPS random d0=0.3"]}
FULL["shapes-paper-resnet8"] = {**FULL["shapes-resnet8-many"], **PAPER_RESNET8_ARMS,
                                "seeds": 10, "ablation_seeds": 5}
FULL["shapes-paper-resnet8"].pop("widths")
QUICK["shapes-paper-resnet8"] = {**QUICK["shapes-resnet8-wide"], **PAPER_RESNET8_ARMS}
QUICK["shapes-paper-resnet8"].pop("widths")
# the paper's own setups (benchmarks/paper.py): CIFAR from --data-dir, 100 clients x 300
# rounds; the arms at the paper's density for the dataset
for _name, _paper in paper.SETUPS.items():
    _lips = "LIPS" if _paper["density"] == 0.5 else f"LIPS d0={_paper['density']}"
    _suffix = "" if _paper["density"] == 0.5 else f" d0={_paper['density']}"
    FULL[_name] = {**paper.PROTOCOL, **_paper, "seeds": 3, "ablation_seeds": 3,
                   "arms": ["FedAvg", _lips],
                   "ablations": [f"LIPS server{_suffix}", f"LIPS random{_suffix}"]}
PAPER = tuple(paper.SETUPS)
RUNTIME_KEYS = ("data_dir", "device")
"""Where a run reads its data and runs: recorded, but not part of what makes two runs
the same setup."""
# grad_dtype: the stored gradients' dtype, float16 as the reference keeps them (and as
# every committed run was made, before the package's default became bfloat16)
COMMON = {"alpha": 0.1, "samples_per_client": 100, "epochs": 5, "batch_size": 100,
          "lr": 0.1, "momentum": 0.9, "period": 5, "data_seed": 0, "grad_dtype": "float16"}


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
    elif setup["task"] in paper.FOLDERS:
        return _on_device(setup, *paper.load_paper_task(setup, seed))
    else:
        raise ValueError(f"unknown task {setup['task']!r}; accepted: digits, shapes, "
                         + ", ".join(paper.FOLDERS))
    resolution = setup.get("resolution")
    if resolution is not None and resolution != x.shape[-1]:
        # the generator draws 32x32; smaller images make a run proportionally cheaper
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution),
                                            mode="bilinear", antialias=True,
                                            align_corners=False)
    if setup.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    parts = dirichlet_split(y[train_pool], setup["clients"], setup["alpha"], seed=seed,
                            min_samples=10)
    train = [train_pool[p] for p in parts]
    dists = [label_distribution(y, t, 10) for t in train]
    tests = [test_pool[p] for p in matched_split(y[test_pool], dists,
                                                 setup["test_per_client"], seed=seed)]
    return _on_device(setup, x, y, train, tests)


def _on_device(setup: dict, x, y, train, tests):
    """The task with its inputs and labels moved to the setup's device (once: every
    client's batches are then cut on the device)."""
    device = torch.device(setup.get("device", "cpu"))
    return x.to(device), y.to(device), train, tests


def model_factory(setup: dict):
    """The setup's model constructor; with ``"channels_last"`` every model it builds is
    stored in that memory format (the same model, a faster training step on CPU)."""
    build, device = _base_factory(setup), torch.device(setup.get("device", "cpu"))
    if setup.get("channels_last"):
        return lambda: build().to(device, memory_format=torch.channels_last)
    return lambda: build().to(device)


def _base_factory(setup: dict):
    channels = 1 if setup["task"] == "digits" else 3
    if setup["model"] == "vgg":
        layout = (16, 32, "M", 64, 64, "M") if setup["task"] == "digits" else \
            (32, "M", 64, "M", 128, 128, "M")
        return lambda: vgg_bn(channels, 10, layout)
    if setup["model"] == "resnet8":
        widths = tuple(setup.get("widths", (8, 16, 32)))
        return lambda: ResNet8(channels, 10, widths)
    if setup["model"] in REFERENCE_MODELS:
        build, classes = REFERENCE_MODELS[setup["model"]], setup.get("classes", 10)
        return lambda: build(channels, classes)
    raise ValueError(f"unknown model {setup['model']!r}; accepted: vgg, resnet8, "
                     + ", ".join(REFERENCE_MODELS))


def run_one(setup: dict, arm: str, seed: int, progress: Optional[tqdm] = None,
            tracker_out: Optional[Path] = None) -> dict:
    """One simulation; returns its curves and summary metrics."""
    x, y, train, tests = load_task(setup, seed)
    factory = model_factory(setup)
    lips, side = None, "client"
    if ARMS[arm] is not None:
        options = dict(ARMS[arm])
        side = options.pop("side", "client")
        lips = LIPSConfig(total_rounds=setup["rounds"], period=setup["period"], seed=seed,
                          grad_dtype=setup["grad_dtype"], **options)
    torch.manual_seed(seed)  # the same initial weights as simulate() builds
    tracker = InertiaTracker(factory(), all_layers=True)
    callbacks = [lambda rnd, model, history: tracker.update(model)]
    if progress is None and os.environ.get("LIPS_BENCH_LOG"):
        def log(rnd, model, history):
            if (rnd + 1) % 20 == 0:
                print(f"  {setup['name']} {arm} seed {seed}: round {rnd + 1}, before "
                      f"{history[-1].before:.3f}, {time.process_time() - start:.0f} cpu s",
                      flush=True)
        callbacks.append(log)
    if progress is not None:
        def tick(rnd, model, history):
            progress.update(1)
            progress.set_postfix(arm=arm, seed=seed, before=f"{history[-1].before:.3f}")
        callbacks.append(tick)
    device = torch.device(setup.get("device", "cpu"))
    finish_times: List[float] = []

    def timed(rnd, model, history):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finish_times.append(time.perf_counter())
    callbacks.append(timed)
    final_state: Dict[str, torch.Tensor] = {}  # the last global model, for the fine-tune

    def keep_final(rnd, model, history):
        if rnd == setup["rounds"] - 1:
            final_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    if setup.get("finetune_epochs"):
        callbacks.append(keep_final)
    start, wall_start = time.process_time(), time.perf_counter()
    history = simulate(
        factory, x, y, train, tests, setup["rounds"], setup["epochs"], setup["batch_size"],
        lambda params: torch.optim.SGD(params, lr=setup["lr"], momentum=setup["momentum"]),
        lips, seed=seed, callbacks=callbacks, server_side=side == "server",
    )
    if tracker_out is not None:
        tracker.to_json(tracker_out.with_name(tracker_out.name + ".json"))
        tracker.plot(tracker_out.with_name(tracker_out.name + ".png"),
                     title=f"{setup['name']}: {arm} (seed {seed}), global model")
    before = [r.before for r in history]
    after = [r.after for r in history]
    extra = {}
    if setup.get("finetune_epochs"):
        extra["finetuned"] = finetune_accuracy(setup, factory, final_state, x, y, train,
                                               tests, seed)
    # wall seconds per round, round 0 left out (it pays for warm-up: allocations,
    # kernel selection, caches) when there are later rounds
    laps = np.diff([wall_start] + finish_times)
    steady = laps[1:] if laps.size > 1 else laps
    return {
        **extra,
        "seconds_per_round": float(f"{steady.mean():.4g}"),
        "seconds_first_round": float(f"{laps[0]:.4g}"),
        "seed": seed,
        "before": before,
        "after": after,
        "masked_rounds": [r.round for r in history if r.masked],
        "before_last": float(np.mean(before[-LAST:])),
        "after_last": float(np.mean(after[-LAST:])),
        "after_final": after[-1],
        "cpu_seconds": round(time.process_time() - start, 1),
        "inertia": group_means(tracker.relative_update),
        "inertia_layers": tracker.layers,
        "relative_update": _rounded(tracker.relative_update),
        # the reference's inertia measures: each layer's drift from the round-2 global
        # model (cosine, L2 distance) and its weight norm, layers x rounds
        "cosine_to_anchor": _rounded(tracker.cosine_to_anchor),
        "distance_to_anchor": _rounded(tracker.distance_to_anchor),
        "weight_norm": _rounded(tracker.weight_norm),
    }


def finetune_accuracy(setup: dict, factory, global_state: Dict[str, torch.Tensor], x, y,
                      train, tests, seed: int) -> float:
    """The paper's last metric: every client trains the final global model for
    ``finetune_epochs`` local epochs (fresh SGD) and is tested on its own test set;
    the mean over clients."""
    model = factory()
    generator = torch.Generator().manual_seed(seed + 1)
    accuracies = []
    for indices, test in zip(train, tests):
        model.load_state_dict(global_state)
        optimizer = torch.optim.SGD(model.parameters(), lr=setup["lr"],
                                    momentum=setup["momentum"])
        local_train(model, optimizer, x[indices], y[indices], setup["finetune_epochs"],
                    setup["batch_size"], generator)
        accuracies.append(personalized_accuracy(model, x, y, [test])[0])
    return float(np.mean(accuracies))


def _rounded(rows: np.ndarray) -> List[List[Optional[float]]]:
    """Five significant digits, NaN as null (JSON)."""
    return [[float(f"{v:.5g}") if math.isfinite(v) else None for v in row] for row in rows]


def t_quantile(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired(runs: List[dict], reference: List[dict], metric: str) -> Optional[dict]:
    """Mean paired difference ``runs - reference`` over the seeds both hold, with a
    95% t-interval (NaN bounds for a single pair)."""
    base = {r["seed"]: r[metric] for r in reference}
    diff = np.array([r[metric] - base[r["seed"]] for r in runs if r["seed"] in base])
    if diff.size == 0:
        return None
    half = (t_quantile(diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size)
            if diff.size > 1 else math.nan)
    return {"mean": float(diff.mean()),
            "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
            "n_pairs": int(diff.size)}


def summarise(runs: Dict[str, List[dict]]) -> dict:
    """Per arm: mean/std of each metric, the paired difference to FedAvg (same seeds)
    with a 95% CI, the paired contrasts of CONTRASTS, and the inertia ratio."""
    summary = {}
    for arm, arm_runs in runs.items():
        entry = {"n": len(arm_runs)}
        for metric in ("after_last", "before_last", "after_final"):
            values = np.array([r[metric] for r in arm_runs])
            entry[metric] = {"mean": float(values.mean()),
                             "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            if arm != "FedAvg" and "FedAvg" in runs:
                diff = paired(arm_runs, runs["FedAvg"], metric)
                if diff is not None:
                    entry[metric]["diff_vs_fedavg"] = diff
            for contrast, reference in CONTRASTS:
                if arm == contrast and reference in runs:
                    diff = paired(arm_runs, runs[reference], metric)
                    if diff is not None:
                        entry[metric][f"diff_vs_{reference}"] = diff
        # recomputed from the stored curves, so the definition is the current one
        groups = [group_means(r["relative_update"]) for r in arm_runs
                  if "relative_update" in r]
        ratios = np.array([g["ratio"] for g in groups])
        if ratios.size:
            entry["inertia_ratio"] = {"mean": float(ratios.mean()),
                                      "std": float(ratios.std(ddof=1)) if ratios.size > 1
                                      else 0.0,
                                      "min": float(ratios.min()), "max": float(ratios.max()),
                                      "n": int(ratios.size)}
            unmasked = [inertia_ratio(r["relative_update"], exclude_rounds=r["masked_rounds"])
                        for r in arm_runs if "relative_update" in r]
            early = [inertia_ratio(np.array(r["relative_update"])[:, :EARLY], warmup=1)
                     for r in arm_runs if len(r.get("relative_update", [[]])[0]) > EARLY]
            if early:
                entry["inertia_ratio_early"] = {
                    "rounds": [1, EARLY - 1], "mean": float(np.mean(early)),
                    "min": float(np.min(early)), "max": float(np.max(early))}
            if unmasked:
                entry["inertia_ratio_unmasked_rounds"] = {
                    "mean": float(np.mean(unmasked)), "min": float(np.min(unmasked)),
                    "max": float(np.max(unmasked))}
            per_run = [ratio_by_window(r["relative_update"],
                                       min(WINDOWS, len(r["relative_update"][0])))
                       for r in arm_runs if "relative_update" in r]
            windows = np.array([[w.ratio for w in spans] for spans in per_run])
            entry["inertia_ratio_by_window"] = [
                {"rounds": [w.start, w.stop - 1], "mean": float(column.mean()),
                 "min": float(column.min()), "max": float(column.max())}
                for w, column in zip(per_run[0], windows.T)]
            for group in ("first", "middle", "last"):
                entry[f"inertia_{group}"] = float(np.mean([g[group] for g in groups]))
        summary[arm] = entry
    return summary


def _diff_cell(d: Optional[dict]) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""


def table(name: str, summary: dict) -> str:
    lines = [f"\n{name}  (personalized accuracy, mean over the last {LAST} rounds; "
             "diff = paired vs FedAvg, 95% CI; inertia ratio under the arm, mean [min, max])",
             f"{'arm':<19} {'n':>2}  {'after aggregation':>18}  {'diff [95% CI]':>26}  "
             f"{'before aggregation':>18}  {'diff [95% CI]':>26}  {'inertia ratio':>22}"]
    for arm, entry in summary.items():
        cells = []
        for metric in ("after_last", "before_last"):
            m = entry[metric]
            cells.append(f"{m['mean']:>10.3f} ± {m['std']:.3f}")
            cells.append(_diff_cell(m.get("diff_vs_fedavg")))
        ratio = entry.get("inertia_ratio")
        cells.append(f"{ratio['mean']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]"
                     if ratio else "")
        lines.append(f"{arm:<19} {entry['n']:>2}  {cells[0]:>18}  {cells[1]:>26}  "
                     f"{cells[2]:>18}  {cells[3]:>26}  {cells[4]:>22}")
    for contrast, reference in CONTRASTS:
        if contrast in summary and f"diff_vs_{reference}" in summary[contrast]["after_last"]:
            a = summary[contrast]["after_last"][f"diff_vs_{reference}"]
            b = summary[contrast]["before_last"][f"diff_vs_{reference}"]
            lines.append(f"  {contrast} - {reference} (paired, n={a['n_pairs']}): after "
                         f"{_diff_cell(a)}, before {_diff_cell(b)}")
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
            line, = ax.plot(rounds, mean, label=f"{arm} (n={len(arm_runs)})", lw=1.2)
            if len(arm_runs) > 1:
                ax.fill_between(rounds, curves.min(axis=0), curves.max(axis=0),
                                color=line.get_color(), alpha=0.08)
        ax.set_title(f"{name}: {title}", fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("personalized accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arms_of(setup: dict) -> tuple:
    """(main arms, ablation arms) of a setup."""
    return (tuple(setup.get("arms", MAIN_ARMS)),
            tuple(setup.get("ablations", OLD_ABLATIONS)))


def plan_runs(setups: Dict[str, dict]) -> List[tuple]:
    """Seed by seed, every arm that seed is planned for (main arms, then ablations), so
    that a run stopped early still holds paired seeds of every arm."""
    runs = []
    for name, setup in setups.items():
        main, ablations = arms_of(setup)
        for seed in range(max(setup["seeds"], setup["ablation_seeds"])):
            runs += [(name, arm, seed) for arm in main if seed < setup["seeds"]]
            runs += [(name, arm, seed) for arm in ablations if seed < setup["ablation_seeds"]]
    return runs


SEED_COUNTS = ("seeds", "ablation_seeds")


def same_setup(a: dict, b: dict) -> bool:
    ignored = SEED_COUNTS + RUNTIME_KEYS
    return {k: v for k, v in a.items() if k not in ignored} == \
        {k: v for k, v in b.items() if k not in ignored}


def run_file(out: Path, name: str, arm: str, seed: int) -> Path:
    """Where one finished run is kept (one file per run: parallel workers never share)."""
    slug = arm.replace(" ", "_").replace("=", "")
    return out / "runs" / name / f"{slug}_seed{seed}.json"


def _device_kind(config: dict) -> str:
    return torch.device(config.get("device", "cpu")).type


def _check_stored(stored: dict, setup: dict, path: Path) -> None:
    """Refuse to resume from a run of another setup, or one made on another kind of
    device: its numbers differ in the last bits, so pairing it with this run's seeds
    would compare machines, not arms."""
    if not same_setup(stored, setup):
        raise SystemExit(f"{path} was made with another setup; move it away or run "
                         "without --resume")
    if _device_kind(stored) != _device_kind(setup):
        raise SystemExit(f"{path} was made on {_device_kind(stored)}, this run is on "
                         f"{_device_kind(setup)}: pass --device {_device_kind(stored)} to "
                         "resume it, or use another --out")


def load_finished(setups: Dict[str, dict], out: Path) -> Dict[str, dict]:
    """Results already in ``out`` whose setup matches (all but the seed counts): a
    resumed run keeps them, since a run is determined by its setup and seed. Reads the
    merged ``<setup>.json`` and the per-run files under ``runs/<setup>/``."""
    results = {name: {"config": setup, "runs": {}} for name, setup in setups.items()}
    for name, setup in setups.items():
        path = out / f"{name}.json"
        if path.exists():
            stored = json.loads(path.read_text())
            _check_stored(stored["config"], setup, path)
            results[name]["runs"] = stored["runs"]
        for run_path in sorted((out / "runs" / name).glob("*.json")):
            stored = json.loads(run_path.read_text())
            _check_stored(stored["config"], setup, run_path)
            arm_runs = results[name]["runs"].setdefault(stored["arm"], [])
            if all(r["seed"] != stored["run"]["seed"] for r in arm_runs):
                arm_runs.append(stored["run"])
    return results


def _job(job: tuple) -> tuple:
    """Run one (setup, arm, seed) in a worker process and keep it in its own file."""
    name, setup, arm, seed, out, threads = job
    torch.set_num_threads(threads)
    out = Path(out)
    tracker = (tracker_file(out, name, arm, "")
               if seed == 0 and arm in arms_of(setup)[0] else None)
    run = run_one(setup, arm, seed, None, tracker)
    path = run_file(out, name, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps({"config": setup, "arm": arm, "run": run}))
    partial.replace(path)
    return name, arm, seed, run


def write_merged(out: Path, name: str, result: dict) -> None:
    """``<setup>.json``: the configuration, every run (arms in plan order, seeds in
    order) and the summary; written by the main process only."""
    main, ablations = arms_of(result["config"])
    order = [a for a in main + ablations if a in result["runs"]] + \
        [a for a in result["runs"] if a not in main + ablations]
    result["runs"] = {a: sorted(result["runs"][a], key=lambda r: r["seed"]) for a in order}
    for runs in result["runs"].values():
        for run in runs:
            if "relative_update" in run:  # stored with the current definition
                run["inertia"] = group_means(run["relative_update"])
    result["summary"] = summarise(result["runs"])
    partial = out / f"{name}.json.{os.getpid()}.part"
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(out / f"{name}.json")


def run_all(setups: Dict[str, dict], out: Path, resume: bool = False, workers: int = 1,
            threads: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        results = load_finished(setups, out)
    else:
        results = {name: {"config": setup, "runs": {}} for name, setup in setups.items()}
        for name in setups:
            for stale in (out / "runs" / name).glob("*.json"):
                stale.unlink()
    done = {(name, arm, run["seed"]) for name, result in results.items()
            for arm, runs in result["runs"].items() for run in runs}
    plan = [job for job in plan_runs(setups) if job not in done]
    print(f"{len(plan)} runs to do, {len(done)} already done; {workers} worker(s)", flush=True)
    jobs = [(name, setups[name], arm, seed, str(out), threads) for name, arm, seed in plan]

    def finished(name: str, arm: str, run: dict) -> None:
        results[name]["runs"].setdefault(arm, []).append(run)
        results[name]["config"] = setups[name]
        write_merged(out, name, results[name])

    if workers <= 1:
        for job in tqdm(jobs, desc="runs", unit="run"):
            name, arm, _, run = _job(job)
            finished(name, arm, run)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            for name, arm, seed, run in tqdm(pool.imap_unordered(_job, jobs), total=len(jobs),
                                             desc="runs", unit="run"):
                print(f"done {name} {arm} seed {seed}: after {run['after_last']:.3f} "
                      f"before {run['before_last']:.3f} ratio {run['inertia']['ratio']:.3f} "
                      f"({run['cpu_seconds']:.0f} s)", flush=True)
                finished(name, arm, run)
    for name in setups:
        write_merged(out, name, results[name])
    replot(out)
    print(f"\nresults in {out}")


def tracker_file(out: Path, name: str, arm: str, suffix: str = ".json") -> Path:
    """Where the seed-0 run of a main arm keeps its tracker (``suffix`` "" for the stem)."""
    return out / f"{name}_{arm.replace(' ', '_')}_inertia{suffix}"


def inertia_summary(out: Path, name: str, arms: Sequence[str],
                    last: int = 10) -> Dict[str, Dict[str, float]]:
    """Mean relative update over the last ``last`` rounds of the first layer, the
    middle layers and the last layer of the global model, per arm with a seed-0
    tracker file."""
    summary = {}
    for arm in arms:
        path = tracker_file(out, name, arm)
        if path.exists():
            updates = InertiaTracker.from_json(path).relative_update[:, -last:]
            summary[arm] = {"first": float(updates[0].mean()),
                            "middle": float(updates[1:-1].mean()),
                            "last": float(updates[-1].mean())}
    return summary


def plot_inertia_comparison(out: Path, name: str, runs: Dict[str, List[dict]],
                            arms: Sequence[str]) -> None:
    """Mean relative update of the middle layers per arm (mean over seeds when the runs
    hold their curves, else the seed-0 tracker), with the first and last layers dotted
    and dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    seeds_note = "seed 0"
    for arm in arms:
        curves = [np.array(r["relative_update"]) for r in runs.get(arm, [])
                  if "relative_update" in r]
        if curves:
            updates = np.mean(curves, axis=0)
            seeds_note = "mean over seeds"
        else:
            path = tracker_file(out, name, arm)
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
    ax.set_title(f"{name}: global model, {seeds_note}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{name}_inertia_compare.png", dpi=110)
    plt.close(fig)


def plot_ratio_vs_gain(out: Path, name: str, runs: Dict[str, List[dict]]) -> None:
    """Per seed: FedAvg's inertia ratio against each LIPS arm's paired gain (after and
    before aggregation)."""
    base = {r["seed"]: r for r in runs.get("FedAvg", []) if "inertia" in r}
    arms = [a for a in runs if a != "FedAvg"]
    if not base or not arms:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, metric, title in zip(axes, ("after_last", "before_last"),
                                 ("after aggregation", "before aggregation")):
        for arm in arms:
            pairs = [(base[r["seed"]]["inertia"]["ratio"],
                      r[metric] - base[r["seed"]][metric])
                     for r in runs[arm] if r["seed"] in base]
            if pairs:
                xs, ys = zip(*pairs)
                ax.scatter(xs, ys, s=18, label=arm)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("FedAvg inertia ratio (same seed)")
        ax.set_title(f"{name}: gain vs FedAvg, {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("paired accuracy difference")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_ratio_vs_gain.png", dpi=110)
    plt.close(fig)


def replot(out: Path) -> None:
    """Redraw every figure and reprint every table from the JSON files in ``out``,
    first merging the per-run files of ``runs/<setup>/`` into ``<setup>.json``."""
    for path in sorted(out.glob("*.json")):
        if path.stem.endswith("_inertia"):
            continue
        result = json.loads(path.read_text())
        if not isinstance(result.get("config"), dict) or "name" not in result["config"]:
            continue  # not a results file of this script
        name = result["config"]["name"]
        if (out / "runs" / name).is_dir():
            result = load_finished({name: result["config"]}, out)[name]
            write_merged(out, name, result)
        plot_curves(name, result["runs"], out / f"{name}_accuracy.png")
        main_arms = arms_of(result["config"])[0]
        for arm in main_arms:
            inertia = tracker_file(out, name, arm)
            if inertia.exists():
                InertiaTracker.from_json(inertia).plot(
                    tracker_file(out, name, arm, ".png"),
                    title=f"{name}: {arm} (seed 0), global model")
        plot_inertia_comparison(out, name, result["runs"], main_arms)
        plot_ratio_vs_gain(out, name, result["runs"])
        print(table(name, summarise(result["runs"])))
        for arm, groups in inertia_summary(out, name, main_arms).items():
            print(f"  inertia, {arm:<11} seed 0, mean relative update over the last 10 "
                  "rounds: " + ", ".join(f"{k} {v:.4f}" for k, v in groups.items()))


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


def paper_slice(name: str, rounds: int, device: str, out: Path, smoke: bool = False) -> int:
    """A few rounds of a paper setup on generated data at full size (100 clients,
    the paper's model), FedAvg and LIPS at the paper's density, seed 0: the wall seconds
    per round of each (round 0, the warm-up, left out), printed and kept in
    ``out/<name>-slice.json``."""
    setup = {"name": name, **COMMON, **FULL[name], "rounds": rounds, "synthetic": True,
             "device": device, **({**paper.SMOKE, "rounds": rounds} if smoke else {})}
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    for arm in arms_of(setup)[0]:
        with tqdm(total=rounds, desc=f"{name} {arm}", unit="round") as progress:
            run = run_one(setup, arm, 0, progress)
        times[arm] = run["seconds_per_round"]
        print(f"slice {name} {arm} on {device}: {run['seconds_per_round']:.3f} s/round "
              f"({setup['clients']} clients, {rounds} rounds)", flush=True)
    lips_arm = arms_of(setup)[0][1]
    print(f"slice {name}: {lips_arm} / FedAvg time per round "
          f"{times[lips_arm] / times['FedAvg']:.3f}")
    (out / f"{name}-slice.json").write_text(json.dumps(
        {"config": setup, "seconds_per_round": times, "torch": torch.__version__}, indent=1))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings, a few minutes")
    parser.add_argument("--setup", action="append", choices=sorted(FULL),
                        help="run only these setups (repeatable); the paper-* setups run "
                             "only when named, and need --data-dir")
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
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel, each in its own process (default 1)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding cifar-10-batches-py/ or cifar-100-python/ "
                             "(paper-* setups)")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the data and every client's training, e.g. "
                             "cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--smoke", action="store_true",
                        help="paper-* setups at tiny sizes (2 clients x 2 rounds), end to end")
    parser.add_argument("--paper-slice", choices=PAPER, default=None,
                        help="time --rounds rounds of this paper setup on generated data at "
                             "full size, FedAvg and LIPS (no --data-dir needed)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds of --paper-slice (default 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r} is not a torch device ({error})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.paper_slice:
        return paper_slice(args.paper_slice, args.rounds, args.device,
                           args.out or Path("paper-slice"), args.smoke)
    if args.verify:
        return verify(args.verify, args.arm, args.seed)
    if args.replot:
        replot(args.out or RESULTS)
        return 0
    chosen = QUICK if args.quick else FULL
    names = args.setup or [name for name in chosen if name not in PAPER]
    if args.quick and any(name in PAPER for name in names):
        parser.error("the paper-* setups have no --quick form; use --smoke")
    setups = {name: {"name": name, **COMMON, **chosen[name]} for name in names}
    for name, setup in setups.items():
        if name in PAPER:
            if args.smoke:
                setup.update(paper.SMOKE)
            # one line, no usage text: the fix is the folder
            if args.data_dir is None:
                raise SystemExit(f"error: --setup {name} needs --data-dir DIR, the folder "
                                 f"holding {paper.FOLDERS[setup['task']]}/")
            folder = args.data_dir / paper.FOLDERS[setup["task"]]
            if not folder.is_dir():
                raise SystemExit(f"error: --setup {name}: no {folder} (expected the python "
                                 f"version of {setup['task']} extracted in --data-dir)")
            setup["data_dir"] = str(args.data_dir.resolve())
        setup["device"] = args.device
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, device {args.device}")
    run_all(setups, out, resume=args.resume, workers=args.workers, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
