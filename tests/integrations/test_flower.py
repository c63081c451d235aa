"""LIPS on Flower: unit checks of the adapter, Ray simulations of both variants, and a
deployment run (SuperLink + two SuperNodes as processes) of examples/flower."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
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
from lips_wrap.integrations.flower import (  # noqa: E402
    LIPSStrategy,
    lips_round,
    lips_train,
    report_metrics,
    show_lips_logs,
)

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


def _message(server_round: int, arrays: ArrayRecord, **records) -> Message:
    content = RecordDict({"arrays": arrays,
                          "config": ConfigRecord({"server-round": server_round}), **records})
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


EVERY_ROUND = LIPSConfig(total_rounds=4, period=1)
"""Server rounds 2, 3, 4 (LIPS rounds 1, 2, 3) mask, at density 0.5 first."""


def _enter(model, msg, context=None, **options):
    """Enter and leave lips_train around one step of training; returns the LIPS."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with lips_train(model, optimizer, msg, context or _context(), EVERY_ROUND,
                    **options) as lips:
        apps._fit(model, lips.optimizer, partition=0)
    return lips


def test_lips_train_refuses_a_model_that_does_not_hold_the_received_arrays(task_identity):
    """Entering lips_train before loading the arrays would mask the old weights and
    report a mask the trained model never had: it raises, names the fix, changes nothing."""
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    model = apps.tiny_net()
    with torch.no_grad():
        model[2].weight.add_(1.0)  # one of the two masked tensors is not the received one
    before = {name: t.clone() for name, t in model.state_dict().items()}
    context = _context()
    with pytest.raises(ValueError, match=(
        r"does not hold the arrays this message carries: 1 of the 2 tensors LIPS masks "
        r"differ from ArrayRecord 'arrays' \(e\.g\. 2\.weight\)\. .*load the received "
        r"arrays first: model\.load_state_dict\(msg\.content\['arrays'\]"
        r"\.to_torch_state_dict\(\)\), then enter lips_train")):
        _enter(model, _message(2, arrays), context)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert "lips.meta" not in context.state
    # Loaded first, as documented: masked on this mask round.
    model.load_state_dict(arrays.to_torch_state_dict())
    assert _enter(model, _message(2, arrays), context).last_report.masked


def test_lips_train_matches_arrays_of_compiled_and_plain_models(task_identity):
    """A compiled model loads a plain model's arrays (and the reverse): the check
    matches the names with and without the '_orig_mod.' prefix."""
    plain = apps.tiny_net()
    compiled = torch.compile(apps.tiny_net(), backend="eager")
    from_plain = ArrayRecord(plain.state_dict())
    from_compiled = ArrayRecord(compiled.state_dict())
    assert next(iter(from_compiled.keys())).startswith("_orig_mod.")
    assert _enter(compiled, _message(2, from_plain)).last_report.masked
    assert _enter(apps.tiny_net(), _message(2, from_compiled)).last_report.masked
    compiled = torch.compile(apps.tiny_net(), backend="eager")
    with torch.no_grad():
        compiled.get_parameter("_orig_mod.4.weight").mul_(2.0)
    with pytest.raises(ValueError, match=r"e\.g\. _orig_mod\.4\.weight\)"):
        _enter(compiled, _message(2, from_plain))


def test_lips_train_names_the_arrays_record_and_can_be_told_not_to_check(task_identity):
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    other = ArrayRecord({"adapter.weight": torch.zeros(2)})
    two = _message(2, arrays, extra=other)
    with pytest.raises(ValueError, match=r"2 ArrayRecords \('arrays', 'extra'\).*arrays_key="):
        _enter(apps.tiny_net(), two)
    assert _enter(apps.tiny_net(), two, arrays_key="arrays").last_report.masked
    with pytest.raises(ValueError, match=r"no ArrayRecord 'model' \(it has: 'arrays', 'extra'\)"):
        _enter(apps.tiny_net(), two, arrays_key="model")
    with pytest.raises(ValueError, match=r"none of the 2 tensors LIPS masks \(e\.g\. 2\.weight\)"
                       r" is in the message's ArrayRecord 'extra'"):
        _enter(apps.tiny_net(), two, arrays_key="extra")
    model = apps.tiny_net()
    with torch.no_grad():
        model[2].weight.add_(1.0)
    assert _enter(model, _message(2, arrays), check_loaded=False).last_report.masked


def test_reply_metrics_carry_the_fallback_count(task_identity):
    """A node's first mask round without stored gradients scores by magnitude: the
    reply metrics say for how many tensors."""
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    context = _context()
    lips = _enter(apps.tiny_net(), _message(1, arrays), context)
    assert dict(report_metrics(lips.last_report)) == {
        "lips-density": 0.0, "lips-zeroed": 0, "lips-fallback": 0, "lips-skipped": 0}
    lips = _enter(apps.tiny_net(), _message(2, arrays), context)  # gradients from round 1
    assert dict(report_metrics(lips.last_report))["lips-fallback"] == 0
    lips = _enter(apps.tiny_net(), _message(2, arrays))  # a node new to the federation
    metrics = dict(report_metrics(lips.last_report))
    assert metrics == {"lips-density": 0.5, "lips-zeroed": 144 + 288, "lips-fallback": 2,
                       "lips-skipped": 0}
    # a node that sat out server round 2 (LIPS round 1, a mask round) says so in round 3
    context = _context()
    _enter(apps.tiny_net(), _message(1, arrays), context)
    lips = _enter(apps.tiny_net(), _message(3, arrays), context)
    assert lips.last_report.skipped == (1,)
    assert dict(report_metrics(lips.last_report))["lips-skipped"] == 1


