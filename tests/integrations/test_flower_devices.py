"""A short Flower simulation (Ray) whose clients train LIPS with the model on each device
(CPU here, CUDA on a GPU machine: ``pytest -m cuda``). The node's kept gradients go
through ``context.state`` (host arrays) and back to the device every round."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICES

pytest.importorskip("flwr")
if importlib.util.find_spec("ray") is None:
    pytest.skip("Flower's simulation needs ray (flwr[simulation])", allow_module_level=True)

import flower_apps as apps  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from test_flower import flower_env  # noqa: E402, F401  (the offline, loopback-only settings)

from lips_wrap import density_at, find_layers  # noqa: E402
from lips_wrap.integrations.flower import lips_train, report_metrics  # noqa: E402


def client_on(device: str) -> ClientApp:
    """A LIPS client that loads the received arrays into a model on ``device``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        model = apps.tiny_net().to(device)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with lips_train(model, optimizer, msg, context, apps.CONFIG) as lips:
            zeros = [int((t == 0).sum()) for t in model.state_dict().values()]
            generator = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
            x = torch.randn(8, 1, 6, 6, generator=generator).to(device)
            y = torch.randint(0, 3, (8,), generator=generator).to(device)
            for _ in range(2):
                lips.optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                lips.optimizer.step()
        on_device = all(p.device.type == device for p in model.parameters())
        metrics = MetricRecord({"num-examples": 8, "zeros": zeros, "on-device": int(on_device),
                                **report_metrics(lips.last_report)})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_simulation_masks_exactly_with_the_model_on(device, flower_env):  # noqa: F811
    from flwr.simulation import run_simulation

    root, _ = flower_env
    resources = {"num_cpus": 1}
    if device == "cuda":  # Ray hides the GPU from actors that do not ask for it
        resources["num_gpus"] = 0.5
    strategy = apps.RecordingFedAvg()
    run_simulation(apps.server_app(strategy), client_on(device),
                   num_supernodes=apps.NUM_NODES,
                   backend_config={"client_resources": resources,
                                   "init_args": {"num_cpus": 2, "_temp_dir": str(root / "ray")}})
    assert sorted(strategy.replies) == [1, 2, 3, 4]
    assert all(count == 0 for count in strategy.failures.values())
    plan = find_layers(apps.tiny_net())
    for server_round, replies in strategy.replies.items():
        density = density_at(server_round - 1, apps.CONFIG)
        assert len(replies) == apps.NUM_NODES
        for reply in replies:
            assert reply["on-device"] == 1
            assert reply["lips-fallback"] == 0  # gradients came back from context.state
            for index, decision in enumerate(plan.decisions):
                if density is not None and decision.eligible:
                    expected = decision.numel - int(density * decision.numel)
                    assert reply["zeros"][index] == expected, (server_round, decision.name)
