"""Shared helpers of the benchmarks: device choice, one thread, warm-up, repeats, medians.

On CPU a call is timed by the wall clock. On CUDA it is timed between two CUDA events
recorded around it, after the queue was drained, so the time is the call's own work on
the GPU (kernels are asynchronous: a wall clock would time only their launch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch

CPU = torch.device("cpu")


def single_thread() -> None:
    """Both sides of every ratio run on one thread (the benchmark machine is shared)."""
    torch.set_num_threads(1)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option every timing benchmark takes (``cpu`` or ``cuda``)."""
    parser.add_argument("--device", default="cpu", type=parse_device,
                        help="cpu (default) or cuda / cuda:N")


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device; only CPU and an available CUDA device are accepted."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a torch device; use cpu or cuda") from error
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {name!r}: accepted are cpu and cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"device {name!r}: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}); use --device cpu")
    return device


def describe(device: torch.device) -> str:
    """One line naming the device the figures come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device}), CUDA events"
    return "CPU, one thread, wall clock"


def seconds(run: Callable[[], object], device: torch.device = CPU) -> float:
    """Time of one call of ``run()`` on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    run()
    return time.perf_counter() - start_time


def median_seconds(
    run: Callable[[], object], repeats: int, setup: Optional[Callable[[], object]] = None,
    warmup: int = 1, device: torch.device = CPU,
) -> float:
    """Median time of ``run()`` on ``device`` over ``repeats`` timed calls after
    ``warmup`` untimed ones; ``setup()`` runs untimed before every call."""
    times: List[float] = []
    for index in range(warmup + repeats):
        if setup is not None:
            setup()
        elapsed = seconds(run, device)
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def paired_medians(
    first: Callable[[], object], second: Callable[[], object], repeats: int,
    setup_second: Optional[Callable[[], object]] = None, device: torch.device = CPU,
) -> Tuple[float, float]:
    """Medians of ``first()`` and ``second()`` timed in alternation on ``device`` (after
    one untimed call each), so load on a shared machine hits both sides alike."""
    first_times: List[float] = []
    second_times: List[float] = []
    for index in range(repeats + 1):
        first_times.append(seconds(first, device))
        if setup_second is not None:
            setup_second()
        second_times.append(seconds(second, device))
        if index == 0:
            first_times.clear()
            second_times.clear()
    return statistics.median(first_times), statistics.median(second_times)


def table(header: List[str], rows: List[List[str]]) -> str:
    """A Markdown table (the README shows these as printed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
