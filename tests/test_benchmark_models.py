"""The paper's own models in benchmarks/models.py: every parameter shape, the
initialisation, and the LIPS plan (every conv but the stem)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lips_wrap import find_layers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from models import resnet8_reference, vgg11_bn_reference  # noqa: E402

RESNET8_SHAPES = {
    "conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,),
    "layers.0.0.conv1.weight": (64, 64, 3, 3), "layers.0.0.bn1.weight": (64,),
    "layers.0.0.bn1.bias": (64,), "layers.0.0.conv2.weight": (64, 64, 3, 3),
    "layers.0.0.bn2.weight": (64,), "layers.0.0.bn2.bias": (64,),
    "layers.1.0.conv1.weight": (128, 64, 3, 3), "layers.1.0.bn1.weight": (128,),
    "layers.1.0.bn1.bias": (128,), "layers.1.0.conv2.weight": (128, 128, 3, 3),
    "layers.1.0.bn2.weight": (128,), "layers.1.0.bn2.bias": (128,),
    "layers.1.0.shortcut.0.weight": (128, 64, 1, 1), "layers.1.0.shortcut.1.weight": (128,),
    "layers.1.0.shortcut.1.bias": (128,),
    "layers.2.0.conv1.weight": (256, 128, 3, 3), "layers.2.0.bn1.weight": (256,),
    "layers.2.0.bn1.bias": (256,), "layers.2.0.conv2.weight": (256, 256, 3, 3),
    "layers.2.0.bn2.weight": (256,), "layers.2.0.bn2.bias": (256,),
    "layers.2.0.shortcut.0.weight": (256, 128, 1, 1), "layers.2.0.shortcut.1.weight": (256,),
    "layers.2.0.shortcut.1.bias": (256,),
    "classifier.weight": (100, 256), "classifier.bias": (100,),
}
VGG11_SHAPES = {
    "features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,),
    "features.4.weight": (128, 64, 3, 3), "features.4.bias": (128,),
    "features.8.weight": (256, 128, 3, 3), "features.8.bias": (256,),
    "features.12.weight": (512, 256, 3, 3), "features.12.bias": (512,),
    "features.16.weight": (512, 512, 3, 3), "features.16.bias": (512,),
    "classifier.0.weight": (10, 512), "classifier.0.bias": (10,),
}
for _conv, _width in ((0, 64), (4, 128), (8, 256), (12, 512), (16, 512)):
    VGG11_SHAPES[f"features.{_conv + 1}.weight"] = (_width,)
    VGG11_SHAPES[f"features.{_conv + 1}.bias"] = (_width,)


@pytest.mark.parametrize("build, shapes, total", [
    (lambda: resnet8_reference(3, 100), RESNET8_SHAPES, 1_258_404),
    (lambda: vgg11_bn_reference(3, 10), VGG11_SHAPES, 3_918_858),
])
def test_every_parameter_shape_is_the_references(build, shapes, total):
    model = build()
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert sum(p.numel() for p in model.parameters()) == total


def test_forward_shapes_and_the_stem_downsamples_four_times():
    resnet = resnet8_reference(3, 100).eval()
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert resnet(torch.randn(2, 3, 16, 16)).shape == (2, 100)
    stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(torch.randn(1, 3, 32, 32)))))
    assert stem.shape == (1, 64, 8, 8)
    vgg = vgg11_bn_reference(3, 10).eval()
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert vgg.features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 1, 1)
    with pytest.raises(RuntimeError):
        vgg(torch.randn(1, 3, 16, 16))  # the classifier needs 32x32 input


@pytest.mark.parametrize("build", [lambda: resnet8_reference(3, 100),
                                   lambda: vgg11_bn_reference(3, 10)])
def test_initialisation_is_the_references(build):
    torch.manual_seed(0)
    model = build()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            std = float(module.weight.detach().std())
            assert abs(std - (2.0 / fan_out) ** 0.5) < 0.15 * (2.0 / fan_out) ** 0.5
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    head = model.classifier if isinstance(model.classifier, nn.Linear) else model.classifier[0]
    if isinstance(model.classifier, nn.Sequential):  # VGG: N(0, 0.01), zero bias
        assert abs(float(head.weight.detach().std()) - 0.01) < 0.002
        assert torch.count_nonzero(head.bias) == 0
    else:  # ResNet: PyTorch's default Linear init, uniform in +-1/sqrt(fan_in)
        assert float(head.weight.abs().max()) <= 1 / 256 ** 0.5


def test_lips_masks_every_conv_but_the_stem():
    resnet_plan = find_layers(resnet8_reference(3, 100))
    assert list(resnet_plan.eligible_names) == [
        "layers.0.0.conv1.weight", "layers.0.0.conv2.weight", "layers.1.0.conv1.weight",
        "layers.1.0.conv2.weight", "layers.1.0.shortcut.0.weight", "layers.2.0.conv1.weight",
        "layers.2.0.conv2.weight", "layers.2.0.shortcut.0.weight"]
    vgg_plan = find_layers(vgg11_bn_reference(3, 10))
    assert list(vgg_plan.eligible_names) == [
        "features.4.weight", "features.8.weight", "features.12.weight", "features.16.weight"]
