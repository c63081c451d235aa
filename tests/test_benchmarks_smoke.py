"""Benchmark smoke tests: each timing benchmark runs with --quick and ends with its ratio
line (no timing asserted); the accuracy benchmark (reproduce.py) runs its many-clients
setup at tiny sizes, every arm, and resumes."""

from __future__ import annotations

import json
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


# -- benchmarks/reproduce.py, the many-clients setup (issue 12), at tiny sizes ----------

def _reproduce():
    pytest.importorskip("tqdm")
    pytest.importorskip("scipy")
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import reproduce

    return reproduce


def _tiny_setup(reproduce, seeds=1, ablation_seeds=1):
    setup = dict(reproduce.FULL["shapes-resnet8-many"])
    setup.update({"name": "tiny", **reproduce.COMMON, "clients": 3, "rounds": 6,
                  "samples_per_client": 20, "test_per_client": 10, "resolution": 8,
                  "widths": [4, 4, 8], "epochs": 1, "seeds": seeds,
                  "ablation_seeds": ablation_seeds})
    return setup


def test_inertia_ratio_definition():
    np = pytest.importorskip("numpy")
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from inertia import default_warmup, inertia_ratio

    updates = np.array([[9.0, 0.2, 0.2, 0.2],      # first layer (round 0 skipped)
                        [9.0, 0.1, 0.1, 0.1],      # middle
                        [9.0, 0.05, 0.05, 0.05],   # middle
                        [9.0, 0.4, 0.4, 0.4]])     # last layer
    assert default_warmup(4) == 0 and default_warmup(100) == 20
    assert inertia_ratio(updates, warmup=1) == pytest.approx(0.075 / 0.3)
    assert inertia_ratio(updates, warmup=0) == pytest.approx(
        (9.0 * 2 + 0.45) / 8 / ((9.0 + 3 * 0.3) / 4))
    assert inertia_ratio(updates, warmup=0, exclude_rounds=[0]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        inertia_ratio(updates[:2])


def test_many_clients_setup_runs_every_arm_and_resumes(tmp_path):
    reproduce = _reproduce()
    pytest.importorskip("matplotlib")
    setup = _tiny_setup(reproduce)
    reproduce.run_all({"tiny": setup}, tmp_path)
    result = json.loads((tmp_path / "tiny.json").read_text())
    arms = ["FedAvg", "LIPS", "LIPS server", "LIPS random", "LIPS d0=0.3"]
    assert list(result["runs"]) == arms
    for arm in arms:
        run = result["runs"][arm][0]
        assert len(run["before"]) == len(run["after"]) == 6
        assert len(run["relative_update"]) == len(run["inertia_layers"]) >= 3
        assert run["inertia"]["ratio"] > 0
    assert result["runs"]["LIPS server"][0]["masked_rounds"] == [1]
    assert result["runs"]["LIPS"][0]["masked_rounds"] == [1]
    assert result["runs"]["FedAvg"][0]["masked_rounds"] == []
    summary = result["summary"]
    assert "diff_vs_fedavg" in summary["LIPS"]["after_last"]
    assert "diff_vs_LIPS" in summary["LIPS random"]["before_last"]
    assert summary["FedAvg"]["inertia_ratio"]["n"] == 1
    assert (tmp_path / "tiny_accuracy.png").exists()
    assert (tmp_path / "tiny_ratio_vs_gain.png").exists()
    # resuming with a second seed of the main arms runs only those three
    more = _tiny_setup(reproduce, seeds=2)
    reproduce.run_all({"tiny": more}, tmp_path, resume=True)
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert [r["seed"] for r in result["runs"]["LIPS"]] == [0, 1]
    assert [r["seed"] for r in result["runs"]["LIPS random"]] == [0]
    again = reproduce.run_one(more, "LIPS", 1)
    assert again["before"] == result["runs"]["LIPS"][1]["before"]
