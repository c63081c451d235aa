import numpy as np
import pytest
import torch
from torch import nn

from lips_wrap import LIPSConfig
from lips_wrap.integrations.custom import simulate


def tiny_task():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(60, 4, generator=generator)
    targets = (inputs[:, 0] > 0).long() + 2 * (inputs[:, 1] > 0).long()
    train = [np.arange(0, 20), np.arange(20, 40)]
    tests = [np.arange(40, 50), np.arange(50, 60)]
    return inputs, targets, train, tests


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def run(config=None, callbacks=(), seed=0, rounds=4, server_side=False):
    inputs, targets, train, tests = tiny_task()
    return simulate(mlp, inputs, targets, train, tests, rounds=rounds, epochs=2, batch_size=8,
                    optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                    lips_config=config, seed=seed, callbacks=callbacks,
                    server_side=server_side)


def test_same_seed_gives_identical_histories_and_another_seed_differs():
    first, second, other = run(seed=3), run(seed=3), run(seed=4)
    assert [r.before_per_client for r in first] == [r.before_per_client for r in second]
    assert [r.after for r in first] == [r.after for r in second]
    assert [r.train_loss for r in first] != [r.train_loss for r in other]


def test_records_every_round_before_and_after_per_client():
    history = run()
    assert [r.round for r in history] == [0, 1, 2, 3]
    for record in history:
        assert len(record.before_per_client) == 2 and len(record.after_per_client) == 2
        assert record.before == pytest.approx(np.mean(record.before_per_client))
        assert record.after == pytest.approx(np.mean(record.after_per_client))
        assert not record.masked


def test_lips_masks_on_the_schedule_and_changes_the_run():
    config = LIPSConfig(total_rounds=4, period=2, start_density=0.3)
    history = run(config)
    assert [r.masked for r in history] == [False, True, False, True]
    plain = run()
    assert history[0].before_per_client == plain[0].before_per_client  # same until a mask
    assert [r.train_loss for r in history[1:]] != [r.train_loss for r in plain[1:]]


def test_callbacks_see_each_aggregated_model():
    seen = []

    def callback(rnd, model, history):
        seen.append((rnd, len(history), model[2].weight.detach().clone()))

    run(callbacks=[callback])
    assert [(rnd, n) for rnd, n, _ in seen] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert not torch.equal(seen[0][2], seen[-1][2])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="total_rounds is 9"):
        run(LIPSConfig(total_rounds=9))
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run(rounds=0)


def test_server_side_masks_the_sent_model_on_mask_rounds_only():
    config = LIPSConfig(total_rounds=6, period=2, start_density=0.5)
    seen = []
    server = run(config, rounds=6, server_side=True,
                 callbacks=[lambda rnd, model, history: seen.append(rnd)])
    plain = run(None, rounds=6)
    assert [r.masked for r in server] == [False, True, False, True, False, True]
    assert seen == list(range(6))
    # round 0 trains the same unmasked model, so both variants agree until the first mask
    assert server[0].before == plain[0].before
    assert [r.before for r in server[1:]] != [r.before for r in plain[1:]]
