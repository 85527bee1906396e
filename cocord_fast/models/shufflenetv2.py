"""CIFAR ShuffleNet v2, size 1x (name ``ShuffleV2``).

Matches RepDistiller ``models/ShuffleNetv2.py`` with ``net_size=1``: stage widths
116, 232, 464, a final 1x1 conv to 1024. Details the outputs depend on:
- the stem is a 1x1 conv (3 -> 24) with no stride or max-pool;
- each stage is one stride-2 ``DownBlock`` followed by (3, 7, 3) basic units, so a 32x32
  input ends at 4x4 (the down unit is extra: stages have 4, 8 and 4 units);
- a basic unit keeps the *first* half of the channels and transforms the second half, then
  concatenates [kept, transformed] and shuffles with 2 groups;
- the down unit's left branch is dw3x3/2-BN then 1x1-BN-ReLU; the right branch is
  1x1-BN-ReLU, dw3x3/2-BN, 1x1-BN-ReLU; output is shuffle(cat[left, right]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.models.base import Classifier, global_pool
from cocord_fast.models.shufflenetv1 import channel_shuffle

_STEM = 24


def _pw(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


def _dw(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, kernel_size=3, stride=stride, padding=1, groups=c, bias=False)


class BasicUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = _pw(half, half), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = _dw(half, 1), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = _pw(half, half), nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, x2 = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(x2)), inplace=True)
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)), inplace=True)
        return channel_shuffle(torch.cat([kept, out], dim=1), 2)


class DownUnit(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = _dw(cin, 2), nn.BatchNorm2d(cin)  # left branch
        self.conv2, self.bn2 = _pw(cin, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _pw(cin, mid), nn.BatchNorm2d(mid)  # right branch
        self.conv4, self.bn4 = _dw(mid, 2), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _pw(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))), inplace=True)
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class ShuffleNetV2(Classifier):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (116, 232, 464),
                 blocks: tuple[int, ...] = (3, 7, 3), last_channels: int = 1024) -> None:
        super().__init__()
        self.conv1 = _pw(3, _STEM)
        self.bn1 = nn.BatchNorm2d(_STEM)
        cin = _STEM
        stages = []
        for width, n in zip(widths, blocks):
            stages.append(nn.Sequential(DownUnit(cin, width), *[BasicUnit(width) for _ in range(n)]))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _pw(cin, last_channels)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.num_features = last_channels
        self.linear = nn.Linear(last_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(F.relu(self.bn2(self.conv2(x)), inplace=True))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def shufflenet_v2(num_classes: int) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes)
