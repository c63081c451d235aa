"""Benchmark smoke tests: grad_dtype.py runs with --quick and ends with its ratio line
(no timing asserted); the accuracy benchmark (reproduce.py) runs its setups at tiny
sizes, every arm, and resumes; the paper setups run end to end on miniature data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


# mask_speed.py, step_overhead.py and memory.py run with --quick in the GPU check's dry
# run (tests/test_devices.py), which checks the same ratio lines
@pytest.mark.slow
@pytest.mark.parametrize("script, label", [("grad_dtype.py", "bfloat16/float16 differ ratio")])
def test_quick_run_ends_with_its_ratio(script, label):
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
    windows = summary["FedAvg"]["inertia_ratio_by_window"]
    assert [w["rounds"] for w in windows] == [[0, 1], [2, 2], [3, 3], [4, 4], [5, 5]]
    from inertia import ratio_by_window
    fedavg = result["runs"]["FedAvg"][0]["relative_update"]
    assert windows[0]["mean"] == pytest.approx(ratio_by_window(fedavg)[0].ratio)
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


# -- the reference-width setup: channels_last is a speed option, never a change of model --

def test_channels_last_option_keeps_the_model_and_masks_exactly():
    reproduce = _reproduce()
    from lips_wrap import LIPSConfig, find_layers, mask_global_state
    from lips_wrap.masking import keep_count

    setup = {**_tiny_setup(reproduce), "channels_last": True}
    x, _, _, _ = reproduce.load_task(setup, 0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    fast = reproduce.model_factory(setup)()
    torch.manual_seed(0)
    plain = reproduce.model_factory({**setup, "channels_last": False})()
    for (name, a), (_, b) in zip(fast.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name  # the same weights, only stored differently
        if a.dim() == 4:
            assert a.is_contiguous(memory_format=torch.channels_last), name
    vgg = reproduce.model_factory({"task": "digits", "model": "vgg", "channels_last": True})()
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in vgg.parameters() if p.dim() == 4)  # every model, not only ResNet-8
    config = LIPSConfig(total_rounds=10, start_density=0.3)
    plan = find_layers(fast)
    previous = {k: v * 0.9 for k, v in fast.state_dict().items()}
    masked_fast, _ = mask_global_state(fast.state_dict(), previous, plan, 1, config)
    masked_plain, _ = mask_global_state(
        plain.state_dict(), {k: v.contiguous() for k, v in previous.items()}, plan, 1, config)
    for name in plan.eligible_names:
        kept = masked_fast[name] != 0
        assert int(kept.sum()) == keep_count(kept.numel(), 0.3), name
        assert torch.equal(masked_fast[name], masked_plain[name]), name


def test_wide_setup_is_the_many_clients_setup_at_twice_the_width():
    reproduce = _reproduce()
    many, ref = reproduce.FULL["shapes-resnet8-many"], reproduce.FULL["shapes-resnet8-wide"]
    assert ref["widths"] == [16, 32, 64] and ref["channels_last"] is True
    assert {k: v for k, v in ref.items() if k not in ("widths", "channels_last")} == \
        {k: v for k, v in many.items() if k != "widths"}
    assert ref["clients"] >= 20 and ref["rounds"] >= 100
    assert ref["seeds"] >= 10 and ref["ablation_seeds"] >= 5


def test_inertia_search_runs_fedavg_per_variant_and_resumes(tmp_path):
    reproduce = _reproduce()
    import inertia_search

    base = _tiny_setup(reproduce)
    variants = [{"clients": 3, "widths": [4, 4, 8], "resolution": 8},
                {"clients": 4, "widths": [4, 8, 8], "resolution": 8}]
    out = tmp_path / "search.json"
    results = inertia_search.search(variants[:1], out, rounds=5, base=base)
    assert list(results) == ["c3_w4-4-8_r8_t5"]
    entry = results["c3_w4-4-8_r8_t5"]
    assert entry["config"]["rounds"] == 5 and entry["config"]["clients"] == 3
    assert len(entry["relative_update"]) == len(entry["inertia_layers"]) >= 3
    assert len(entry["relative_update"][0]) == 5
    assert entry["inertia"]["ratio"] > 0
    stored = json.loads(out.read_text())
    assert stored["c3_w4-4-8_r8_t5"]["inertia"] == entry["inertia"]
    # resuming runs only the new variant and keeps the first one as it was
    again = inertia_search.search(variants, out, rounds=5, base=base, resume=True)
    assert list(again) == ["c3_w4-4-8_r8_t5", "c4_w4-8-8_r8_t5"]
    assert again["c3_w4-4-8_r8_t5"] == stored["c3_w4-4-8_r8_t5"]
    table = inertia_search.markdown(again).splitlines()
    assert len(table) == 4 and table[2].startswith("| 3 | 4/4/8 | 8x8 | 5 | **")


def test_report_tables_include_the_ratio_over_time(tmp_path):
    reproduce = _reproduce()
    import report

    setup = {**_tiny_setup(reproduce), "arms": ["FedAvg", "LIPS"], "ablations": []}
    reproduce.run_all({"tiny": setup}, tmp_path)
    markdown = report.markdown(json.loads((tmp_path / "tiny.json").read_text()))
    over_time = markdown.split("**Inertia ratio over time**")[1].splitlines()
    assert over_time[2] == ("| arm | rounds 0-1 | rounds 2-2 | rounds 3-3 | rounds 4-4 "
                            "| rounds 5-5 |")
    assert over_time[4].startswith("| FedAvg | ") and over_time[5].startswith("| LIPS | ")
    # the anchor drift per arm, checked against a computation from the stored arrays
    stored = json.loads((tmp_path / "tiny.json").read_text())
    run = stored["runs"]["FedAvg"][0]
    import numpy as np

    distance, norm = np.array(run["distance_to_anchor"]), np.array(run["weight_norm"])
    moved = distance[:, -1] / norm[:, 2]
    expected = moved[1:-1].mean() / ((moved[0] + moved[-1]) / 2)
    drift = report.drift_table(stored).splitlines()
    assert drift[4].startswith(f"| FedAvg | 1 | {expected:.2f} [{expected:.2f}, ")
    assert drift[5].startswith("| LIPS | 1 | ")
    table = report.across([tmp_path / "tiny.json"]).splitlines()
    assert len(table) == 3 and table[2].startswith("| tiny | ")
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[4].startswith(f"{expected:.2f} [") and cells[5:7] == ["LIPS", "1"]
    assert report.main([str(tmp_path / "tiny.json")]) == 0


def test_paper_resnet8_setup_is_the_many_clients_protocol_with_the_papers_model():
    reproduce = _reproduce()
    many, paper = reproduce.FULL["shapes-resnet8-many"], reproduce.FULL["shapes-paper-resnet8"]
    assert paper["model"] == "resnet8-reference" and "widths" not in paper
    protocol = ("clients", "rounds", "epochs", "resolution", "test_per_client", "task")
    assert all(paper[k] == many[k] for k in protocol if k in many)
    assert paper["arms"] == ["FedAvg", "LIPS d0=0.3", "LIPS"]
    assert paper["ablations"] == ["LIPS server d0=0.3", "LIPS random d0=0.3"]
    assert reproduce.ARMS["LIPS server d0=0.3"]["start_density"] == 0.3
    assert reproduce.ARMS["LIPS random d0=0.3"]["score"] == "random"
    assert paper["seeds"] >= 8 and paper["ablation_seeds"] >= 5


@pytest.mark.parametrize("name", ["paper-cifar10-vgg11", "paper-cifar100-resnet8"])
def test_paper_setup_smoke_runs_every_arm_on_a_miniature_folder(tmp_path, name):
    reproduce = _reproduce()
    import paper

    setup = reproduce.FULL[name]
    paper.write_miniature(tmp_path / "data", setup["task"])
    out = tmp_path / "out"
    assert reproduce.main(["--setup", name, "--smoke", "--data-dir", str(tmp_path / "data"),
                           "--out", str(out)]) == 0
    stored = json.loads((out / f"{name}.json").read_text())
    density = paper.SETUPS[name]["density"]
    arms = ["FedAvg", "LIPS" if density == 0.5 else f"LIPS d0={density}"]
    assert list(stored["runs"])[:2] == arms and len(stored["runs"]) == 4
    assert stored["config"]["clients"] == 2 and stored["config"]["rounds"] == 2
    assert stored["config"]["data_dir"] == str((tmp_path / "data").resolve())
    for runs in stored["runs"].values():
        run = runs[0]
        assert 0.0 <= run["finetuned"] <= 1.0 and run["seconds_per_round"] > 0
        assert len(run["before"]) == 2 and len(run["weight_norm"][0]) == 2
    assert stored["runs"][arms[1]][0]["masked_rounds"] == [1]
    assert stored["runs"]["FedAvg"][0]["masked_rounds"] == []


def test_paper_setup_without_its_folder_is_one_clear_error(tmp_path):
    reproduce = _reproduce()
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--setup", "paper-cifar100-resnet8", "--data-dir", str(tmp_path)])
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1
    assert str(tmp_path / "cifar-100-python") in message
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--setup", "paper-cifar10-vgg11"])
    assert "--data-dir" in str(stop.value.code) and "cifar-10-batches-py/" in str(stop.value.code)


def test_paper_slice_times_fedavg_and_lips_on_the_cpu(tmp_path, capsys):
    reproduce = _reproduce()
    assert reproduce.main(["--paper-slice", "paper-cifar100-resnet8", "--smoke", "--rounds",
                           "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("slice")]
    assert len(lines) == 3 and "FedAvg on cpu" in lines[0] and "LIPS d0=0.3" in lines[1]
    stored = json.loads((tmp_path / "paper-cifar100-resnet8-slice.json").read_text())
    assert stored["config"]["synthetic"] is True and stored["config"]["model"] == \
        "resnet8-reference"
    assert set(stored["seconds_per_round"]) == {"FedAvg", "LIPS d0=0.3"}


def test_paper_split_gives_every_client_its_size_and_matching_test_labels():
    _reproduce()
    import numpy as np
    import paper

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    test_labels = rng.integers(0, 10, 2000)
    setup = {"clients": 30, "classes": 10, "alpha": 0.1, "samples_per_client": 100,
             "test_per_client": 400}
    train, tests = paper.paper_split(labels, test_labels, setup, seed=3)
    assert [len(t) for t in train] == [100] * 30 and [len(t) for t in tests] == [400] * 30
    for tr, te in zip(train, tests):
        assert len(set(tr.tolist())) == 100  # no image twice within a client
        train_share = np.bincount(labels[tr], minlength=10) / 100
        test_share = np.bincount(test_labels[te], minlength=10) / 400
        assert np.abs(train_share - test_share).max() <= 0.011  # the same proportions
    # Dirichlet(0.1): most clients are dominated by one or two classes
    top = [np.sort(np.bincount(labels[t], minlength=10))[-2:].sum() for t in train]
    assert np.median(top) >= 80
    assert paper.class_counts([0.333, 0.333, 0.334], 100).tolist() == [33, 33, 34]
    assert paper.class_counts([0.996, 0.004, 0.0], 100).tolist() == [100, 0, 0]


def test_resume_refuses_runs_made_on_another_kind_of_device(tmp_path):
    reproduce = _reproduce()
    setup = {**_tiny_setup(reproduce), "arms": ["FedAvg"], "ablations": [], "rounds": 2}
    reproduce.run_all({"tiny": setup}, tmp_path)
    assert reproduce.load_finished({"tiny": {**setup, "device": "cpu"}}, tmp_path)
    with pytest.raises(SystemExit, match="made on cpu, this run is on cuda: pass --device cpu"):
        reproduce.load_finished({"tiny": {**setup, "device": "cuda"}}, tmp_path)
