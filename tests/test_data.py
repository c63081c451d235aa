import numpy as np
import pytest
import torch

from lips_wrap.data import NUM_CLASSES, make_shapes


def test_same_seed_same_images_other_seed_other_images():
    x1, y1 = make_shapes(30, seed=5)
    x2, y2 = make_shapes(30, seed=5)
    x3, _ = make_shapes(30, seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_shapes_dtype_and_balanced_labels():
    x, y = make_shapes(45, seed=0)
    assert x.shape == (45, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    counts = np.bincount(y.numpy(), minlength=NUM_CLASSES)
    assert NUM_CLASSES == 10 and counts.min() == 4 and counts.max() == 5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n must be >= 1"):
        make_shapes(0)
    with pytest.raises(ValueError, match="noise"):
        make_shapes(3, noise=-1.0)
