"""Layer-wise inertia, and what LIPS does to it: FedAvg against FedAvg+LIPS with the
paper's ResNet-8 on generated images, many clients with little data each.

    python examples/inertia_demo.py                  # 2-3 minutes on 2 free CPU cores
    python examples/inertia_demo.py --clients 4 --rounds 3 --out tiny.png   # seconds

Both arms start from the same model and data split and run side by side, each in its own
process with one torch thread. The script prints how much the global model's middle
layers move compared with its first and last layers (the inertia ratio) and the clients'
accuracy, then writes one PNG: the per-layer update heatmaps of both arms and the
accuracy curves. One seed is an anecdote; the benchmark (docs/results.md) has the
statistics.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import sys
import textwrap
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from models import resnet8_reference  # noqa: E402  (the paper's ResNet-8)

from lips_wrap import InertiaTracker, LIPSConfig, find_layers  # noqa: E402
from lips_wrap.data import make_shapes  # noqa: E402
from lips_wrap.diagnose import plan_layers  # noqa: E402
from lips_wrap.diagnostics import (  # noqa: E402
    INERTIA_THRESHOLD,
    default_warmup,
    inertia_ratio,
    inertia_ratio_by_window,
)
from lips_wrap.integrations.custom import (  # noqa: E402
    dirichlet_split,
    label_distribution,
    matched_split,
    simulate,
)

ARMS = ("FedAvg", "FedAvg+LIPS")
START_DENSITY = 0.3  # the paper's start density for ResNet-8
PERIOD = 5  # the paper's mask period
LAST = 5  # accuracies are summarised over the last LAST rounds


@dataclass(frozen=True)
class Setup:
    """One run of the demo (both arms share it)."""

    clients: int
    samples_per_client: int
    rounds: int
    resolution: int
    alpha: float
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    test_per_client: int
    seed: int


def load_task(setup: Setup) -> Tuple[torch.Tensor, torch.Tensor, List[np.ndarray],
                                     List[np.ndarray]]:
    """Generated shapes images at ``setup.resolution``, labels, and per-client training
    and test indices (each client's test labels follow its training labels)."""
    train_n = setup.clients * setup.samples_per_client
    x_train, y_train = make_shapes(train_n, seed=0)
    x_test, y_test = make_shapes(2000, seed=10_000)
    x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
    if setup.resolution != x.shape[-1]:  # the generator draws 32x32
        x = torch.nn.functional.interpolate(x, size=(setup.resolution, setup.resolution),
                                            mode="bilinear", antialias=True,
                                            align_corners=False)
    x = x.contiguous(memory_format=torch.channels_last)  # faster convolutions on CPU
    train = dirichlet_split(y_train, setup.clients, setup.alpha, seed=setup.seed,
                            min_samples=10)
    dists = [label_distribution(y_train, t, 10) for t in train]
    tests = [train_n + t for t in matched_split(y_test, dists, setup.test_per_client,
                                                seed=setup.seed)]
    return x, y, train, tests


def build_model() -> torch.nn.Module:
    """The paper's ResNet-8 for 3-channel images and 10 classes."""
    return resnet8_reference(3, 10).to(memory_format=torch.channels_last)


def lips_config(setup: Setup) -> LIPSConfig:
    """LIPS with the paper's period and start density for ResNet-8 (the library's
    other defaults)."""
    return LIPSConfig(total_rounds=setup.rounds, period=PERIOD, start_density=START_DENSITY,
                      seed=setup.seed)


_progress: Optional[Queue] = None
"""In a worker process: where it reports each finished round."""


def _init_worker(progress: Queue) -> None:
    global _progress
    _progress = progress
    torch.set_num_threads(1)


def run_arm(arm: str, setup: Setup) -> dict:
    """Simulate one arm; its accuracies per round and the global model's per-layer
    relative update (layers x rounds)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; accepted: {', '.join(ARMS)}")
    start = time.perf_counter()
    x, y, train, tests = load_task(setup)
    torch.manual_seed(setup.seed)  # the initial weights simulate() builds from the seed
    tracker = InertiaTracker(build_model(), all_layers=True)

    def record(rnd, model, history):
        tracker.update(model)
        if _progress is not None:
            _progress.put(arm)

    history = simulate(
        build_model, x, y, train, tests, setup.rounds, setup.epochs, setup.batch_size,
        lambda params: torch.optim.SGD(params, lr=setup.lr, momentum=setup.momentum),
        lips_config(setup) if arm == "FedAvg+LIPS" else None, seed=setup.seed,
        callbacks=[record],
    )
    return {
        "before": [r.before for r in history],
        "after": [r.after for r in history],
        "masked_rounds": [r.round for r in history if r.masked],
        "layers": tracker.layers,
        "relative_update": tracker.relative_update,
        "seconds": time.perf_counter() - start,
    }


def run_both(setup: Setup) -> Dict[str, dict]:
    """Both arms in parallel processes with one progress bar over their rounds."""
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    with ProcessPoolExecutor(len(ARMS), mp_context=context, initializer=_init_worker,
                             initargs=(progress,)) as pool, \
            tqdm(total=len(ARMS) * setup.rounds, desc="rounds (both arms)",
                 unit="round") as bar:
        futures: Dict[str, Future] = {arm: pool.submit(run_arm, arm, setup) for arm in ARMS}
        done = {arm: 0 for arm in ARMS}
        while bar.n < bar.total:
            for future in futures.values():
                if future.done() and future.exception() is not None:
                    future.result()  # raises the worker's error here
            try:
                arm = progress.get(timeout=0.5)
            except queue.Empty:
                if all(f.done() for f in futures.values()):
                    break
                continue
            done[arm] += 1
            bar.update(1)
            bar.set_postfix({a: f"{n}/{setup.rounds}" for a, n in done.items()})
        return {arm: f.result() for arm, f in futures.items()}


def layer_roles(layers: List[str]) -> List[str]:
    """first / middle / last of each tracked layer: the middle layers are those LIPS
    masks (every conv but the 7x7 stem), the edges the stem and the classifier."""
    model = build_model()
    names, roles = plan_layers(find_layers(model), model)
    if names != layers:
        raise RuntimeError(f"tracked layers {layers} differ from the model's {names}")
    return roles


def print_inertia(results: Dict[str, dict], roles: List[str], rounds: int) -> None:
    print("\nHow much each layer of the global model moves per round: ||W_t - W_t-1|| / "
          "||W_t-1||,\nmean over the middle layers (the convs LIPS masks) and over the "
          "edges (7x7 stem, classifier).")
    print("Inertia ratio = middle / edges. Near or above 1, the middle layers learn as "
          "much as the ends;\nwell below 1 (lips-wrap diagnose flags < "
          f"{INERTIA_THRESHOLD}), they lag and the clients share little but the head.")
    windows = min(5, rounds)
    spans = {arm: inertia_ratio_by_window(r["relative_update"], roles, windows)
             for arm, r in results.items()}
    print(f"\n{'rounds':>8} " + " ".join(f"| {arm:^25}" for arm in results))
    print(f"{'':>8} " + " ".join(f"| {'middle':>8} {'edges':>8} {'ratio':>7}"
                                 for _ in results))
    for i, span in enumerate(spans[ARMS[0]]):
        cells = []
        for arm, r in results.items():
            part = inertia_ratio(r["relative_update"][:, span.start:span.stop], roles,
                                 warmup=0)
            cells.append(f"| {part.middle:>8.4f} {part.edges:>8.4f} "
                         f"{spans[arm][i].ratio:>7.2f}")
        label = f"{span.start}-{span.stop - 1}" if span.stop - 1 > span.start else \
            str(span.start)
        print(f"{label:>8} " + " ".join(cells))
    warmup = default_warmup(rounds)  # the first rounds move every layer a lot
    for arm, r in results.items():
        whole = inertia_ratio(r["relative_update"], roles, warmup)
        print(f"  {arm:<12} inertia ratio over rounds {warmup}-{rounds - 1}: {whole.ratio:.2f}")
    masked = results["FedAvg+LIPS"]["masked_rounds"]
    kept = [t for t in range(warmup, rounds) if t not in masked]
    if masked and kept:
        ratios = ", ".join(
            f"{arm} {inertia_ratio(r['relative_update'][:, kept], roles, warmup=0).ratio:.2f}"
            for arm, r in results.items())
        print(textwrap.fill(
            f"LIPS's clients started rounds {', '.join(map(str, masked))} from a masked "
            "model: those rounds' update includes the regrowth of the zeroed weights. Over "
            f"rounds {warmup}-{rounds - 1} without them ({len(kept)} rounds): {ratios}.",
            width=96, initial_indent="  ", subsequent_indent="  "))


def print_accuracy(results: Dict[str, dict], rounds: int) -> None:
    print("\nPersonalized accuracy: mean over clients, each on its own test set (labels "
          "drawn like its training labels).")
    print("  after aggregation:  the model averaged at the end of the round, as each "
          "client receives it for the next\n                      round (* LIPS's clients "
          "masked it first); in the last round, the averaged model itself")
    print("  before aggregation: each client's own model after its local training in the "
          "round")
    print(f"\n{'round':>5} " + " ".join(f"| {arm:^16}" for arm in results))
    print(f"{'':>5} " + " ".join(f"| {'after':>8} {'before':>7}" for _ in results))
    for rnd in range(rounds):
        cells = [f"| {r['after'][rnd]:>7.3f}{'*' if rnd + 1 in r['masked_rounds'] else ' '}"
                 f" {r['before'][rnd]:>7.3f}" for r in results.values()]
        print(f"{rnd:>5} " + " ".join(cells))
    last = min(LAST, rounds)
    print(f"\nsummary (mean over the last {last} rounds):")
    means = {arm: (float(np.mean(r["after"][-last:])), float(np.mean(r["before"][-last:])))
             for arm, r in results.items()}
    for arm, (after, before) in means.items():
        print(f"  {arm:<12} after {after:.3f}   before {before:.3f}")
    (a0, b0), (a1, b1) = means["FedAvg"], means["FedAvg+LIPS"]
    print(f"  LIPS - FedAvg: after {a1 - a0:+.3f}, before {b1 - b0:+.3f}")


def plot(results: Dict[str, dict], path: Path, setup: Setup) -> None:
    """Per-layer update heatmaps of both arms (one colour scale) and accuracy curves."""
    try:
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("the figure needs matplotlib: pip install 'lips-wrap[plot]'") from None
    updates = np.concatenate([r["relative_update"] for r in results.values()], axis=1)
    positive = updates[np.isfinite(updates) & (updates > 0)]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
    norm = LogNorm(vmin=low, vmax=max(high, low * 1.0001))
    layers = [name.removesuffix(".weight") for name in results[ARMS[0]]["layers"]]
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, (arm, r) in zip(axes, results.items()):
        shown = np.where(np.isfinite(r["relative_update"]) & (r["relative_update"] > 0),
                         r["relative_update"], low)
        image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis",
                          norm=norm)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers if ax is axes[0] else [], fontsize=7)
        for edge in (0.5, len(layers) - 1.5):  # the middle layers between stem and head
            ax.axhline(edge, color="white", lw=1)
        for rnd in r["masked_rounds"]:
            ax.plot(rnd, -0.5, "v", color="red", ms=6, clip_on=False)
        ax.set_xlabel("round" + (" (red: clients start from a masked model)"
                                 if r["masked_rounds"] else ""))
        ax.set_title(f"{arm}: relative update per layer", fontsize=10)
    fig.colorbar(image, ax=list(axes[:2]), fraction=0.03, pad=0.01,
                 label="||W_t - W_t-1|| / ||W_t-1||")
    curves = axes[2]
    for arm, r in results.items():
        rounds = np.arange(len(r["after"]))
        line, = curves.plot(rounds, r["after"], label=f"{arm}, after aggregation")
        curves.plot(rounds, r["before"], "--", color=line.get_color(),
                    label=f"{arm}, before aggregation")
    curves.set_xlabel("round")
    curves.set_ylabel("personalized accuracy")
    curves.set_title(f"accuracy (seed {setup.seed}: one seed is an anecdote)", fontsize=10)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    fig.suptitle(f"paper's ResNet-8, {setup.clients} clients x {setup.samples_per_client} "
                 f"images ({setup.resolution}x{setup.resolution}), Dirichlet({setup.alpha}), "
                 f"{setup.epochs} local epochs", fontsize=10)
    fig.savefig(path, dpi=110)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=positive_int, default=10)
    parser.add_argument("--samples-per-client", type=positive_int, default=100)
    parser.add_argument("--rounds", type=positive_int, default=40)
    parser.add_argument("--resolution", type=positive_int, default=16,
                        help="image side in pixels (the generator draws 32)")
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="Dirichlet concentration of the label split")
    parser.add_argument("--test-per-client", type=positive_int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("inertia_demo.png"),
                        help="where the PNG goes")
    args = parser.parse_args(argv)
    if args.resolution > 32:
        parser.error(f"--resolution must be at most 32 (the generated size), got "
                     f"{args.resolution}")
    if args.alpha <= 0:
        parser.error(f"--alpha must be > 0, got {args.alpha}")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    setup = Setup(clients=args.clients, samples_per_client=args.samples_per_client,
                  rounds=args.rounds, resolution=args.resolution, alpha=args.alpha,
                  epochs=5, batch_size=100, lr=0.1, momentum=0.9,
                  test_per_client=args.test_per_client, seed=args.seed)
    params = sum(p.numel() for p in build_model().parameters())
    print(f"FedAvg vs FedAvg+LIPS, seed {setup.seed}: the paper's ResNet-8 ({params / 1e6:.2f}M "
          f"parameters), {setup.clients} clients x {setup.samples_per_client} generated "
          f"{setup.resolution}x{setup.resolution} images,\nDirichlet({setup.alpha}) labels, "
          f"{setup.rounds} rounds of {setup.epochs} local epochs, batch {setup.batch_size}, "
          f"SGD lr {setup.lr} momentum {setup.momentum} (fresh each round).")
    print(f"LIPS: the paper's period {PERIOD} and start density {START_DENSITY} for ResNet-8: "
          "clients mask the conv\nweights between stem and classifier of the model they "
          f"receive at rounds 1, {1 + PERIOD}, {1 + 2 * PERIOD}, ...")
    start = time.perf_counter()
    results = run_both(setup)
    roles = layer_roles(results[ARMS[0]]["layers"])
    print_inertia(results, roles, setup.rounds)
    print_accuracy(results, setup.rounds)
    print("\nOne seed is an anecdote: the numbers above are whatever seed "
          f"{setup.seed} gives. For paired seeds with\nconfidence intervals, see the "
          "benchmark (docs/results.md, benchmarks/reproduce.py).")
    plot(results, args.out, setup)
    print(f"figure written to {args.out} ({time.perf_counter() - start:.0f} s; arms "
          + ", ".join(f"{arm} {r['seconds']:.0f} s" for arm, r in results.items()) + ")")


if __name__ == "__main__":
    main()
