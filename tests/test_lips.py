import copy

import pytest
import torch
from conftest import MIDDLE, SmallCNN, train_steps
from torch import nn

from lips_wrap import LIPS, LIPSConfig, MaskReport, mask_global_state
from lips_wrap.masking import keep_count


def make(**config):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    settings = {"total_rounds": 20, **config}
    return model, LIPS(model, opt, LIPSConfig(**settings))


def test_mask_round_keeps_exact_count_and_exempt_bit_identical():
    model, lips = make(start_density=0.3)
    train_steps(model, lips.optimizer)
    before = copy.deepcopy(model.state_dict())
    report = lips.on_global_model(1)
    assert report.masked and report.density == pytest.approx(0.3)
    zeroed = 0
    for name, tensor in model.state_dict().items():
        if name in MIDDLE:
            kept = keep_count(tensor.numel(), 0.3)
            assert int((tensor != 0).sum()) == kept, name
            zeroed += tensor.numel() - kept
            # kept entries are unchanged
            assert torch.equal(tensor[tensor != 0], before[name][tensor != 0])
        else:
            assert torch.equal(tensor, before[name]), name
    assert report == MaskReport(1, pytest.approx(0.3), "sensitivity", 3, zeroed,
                                sum(model.get_parameter(n).numel() for n in MIDDLE), ())


def test_keeps_the_largest_gradient_times_weight():
    model, lips = make()
    train_steps(model, lips.optimizer)
    param = model.get_parameter("fc.weight")
    grad = lips.optimizer.captured_grad(param).float()
    score = (grad * param.detach()).abs().reshape(-1)
    expected = torch.zeros_like(score, dtype=torch.bool)
    expected[score.argsort(descending=True, stable=True)[:keep_count(score.numel(), 0.5)]] = True
    lips.on_global_model(1)
    assert torch.equal(param.detach().reshape(-1) != 0, expected)


def test_off_mask_rounds_change_nothing():
    model, lips = make()
    train_steps(model, lips.optimizer)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(lips.optimizer.state_dict())
    for rnd in (0, 2, 3, 4, 5):
        report = lips.on_global_model(rnd)
        assert not report.masked and report.elements_zeroed == 0
        # round 1's mask was skipped: said by round 2's report, and only there
        assert report.skipped == ((1,) if rnd == 2 else ())
        assert str(report).endswith("no mask" if rnd != 2 else "round(s) 1 (this client "
                                    "was not there)")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert str(lips.optimizer.state_dict()) == str(state_before)


def test_mask_is_transient_weights_regrow():
    model, lips = make()
    train_steps(model, lips.optimizer)
    lips.on_global_model(1)
    zero = model.get_parameter("conv1.weight") == 0
    lips.optimizer.state.clear()
    train_steps(model, lips.optimizer, steps=2, seed=5)
    assert bool((model.get_parameter("conv1.weight")[zero] != 0).any())


def test_never_trained_client_falls_back_to_magnitude():
    model, lips = make()
    report = lips.on_global_model(1)
    assert report.fallback == MIDDLE
    assert "magnitude score" in str(report)
    weight = model.get_parameter("conv2.weight")
    assert int((weight != 0).sum()) == keep_count(weight.numel(), 0.5)


def test_rounds_must_increase():
    model, lips = make()
    lips.on_global_model(1)
    with pytest.raises(ValueError, match=r"on_global_model\(1\) after on_global_model\(1\)"):
        lips.on_global_model(1)
    with pytest.raises(ValueError, match="rounds must increase"):
        lips.on_global_model(0)
    with pytest.raises(ValueError, match=r"round 20 is outside \[0, 20\)"):
        lips.on_global_model(20)


@pytest.mark.parametrize("where", ["weight", "grad"])
def test_non_finite_values_at_mask_time_name_the_tensor(where):
    model, lips = make()
    train_steps(model, lips.optimizer)
    param = model.get_parameter("conv2.weight")
    target = param.data if where == "weight" else lips.optimizer.captured_grad(param)
    target.view(-1)[3] = float("nan")
    before = model.get_parameter("conv1.weight").detach().clone()
    expected = "weight conv2.weight" if where == "weight" else "stored gradient of conv2.weight"
    with pytest.raises(ValueError, match=f"{expected} holds 1 NaN"):
        lips.on_global_model(1)
    assert torch.equal(model.get_parameter("conv1.weight"), before)  # nothing half-done


