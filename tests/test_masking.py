import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lips_wrap.masking import (
    apply_mask_,
    compute_score,
    keep_count,
    keep_mask,
    low_magnitude_score,
    magnitude_score,
    random_score,
    sensitivity_score,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sort-based reference: k largest, ties to the lowest flat index."""
    flat = score.reshape(-1).to(torch.float64).numpy()
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return torch.from_numpy(mask).reshape(score.shape)


score_values = st.lists(
    st.sampled_from([0.0, 1.0, -1.0, 2.5, 0.5]) | st.floats(-100, 100, width=16),
    min_size=1, max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(values=score_values, data=st.data(), dtype=st.sampled_from(DTYPES))
def test_keep_mask_exact_count_and_matches_reference(values, data, dtype):
    score = torch.tensor(values, dtype=torch.float32).to(dtype)
    k = data.draw(st.integers(0, score.numel()))
    mask = keep_mask(score, k)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert int(mask.sum()) == k
    assert torch.equal(mask, reference_mask(score, k))


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), density=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16))
def test_keep_mask_multidimensional_is_deterministic(shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, shape, generator=generator).float()  # many ties
    k = keep_count(score.numel(), density)
    first, second = keep_mask(score, k), keep_mask(score.clone(), k)
    assert torch.equal(first, second) and int(first.sum()) == k
    assert torch.equal(first, reference_mask(score, k))


def test_ties_go_to_lowest_flat_index():
    score = torch.tensor([[1.0, 3.0, 1.0], [1.0, 0.0, 1.0]])
    assert keep_mask(score, 3).tolist() == [[True, True, True], [False, False, False]]
    assert keep_mask(score, 4).tolist() == [[True, True, True], [True, False, False]]


def test_keep_count_is_int_of_product():
    assert keep_count(10, 0.5) == 5
    assert keep_count(100, 0.29) == int(0.29 * 100) == 28  # truncation, as the reference
    assert keep_count(7, 1.0) == 7
    with pytest.raises(ValueError, match="density must be in"):
        keep_count(10, 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_score_names_the_tensor(bad):
    score = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="the score of blocks.0.fc1.weight holds 1 NaN or inf"):
        keep_mask(score, 1, name="blocks.0.fc1.weight")


def test_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\] for w, got 4"):
        keep_mask(torch.ones(3), 4, name="w")


def test_scores():
    weight = torch.tensor([1.0, -2.0, 3.0])
    grad = torch.tensor([-4.0, 0.5, 0.0], dtype=torch.float16)
    assert sensitivity_score(weight, grad).tolist() == [4.0, 1.0, 0.0]
    assert sensitivity_score(weight, grad).dtype == torch.float32
    assert magnitude_score(weight).tolist() == [1.0, 2.0, 3.0]
    assert low_magnitude_score(weight).tolist() == [-1.0, -2.0, -3.0]
    kept = keep_mask(low_magnitude_score(weight), 1)
    assert kept.tolist() == [True, False, False]  # the smallest magnitude
    with pytest.raises(ValueError, match="gradient shape"):
        sensitivity_score(weight, torch.zeros(4))


def test_sensitivity_score_of_half_weights_is_float32():
    weight = torch.full((4,), 1e-4, dtype=torch.float16)
    grad = torch.full((4,), 1e-4, dtype=torch.float16)
    score = sensitivity_score(weight, grad)
    assert score.dtype == torch.float32 and bool((score > 0).all())  # no fp16 underflow


def test_random_score_reproducible():
    weight = torch.zeros(50)
    first = random_score(weight, torch.Generator().manual_seed(3))
    second = random_score(weight, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_compute_score_dispatch_and_errors():
    weight = torch.tensor([1.0, -2.0])
    assert compute_score("magnitude", weight).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="needs a gradient"):
        compute_score("sensitivity", weight)
    with pytest.raises(ValueError, match="needs a generator"):
        compute_score("random", weight)
    with pytest.raises(ValueError, match="unknown score 'x'"):
        compute_score("x", weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mask_in_place(dtype):
    tensor = torch.arange(1, 5, dtype=dtype)
    out = apply_mask_(tensor, torch.tensor([True, False, True, False]))
    assert out is tensor and tensor.tolist() == [1, 0, 3, 0]
