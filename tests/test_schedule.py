import pytest

from lips_wrap import LIPSConfig, density_at, is_mask_round
from lips_wrap.schedule import aggregation_density


def test_mask_rounds_for_period_five():
    config = LIPSConfig(total_rounds=30, period=5)
    assert [r for r in range(30) if is_mask_round(r, config)] == [1, 6, 11, 16, 21, 26]


def test_initial_model_never_masked_even_with_period_one():
    config = LIPSConfig(total_rounds=4, period=1)
    assert density_at(0, config) is None
    assert [density_at(r, config) is not None for r in range(1, 4)] == [True] * 3


def test_density_is_that_of_the_aggregated_round():
    config = LIPSConfig(total_rounds=300, period=5, start_density=0.3)
    assert density_at(1, config) == pytest.approx(0.3)  # d(0) = d0
    assert density_at(6, config) == pytest.approx(0.3 + 0.7 * 5 / 300)
    assert density_at(296, config) == pytest.approx(0.3 + 0.7 * 295 / 300)
    assert density_at(2, config) is None


def test_density_capped_at_one():
    config = LIPSConfig(total_rounds=10, start_density=0.5)
    assert aggregation_density(20, config) == 1.0


@pytest.mark.parametrize("round_index", [-1, 30, 31])
def test_round_out_of_range(round_index):
    with pytest.raises(ValueError, match=f"round {round_index} is outside \\[0, 30\\)"):
        density_at(round_index, LIPSConfig(total_rounds=30))


def test_round_must_be_int():
    with pytest.raises(TypeError, match="round must be an integer"):
        density_at(1.0, LIPSConfig(total_rounds=30))


def test_numpy_integers_accepted():
    import numpy as np

    config = LIPSConfig(total_rounds=np.int64(30), period=np.int32(5))
    assert type(config.total_rounds) is int and type(config.period) is int
    assert density_at(np.int64(6), config) == density_at(6, config)
