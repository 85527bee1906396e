"""CIFAR ShuffleNet v1, groups 3 (name ``ShuffleV1``).

Matches RepDistiller ``models/ShuffleNetv1.py``. Details the outputs depend on:
- the stem is a 1x1 conv (3 -> 24) with no stride or pooling;
- every stage starts with a stride-2 unit, including the first, so 32x32 ends at 4x4;
- a stride-2 unit's branch outputs (stage width - input width) channels and is concatenated
  with a 3x3/2 average pool of the input (padding 1, padding counted in the mean);
- the first 1x1 conv of the very first unit (input 24 channels) is not grouped;
- the depthwise conv is followed by BN *and* ReLU, unlike the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.models.base import Classifier, global_pool

_STEM = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, g*k, H, W) -> interleave the g groups channel by channel."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        self.stride = stride
        # As in the paper, the pointwise conv right after the 24-channel stem is not grouped.
        self.first_groups = 1 if cin == _STEM else groups
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on fresh results no backward reads (fewer large allocations).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            out = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1)
        else:
            out += x
        return F.relu(out, inplace=True)


class ShuffleNetV1(Classifier):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (240, 480, 960),
                 blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        cin = _STEM
        stages = []
        for width, n in zip(widths, blocks):
            # The first unit of a stage concatenates its input, so its branch adds width - cin.
            units = [ShuffleUnit(cin, width - cin, 2, groups)]
            units += [ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = cin
        self.linear = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def shufflenet_v1(num_classes: int) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes)
