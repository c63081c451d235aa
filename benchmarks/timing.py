"""Shared helpers of the benchmarks: one thread, warm-up, repeats, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch


def single_thread() -> None:
    """Both sides of every ratio run on one thread (the benchmark machine is shared)."""
    torch.set_num_threads(1)


def median_seconds(
    run: Callable[[], object], repeats: int, setup: Optional[Callable[[], object]] = None,
    warmup: int = 1,
) -> float:
    """Median wall time of ``run()`` over ``repeats`` timed calls after ``warmup``
    untimed ones; ``setup()`` runs untimed before every call."""
    times: List[float] = []
    for index in range(warmup + repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def paired_medians(
    first: Callable[[], object], second: Callable[[], object], repeats: int,
    setup_second: Optional[Callable[[], object]] = None,
) -> Tuple[float, float]:
    """Medians of ``first()`` and ``second()`` timed in alternation (after one untimed
    call each), so load on a shared machine hits both sides alike."""
    firsts: List[float] = []
    seconds: List[float] = []
    for index in range(repeats + 1):
        firsts.append(median_seconds(first, 1, warmup=0))
        seconds.append(median_seconds(second, 1, setup=setup_second, warmup=0))
        if index == 0:
            firsts.clear()
            seconds.clear()
    return statistics.median(firsts), statistics.median(seconds)


def table(header: List[str], rows: List[List[str]]) -> str:
    """A Markdown table (the README shows these as printed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
