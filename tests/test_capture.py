"""Gradient capture of LIPSOptimizer: dtype, device, fused copy, restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lips_wrap import LIPS, LIPSConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3),
    )


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    x = torch.randn(16, 6)
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,))).backward()
    optimizer.step()


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grad_device", [None, "cpu"])
def test_captured_grads_are_last_step_grads_in_grad_dtype(grad_dtype, grad_device):
    model = _model()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                LIPSConfig(10, grad_dtype=grad_dtype, grad_device=grad_device))
    assert lips.plan.eligible_names
    for _ in range(2):
        _step(model, lips.optimizer)
    for name in lips.plan.eligible_names:
        param = model.get_parameter(name)
        kept = lips.optimizer.captured_grad(param)
        assert kept.dtype == grad_dtype
        assert kept.device == torch.device("cpu")
        assert kept.shape == param.shape
        assert torch.equal(kept, param.grad.to(grad_dtype))  # the last step's gradient


def test_exempt_parameters_are_not_captured():
    model = _model()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(10))
    _step(model, lips.optimizer)
    eligible = set(lips.plan.eligible_names)
    for name, param in model.named_parameters():
        if name not in eligible:
            with pytest.raises(KeyError):
                lips.optimizer.captured_grad(param)


def test_buffers_are_reused_across_steps():
    model = _model()
    lips = LIPS(model, torch.optim.AdamW(model.parameters()), LIPSConfig(10))
    _step(model, lips.optimizer)
    param = model.get_parameter(lips.plan.eligible_names[0])
    first = lips.optimizer.captured_grad(param)
    _step(model, lips.optimizer)
    assert lips.optimizer.captured_grad(param) is first
    assert torch.equal(first, param.grad.to(torch.bfloat16))


def test_params_without_grad_keep_nothing_until_they_get_one():
    model = _model()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(10))
    frozen = model.get_parameter(lips.plan.eligible_names[0])
    frozen.requires_grad_(False)
    _step(model, lips.optimizer)
    assert lips.optimizer.captured_grad(frozen) is None
    other = model.get_parameter(lips.plan.eligible_names[1])
    assert lips.optimizer.captured_grad(other) is not None


def test_closure_step_captures_after_the_closure():
    model = _model()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(10))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def closure():
        lips.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    lips.optimizer.step(closure)
    param = model.get_parameter(lips.plan.eligible_names[0])
    assert torch.equal(lips.optimizer.captured_grad(param), param.grad.to(torch.bfloat16))


def test_restored_grads_take_grad_dtype_and_grad_device():
    model = _model()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1),
                LIPSConfig(10, grad_dtype="bfloat16", grad_device="cpu"))
    _step(model, lips.optimizer)
    state = lips.state_dict()
    name = lips.plan.eligible_names[0]
    state["grads"][name] = state["grads"][name].to(torch.float32) * 2
    lips.load_state_dict(state)
    kept = lips.optimizer.captured_grad(model.get_parameter(name))
    assert kept.dtype == torch.bfloat16 and kept.device == torch.device("cpu")
    assert torch.equal(kept, state["grads"][name].to(torch.bfloat16))


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    model = nn.Sequential(emb)
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1),
                LIPSConfig(10, include=("0.weight",)))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        lips.optimizer.step()


def test_mask_round_zeroes_weights_and_state_at_the_same_entries():
    model = _model()
    lips = LIPS(model, torch.optim.AdamW(model.parameters()), LIPSConfig(10))
    _step(model, lips.optimizer)
    report = lips.on_global_model(1)
    assert report.masked
    for name in lips.plan.eligible_names:
        param = model.get_parameter(name)
        dropped = param == 0
        assert int(dropped.sum()) == param.numel() - int(0.5 * param.numel())
        for value in lips.optimizer.state_tensors(param):
            assert not value[dropped].any()
