"""The sort-free selection against a reference that sorts (stable argsort of -score)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lips_wrap import selection
from lips_wrap.masking import keep_mask, kth_largest
from lips_wrap.selection import (
    NonFiniteError,
    Selection,
    apply_selection_,
    select_top_k,
    selection_mask,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, ties to the lowest flat index: a stable sort of the negated score."""
    flat = score.reshape(-1).to(torch.float64)
    order = torch.sort(-flat, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(score.shape)


@pytest.fixture
def tiny_constants(monkeypatch):
    """Shrink the sample and the direct-solve size so small tensors take every path
    (bracket, candidates, recursion, tie pass, fallback)."""
    monkeypatch.setattr(selection, "SAMPLE", 64)
    monkeypatch.setattr(selection, "SMALL", 16)
    monkeypatch.setattr(selection, "SIGMAS", 1.0)  # narrow brackets: some miss
    monkeypatch.setattr(selection, "BUDGET", 0.5)


values = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, width=16),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5]),  # heavy ties, signed zeros
)
shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3)


@st.composite
def scores_and_k(draw):
    shape = draw(shapes)
    numel = math.prod(shape)
    data = draw(st.lists(values, min_size=numel, max_size=numel))
    dtype = draw(st.sampled_from(DTYPES))
    score = torch.tensor(data, dtype=torch.float32).to(dtype).reshape(shape)
    k = draw(st.integers(0, numel))
    return score, k


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # constant patch only
@given(case=scores_and_k(), chunk=st.integers(1, 40))
def test_matches_sorting_reference_on_every_path(tiny_constants, case, chunk):
    score, k = case
    chosen = select_top_k(score, k, chunk=chunk)
    mask = selection_mask(score, chosen)
    assert torch.equal(mask, reference_mask(score, k))
    assert int(mask.sum()) == k == chosen.kept


@settings(max_examples=60, deadline=None)
@given(case=scores_and_k())
def test_keep_mask_matches_reference_with_default_constants(case):
    score, k = case
    assert torch.equal(keep_mask(score, k), reference_mask(score, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_large_tensors_take_the_bracket_path(dtype, density):
    generator = torch.Generator().manual_seed(7)
    score = torch.randn(3001, 37, generator=generator).to(dtype)  # odd shape, > SMALL
    k = int(density * score.numel())
    assert torch.equal(keep_mask(score, k), reference_mask(score, k))


@pytest.mark.parametrize("fill", [0.0, -3.0])
def test_all_equal_keeps_the_lowest_indices(fill):
    score = torch.full((50_000,), fill)
    for k in (0, 1, 12_345, 49_999, 50_000):
        mask = keep_mask(score, k)
        assert mask[:k].all() and not mask[k:].any()


def test_negative_scores_low_magnitude_style():
    generator = torch.Generator().manual_seed(3)
    score = -torch.rand(20_011, generator=generator).abs()
    score[::5] = -0.5  # a tie block near the middle
    for k in (1, 4_000, 10_005, 16_000):
        assert torch.equal(keep_mask(score, k), reference_mask(score, k))


def test_ties_straddling_threshold_in_a_large_tensor():
    score = torch.zeros(100_003)
    score[::3] = 1.0
    score[5::7] = 2.0
    for k in (1, 14_286, 20_000, 50_000, 90_000):
        assert torch.equal(keep_mask(score, k), reference_mask(score, k))


def test_bracket_miss_falls_back_to_exact(monkeypatch):
    # Force a useless bracket: the pass then finds the threshold outside it.
    monkeypatch.setattr(selection, "_bracket", lambda flat, k: (10.0, 11.0))
    score = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(keep_mask(score, 9_000), reference_mask(score, 9_000))


def test_candidate_budget_overflow_falls_back_to_exact(monkeypatch):
    monkeypatch.setattr(selection, "_bracket", lambda flat, k: (-math.inf, math.inf))
    score = torch.randn(20_000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(keep_mask(score, 5_000), reference_mask(score, 5_000))


def test_kth_largest_is_exact():
    score = torch.randn(40_000, generator=torch.Generator().manual_seed(4))
    expected = torch.sort(score, descending=True).values[12_344]
    assert torch.equal(kth_largest(score, 12_345), expected)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("numel", [100, 50_000])
def test_non_finite_scores_are_refused(bad, numel):
    score = torch.rand(numel)
    score[numel // 3] = bad
    with pytest.raises(NonFiniteError, match="w1.*NaN or inf"):
        select_top_k(score, numel // 2, "w1")
    with pytest.raises(ValueError, match="NaN or inf"):
        keep_mask(score, numel, "w1")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_score_is_refused_when_the_bracket_overflows(bad):
    # A heavy tie makes the bracket collect more candidates than its budget, so the
    # exact fallback decides; the check must not be skipped on that path.
    score = torch.ones(50_000)
    score[7] = bad
    with pytest.raises(NonFiniteError, match="w1 holds 1 NaN or inf"):
        select_top_k(score, 3, "w1")


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 4\].*got 5"):
        select_top_k(torch.zeros(4), 5)
    with pytest.raises(TypeError, match="floating-point"):
        select_top_k(torch.zeros(4, dtype=torch.int64), 2)


def test_apply_selection_zeroes_dropped_entries_of_every_tensor():
    generator = torch.Generator().manual_seed(5)
    score = torch.rand(300, 70, generator=generator)
    weight = torch.randn(300, 70, generator=generator)
    state = torch.randn(300, 70, generator=generator).t().contiguous().t()  # non-contiguous
    before_w, before_s = weight.clone(), state.clone()
    chosen = select_top_k(score, 9_000)
    apply_selection_([weight, state], score, chosen, chunk=1_000)
    mask = reference_mask(score, 9_000)
    for after, before in ((weight, before_w), (state, before_s)):
        assert torch.equal(after[mask], before[mask])
        assert not after[~mask].any()


def test_apply_selection_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        apply_selection_([torch.zeros(3)], torch.zeros(4), Selection(0.0, 4, 2))
