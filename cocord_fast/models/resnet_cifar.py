"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Matches RepDistiller ``models/resnet.py`` (parameter/buffer names, shapes and forward pass):
a 3x3 stem, three stages of basic blocks (strides 1, 2, 2), and a 1x1 conv + BN
``downsample`` shortcut wherever the stride or the width changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.models.base import Classifier, global_pool


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place where the input is a fresh result no backward reads: fewer large
        # allocations, which on CPU cost a page fault per 4 KiB on first touch.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class CifarResNet(Classifier):
    """``widths`` = (stem, stage1, stage2, stage3); each stage has (depth - 2) // 6 blocks."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        stages = []
        for width, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [BasicBlock(cin if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = widths[3]
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


_SLIM = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # the "x4" models


def resnet8(num_classes: int) -> CifarResNet:
    return CifarResNet(8, _SLIM, num_classes)


def resnet14(num_classes: int) -> CifarResNet:
    return CifarResNet(14, _SLIM, num_classes)


def resnet20(num_classes: int) -> CifarResNet:
    return CifarResNet(20, _SLIM, num_classes)


def resnet32(num_classes: int) -> CifarResNet:
    return CifarResNet(32, _SLIM, num_classes)


def resnet44(num_classes: int) -> CifarResNet:
    return CifarResNet(44, _SLIM, num_classes)


def resnet56(num_classes: int) -> CifarResNet:
    return CifarResNet(56, _SLIM, num_classes)


def resnet110(num_classes: int) -> CifarResNet:
    return CifarResNet(110, _SLIM, num_classes)


def resnet8x4(num_classes: int) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
