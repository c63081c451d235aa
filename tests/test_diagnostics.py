import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lips_wrap import InertiaTracker
from lips_wrap.diagnostics import cosine_similarity, inertia_ratio, relative_update


def three_layers() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return model


def weights(middle, first=((1.0, 0.0), (0.0, 1.0)), last=((1.0, 0.0), (0.0, 1.0))):
    return {"0.weight": torch.tensor(first), "1.weight": torch.tensor(middle),
            "2.weight": torch.tensor(last)}


SEQUENCE = [
    ((2.0, 0.0), (0.0, 2.0)),  # round 0: doubled, ||dW|| / ||W|| = sqrt(2) / sqrt(2) = 1
    ((2.0, 0.0), (0.0, 2.0)),  # round 1: unchanged
    ((0.0, 3.0), (4.0, 0.0)),  # round 2 (anchor): ||dW|| = sqrt(4+9+16+4), ||W_1|| = sqrt(8)
    ((0.0, 6.0), (8.0, 0.0)),  # round 3: doubled: update 1, cosine to anchor 1
    ((3.0, 0.0), (0.0, 4.0)),  # round 4: orthogonal to the anchor: cosine 0
]


def recorded(all_layers=False, anchor_round=2):
    tracker = InertiaTracker(three_layers(), all_layers=all_layers, anchor_round=anchor_round)
    for middle in SEQUENCE:
        tracker.update(weights(middle))
    return tracker


def test_tracks_the_eligible_layers_by_default_and_every_weight_on_request():
    assert recorded().layers == ["1.weight"]
    assert recorded(all_layers=True).layers == ["0.weight", "1.weight", "2.weight"]


def test_relative_update_exact_values():
    updates = recorded().relative_update
    assert updates.shape == (1, 5)
    expected = [1.0, 0.0, math.sqrt(33) / math.sqrt(8), 1.0, math.sqrt(9 + 36 + 16 + 64) / 10]
    np.testing.assert_allclose(updates[0], expected, rtol=1e-12)


def test_cosine_to_anchor_exact_values_nan_before_anchor():
    cosines = recorded().cosine_to_anchor[0]
    assert np.isnan(cosines[:2]).all()
    np.testing.assert_allclose(cosines[2:], [1.0, 1.0, 0.0], atol=1e-12)


def test_unchanged_layers_record_zero_update_and_cosine_one():
    tracker = recorded(all_layers=True)
    np.testing.assert_allclose(tracker.relative_update[[0, 2]], 0.0)
    np.testing.assert_allclose(tracker.cosine_to_anchor[[0, 2], 2:], 1.0)


def test_anchor_round_is_configurable():
    cosines = recorded(anchor_round=0).cosine_to_anchor[0]
    np.testing.assert_allclose(cosines, [1.0, 1.0, 0.0, 0.0, 14 / (5 * math.sqrt(8))], atol=1e-12)


def test_accepts_a_module_and_copies_the_weights():
    model = three_layers()
    tracker = InertiaTracker(model)
    with torch.no_grad():
        model[1].weight.mul_(3.0)
    tracker.update(model)
    with torch.no_grad():
        model[1].weight.mul_(100.0)  # must not change what was recorded
    tracker.update(model)
    np.testing.assert_allclose(tracker.relative_update[0], [2.0, 99.0])


