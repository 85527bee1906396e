"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Matches RepDistiller ``models/wrn.py``: pre-activation blocks (BN-ReLU-conv), stage widths
16k, 32k, 64k with (depth - 4) // 6 blocks each, a final BN-ReLU, then pooling.
The stage containers are ``block{1,2,3}.layer`` so the state-dict names line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.models.base import Classifier, global_pool


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Conv2d | None = None
        if cin != cout:
            self.convShortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre)), inplace=True))
        # RepDistiller quirk kept on purpose: when the width changes, the 1x1 shortcut reads
        # the pre-activated input; otherwise the shortcut is the raw input.
        # (Identity shortcuts only occur with stride 1 here, as in RepDistiller.)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class _Stage(nn.Module):
    """Holds the blocks under ``.layer``, RepDistiller's ``NetworkBlock`` naming."""

    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(Classifier):
    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        w = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = _Stage(n, w[0], w[1], 1)
        self.block2 = _Stage(n, w[1], w[2], 2)
        self.block3 = _Stage(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.num_features = w[3]
        self.fc = nn.Linear(w[3], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return global_pool(F.relu(self.bn1(x), inplace=True))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


def wrn_16_1(num_classes: int) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int) -> WideResNet:
    return WideResNet(40, 2, num_classes)
