"""LIPS on Flower: unit checks of the adapter, Ray simulations of both variants, and a
deployment run (SuperLink + two SuperNodes as processes) of examples/flower."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
if importlib.util.find_spec("ray") is None:  # not imported here: see flower_env
    pytest.skip("Flower's simulation needs ray (flwr[simulation])", allow_module_level=True)

import flower_apps as apps  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from lips_wrap import LIPSConfig, density_at, find_layers  # noqa: E402
from lips_wrap.integrations.flower import LIPSStrategy, lips_round, lips_train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory):
    """Offline, private, loopback-only settings for everything Flower and Ray start.

    Ray reads its settings when first imported, so nothing imports it before this."""
    root = tmp_path_factory.mktemp("flwr")
    env = {
        "FLWR_HOME": str(root / "home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(root / "ray"),
        # Ray otherwise takes the machine's interface address as its node address and
        # binds its gRPC servers there; with this it uses (and binds) the loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield root, env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def task_identity():
    """What a ServerApp/ClientApp process sets before messages can be built."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _message(server_round: int, arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays,
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0},
                   state=RecordDict(), run_config={})


# -- adapter, without a federation ------------------------------------------------------

def test_lips_round_maps_flower_rounds_to_core_rounds(task_identity):
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    assert lips_round(_message(1, arrays)) == 0
    assert lips_round(_message(7, arrays)) == 6
    assert density_at(lips_round(_message(2, arrays)), LIPSConfig(10)) == 0.5
    no_round = Message(content=RecordDict({"arrays": arrays}), dst_node_id=1,
                       message_type="train")
    with pytest.raises(ValueError, match="server-round"):
        lips_round(no_round)
    with pytest.raises(ValueError, match="1-based"):
        lips_round(_message(0, arrays))


def test_lips_train_keeps_node_state_between_rebuilt_apps(task_identity):
    config = LIPSConfig(total_rounds=4, period=1)
    context = _context()
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    model = apps.tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with lips_train(model, optimizer, _message(1, arrays), context, config) as lips:
        assert not lips.last_report.masked
        apps._fit(model, lips.optimizer, partition=0)
    assert set(context.state.keys()) == {"lips.grads", "lips.meta"}
    assert context.state["lips.meta"]["last-round"] == 0
    # A fresh model and LIPS (as Flower rebuilds the ClientApp): the node's gradients
    # are restored, so the mask is scored by sensitivity, not the magnitude fallback.
    model = apps.tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with lips_train(model, optimizer, _message(2, arrays), context, config) as lips:
            assert lips.last_report.masked and lips.last_report.fallback == ()
            raise RuntimeError("boom")
    assert context.state["lips.meta"]["last-round"] == 0  # a failed round saves nothing
    model = apps.tiny_net()
    with pytest.raises(ValueError, match="past LIPSConfig.total_rounds=4"):
        with lips_train(model, torch.optim.SGD(model.parameters(), lr=1),
                        _message(5, arrays), context, config):
            pass
    with pytest.raises(ValueError, match="rounds must increase"):
        with lips_train(model, torch.optim.SGD(model.parameters(), lr=1),
                        _message(1, arrays), context, config):
            pass


class _Grid:
    def get_node_ids(self):
        return [11, 12, 13]


def test_strategy_masks_a_copy_and_never_the_shared_record(task_identity):
    model = apps.tiny_net()
    plan = find_layers(model)
    strategy = LIPSStrategy(FedAvg(), model, LIPSConfig(total_rounds=3, period=1))
    first = ArrayRecord(model.state_dict())
    messages = list(strategy.configure_train(1, first, ConfigRecord(), _Grid()))
    assert all(m.content["arrays"] is first for m in messages)  # round 1: untouched
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    second = ArrayRecord(model.state_dict())
    before = {name: bytes(array.data) for name, array in second.items()}
    messages = list(strategy.configure_train(2, second, ConfigRecord({"lr": 0.1}), _Grid()))
    assert {m.metadata.dst_node_id for m in messages} == {11, 12, 13}
    assert {name: bytes(array.data) for name, array in second.items()} == before
    sent = messages[0].content["arrays"]
    assert sent is not second and all(m.content["arrays"] is sent for m in messages)
    assert messages[0].content["config"]["server-round"] == 2
    assert messages[0].content["config"]["lr"] == 0.1
    for decision in plan.decisions:
        tensor = torch.from_numpy(sent[decision.name].numpy())
        if decision.eligible:
            keep = int(0.5 * decision.numel)
            assert int((tensor == 0).sum()) == decision.numel - keep
        else:
            assert bytes(sent[decision.name].data) == before[decision.name]
    assert strategy.reports[2].density == 0.5 and strategy.reports[2].fallback == ()


def test_strategy_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Strategy"):
        LIPSStrategy(object(), apps.tiny_net(), LIPSConfig(3))
    with pytest.raises(TypeError, match="LayerPlan"):
        LIPSStrategy(FedAvg(), "net", LIPSConfig(3))


# -- Ray simulations --------------------------------------------------------------------

def _simulate(flower_env, client_app, strategy):
    from flwr.simulation import run_simulation

    root, _ = flower_env
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": 2, "_temp_dir": str(root / "ray")}}
    run_simulation(apps.server_app(strategy), client_app, num_supernodes=apps.NUM_NODES,
                   backend_config=backend)


