"""The benchmark's models, both with BatchNorm as in the paper: a VGG-style CNN and
ResNet-8 (a 3x3 stem, one basic block per stage at 16/32/64 channels, a linear head)."""

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
