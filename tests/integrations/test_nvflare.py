"""LIPS on NVIDIA FLARE: unit checks of the adapter, and NVFlare's own simulator running
the Client API script of nvflare_app/ (client side, in one process per site and in a
fresh process per task), LIPSFedAvg (server side) and a failing client.

The simulations run in a network namespace with only loopback up (the simulator's
server listens on all interfaces), as a process group the test stops by its id. The
simulator exits 0 even when a client fails, so every run is judged by its global model
file and round metrics.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

pytest.importorskip("nvflare")

APP = Path(__file__).resolve().parent / "nvflare_app"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nvflare"
sys.path.insert(0, str(APP))

from nvflare.app_common.abstract.fl_model import FLModel  # noqa: E402
from nvflare_net import MASKED, Net  # noqa: E402

import lips_wrap.integrations.nvflare as nvf  # noqa: E402
from lips_wrap import LIPSConfig, density_at, find_layers  # noqa: E402
from lips_wrap.masking import keep_count  # noqa: E402

SIM_TIMEOUT = 420  # seconds; a run takes 25-150 s on 2 busy cores


def _namespace_prefix() -> Optional[List[str]]:
    """``unshare`` arguments that give a private network namespace here (as root, or
    with user namespaces), or None."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            if subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
                return prefix
        except FileNotFoundError:
            return None
    return None


NAMESPACE = _namespace_prefix()
needs_namespace = pytest.mark.skipif(
    NAMESPACE is None,
    reason="the simulator's server listens on all interfaces: its tests run only in a "
    "private network namespace (unshare -n as root, or unshare -rn), unavailable here",
)


class SimulationFailed(AssertionError):
    """The simulation did not produce every round's global model and metrics."""


