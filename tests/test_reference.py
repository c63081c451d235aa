"""The fine-tuning mode: dropped entries return to the reference weights."""

import pytest
import torch
from conftest import MIDDLE, SmallCNN, train_steps

from lips_wrap import LIPS, LIPSConfig, find_layers, mask_global_state
from lips_wrap.masking import keep_count


def make(**config):
    torch.manual_seed(0)
    model = SmallCNN()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, inner, LIPS(model, inner, LIPSConfig(total_rounds=10, **config))


def test_dropped_entries_return_to_the_initial_weights():
    model, inner, lips = make(reference="initial", start_density=0.4)
    initial = {n: model.get_parameter(n).detach().clone() for n in MIDDLE}
    train_steps(model, lips.optimizer, steps=3)
    trained = {n: model.get_parameter(n).detach().clone() for n in MIDDLE}
    grads = {n: lips.optimizer.captured_grad(model.get_parameter(n)).float() for n in MIDDLE}
    lips.on_global_model(1)
    for name in MIDDLE:
        weight = model.get_parameter(name)
        kept = weight.ne(initial[name])
        assert int(kept.sum()) == keep_count(weight.numel(), 0.4), name
        assert torch.equal(weight[kept], trained[name][kept])
        # the kept entries are the top-k of |g * (W - W_initial)|
        score = (grads[name] * (trained[name] - initial[name])).abs()
        threshold = score[kept].min()
        assert bool((score[~kept] <= threshold).all()), name
        momentum = inner.state[weight]["momentum_buffer"]
        assert not bool(momentum[~kept].any())


def test_zero_reference_is_the_papers_method():
    results = []
    for mode in ("zero", "initial"):
        model, _, lips = make(reference=mode)
        if mode == "initial":
            lips.set_reference({n: torch.zeros_like(p) for n, p in lips._params.items()})
        train_steps(model, lips.optimizer, steps=2)
        lips.on_global_model(1)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_reference_is_part_of_the_state_dict():
    model, _, lips = make(reference="initial")
    state = lips.state_dict()
    assert set(state["reference"]) == set(MIDDLE)
    train_steps(model, lips.optimizer)
    lips.on_global_model(0)
    lips.load_state_dict(state)
    with pytest.raises(ValueError, match="reference"):
        lips.load_state_dict({k: v for k, v in state.items() if k != "reference"})
    broken = dict(state, reference={n: t[:1] for n, t in state["reference"].items()})
    with pytest.raises(ValueError, match="shape"):
        lips.load_state_dict(broken)


def test_set_reference_checks_its_input():
    _, _, lips = make(reference="initial")
    with pytest.raises(ValueError, match="lacks"):
        lips.set_reference({"conv1.weight": torch.zeros(6, 4, 3, 3)})
    _, _, plain = make()
    with pytest.raises(ValueError, match="reference='initial'"):
        plain.set_reference({})


def test_server_side_reference():
    torch.manual_seed(0)
    model = SmallCNN()
    plan = find_layers(model)
    start = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    previous = {k: v + 0.01 for k, v in start.items()}
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in start.items()}
    config = LIPSConfig(total_rounds=10, reference="initial", start_density=0.3)
    masked, report = mask_global_state(state, previous, plan, 1, config, reference=start)
    assert report.masked
    for name in MIDDLE:
        kept = masked[name].ne(start[name])
        assert int(kept.sum()) == keep_count(start[name].numel(), 0.3)
        assert torch.equal(masked[name][kept], state[name][kept])
    with pytest.raises(ValueError, match="needs mask_global_state"):
        mask_global_state(state, previous, plan, 1, config)
    with pytest.raises(ValueError, match="reference='zero'"):
        mask_global_state(state, previous, plan, 1, LIPSConfig(total_rounds=10),
                          reference=start)
