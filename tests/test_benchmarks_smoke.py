"""Each benchmark runs with --quick and ends with its ratio line (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, label",
    [
        ("mask_speed.py", "mask/fedavg ratio"),
        ("step_overhead.py", "step overhead ratio"),
        ("memory.py", "memory ratio"),
    ],
)
def test_quick_run_ends_with_its_ratio(script, label):
    if script != "mask_speed.py":
        pytest.importorskip("timm")
    pytest.importorskip("tqdm")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
        env={"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PATH": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"{re.escape(label)}: \d+\.\d+", last), last
