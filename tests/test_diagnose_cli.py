"""``lips-wrap diagnose``: inertia from saved global checkpoints (simulation, Flower,
hand-made files), its verdict, outputs, and the errors that name the bad file."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from torch import nn

from lips_wrap import InertiaTracker
from lips_wrap.__main__ import main
from lips_wrap.diagnose import CheckpointError, diagnose, find_checkpoints, round_of
from lips_wrap.diagnostics import INERTIA_THRESHOLD

HERE = Path(__file__).resolve().parent


def mlp() -> nn.Module:
    """Four weight matrices: stem, two middle layers, head (factory for --model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                         nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


WEIGHTS = ["0.weight", "2.weight", "4.weight", "6.weight"]


def stalled_run(folder: Path, rounds: int = 6, middle_step: float = 0.001,
                suffix: str = ".pt", late_middle_step: Optional[float] = None,
                switch: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Checkpoints whose edges move by 10% per round and middle layers by ``middle_step``
    (by ``late_middle_step`` from round ``switch`` on, when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = mlp()
    generator = torch.Generator().manual_seed(1)
    states = []
    for rnd in range(rounds):
        middle = middle_step if late_middle_step is None or rnd < switch else late_middle_step
        with torch.no_grad():
            for index, step in ((0, 0.1), (2, middle), (4, middle), (6, 0.1)):
                weight = model[index].weight
                weight.add_(step * weight.norm() / math.sqrt(weight.numel())
                            * torch.randn(weight.shape, generator=generator))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        states.append(state)
        save(state, folder / f"round_{rnd}{suffix}")
    return states


def save(state: Dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def expected_updates(states: List[Dict[str, torch.Tensor]], names: List[str]) -> np.ndarray:
    """Relative updates computed here, independently of the package."""
    rows = []
    for name in names:
        row = []
        for before, after in zip(states, states[1:]):
            a, b = after[name].double(), before[name].double()
            row.append(float(torch.linalg.norm(a - b) / torch.linalg.norm(b)))
        rows.append(row)
    return np.array(rows)


def run(capsys, *argv: str):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- verdict and numbers -----------------------------------------------------------------

def test_stalled_middle_layers_give_the_inertia_verdict_and_exit_1(tmp_path, capsys):
    states = stalled_run(tmp_path / "ckpt")
    code, out, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--json")
    assert code == 1, err
    result = json.loads(out)
    assert result["layers"] == WEIGHTS
    assert result["roles"] == ["first", "middle", "middle", "last"]
    assert result["update_rounds"] == [1, 2, 3, 4, 5]
    updates = expected_updates(states, WEIGHTS)
    np.testing.assert_allclose(result["relative_update"], updates, rtol=1e-5)
    verdict = result["verdict"]
    warm = 1  # 20% of 5 updates
    middle = updates[1:3, warm:].mean()
    edges = (updates[0, warm:].mean() + updates[3, warm:].mean()) / 2
    assert verdict["warmup"] == warm and verdict["updates_used"] == 4
    assert verdict["ratio"] == pytest.approx(middle / edges, rel=1e-5)
    assert verdict["threshold"] == INERTIA_THRESHOLD
    assert verdict["stalled"] is True and verdict["ratio"] < 0.1


def test_table_and_verdict_state_their_numbers(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt")
    code, out, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--warmup", "0")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "role", "shape", "mean", "update", "last", "update",
                                "vs", "edges"]
    assert lines[1].split()[:3] == ["0.weight", "first", "6x4"]
    assert lines[4].split()[:3] == ["6.weight", "last", "3x6"]
    assert "6 checkpoints, rounds 0..5; 4 layers tracked" in out
    verdict = lines[-1]
    assert verdict.startswith("verdict: INERTIA")
    assert f"threshold {INERTIA_THRESHOLD:.3f}" in verdict
    assert "rounds 1..5 (5 updates after a warm-up of 0)" in verdict


def test_moving_middle_layers_give_no_inertia_and_exit_0(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt", middle_step=0.1)
    code, out, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"))
    assert code == 0
    assert out.splitlines()[-1].startswith("verdict: no inertia")


def test_ratio_over_time_shows_a_lag_that_the_run_average_hides(tmp_path, capsys):
    # the middle layers stall over rounds 1..4, then move as much as the edges
    states = stalled_run(tmp_path / "ckpt", rounds=11, late_middle_step=0.1, switch=5)
    code, out, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--windows", "2")
    assert code == 0  # over the run (after the warm-up) they keep moving
    lines = out.splitlines()
    over_time, drift = lines[-3], lines[-2]  # then the anchor drift, then the verdict
    assert drift.startswith("anchor drift (since the global model of round 3, to round 10)")
    assert over_time.startswith("ratio over time (no warm-up): rounds 1..5 ")
    assert " | rounds 6..10 " in over_time
    assert "below the threshold in rounds 1..5: the middle layers lagged there only" \
        in over_time
    assert lines[-1].startswith("verdict: no inertia")
    code, out, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--windows", "2", "--json")
    spans = json.loads(out)["ratio_over_time"]
    updates = expected_updates(states, WEIGHTS)
    for span, (start, stop) in zip(spans, ((0, 5), (5, 10))):
        part = updates[:, start:stop]
        expected = part[1:3].mean() / ((part[0].mean() + part[3].mean()) / 2)
        assert span["rounds"] == [start + 1, stop]
        assert span["ratio"] == pytest.approx(expected, rel=1e-5)
    assert spans[0]["ratio"] < INERTIA_THRESHOLD < spans[1]["ratio"]


def test_windows_default_and_bad_values(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt", rounds=4)
    code, out, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--json")
    assert [s["rounds"] for s in json.loads(out)["ratio_over_time"]] == [[1, 1], [2, 2],
                                                                         [3, 3]]
    for bad in ("0", "4"):
        code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--windows", bad)
        assert code == 2
        assert f"windows {bad} does not fit 3 updates (4 checkpoints); use 1..3" in err


def test_threshold_option_decides_the_exit_code(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt")
    assert run(capsys, "diagnose", str(tmp_path / "ckpt"), "--threshold", "0.0001")[0] == 0
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--threshold", "-1")
    assert code == 2 and "threshold must be a finite number > 0, got -1.0" in err
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--warmup", "5")
    assert code == 2 and "warmup 5 leaves no update" in err


def test_model_spec_picks_middle_layers_by_detection(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    stalled_run(tmp_path / "ckpt")
    code, out, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--json",
                       "--model", "test_diagnose_cli:mlp", "--exclude", "4.weight")
    assert code == 1
    result = json.loads(out)
    # detection: 2.weight and 4.weight are middle layers; --exclude moves 4.weight out
    assert result["layers"] == WEIGHTS
    assert result["roles"] == ["first", "middle", "other", "last"]


def test_simulation_checkpoints(tmp_path, capsys):
    """Checkpoints written by the project's own FedAvg simulation, one per round."""
    from lips_wrap.integrations.custom import dirichlet_split, simulate

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(120, 4, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    train = dirichlet_split(targets[:90].numpy(), 3, alpha=0.5, seed=0)
    test = [np.arange(90, 120)] * 3
    folder = tmp_path / "sim"
    folder.mkdir()

    def checkpoint(rnd, model, history):
        torch.save(model.state_dict(), folder / f"global_round_{rnd:03d}.pt")

    simulate(mlp, inputs, targets, train, test, rounds=5, epochs=1, batch_size=16,
             optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1), callbacks=[checkpoint])
    states = [torch.load(folder / f"global_round_{r:03d}.pt") for r in range(5)]
    code, out, err = run(capsys, "diagnose", str(folder), "--json", "--out",
                         str(tmp_path / "report"))
    assert code in (0, 1), err
    result = json.loads(out)
    assert [c["round"] for c in result["checkpoints"]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(result["relative_update"], expected_updates(states, WEIGHTS),
                               rtol=1e-5)
    assert code == (1 if result["verdict"]["stalled"] else 0)
    loaded = InertiaTracker.from_json(tmp_path / "report" / "inertia.json")
    assert loaded.layers == WEIGHTS and loaded.rounds == 4
    from_csv = InertiaTracker.from_csv(tmp_path / "report" / "inertia.csv")
    np.testing.assert_allclose(from_csv.relative_update, loaded.relative_update)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "report" / "inertia.png").read_bytes()[:4] == b"\x89PNG"


# -- formats and ordering ----------------------------------------------------------------

def test_safetensors_without_model_use_natural_name_order(tmp_path):
    pytest.importorskip("safetensors")
    from lips_wrap.diagnose import natural_key

    assert sorted(["h.10.w", "h.2.w", "a.w"], key=natural_key) == ["a.w", "h.2.w", "h.10.w"]
    stalled_run(tmp_path / "ckpt", suffix=".safetensors")
    result = diagnose([tmp_path / "ckpt"])
    assert result.tracker.layers == WEIGHTS   # 0, 2, 4, 6: natural order is model order here
    assert "natural name order" in result.table()


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_formats_give_the_same_numbers(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    states = stalled_run(tmp_path / "ckpt", suffix=suffix)
    result = diagnose([tmp_path / "ckpt"])
    np.testing.assert_allclose(result.tracker.relative_update,
                               expected_updates(states, WEIGHTS), rtol=1e-5)


def test_rounds_are_ordered_by_number_not_by_name(tmp_path):
    states = stalled_run(tmp_path / "a", rounds=3)
    for number, state in zip((2, 10, 1), states):   # saving order: 2, 10, 1
        torch.save(state, tmp_path / f"model_r{number}.pt")
    found = find_checkpoints([str(tmp_path / "model_r*.pt")])
    assert [c.round for c in found] == [1, 2, 10]
    assert round_of("ckpt-v2-round0007.safetensors") == 7
    assert round_of("runs/round_12/model.safetensors") == 12   # save_pretrained folders
    with pytest.raises(CheckpointError, match="nor in its folder's name"):
        round_of("runs/final/model.pt")


def test_per_round_folders_as_save_pretrained_writes_them(tmp_path):
    states = stalled_run(tmp_path / "flat", rounds=3)
    for rnd, state in zip((10, 2, 1), states):
        (tmp_path / f"round_{rnd}").mkdir()
        torch.save(state, tmp_path / f"round_{rnd}" / "model.pt")
    result = diagnose([str(tmp_path / "round_*" / "model.pt")])
    assert [c.round for c in result.checkpoints] == [1, 2, 10]
    np.testing.assert_allclose(result.tracker.relative_update,
                               expected_updates([states[2], states[1], states[0]], WEIGHTS),
                               rtol=1e-5)


def test_nested_and_list_checkpoints_are_read(tmp_path):
    states = stalled_run(tmp_path / "plain", rounds=3)
    for rnd, state in enumerate(states):
        torch.save({"model": state, "round": rnd, "optimizer": {}}, tmp_path / f"n{rnd}.pt")
        torch.save([state[name] for name in WEIGHTS], tmp_path / f"list{rnd}.pth")
    nested = diagnose([str(tmp_path / "n*.pt")])
    listed = diagnose([str(tmp_path / "list*.pth")])
    assert nested.tracker.layers == WEIGHTS
    assert listed.tracker.layers == ["0", "1", "2", "3"]
    np.testing.assert_allclose(nested.tracker.relative_update, listed.tracker.relative_update)


# -- errors name the file ----------------------------------------------------------------

def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "round_3.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"))
    assert code == 2
    assert f"{tmp_path / 'ckpt' / 'round_3.pt'}: cannot read it as a pt checkpoint" in err


class Payload:
    """Not a tensor: ``weights_only=True`` refuses to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    stalled_run(tmp_path / "ckpt")
    torch.save({"0.weight": Payload()}, tmp_path / "ckpt" / "round_2.pt")
    with pytest.raises(CheckpointError, match="round_2.pt: cannot read it"):
        diagnose([tmp_path / "ckpt"])


def test_mismatched_checkpoint_is_named(tmp_path):
    states = stalled_run(tmp_path / "ckpt")
    del states[4]["4.weight"]
    torch.save(states[4], tmp_path / "ckpt" / "round_4.pt")
    with pytest.raises(CheckpointError, match=r"round_4.pt: lacks 1 tracked tensors, "
                                              r"e.g. \['4.weight'\]"):
        diagnose([tmp_path / "ckpt"])


def test_changing_shapes_are_named(tmp_path):
    states = stalled_run(tmp_path / "ckpt")
    states[2]["2.weight"] = torch.ones(6, 7)
    torch.save(states[2], tmp_path / "ckpt" / "round_2.pt")
    with pytest.raises(CheckpointError, match=r"round_2.pt: tensor '2.weight' has shape "
                                              r"\(6, 7\), but \(6, 6\) in the first"):
        diagnose([tmp_path / "ckpt"])


def test_non_finite_values_are_named(tmp_path):
    states = stalled_run(tmp_path / "ckpt")
    states[5]["6.weight"][0, 0] = float("nan")
    torch.save(states[5], tmp_path / "ckpt" / "round_5.pt")
    with pytest.raises(CheckpointError, match=r"round_5.pt: tensor '6.weight' holds 1 "
                                              r"non-finite values"):
        diagnose([tmp_path / "ckpt"])


def test_too_few_rounds_and_bad_names(tmp_path, capsys):
    stalled_run(tmp_path / "two", rounds=2)
    code, _, err = run(capsys, "diagnose", str(tmp_path / "two"))
    assert code == 2 and "needs checkpoints of at least 3 rounds, found 2" in err
    stalled_run(tmp_path / "ckpt", rounds=3)
    torch.save({}, tmp_path / "ckpt" / "final.pt")
    with pytest.raises(CheckpointError, match="final.pt: no round number in the file name"):
        find_checkpoints([tmp_path / "ckpt"])
    (tmp_path / "ckpt" / "final.pt").unlink()
    torch.save({}, tmp_path / "ckpt" / "model_1.pth")
    with pytest.raises(CheckpointError, match="both carry round number 1"):
        find_checkpoints([tmp_path / "ckpt"])
    with pytest.raises(CheckpointError, match="no such file or folder"):
        find_checkpoints([tmp_path / "missing"])
    with pytest.raises(CheckpointError, match="the pattern matches no checkpoint file"):
        find_checkpoints([str(tmp_path / "*.nothing")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="notes.txt: not a checkpoint type"):
        find_checkpoints([tmp_path / "notes.txt"])


def test_usage_errors_exit_2(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt", rounds=3)
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--include", "x*")
    assert code == 2 and "--include and --exclude need --model" in err
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--warmup", "two")
    assert code == 2 and "invalid int value: 'two'" in err
    code, _, err = run(capsys, "diagnose")
    assert code == 2 and "the following arguments are required: PATH" in err


# -- progress bar ------------------------------------------------------------------------

def test_progress_bar_on_request(tmp_path, capsys):
    pytest.importorskip("tqdm")
    stalled_run(tmp_path / "ckpt", rounds=4)
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--progress")
    assert code == 1
    assert "checkpoints: 100%" in err and "4/4" in err
    run(capsys, "diagnose", str(tmp_path / "ckpt"), "--no-progress")
    assert "checkpoints:" not in capsys.readouterr().err


def test_progress_without_tqdm_names_the_extra(tmp_path, capsys, monkeypatch):
    stalled_run(tmp_path / "ckpt", rounds=3)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    code, _, err = run(capsys, "diagnose", str(tmp_path / "ckpt"), "--progress")
    assert code == 2 and "pip install 'lips-wrap[progress]'" in err
    code, _, _ = run(capsys, "diagnose", str(tmp_path / "ckpt"))  # default: no bar, no error
    assert code == 1


# -- the program -------------------------------------------------------------------------

def test_python_dash_m_and_console_script_agree(tmp_path):
    stalled_run(tmp_path / "ckpt", rounds=3)
    commands = [[sys.executable, "-m", "lips_wrap"]]
    script = Path(sys.executable).parent / "lips-wrap"
    if script.exists():
        commands.append([str(script)])
    for command in commands:
        result = subprocess.run(command + ["diagnose", str(tmp_path / "ckpt")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "verdict: INERTIA" in result.stdout


# -- Flower ------------------------------------------------------------------------------

def flower_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


FLOWER_ROUNDS = 3


def flower_apps(folder: Path):
    """A FedAvg ServerApp that saves the global arrays of every round, as Flower users
    do (``evaluate_fn`` gets the global ``ArrayRecord``), and a small ClientApp."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        model = flower_net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        generator = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        inputs = torch.randn(32, 6, generator=generator)
        targets = torch.randint(0, 3, (32,), generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for start in range(0, 32, 8):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[start:start + 8]),
                                        targets[start:start + 8]).backward()
            optimizer.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": 32})})
        return Message(content=content, reply_to=msg)

    def save_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        torch.save(arrays.to_torch_state_dict(), folder / f"global_round_{server_round}.pt")
        return MetricRecord({"saved": 1})

    server = ServerApp()

    @server.main()
    def main_fn(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
        strategy.start(grid, ArrayRecord(flower_net().state_dict()),
                       num_rounds=FLOWER_ROUNDS, evaluate_fn=save_round)

    return server, client


@pytest.mark.slow
def test_flower_run_checkpoints(tmp_path, capsys, monkeypatch):
    """A Flower simulation (Ray, 2 nodes, loopback only) saving one checkpoint per round."""
    pytest.importorskip("flwr")
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Flower's simulation needs ray (flwr[simulation])")
    # Ray's socket paths must stay under 108 bytes: a short private folder in /tmp.
    ray_dir = Path(tempfile.mkdtemp(prefix="lwd-ray-", dir="/tmp"))
    for key, value in {
        "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_dir),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }.items():
        monkeypatch.setenv(key, value)
    from flwr.simulation import run_simulation

    folder = tmp_path / "flower"
    folder.mkdir()
    server, client = flower_apps(folder)
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": 2, "_temp_dir": str(ray_dir)}}
    try:
        run_simulation(server, client, num_supernodes=2, backend_config=backend)
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    saved = sorted(os.listdir(folder))
    assert saved == [f"global_round_{r}.pt" for r in range(FLOWER_ROUNDS + 1)]
    states = [torch.load(folder / f"global_round_{r}.pt") for r in range(FLOWER_ROUNDS + 1)]
    code, out, err = run(capsys, "diagnose", str(folder), "--json")
    assert code in (0, 1), err
    result = json.loads(out)
    assert result["layers"] == ["0.weight", "2.weight", "4.weight"]
    assert result["roles"] == ["first", "middle", "last"]
    np.testing.assert_allclose(result["relative_update"],
                               expected_updates(states, result["layers"]), rtol=1e-5)
    assert np.all(np.array(result["relative_update"]) > 0)  # FedAvg moved every layer


def test_runs_without_the_optional_packages(tmp_path):
    """matplotlib, tqdm and safetensors are optional: .pt checkpoints are diagnosed, the
    CSV and JSON written, and the missing heatmap named with its extra."""
    stalled_run(tmp_path / "ckpt", rounds=3)
    script = (
        "import sys\n"
        "for name in ('matplotlib', 'tqdm', 'safetensors'): sys.modules[name] = None\n"
        "from lips_wrap.__main__ import main\n"
        f"code = main(['diagnose', {str(tmp_path / 'ckpt')!r}, '--out', "
        f"{str(tmp_path / 'out')!r}])\n"
        "assert not any(sys.modules.get(n) for n in ('matplotlib', 'tqdm', 'safetensors'))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    assert "inertia.png not written: the heatmap needs matplotlib: pip install " \
           "'lips-wrap[plot]'" in result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["inertia.csv", "inertia.json"]
    (tmp_path / "st").mkdir()
    for rnd in range(3):
        (tmp_path / "st" / f"r{rnd}.safetensors").write_bytes(b"x")
    script = script.replace(str(tmp_path / "ckpt"), str(tmp_path / "st"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "r0.safetensors: reading .safetensors needs the safetensors package: pip " \
           "install 'lips-wrap[safetensors]'" in result.stderr
