import numpy as np
import pytest
import torch
from torch import nn

from lips_wrap.integrations.custom import (
    dirichlet_split,
    fedavg,
    label_distribution,
    local_train,
    matched_split,
    personalized_accuracy,
)

LABELS = np.repeat(np.arange(10), 50)


def test_dirichlet_split_is_a_partition_with_skew():
    parts = dirichlet_split(LABELS, 8, alpha=0.1, seed=1, min_samples=5)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(LABELS.size))
    assert min(len(p) for p in parts) >= 5
    # alpha 0.1: most clients are dominated by few classes
    top_share = [label_distribution(LABELS, p, 10).max() for p in parts]
    assert np.median(top_share) > 0.4
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_split(LABELS, 8, 0.1, 1, 5)))


def test_dirichlet_split_bad_input():
    with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
        dirichlet_split(LABELS, 4, alpha=0)
    with pytest.raises(ValueError, match="num_clients must be >= 1, got 0"):
        dirichlet_split(LABELS, 0, alpha=1)
    with pytest.raises(ValueError, match="cannot give 10 clients 60 each"):
        dirichlet_split(LABELS, 10, alpha=1, min_samples=60)
    with pytest.raises(ValueError, match="1-D sequence of integer class ids"):
        dirichlet_split(np.zeros(4), 2, alpha=1)


def test_matched_split_follows_each_distribution():
    dists = [np.eye(10)[3], np.array([0.5, 0.5] + [0] * 8)]
    tests = matched_split(LABELS, dists, 200, seed=0)
    assert all(len(t) == 200 for t in tests)
    assert set(LABELS[tests[0]].tolist()) == {3}
    assert set(LABELS[tests[1]].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="client 0 needs class 11"):
        matched_split(LABELS, [np.eye(12)[11]], 5)


def test_fedavg_is_sample_weighted():
    half = torch.float16
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(2), "h": torch.tensor([1.0], dtype=half)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(5), "h": torch.tensor([3.0], dtype=half)}
    out = fedavg([a, b], [1, 3])
    assert out["w"].tolist() == [3.0, 1.0]
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4  # 2*0.25 + 5*0.75 rounded
    assert out["h"].dtype == torch.float16 and out["h"].item() == 2.5
    with pytest.raises(ValueError, match="2 state dicts but 1 weights"):
        fedavg([a, b], [1])
    with pytest.raises(ValueError, match="state dict 1 has other keys"):
        fedavg([a, {"w": a["w"]}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([a], [0])


def test_local_train_and_personalized_accuracy():
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    first = local_train(model, opt, x, y, 1, 10, torch.Generator().manual_seed(0))
    last = local_train(model, opt, x, y, 30, 10, torch.Generator().manual_seed(0))
    assert last < first
    mean, per_client = personalized_accuracy(model, x, y, [np.arange(20), np.arange(20, 40)])
    assert len(per_client) == 2 and mean == pytest.approx(np.mean(per_client)) and mean > 0.8
    assert model.training
