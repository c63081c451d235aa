"""LIPSCallback with the Trainer's model on each device (CPU here, CUDA on a GPU machine:
``pytest -m cuda``). The Trainer places the model itself (``use_cpu``)."""

from __future__ import annotations

import pytest
from conftest import DEVICES

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf import CONFIG, assert_masks, federate, tiny_bert  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_masks_exact_counts_with_the_model_on(device, tmp_path):
    model = tiny_bert().to(device)
    lips, callback, probe, loaded = federate(model, "cls", CONFIG, tmp_path,
                                             args={"use_cpu": device == "cpu"})
    assert {p.device.type for p in model.parameters()} == {device}
    for name in lips.plan.eligible_names:  # kept beside the weights, from this device
        kept = lips.optimizer.captured_grad(model.get_parameter(name))
        assert kept.device.type == device and kept.dtype == lips.config.grad_dtype, name
    assert assert_masks(lips, callback, probe, loaded, CONFIG) == 2
    assert not any(r.fallback for r in callback.reports)  # each client's gradients kept
