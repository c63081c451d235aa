"""The benchmark's models, all with BatchNorm as in the paper.

* ``resnet8_reference`` and ``vgg11_bn_reference``: the paper's own ResNet-8 and VGG11-bn,
  as the authors' code builds them (layer for layer, the same initialisation).
* ``ResNet8`` (a narrow CIFAR-style ResNet-8: 3x3 stem, one basic block per stage at
  8/16/32 or 16/32/64 channels) and ``vgg_bn`` (a small VGG-style CNN): the earlier
  CPU-sized models, *not* the paper's; kept for the committed results made with them.
"""

from __future__ import annotations

from typing import Sequence, Union

from torch import nn


def vgg_bn(in_channels: int, num_classes: int,
           layout: Sequence[Union[int, str]] = (32, "M", 64, "M", 128, 128, "M")) -> nn.Module:
    """VGG-style: 3x3 conv + BatchNorm + ReLU blocks, "M" a 2x2 max-pool, then a
    global average pool and a linear classifier."""
    layers, channels = [], in_channels
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                       nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            channels = int(item)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


class BasicBlock(nn.Module):
    """Two 3x3 convs (no bias) with BatchNorm; a 1x1 conv + BatchNorm shortcut where the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """The narrow CIFAR-style ResNet-8 (not the paper's: see ``resnet8_reference``)."""

    def __init__(self, in_channels: int, num_classes: int,
                 widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for index, width in enumerate(widths):
            stages.append(BasicBlock(cin, width, 1 if index == 0 else 2))
            cin = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class ReferenceResNet8(nn.Module):
    """The paper's ResNet-8: a torchvision-style ResNet with one basic block per stage.

    Stem: 7x7 conv (stride 2, padding 3, 64 channels, no bias), BatchNorm, ReLU, 3x3
    max-pool (stride 2, padding 1); one ``BasicBlock`` per stage at 64, 128 and 256
    channels (strides 1, 2, 2); global average pool; ``Linear(256, num_classes)``.
    Parameter names follow the authors' code (``conv1``, ``layers.<stage>.0``,
    ``classifier``), so its state dicts line up with theirs.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, width, stride)))
            cin = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)
        _reference_init(self, linear=False)

    def forward(self, x):
        x = self.layers(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.classifier(self.avgpool(x).flatten(1))


def resnet8_reference(in_channels: int = 3, num_classes: int = 100) -> nn.Module:
    """The paper's ResNet-8 (about 1.2M parameters with 100 classes)."""
    return ReferenceResNet8(in_channels, num_classes)


VGG11_LAYOUT = (64, "M", 128, "M", 256, "M", 512, "M", 512, "M")
"""VGG11's configuration "A": a number is a 3x3 conv of that many channels, "M" a
2x2 max-pool."""


class ReferenceVGG(nn.Module):
    """The paper's VGG-bn: ``features`` (3x3 conv with bias, padding 1, + BatchNorm +
    ReLU per number of the layout, a 2x2 max-pool per "M"), flatten, ``classifier``
    (one ``Linear``). Names follow the authors' code."""

    def __init__(self, in_channels: int, num_classes: int,
                 layout: Sequence[Union[int, str]] = VGG11_LAYOUT) -> None:
        super().__init__()
        layers, channels = [], in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1),
                           nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(channels, num_classes))
        _reference_init(self, linear=True)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg11_bn_reference(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """The paper's VGG11-bn (about 3.9M parameters); 32x32 input (five 2x2 pools
    leave 1x1x512 for the classifier)."""
    return ReferenceVGG(in_channels, num_classes)


def _reference_init(model: nn.Module, linear: bool) -> None:
    """The authors' initialisation: Kaiming-normal (fan_out, relu) convs with zero bias,
    BatchNorm weight 1 and bias 0; with ``linear``, Linear weights N(0, 0.01) and zero
    bias (their VGG), else PyTorch's default Linear init (their ResNet)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear:
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