def test_log_lines_name_the_flower_and_the_lips_round(task_identity, caplog):
    """Each line names both numberings once: never 'server round 2: round 1: ...'."""
    caplog.set_level(logging.INFO, logger="lips_wrap")
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    _enter(apps.tiny_net(), _message(2, arrays))
    strategy = LIPSStrategy(FedAvg(), apps.tiny_net(), LIPSConfig(total_rounds=3, period=1))
    for server_round in (1, 2):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()))
    lines = [r.getMessage() for r in caplog.records if r.name == "lips_wrap.integrations.flower"]
    client, server = lines
    head = "node 7, Flower server round 2 (LIPS round 1): masked 2 tensors at density 0.500 "
    assert client.startswith(head) and "round" not in client[len(head):]
    assert client.endswith("; 2 tensors had no stored gradient: magnitude score")
    head = "Flower server round 2 (LIPS round 1): masked 2 tensors at density 0.500 "
    assert server.startswith(head) and "round" not in server[len(head):]


@pytest.fixture
def lips_logger():
    """The ``lips_wrap`` logger, restored after the test."""
    logger = logging.getLogger("lips_wrap")
    saved = (logger.level, list(logger.handlers))
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]


def test_show_lips_logs_prints_lips_lines_like_flowers_own(task_identity, lips_logger):
    from flwr.common.logger import console_handler

    show_lips_logs()
    show_lips_logs()
    assert lips_logger.handlers.count(console_handler) == 1
    assert lips_logger.level == logging.INFO
    printed = io.StringIO()
    stream = console_handler.setStream(printed)
    try:
        _enter(apps.tiny_net(), _message(2, ArrayRecord(apps.tiny_net().state_dict())))
    finally:
        console_handler.setStream(stream)
    assert "INFO \033[0m:      node 7, Flower server round 2 (LIPS round 1): masked 2 " in (
        printed.getvalue())


def test_strategy_refuses_arrays_that_lack_the_planned_tensors(task_identity):
    compiled = torch.compile(apps.tiny_net(), backend="eager")
    strategy = LIPSStrategy(FedAvg(), compiled, LIPSConfig(total_rounds=3, period=1))
    arrays = ArrayRecord(apps.tiny_net().state_dict())
    with pytest.raises(ValueError, match=r"lack 2 tensors the plan masks \(e\.g\. "
                       r"_orig_mod\.2\.weight.*the arrays hold e\.g\. 0\.weight"):
        strategy.configure_train(1, arrays, ConfigRecord(), _Grid())


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
        density = density_at(server_round - 1, apps.CONFIG)
        for reply in replies:
            flags = dict(zip([d.name for d in plan.decisions], reply["unchanged"]))
            for decision in plan.decisions:
                assert flags[decision.name] == int(not (density and decision.eligible))
            # The reply metrics of report_metrics; gradients came back from
            # context.state: no magnitude fallback.
            assert reply["lips-density"] == (density or 0.0)
            assert reply["lips-fallback"] == 0


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
def test_raw_optimizer_inside_lips_train_is_said_in_a_simulation(flower_env):
    """Issue 20: a handler that trains with its own optimizer inside lips_train. Every
    round, nodes in error mode fail with the fix, the others warn once each."""
    strategy = apps.RecordingFedAvg()
    _simulate(flower_env, apps.raw_client, strategy)
    assert sorted(strategy.replies) == [1, 2, 3, 4]
    for server_round in strategy.replies:
        errors = strategy.errors[server_round]
        assert len(errors) == len(apps.RAW_ERROR_NODES), server_round
        for reason in errors:
            assert "leaving lips_train" in reason and "went to the wrapped optimizer" in reason
            assert "train with lips.optimizer" in reason
        replies = strategy.replies[server_round]
        assert sorted(r["partition-id"] for r in replies) == [2, 3]
        assert [r["unwrapped-warnings"] for r in replies] == [1, 1]
        # no gradient was ever kept: every mask falls back to magnitude, and says so
        expected = 0 if server_round == 1 else len(find_layers(apps.tiny_net()).eligible)
        assert [r["lips-fallback"] for r in replies] == [expected] * 2


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
        # Both nodes trained in round 1 through lips.optimizer: no magnitude fallback.
        fallback = [float(x) for x in re.findall(r"'lips-fallback': ([0-9.e+]+)", output)]
        assert fallback[:2] == [0.0, 0.0], output[-3000:]
        # show_lips_logs() in the example's ClientApp: each SuperNode shows LIPS's line.
        for node in range(2):
            log = (logs / f"supernode{node}.log").read_text()
            assert re.search(r"node \d+, Flower server round 2 \(LIPS round 1\): masked 2 "
                             r"tensors at density 0\.500", log), log[-3000:]
        assert sockets and [s for s in sockets if not s[0].startswith(LOOPBACK)] == []
    finally:
        _stop(processes)
    assert all(proc.poll() is not None for proc in processes)