def test_state_dict_round_trip_lets_one_lips_serve_many_clients():
    model, lips = make()
    fresh = lips.state_dict()
    assert fresh == {"version": 1, "last_round": None, "grads": {}}
    train_steps(model, lips.optimizer, seed=1)
    lips.on_global_model(0)
    client_a = lips.state_dict()
    assert set(client_a["grads"]) == set(MIDDLE) and client_a["last_round"] == 0
    assert client_a["grads"]["fc.weight"].dtype == torch.bfloat16
    # the saved copy does not move when training goes on
    snapshot = client_a["grads"]["fc.weight"].clone()
    train_steps(model, lips.optimizer, seed=2)
    assert torch.equal(client_a["grads"]["fc.weight"], snapshot)

    lips.load_state_dict(fresh)  # client b: never trained
    assert lips.on_global_model(1).fallback == MIDDLE
    lips.load_state_dict(client_a)
    report = lips.on_global_model(1)
    assert report.fallback == ()
    param = model.get_parameter("fc.weight")
    assert torch.equal(lips.optimizer.captured_grad(param), snapshot)


def test_load_state_dict_rejects_foreign_states():
    model, lips = make()
    with pytest.raises(ValueError, match="not a LIPS state"):
        lips.load_state_dict({"grads": {}})
    with pytest.raises(ValueError, match="does not mask: head.weight"):
        lips.load_state_dict({"version": 1, "last_round": None,
                              "grads": {"head.weight": torch.zeros(3, 12)}})
    with pytest.raises(ValueError, match=r"grads\['fc.weight'\]: gradient of shape \(2,\)"):
        lips.load_state_dict({"version": 1, "last_round": None,
                              "grads": {"fc.weight": torch.zeros(2)}})
    with pytest.raises(ValueError, match="round 99 is outside"):
        lips.load_state_dict({"version": 1, "last_round": 99, "grads": {}})


def test_random_score_is_reproducible_per_seed():
    masks = []
    for seed in (1, 1, 2):
        model, lips = make(score="random", seed=seed)
        lips.on_global_model(1)
        masks.append(model.get_parameter("conv2.weight") != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("score", ["magnitude", "low_magnitude"])
def test_magnitude_scores(score):
    model, lips = make(score=score)
    weight = model.get_parameter("fc.weight")
    magnitude = weight.detach().abs().clone()
    lips.on_global_model(1)
    kept = magnitude[weight != 0]
    dropped = magnitude[weight == 0]
    if score == "magnitude":
        assert kept.min() >= dropped.max()
    else:
        assert kept.max() <= dropped.min()


def test_optimizer_must_hold_the_eligible_parameters():
    model = SmallCNN()
    other = torch.optim.SGD(SmallCNN().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the optimizer does not hold 3 of the 3 parameters"):
        LIPS(model, other, LIPSConfig(10))
    partial = torch.optim.SGD([model.conv1.weight], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold 2 of the 3 .* conv2.weight, fc.weight"):
        LIPS(model, partial, LIPSConfig(10))


def test_mixed_devices_refused():
    model = SmallCNN()
    model.head = nn.Linear(12, 3, device="meta")
    expected = r"several devices: cpu \(stem.weight\), meta \(head.weight\)"
    with pytest.raises(ValueError, match=expected):
        LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(10))


def test_argument_types_checked():
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="config must be a LIPSConfig, got dict"):
        LIPS(model, opt, {"total_rounds": 3})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        LIPS(model, [], LIPSConfig(3))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        LIPS("model", opt, LIPSConfig(3))


def test_no_eligible_layer_is_an_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no eligible layer found"):
        LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(3))


def test_tied_parameters_masked_once_through_every_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(6, 6) for _ in range(4))
            self.c.weight = self.b.weight

    model = Tied()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(5))
    report = lips.on_global_model(1)
    assert report.tensors_masked == 1
    assert int((model.b.weight != 0).sum()) == 18 and model.c.weight is model.b.weight


def test_server_side_mask_scores_the_update_and_copies():
    torch.manual_seed(0)
    model = SmallCNN()
    plan = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), LIPSConfig(10)).plan
    state = {k: v.clone() for k, v in model.state_dict().items()}
    previous = {k: v - 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in state.items()}
    original = {k: v.clone() for k, v in state.items()}
    out, report = mask_global_state(state, previous, plan, 1, LIPSConfig(10, start_density=0.3))
    for name, tensor in state.items():
        assert torch.equal(tensor, original[name])  # input untouched
        if name in MIDDLE:
            score = ((tensor - previous[name]) * tensor).abs().reshape(-1)
            k = keep_count(tensor.numel(), 0.3)
            expected = torch.zeros_like(score, dtype=torch.bool)
            expected[score.argsort(descending=True, stable=True)[:k]] = True
            assert torch.equal(out[name].reshape(-1) != 0, expected)
        else:
            assert out[name] is tensor
    assert report.tensors_masked == 3 and report.fallback == ()
    out2, report2 = mask_global_state(state, None, plan, 1, LIPSConfig(10))
    assert report2.fallback == MIDDLE
    out3, report3 = mask_global_state(state, previous, plan, 2, LIPSConfig(10))
    assert not report3.masked and all(out3[k] is state[k] for k in state)
    with pytest.raises(KeyError, match="lacks 1 tensors the plan masks, e.g. fc.weight"):
        mask_global_state({k: v for k, v in state.items() if k != "fc.weight"}, None, plan, 1,
                          LIPSConfig(10))