def run_isolated(script_and_args: List[str], cwd: Path) -> str:
    """Run a Python script in a network namespace with only loopback up, as a process
    group of its own, stopped (by its id) when the script ends or times out; return
    its output."""
    command = NAMESPACE + ["sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                           sys.executable] + script_and_args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(APP)}
    log_path = cwd / "simulator.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=SIM_TIMEOUT)
        finally:
            try:  # the simulator's own children included: the group the test started
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    return log_path.read_text()


def run_simulation(tmp_path: Path, side: str, *, clients: int = 2, threads: int = 2,
                   rounds: int = 4, period: int = 2, skip_load_round: int = -1) -> Dict:
    """Run nvflare_app/nvflare_job.py with loopback only; return the round metrics,
    traces and global model, or raise SimulationFailed with the sites' errors."""
    workspace, trace = tmp_path / "ws", tmp_path / "trace"
    trace.mkdir()
    run_isolated([
        str(APP / "nvflare_job.py"), "--workspace", str(workspace), "--trace", str(trace),
        "--side", side, "--clients", str(clients), "--threads", str(threads),
        "--rounds", str(rounds), "--period", str(period),
        "--skip-load-round", str(skip_load_round),
    ], tmp_path)
    job = workspace / "server" / "simulate_job"
    metrics_file = job / "metrics" / "round_metrics.jsonl"
    metrics = (
        [json.loads(line) for line in metrics_file.read_text().splitlines()]
        if metrics_file.is_file() else []
    )
    model_file = job / "app_server" / "FL_global_model.pt"
    if [m["round"] for m in metrics] != list(range(rounds)) or not model_file.is_file():
        errors = "\n".join(
            path.read_text() for path in sorted(workspace.glob("*/error_log.txt"))
        )
        raise SimulationFailed(
            f"{side} run: round metrics for rounds {[m['round'] for m in metrics]} of "
            f"{rounds}, global model file {'present' if model_file.is_file() else 'missing'}"
            f"; the sites' errors:\n{errors}"
        )
    traces = {
        (site, rnd): torch.load(trace / f"{site}-round{rnd}.pt", weights_only=False)
        for site in [f"site-{i}" for i in range(1, clients + 1)] for rnd in range(rounds)
    }
    model = torch.load(model_file, weights_only=False)["model"]
    return {"metrics": metrics, "traces": traces, "global": model, "rounds": rounds}


def fedavg(run: Dict, rnd: int) -> Dict[str, torch.Tensor]:
    """What NVFlare's FedAvg aggregates from round ``rnd``'s uploads (weighted by
    steps; exact for two sites, whose sum does not depend on arrival order)."""
    sent = [run["traces"][(site, rnd)]["sent"] for site in ("site-1", "site-2")]
    weight = 4.0  # 1.0 x NUM_STEPS_CURRENT_ROUND (40 samples in batches of 10)
    return {
        name: (sent[0][name] * weight + sent[1][name] * weight) * (1.0 / (2 * weight))
        for name in sent[0]
    }


def assert_top_k(result: torch.Tensor, weight: torch.Tensor, signal: torch.Tensor,
                 density: float, what: str) -> None:
    """``result`` is ``weight`` with exactly its ``int(density * numel)`` entries of
    largest ``|signal * weight|`` kept and every other entry zero."""
    assert torch.count_nonzero(weight) == weight.numel(), f"{what}: zeros before the mask"
    k = keep_count(weight.numel(), density)
    score = (signal.float() * weight.float()).abs().flatten()
    kept = torch.zeros(weight.numel(), dtype=torch.bool)
    kept[score.topk(k).indices] = True
    expected = torch.where(kept.view_as(weight), weight, torch.zeros_like(weight))
    assert torch.count_nonzero(result) == k, f"{what}: {torch.count_nonzero(result)} kept, not {k}"
    assert torch.equal(result, expected), f"{what}: not the top {k} of |g * W|"


def check_client_masks(run: Dict, config: LIPSConfig) -> None:
    """Every site, every round: the model LIPS left is the received one, except on mask
    rounds, where each masked tensor keeps exactly its top-k entries by |g * W| with
    ``g`` the gradient the site kept from its previous round."""
    assert find_layers(Net()).eligible_names == MASKED
    for (site, rnd), trace in run["traces"].items():
        density = density_at(rnd, config)
        report = trace["report"]
        assert report["density"] == density and report["fallback"] == ()
        assert report["skipped"] == ()
        for name, received in trace["received"].items():
            masked = trace["masked"][name]
            if density is None or name not in MASKED:
                assert torch.equal(masked, received), (site, rnd, name)
            else:
                grad = run["traces"][(site, rnd - 1)]["grads"][name]
                assert_top_k(masked, received, grad, density, f"{site} round {rnd} {name}")
        site_metrics = {
            s["name"]: {m["name"]: m["value"] for m in s["metrics"]}
            for s in run["metrics"][rnd]["sites"]
        }
        assert site_metrics[site]["lips_density"] == (density or 0.0)


def check_global_model(run: Dict) -> None:
    """The saved global model is the last round's aggregate (never masked)."""
    last = fedavg(run, run["rounds"] - 1)
    assert set(run["global"]) == set(last)
    for name, value in run["global"].items():
        assert torch.equal(torch.as_tensor(value), last[name]), name


# ---------------------------------------------------------------- unit checks


@pytest.fixture
def site(monkeypatch, tmp_path):
    """lips_train outside a simulator: site and job from stand-ins, the working
    directory a temporary one, no LIPS of an earlier test in the process."""
    monkeypatch.setattr(nvf.flare, "get_site_name", lambda: "site-7")
    monkeypatch.setattr(nvf.flare, "get_job_id", lambda: "job-a")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nvf, "_SITES", {})
    return tmp_path


def _received(model, rnd, total=4):
    return FLModel(params={k: v.clone() for k, v in model.state_dict().items()},
                   current_round=rnd, total_rounds=total)


def _train(model, optimizer):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 8, generator=generator), torch.randint(0, 3, (10,), generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_lips_train_checks_round_config_and_loading(site):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="FLModel that flare.receive"):
        with nvf.lips_train(model, optimizer, model.state_dict()):
            pass
    with pytest.raises(ValueError, match="current_round is None"):
        with nvf.lips_train(model, optimizer, FLModel(params=model.state_dict(),
                                                      total_rounds=4)):
            pass
    with pytest.raises(ValueError, match=r"total_rounds=9\) but the job runs 4 rounds"):
        with nvf.lips_train(model, optimizer, _received(model, 0), LIPSConfig(total_rounds=9)):
            pass
    stale = _received(Net(), 0)  # other weights than the model's
    with pytest.raises(ValueError, match=r"load_state_dict\(input_model.params\) first"):
        with nvf.lips_train(model, optimizer, stale):
            pass
    assert not (site / "lips_state_site-7.pt").exists()


