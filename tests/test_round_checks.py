"""What a new user could miss without a word (issue 20), said by the core: float16
gradients too small for float16, skipped mask rounds, the magnitude fallback, and
training that bypassed lips.optimizer when a new LIPS is built every round."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import MIDDLE, SmallCNN, train_steps
from torch import nn

from lips_wrap import LIPS, ClientStates, LIPSConfig


def make(**config):
    torch.manual_seed(0)
    model = SmallCNN()
    settings = {"total_rounds": 20, "period": 1, **config}
    return model, LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(**settings))


def small_gradient_step(model, optimizer, scale=1e-4):
    """One step whose gradients are ``scale`` times the usual ones (a nearly
    converged model): float16 stores most of them as subnormals or zero."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 1, 6, 6, generator=generator), torch.tensor([0, 1, 2, 0, 1])
    optimizer.zero_grad()
    (nn.functional.cross_entropy(model(x), y) * scale).backward()
    optimizer.step()


def recorded(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


# -- 1. float16 buffers too small for the gradients -------------------------------------
@pytest.mark.parametrize("scale, found", [(1e-4, "% of its non-zero entries are subnormal"),
                                          (1e-8, "every entry is 0")])
def test_float16_gradients_below_its_range_warn_once_per_tensor_with_the_fix(scale, found):
    model, lips = make(grad_dtype=torch.float16)
    lips.on_global_model(0)
    small_gradient_step(model, lips.optimizer, scale)
    _, said = recorded(lambda: lips.on_global_model(1))
    precision = [text for text in said if "too small for float16" in text]
    assert sorted(text.split(" of ")[1].split(" is ")[0] for text in precision) == sorted(MIDDLE)
    for text in precision:
        assert found in text
        assert "grad_dtype=torch.bfloat16" in text and "grad_dtype=torch.float32" in text
        if scale == 1e-4:
            assert float(text.split("float16: ")[1].split("%")[0]) > 10.0
    small_gradient_step(model, lips.optimizer, scale)
    _, said = recorded(lambda: lips.on_global_model(2))
    assert not [text for text in said if "too small for float16" in text]  # once per tensor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_and_float32_keep_small_gradients_without_a_word(dtype):
    model, lips = make(grad_dtype=dtype)
    lips.on_global_model(0)
    small_gradient_step(model, lips.optimizer)
    _, said = recorded(lambda: lips.on_global_model(1))
    assert said == []
    for name in MIDDLE:
        param = model.get_parameter(name)
        kept = lips.optimizer.captured_grad(param)
        assert kept.count_nonzero() == param.grad.count_nonzero() > 0, name


def test_usual_float16_gradients_do_not_warn():
    model, lips = make(grad_dtype=torch.float16)
    lips.on_global_model(0)
    train_steps(model, lips.optimizer)
    _, said = recorded(lambda: lips.on_global_model(1))
    assert said == []


# -- 3. skipped mask rounds are recorded -------------------------------------------------
def test_a_skipped_mask_round_is_named_by_the_next_report():
    model, lips = make(period=5)  # mask rounds 1, 6, 11, 16
    lips.on_global_model(0)
    train_steps(model, lips.optimizer)
    report = lips.on_global_model(7)  # the client missed rounds 1 to 6
    assert not report.masked and report.skipped == (1, 6)
    assert str(report).endswith("skipped the mask of round(s) 1, 6 (this client was not there)")
    train_steps(model, lips.optimizer)
    report = lips.on_global_model(11)
    assert report.masked and report.skipped == ()  # 8-10 hold no mask round


def test_a_late_first_round_names_the_masks_before_it(caplog):
    model, lips = make(period=5)
    clients = ClientStates(lips)
    clients.activate("late")
    with caplog.at_level(logging.INFO, logger="lips_wrap"):
        report, _ = recorded(lambda: lips.on_global_model(6))
    assert report.masked and report.skipped == (1,)
    assert "skipped the mask of round(s) 1" in caplog.text


# -- 4. the magnitude fallback warns once per LIPS ---------------------------------------
def test_magnitude_fallback_warns_once_per_lips_then_logs(caplog):
    model, lips = make()
    clients = ClientStates(lips)
    clients.activate(0)
    report, said = recorded(lambda: lips.on_global_model(1))
    assert report.fallback == MIDDLE
    assert len([text for text in said if "scored by magnitude |W|" in text]) == 1
    assert "Said once per LIPS" in said[0]
    train_steps(model, lips.optimizer)
    clients.activate(1)  # another client whose first round is a mask round
    with caplog.at_level(logging.INFO, logger="lips_wrap"):
        report, said = recorded(lambda: lips.on_global_model(1))
    assert report.fallback == MIDDLE and said == []
    assert "scored by magnitude |W|" in caplog.text


# -- 5. training that bypassed lips.optimizer, seen at the end of the round -------------
def rebuilt_round(state, rnd, optimizer_choice, **config):
    """One round as adapters run it: a new model, optimizer and LIPS, the client's
    state restored, training, end_round. Returns the new state."""
    torch.manual_seed(0)
    model = SmallCNN()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lips = LIPS(model, inner, LIPSConfig(total_rounds=20, period=1, **config))
    if state is not None:
        lips.load_state_dict(state)
    lips.on_global_model(rnd)
    train_steps(model, lips.optimizer if optimizer_choice == "wrapper" else inner)
    lips.end_round("leaving the test's round", "use the wrapper")
    return lips.state_dict()


def test_end_round_says_a_round_trained_with_the_raw_optimizer():
    state, said = recorded(lambda: rebuilt_round(None, 0, "raw"))
    assert len(said) == 1
    assert said[0].startswith("leaving the test's round: 2 optimizer step(s) went to the "
                              "wrapped optimizer directly")
    assert said[0].endswith("Fix: use the wrapper")
    assert state["grads"] == {}
    with pytest.raises(RuntimeError, match="leaving the test's round: .* Fix: use the wrapper"):
        rebuilt_round(None, 0, "raw", unwrapped_training="error")
    _, said = recorded(lambda: rebuilt_round(None, 0, "raw", unwrapped_training="ignore"))
    assert said == []


def test_end_round_is_quiet_when_training_went_through_the_wrapper():
    state, said = recorded(lambda: rebuilt_round(None, 0, "wrapper"))
    assert said == [] and set(state["grads"]) == set(MIDDLE)
    _, said = recorded(lambda: rebuilt_round(state, 1, "wrapper"))
    assert said == []


def test_said_once_not_again_by_the_next_on_global_model():
    torch.manual_seed(0)
    model = SmallCNN()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lips = LIPS(model, inner, LIPSConfig(total_rounds=20, period=1))
    lips.on_global_model(0)
    train_steps(model, inner)
    _, said = recorded(lips.end_round)
    assert len(said) == 1 and said[0].startswith("lips.end_round(): ")
    _, said = recorded(lambda: lips.on_global_model(1))
    assert not [text for text in said if "lips.optimizer, the wrapper" in text]


def test_client_states_check_the_outgoing_clients_training():
    torch.manual_seed(0)
    model = SmallCNN()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    lips = LIPS(model, inner, LIPSConfig(total_rounds=20, period=1))
    clients = ClientStates(lips, fix="step the wrapper")
    clients.activate("a")
    lips.on_global_model(0)
    train_steps(model, inner)  # client "a" bypasses the wrapper
    _, said = recorded(lambda: clients.activate("b"))
    assert len(said) == 1
    assert said[0].startswith("the round of client 'a': 2 optimizer step(s)")
    assert said[0].endswith("Fix: step the wrapper")
    lips.on_global_model(0)
    train_steps(model, lips.optimizer)
    _, said = recorded(lambda: clients.activate("a"))
    assert said == []
