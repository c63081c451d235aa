"""The authors' measure of inertia beside the relative update: each layer's drift from
the anchor round's weights (cosine, L2 distance) and its weight norm, recorded by
InertiaTracker, summarised by anchor_drift and printed by ``lips-wrap diagnose``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_diagnose_cli import WEIGHTS, stalled_run
from torch import nn

from lips_wrap import InertiaTracker
from lips_wrap.__main__ import main
from lips_wrap.diagnostics import anchor_drift


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))


def test_tracker_records_distance_and_norm_against_the_anchor_exactly():
    model = _model()
    tracker = InertiaTracker(model, all_layers=True, anchor_round=1)
    snapshots = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + 0.1 * (step + 1))
        tracker.update(model)
        snapshots.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    names = tracker.layers
    assert names == ["0.weight", "1.weight", "2.weight"]
    for t in range(4):
        for i, name in enumerate(names):
            now = snapshots[t][name]
            assert tracker.weight_norm[i, t] == pytest.approx(float(now.norm()), rel=1e-12)
            if t < 1:
                assert math.isnan(tracker.distance_to_anchor[i, t])
                assert math.isnan(tracker.cosine_to_anchor[i, t])
            else:
                anchor = snapshots[1][name]
                assert tracker.distance_to_anchor[i, t] == pytest.approx(
                    float((now - anchor).norm()), rel=1e-9)
    # scaling a weight keeps its direction: cosine 1, drift = growth - 1
    assert np.allclose(tracker.cosine_to_anchor[:, 1:], 1.0)


def test_json_and_csv_round_trip_keep_the_four_measures(tmp_path):
    model = _model()
    tracker = InertiaTracker(model, all_layers=True, anchor_round=0)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tracker.update(model)
    tracker.to_json(tmp_path / "t.json")
    tracker.to_csv(tmp_path / "t.csv")
    for loaded in (InertiaTracker.from_json(tmp_path / "t.json"),
                   InertiaTracker.from_csv(tmp_path / "t.csv", anchor_round=0)):
        for measure in ("relative_update", "cosine_to_anchor", "distance_to_anchor",
                        "weight_norm"):
            np.testing.assert_allclose(getattr(loaded, measure), getattr(tracker, measure),
                                       rtol=1e-12)


def test_a_file_from_before_the_new_measures_loads_with_them_all_nan(tmp_path):
    old = {"layers": ["a", "b", "c"], "anchor_round": 2,
           "relative_update": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]],
           "cosine_to_anchor": [[None, None]] * 3}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = InertiaTracker.from_json(tmp_path / "old.json")
    assert loaded.relative_update.tolist() == old["relative_update"]
    assert np.isnan(loaded.distance_to_anchor).all() and loaded.weight_norm.shape == (3, 2)


def test_anchor_drift_groups_middle_against_edges():
    roles = ["first", "middle", "middle", "last"]
    cosines = np.array([[np.nan, 1.0, 0.8], [np.nan, 1.0, 0.99], [np.nan, 1.0, 0.97],
                        [np.nan, 1.0, 0.6]])
    norms = np.array([[1.0, 2.0, 2.2], [1.0, 4.0, 4.4], [1.0, 1.0, 1.5], [1.0, 2.0, 3.0]])
    distances = np.array([[np.nan, 0.0, 1.0], [np.nan, 0.0, 0.4], [np.nan, 0.0, 0.2],
                          [np.nan, 0.0, 2.0]])
    drift = anchor_drift(cosines, distances, norms, roles, anchor=1)
    assert drift.anchor == 1 and drift.last == 2
    assert drift.middle_cosine == pytest.approx(0.98)
    assert drift.edges_cosine == pytest.approx(0.7)
    assert drift.middle_drift == pytest.approx((0.4 / 4.0 + 0.2 / 1.0) / 2)
    assert drift.edges_drift == pytest.approx((1.0 / 2.0 + 2.0 / 2.0) / 2)
    assert drift.ratio == pytest.approx(0.15 / 0.75)
    assert drift.middle_norm_growth == pytest.approx((1.1 + 1.5) / 2)
    assert drift.edges_norm_growth == pytest.approx((1.1 + 1.5) / 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"anchor": 2}, "must come after the anchor"),
    ({"anchor": 5}, "anchor must be a column in [0, 2]"),
    ({"anchor": 0, "last": True}, "last must be a column"),
])
def test_anchor_drift_bad_columns_are_named(kwargs, message):
    a = np.ones((3, 3))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        anchor_drift(a, a, a, ["first", "middle", "last"], **kwargs)


def test_anchor_drift_refuses_mismatched_shapes_and_roles():
    with pytest.raises(ValueError, match="one role per layer"):
        anchor_drift(np.ones((3, 3)), np.ones((3, 2)), np.ones((3, 3)),
                     ["first", "middle", "last"], anchor=0)
    with pytest.raises(ValueError, match="needs a middle layer"):
        anchor_drift(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), ["first", "last"],
                     anchor=0)


def test_diagnose_prints_and_stores_the_anchor_drift(tmp_path, capsys):
    states = stalled_run(tmp_path / "ckpt", rounds=8)
    code = main(["diagnose", str(tmp_path / "ckpt"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    drift = result["anchor_drift"]
    # the tracker's anchor is update 2, i.e. the checkpoint of round 3; last is round 7
    assert drift["anchor_round"] == 3 and drift["last_round"] == 7

    def rel(name):
        a, b = states[3][name].double(), states[7][name].double()
        return float((b - a).norm() / a.norm())

    middle = (rel(WEIGHTS[1]) + rel(WEIGHTS[2])) / 2
    edges = (rel(WEIGHTS[0]) + rel(WEIGHTS[3])) / 2
    assert drift["middle_drift"] == pytest.approx(middle, rel=1e-6)
    assert drift["edges_drift"] == pytest.approx(edges, rel=1e-6)
    assert drift["ratio"] == pytest.approx(middle / edges, rel=1e-6) and drift["ratio"] < 0.1
    assert len(result["weight_norm"]) == 4 and len(result["distance_to_anchor"][0]) == 7
    code = main(["diagnose", str(tmp_path / "ckpt")])
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith("anchor drift"))
    assert "round 3, to round 7" in line and f"drift ratio middle / edges {middle / edges:.3f}" \
        in line
    assert lines[-1].startswith("verdict:")


def test_diagnose_with_too_few_rounds_for_the_anchor_says_so(tmp_path, capsys):
    stalled_run(tmp_path / "ckpt", rounds=4)  # 3 updates: the anchor is the last one
    main(["diagnose", str(tmp_path / "ckpt"), "--warmup", "0"])
    out = capsys.readouterr().out
    assert "anchor drift: needs a round after the anchor" in out