def test_state_survives_a_fresh_process_and_a_failed_round(site):
    config = LIPSConfig(total_rounds=4, period=1)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with nvf.lips_train(model, optimizer, _received(model, 0), config) as first:
        _train(model, first.optimizer)
    grads = first.state_dict()["grads"]
    path = nvf.state_path("site-7")
    assert path == site / "lips_state_site-7.pt" and path.is_file()

    trained = {k: v.clone() for k, v in model.state_dict().items()}
    # same model and optimizer in the same process: the same LIPS serves again
    with pytest.raises(RuntimeError, match="boom"):
        with nvf.lips_train(model, optimizer, _received(model, 1), config) as again:
            assert again is first and again.last_report.masked
            raise RuntimeError("boom")
    assert first.state_dict()["last_round"] == 0  # put back as before the failed round

    # a fresh process: nothing in memory, the state comes from the file
    del first, again
    nvf._SITES.clear()
    model2 = Net()
    model2.load_state_dict(trained)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    received = _received(model2, 1)
    with nvf.lips_train(model2, optimizer2, received, config) as lips:
        assert lips.last_report.masked and lips.last_report.fallback == ()
        for name in MASKED:
            assert_top_k(model2.get_parameter(name).detach(), received.params[name],
                         grads[name], density_at(1, config), name)


def test_state_of_another_job_is_refused(site, monkeypatch):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with nvf.lips_train(model, optimizer, _received(model, 0)) as lips:
        _train(model, lips.optimizer)
    del lips
    nvf._SITES.clear()
    monkeypatch.setattr(nvf.flare, "get_job_id", lambda: "job-b")
    with pytest.raises(ValueError, match="state of job 'job-a', site 'site-7', not of job 'job-b'"):
        with nvf.lips_train(model, optimizer, _received(model, 1)):
            pass


@pytest.mark.filterwarnings("ignore:LIPS round 1. no stored gradient")
def test_training_without_the_wrapper_is_caught_at_the_end_of_the_round(site):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"leaving lips_train \(site-7, round 0\).*"
                      r"train with lips.optimizer"):
        with nvf.lips_train(model, optimizer, _received(model, 0)):
            _train(model, optimizer)  # the optimizer passed in, not lips.optimizer
    strict = LIPSConfig(total_rounds=4, unwrapped_training="error")
    with pytest.raises(RuntimeError, match="leaving lips_train"):
        with nvf.lips_train(model, optimizer, _received(model, 1), strict) as lips:
            _train(model, optimizer)
    assert lips.state_dict()["last_round"] == 0  # put back as before the round


def test_lost_state_is_a_warning(site, caplog):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="scored by magnitude"):
        with nvf.lips_train(model, optimizer, _received(model, 1)) as lips:
            assert lips.last_report.fallback == MASKED
    assert "no LIPS state of this site from earlier rounds" in caplog.text


def test_server_controller_checks_its_config():
    with pytest.raises(ValueError, match=r"total_rounds=5\) but the controller runs rounds 0..3"):
        nvf.LIPSFedAvg(num_clients=2, num_rounds=4, lips_model=Net(),
                       lips_config=LIPSConfig(total_rounds=5))
    with pytest.raises(TypeError, match="lips_model must be a torch.nn.Module"):
        nvf.LIPSFedAvg(num_rounds=4, lips_model={}, lips_config=LIPSConfig(total_rounds=4))