def _probe():
    return apps.listening_sockets([os.getpid()])


def _check_received(replies, global_sums, server_round):
    """Every node's received arrays: exact density on eligible tensors on mask rounds,
    exempt tensors (and everything on other rounds) identical to the global model."""
    plan = find_layers(apps.tiny_net())
    density = density_at(server_round - 1, apps.CONFIG)
    for reply in replies:
        for index, decision in enumerate(plan.decisions):
            if density is not None and decision.eligible:
                expected = decision.numel - int(density * decision.numel)
                assert reply["zeros"][index] == expected, (server_round, decision.name)
            else:
                assert reply["sums"][index] == global_sums[index], (server_round, decision.name)


@pytest.fixture(scope="module")
def client_side_run(flower_env):
    strategy = apps.RecordingFedAvg(probe=_probe)
    _simulate(flower_env, apps.lips_client, strategy)
    return strategy


@pytest.mark.slow
def test_client_side_masks_exactly_on_mask_rounds(client_side_run):
    run = client_side_run
    assert sorted(run.replies) == [1, 2, 3, 4]
    plan = find_layers(apps.tiny_net())
    for server_round, replies in run.replies.items():
        _check_received(replies, run.global_sums[server_round], server_round)
        masked = density_at(server_round - 1, apps.CONFIG) is not None
        for reply in replies:
            flags = dict(zip([d.name for d in plan.decisions], reply["unchanged"]))
            for decision in plan.decisions:
                assert flags[decision.name] == int(not (masked and decision.eligible))
            # Gradients came back from context.state: no magnitude fallback.
            assert reply["fallback"] == 0


@pytest.mark.slow
def test_failed_node_is_dropped_for_its_round_and_comes_back(client_side_run):
    run = client_side_run
    failing_node, failing_round = apps.FAILING
    assert run.failures == {1: 0, 2: 0, 3: 1, 4: 0}
    partitions = {r: sorted(m["partition-id"] for m in run.replies[r]) for r in run.replies}
    assert partitions[failing_round] == [p for p in range(apps.NUM_NODES) if p != failing_node]
    assert partitions[failing_round + 1] == list(range(apps.NUM_NODES))


@pytest.mark.slow
def test_simulation_listens_on_loopback_only(client_side_run):
    sockets = client_side_run.probed
    assert sockets, "the probe found no listening socket of the simulation"
    assert [s for s in sockets if not s[0].startswith(LOOPBACK)] == []


@pytest.mark.slow
def test_server_side_masks_exactly_on_mask_rounds(flower_env):
    inner = apps.RecordingFedAvg()
    strategy = LIPSStrategy(inner, apps.tiny_net(), apps.CONFIG)
    _simulate(flower_env, apps.plain_client, strategy)
    assert sorted(inner.replies) == [1, 2, 3, 4]
    assert all(count == 0 for count in inner.failures.values())
    for server_round, replies in inner.replies.items():
        assert len(replies) == apps.NUM_NODES
        _check_received(replies, inner.global_sums[server_round], server_round)
        # one mask per round, the same on every node
        assert all(r["zeros"] == replies[0]["zeros"] for r in replies)
    assert [r.masked for _, r in sorted(strategy.reports.items())] == [False, True, True, True]
    assert strategy.reports[2].fallback == ()


# -- deployment: SuperLink + SuperNodes as processes ------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait until the SuperLink answers on its HTTP API (or fail if it exited)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"flower-superlink exited with {process.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"flower-superlink did not answer on port {port} in {timeout:.0f} s")


def _stop(processes) -> None:
    for proc in reversed(processes):  # SuperNodes first, then the SuperLink
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(processes):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.slow
def test_deployment_superlink_and_two_supernodes(flower_env):
    root, env_vars = flower_env
    env = {**os.environ, **env_vars, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    link_port = _free_port()
    home = Path(env_vars["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    processes = []

    def start(name, args):
        log = open(logs / f"{name}.log", "w")
        processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=root))

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                            "--host", "127.0.0.1", "--port", str(link_port),
                            "--database", str(root / "state.db"),
                            "--disable-runtime-dependency-installation"])
        _wait_healthy(link_port, processes[0])
        for node in range(2):
            start(f"supernode{node}", [
                str(BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", f"partition-id={node} num-partitions=2"])
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO / "examples" / "flower"), "deploy", "--stream",
             "--run-config", "num-server-rounds=2 local-epochs=1 fraction-evaluate=0.0"],
            env=env, capture_output=True, text=True, timeout=420, cwd=root)
        sockets = apps.listening_sockets([p.pid for p in processes])
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:]
        listing = subprocess.run([str(BIN / "flwr"), "ls", "deploy", "--format", "json"],
                                 env=env, capture_output=True, text=True, timeout=60, cwd=root)
        runs = json.loads(listing.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], listing.stdout
        # Server round 2 is the first mask round: both nodes zero half of the 13,824
        # eligible weights of the digits CNN (density 0.5).
        zeroed = [float(x) for x in re.findall(r"'lips-zeroed': ([0-9.e+]+)", output)]
        assert zeroed[:2] == [0.0, 6912.0], output[-3000:]
        assert sockets and [s for s in sockets if not s[0].startswith(LOOPBACK)] == []
    finally:
        _stop(processes)
    assert all(proc.poll() is not None for proc in processes)
