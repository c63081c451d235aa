import pytest
import torch

from lips_wrap import SCORES, LIPSConfig


def test_defaults_follow_the_reference():
    config = LIPSConfig(total_rounds=300)
    assert (config.period, config.start_density, config.score) == (5, 0.5, "sensitivity")
    # the stored gradient is bfloat16, not the reference's float16 (issue 20:
    # float16 flushes small gradients; benchmarks/grad_dtype.py)
    assert config.grad_dtype is torch.bfloat16 and config.include == () and config.exclude == ()


def test_frozen():
    with pytest.raises(AttributeError):
        LIPSConfig(10).period = 3


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01, 2])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match=r"start_density must be in \(0, 1\], got"):
        LIPSConfig(10, start_density=density)


def test_density_one_is_accepted():
    assert LIPSConfig(10, start_density=1).start_density == 1.0


@pytest.mark.parametrize("field,value", [("period", 0), ("total_rounds", 0), ("period", -3)])
def test_counts_below_one(field, value):
    kwargs = {"total_rounds": 10, field: value}
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got {value}"):
        LIPSConfig(**kwargs)


@pytest.mark.parametrize("value", [2.5, "5", True])
def test_counts_must_be_integers(value):
    with pytest.raises(TypeError, match="period must be an integer"):
        LIPSConfig(10, period=value)


def test_unknown_score_lists_accepted():
    with pytest.raises(ValueError, match="unknown score 'topk'; accepted: " + ", ".join(SCORES)):
        LIPSConfig(10, score="topk")


def test_patterns_normalised_to_tuples():
    config = LIPSConfig(10, include="blocks.*", exclude=["a", "b"])
    assert config.include == ("blocks.*",) and config.exclude == ("a", "b")
    with pytest.raises(TypeError, match="exclude holds 3"):
        LIPSConfig(10, exclude=["a", 3])


def test_grad_dtype_by_name_or_dtype():
    assert LIPSConfig(10, grad_dtype="bfloat16").grad_dtype is torch.bfloat16
    assert LIPSConfig(10, grad_dtype=torch.float32).grad_dtype is torch.float32
    with pytest.raises(ValueError, match="grad_dtype torch.int8 is not accepted"):
        LIPSConfig(10, grad_dtype=torch.int8)


def test_grad_device_must_be_a_device():
    assert LIPSConfig(10, grad_device="cpu").grad_device == "cpu"
    with pytest.raises(ValueError, match="grad_device 'gpu0' is not a torch device"):
        LIPSConfig(10, grad_device="gpu0")
