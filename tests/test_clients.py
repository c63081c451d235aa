"""ClientStates and ServerMasker: the per-client and previous-global state adapters share."""

import pytest
import torch
from conftest import MIDDLE, SmallCNN, train_steps

from lips_wrap import LIPS, ClientStates, LIPSConfig, ServerMasker, find_layers


def small_lips():
    torch.manual_seed(0)
    model = SmallCNN()
    return model, LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       LIPSConfig(total_rounds=10))


def test_each_client_keeps_its_own_gradients():
    model, lips = small_lips()
    clients = ClientStates(lips)
    kept = {}
    for cid, seed in (("a", 1), ("b", 2)):
        clients.activate(cid)
        lips.on_global_model(0)
        train_steps(model, lips.optimizer, seed=seed)
        kept[cid] = lips.optimizer.captured_grad(model.conv1.weight).clone()
    assert not torch.equal(kept["a"], kept["b"])
    clients.activate("a")
    assert torch.equal(lips.optimizer.captured_grad(model.conv1.weight), kept["a"])
    assert torch.equal(clients.state_of("b")["grads"]["conv1.weight"], kept["b"])
    clients.activate("c")  # a new client starts fresh
    assert lips.optimizer.captured_grad(model.conv1.weight) is None
    assert len(clients) == 2  # a and b stored; c is active, stored at the next save
    # carried over to a LIPS around a fresh optimizer
    clients.save()
    assert len(clients) == 3
    del lips
    again = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 LIPSConfig(total_rounds=10))
    carried = ClientStates(again, carry=clients)
    carried.activate("b")
    assert torch.equal(again.optimizer.captured_grad(model.conv1.weight), kept["b"])
    with pytest.raises(TypeError, match="needs a LIPS"):
        ClientStates(model)


def test_server_masker_scores_against_what_it_sent():
    torch.manual_seed(0)
    model = SmallCNN()
    plan = find_layers(model)
    config = LIPSConfig(total_rounds=10, period=1)
    initial = model.state_dict()
    masker = ServerMasker(plan, config, initial=initial)
    aggregated = {k: v + 0.1 if v.is_floating_point() else v for k, v in initial.items()}
    masked, report = masker(aggregated, 1)
    assert report.masked and report.fallback == ()
    for name in MIDDLE:
        assert torch.equal(masker.previous[name], masked[name])
        assert masker.previous[name] is not masked[name]
    assert set(masker.previous) == set(MIDDLE)
    fresh = ServerMasker(plan, config)
    assert fresh(aggregated, 1)[1].fallback == tuple(MIDDLE)  # no previous: magnitude


def test_client_states_checkpoint_round_trip():
    model, lips = small_lips()
    clients = ClientStates(lips)
    clients.activate(0)
    lips.on_global_model(0)
    train_steps(model, lips.optimizer)
    saved = clients.state_dict()
    assert saved["clients"][0]["last_round"] == 0
    other = ClientStates(lips)
    other.load_state_dict(saved)
    other.activate(0)
    assert lips.state_dict()["last_round"] == 0
    with pytest.raises(ValueError, match="'clients'"):
        other.load_state_dict({"states": {}})
