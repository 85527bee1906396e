"""CIFAR ResNet50 (name ``ResNet50``).

Matches RepDistiller ``models/resnetv2.py`` ``ResNet50``: the ImageNet bottleneck layout
(3, 4, 6, 3 blocks, widths 64..512, expansion 4) with a 3x3 stride-1 stem and no max-pool,
so a 32x32 input reaches the last stage at 4x4. Shortcuts are named ``shortcut`` and the
classifier ``linear``, unlike torchvision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.models.base import Classifier, global_pool

_EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * _EXPANSION
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # An empty Sequential is the identity and has no state, as in RepDistiller.
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on fresh results no backward reads (fewer large allocations).
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class CifarResNet50(Classifier):
    def __init__(self, num_classes: int, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
            layers = []
            for i in range(n):
                layers.append(Bottleneck(cin, planes, stride if i == 0 else 1))
                cin = planes * _EXPANSION
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = cin
        self.linear = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return global_pool(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def resnet50_cifar(num_classes: int) -> CifarResNet50:
    return CifarResNet50(num_classes)