@pytest.mark.parametrize("params_type", ["FULL", "DIFF"])
def test_server_controller_masks_the_global_model(params_type):
    """update_model, called as FedAvg's run() calls it: the model for rounds 1 and 2 is
    the aggregate with each masked tensor's top-k by |dW * W| kept (dW against the model
    sent the round before, masked or not), the rest as aggregated; nothing after the
    last round. With DIFF updates the sites' changes add to the masked model."""
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.fl_model import ParamsType

    controller = nvf.LIPSFedAvg(num_clients=2, num_rounds=3, lips_model=Net(),
                                lips_config=LIPSConfig(total_rounds=3, period=1))
    controller.fl_ctx = FLContext()
    controller.event = lambda *args, **kwargs: None  # no engine to tell
    torch.manual_seed(0)
    sent = {k: v.numpy().copy() for k, v in Net().state_dict().items()}
    model = FLModel(params_type=ParamsType.FULL, params=dict(sent))
    generator = torch.Generator().manual_seed(1)
    for rnd in range(3):
        change = {k: 0.05 * torch.randn(v.shape, generator=generator).numpy()
                  for k, v in sent.items()}
        aggregate = {k: sent[k] + change[k] for k in sent}
        update = change if params_type == "DIFF" else aggregate
        controller.current_round = rnd
        model = controller.update_model(model, FLModel(
            params_type=getattr(ParamsType, params_type), params=dict(update), meta={}))
        density = density_at(rnd + 1, LIPSConfig(total_rounds=3, period=1)) if rnd < 2 else None
        for name, value in model.params.items():
            assert isinstance(value, type(aggregate[name]))
            result, expected = torch.as_tensor(value), torch.as_tensor(aggregate[name])
            if density is None or name not in MASKED:
                assert torch.equal(result, expected), (rnd, name)
            else:
                assert_top_k(result, expected, expected - torch.as_tensor(sent[name]),
                             density, f"model for round {rnd + 1}, {name}")
        sent = {k: np.copy(v) for k, v in model.params.items()}
    assert sorted(controller.lips_reports) == [1, 2]


# ---------------------------------------------------------------- simulations


@pytest.mark.slow
@needs_namespace
def test_client_side_in_one_process_per_site(tmp_path):
    run = run_simulation(tmp_path, "client", threads=2, rounds=4, period=2)
    for site in ("site-1", "site-2"):
        assert len({run["traces"][(site, r)]["pid"] for r in range(4)}) == 1
    check_client_masks(run, LIPSConfig(total_rounds=4, period=2))
    check_global_model(run)


@pytest.mark.slow
@needs_namespace
def test_client_side_with_a_fresh_process_per_task(tmp_path):
    run = run_simulation(tmp_path, "client", threads=1, rounds=2, period=1)
    for site in ("site-1", "site-2"):
        assert len({run["traces"][(site, r)]["pid"] for r in range(2)}) == 2
        assert run["traces"][(site, 0)]["cwd"] == str(tmp_path / "ws" / site)
    check_client_masks(run, LIPSConfig(total_rounds=2, period=1))
    check_global_model(run)


@pytest.mark.slow
@needs_namespace
def test_server_side_lips_fedavg(tmp_path):
    config = LIPSConfig(total_rounds=4, period=2)
    run = run_simulation(tmp_path, "server", threads=2, rounds=4, period=2)
    traces = run["traces"]
    previous = None
    for rnd in range(4):
        received = traces[("site-1", rnd)]["received"]
        for name, value in traces[("site-2", rnd)]["received"].items():
            assert torch.equal(value, received[name])  # one global model for all
        density = density_at(rnd, config)
        if rnd == 0:
            assert all(torch.count_nonzero(received[name]) == received[name].numel()
                       for name in MASKED)
        else:
            aggregate = fedavg(run, rnd - 1)
            for name, value in received.items():
                if density is None or name not in MASKED:
                    assert torch.equal(value, aggregate[name]), (rnd, name)
                else:
                    assert_top_k(value, aggregate[name], aggregate[name] - previous[name],
                                 density, f"round {rnd} {name}")
        previous = received
    check_global_model(run)


@pytest.mark.slow
@needs_namespace
def test_a_failing_client_fails_the_run(tmp_path):
    with pytest.raises(SimulationFailed, match="does not hold the received weights"):
        run_simulation(tmp_path, "client", threads=2, rounds=2, skip_load_round=0)


@pytest.mark.slow
@needs_namespace
def test_example_job(tmp_path):
    """examples/nvflare/job.py, client side, 2 sites x 2 rounds: it prints a row per
    round (round 1 masked at the start density) and the global model it read back."""
    out = run_isolated([str(EXAMPLE / "job.py"), "--sites", "2", "--rounds", "2",
                        "--period", "1", "--workspace", str(tmp_path / "ws")], tmp_path)
    rows = re.findall(r"^\s+(\d+)\s+(\d\.\d{3})\s+\d\.\d{3}\s+\d\.\d{3}$", out, re.M)
    assert rows == [("0", "0.000"), ("1", "0.500")], out[-3000:]
    model = tmp_path / "ws" / "lips_digits" / "server" / "simulate_job" / "app_server"
    assert f"global model: {model / 'FL_global_model.pt'}" in out