def test_pure_helpers_edge_cases():
    zero = torch.zeros(3)
    assert relative_update(zero, zero) == 0.0
    assert relative_update(torch.ones(3), zero) == math.inf
    assert math.isnan(cosine_similarity(zero, torch.ones(3)))
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])) == -1.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="anchor_round"):
        InertiaTracker(three_layers(), anchor_round=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        InertiaTracker("model")
    tracker = InertiaTracker(three_layers())
    with pytest.raises(KeyError, match="1.weight"):
        tracker.update({"0.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="mapping"):
        tracker.update([1, 2])


def test_json_round_trip(tmp_path):
    tracker = recorded(all_layers=True)
    tracker.to_json(tmp_path / "inertia.json")
    loaded = InertiaTracker.from_json(tmp_path / "inertia.json")
    assert loaded.layers == tracker.layers
    assert loaded.anchor_round == 2
    np.testing.assert_array_equal(loaded.relative_update, tracker.relative_update)
    np.testing.assert_array_equal(loaded.cosine_to_anchor, tracker.cosine_to_anchor)
    with pytest.raises(RuntimeError, match="loaded from a file"):
        loaded.update(weights(SEQUENCE[0]))


def test_csv_round_trip(tmp_path):
    tracker = recorded(all_layers=True)
    tracker.to_csv(tmp_path / "inertia.csv")
    lines = (tmp_path / "inertia.csv").read_text().splitlines()
    assert lines[0] == "layer,round,relative_update,cosine_to_anchor,distance_to_anchor,weight_norm"
    assert len(lines) == 1 + 3 * 5
    loaded = InertiaTracker.from_csv(tmp_path / "inertia.csv", anchor_round=2)
    assert loaded.layers == tracker.layers
    np.testing.assert_array_equal(loaded.relative_update, tracker.relative_update)
    np.testing.assert_array_equal(loaded.cosine_to_anchor, tracker.cosine_to_anchor)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "inertia.png"
    recorded(all_layers=True).plot(path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"lips-wrap\[plot\]"):
        recorded().plot(tmp_path / "x.png")


def test_layer_groups_split_first_middle_last():
    from lips_wrap._plotting import layer_groups

    groups = dict(layer_groups(5))
    assert groups == {"first layer": range(0, 1), "middle layers (mean)": range(1, 4),
                      "last layer": range(4, 5)}
    assert [label for label, _ in layer_groups(2)] == ["layer 0", "layer 1"]


# -- the inertia ratio -------------------------------------------------------------------

def test_inertia_ratio_exact_values_and_warmup():
    from lips_wrap.diagnostics import inertia_ratio

    updates = np.array([
        [9.0, 0.4, 0.2],    # first
        [9.0, 0.1, 0.1],    # middle
        [9.0, 0.3, 0.1],    # middle
        [5.0, 5.0, 5.0],    # other: ignored
        [9.0, 0.2, 0.4],    # last
    ])
    roles = ["first", "middle", "middle", "other", "last"]
    result = inertia_ratio(updates, roles, warmup=1)
    assert result.middle == pytest.approx(0.15)
    assert result.first == pytest.approx(0.3) and result.last == pytest.approx(0.3)
    assert result.edges == pytest.approx(0.3)
    assert result.ratio == pytest.approx(0.5)
    assert (result.warmup, result.rounds_used) == (1, 2)
    assert inertia_ratio(updates, roles, warmup=0).ratio == pytest.approx(
        np.mean([9, 0.1, 0.1, 9, 0.3, 0.1]) / np.mean([np.mean([9, 0.4, 0.2]),
                                                       np.mean([9, 0.2, 0.4])]))
    # default warm-up: 20% of the rounds, rounded down
    assert inertia_ratio(np.ones((3, 10)), ["first", "middle", "last"]).warmup == 2


def test_inertia_ratio_edge_cases_and_errors():
    from lips_wrap.diagnostics import inertia_ratio

    only_last = inertia_ratio(np.array([[0.2, 0.2], [0.4, 0.4]]), ["middle", "last"])
    assert only_last.ratio == pytest.approx(0.5) and math.isnan(only_last.first)
    frozen_edges = inertia_ratio(np.array([[0.0], [0.1], [0.0]]), ["first", "middle", "last"])
    assert frozen_edges.ratio == math.inf
    still = inertia_ratio(np.zeros((3, 2)), ["first", "middle", "last"])
    assert math.isnan(still.ratio)
    with_inf = inertia_ratio(np.array([[0.2, 0.2], [math.inf, 0.1], [0.2, 0.2]]),
                             ["first", "middle", "last"], warmup=0)
    assert with_inf.middle == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one role per layer"):
        inertia_ratio(np.ones((2, 3)), ["first"])
    with pytest.raises(ValueError, match=r"unknown roles \['head'\]"):
        inertia_ratio(np.ones((2, 3)), ["first", "head"])
    with pytest.raises(ValueError, match=r"warmup must be an integer in \[0, 2\]"):
        inertia_ratio(np.ones((2, 3)), ["first", "middle"], warmup=3)
    with pytest.raises(ValueError, match="at least one middle layer"):
        inertia_ratio(np.ones((2, 3)), ["first", "last"])
    with pytest.raises(ValueError, match="needs a first or a last layer"):
        inertia_ratio(np.ones((2, 3)), ["middle", "other"])


def test_threshold_is_one_documented_constant():
    from lips_wrap import diagnostics

    assert 0.0 < diagnostics.INERTIA_THRESHOLD < 1.0
    source = Path(diagnostics.__file__).read_text()
    assert source.count("INERTIA_THRESHOLD: float =") == 1
    assert "benchmarks/reproduce.py" in source.split("INERTIA_THRESHOLD: float =")[1][:600]


def test_from_weights_tracks_named_tensors_without_a_model():
    first = weights(((1.0, 0.0), (0.0, 1.0)))
    tracker = InertiaTracker.from_weights(first, ["1.weight", "2.weight"], anchor_round=0)
    for middle in SEQUENCE[:2]:
        tracker.update(weights(middle))
    np.testing.assert_allclose(tracker.relative_update, [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(tracker.cosine_to_anchor[0], [1.0, 1.0])
    with pytest.raises(ValueError, match="non-empty sequence of names"):
        InertiaTracker.from_weights(first, [])
    with pytest.raises(KeyError, match="lack 1 tracked layers"):
        InertiaTracker.from_weights(first, ["9.weight"])


# -- plots -------------------------------------------------------------------------------

def test_plot_keeps_the_users_matplotlib_backend(tmp_path):
    """Drawing must neither switch the backend nor leave a pyplot figure open."""
    pytest.importorskip("matplotlib")
    script = (
        "import matplotlib, sys\n"
        "matplotlib.use('svg')\n"
        "from test_diagnostics import recorded\n"
        f"recorded(all_layers=True).plot({str(tmp_path / 'x.png')!r})\n"
        "import matplotlib.pyplot as plt\n"
        "print(matplotlib.get_backend(), len(plt.get_fignums()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["svg", "0"]
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_inertia_takes_groups_and_round_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    from lips_wrap._plotting import plot_inertia

    updates = np.array([[0.1, 0.2, 0.3], [0.01, 0.02, 0.0], [0.2, 0.1, 0.1]])
    path = tmp_path / "g.png"
    plot_inertia(["a", "b", "c"], updates, path, groups=[("edges", [0, 2]), ("mid", [1])],
                 rounds=[5, 10, 15])
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2 round numbers for 3 columns"):
        plot_inertia(["a", "b", "c"], updates, path, rounds=[1, 2])


def test_ratio_by_window_splits_the_rounds_and_rates_each_span():
    from lips_wrap.diagnostics import WindowRatio, inertia_ratio_by_window

    roles = ["first", "middle", "last"]
    updates = np.array([[0.2] * 7,
                        [0.02, 0.02, 0.02, 0.2, 0.2, 0.4, 0.4],
                        [0.2] * 7])
    spans = inertia_ratio_by_window(updates, roles, windows=3)
    assert [(s.start, s.stop) for s in spans] == [(0, 3), (3, 5), (5, 7)]
    assert [s.ratio for s in spans] == pytest.approx([0.1, 1.0, 2.0])
    whole = inertia_ratio_by_window(updates, roles, windows=1)
    assert whole == [WindowRatio(0, 7, pytest.approx(inertia_ratio(updates, roles, 0).ratio))]
    # a span where the middle layers never moved finitely is NaN, not an error
    frozen = updates.copy()
    frozen[1, :3] = np.nan
    assert math.isnan(inertia_ratio_by_window(frozen, roles, windows=3)[0].ratio)
    for bad in (0, 8, 2.0, True):
        with pytest.raises(ValueError, match=r"windows must be an integer in \[1, 7\]"):
            inertia_ratio_by_window(updates, roles, windows=bad)
