"""CIFAR MobileNetV2 at width 0.5 (name ``MobileNetV2``).

Matches RepDistiller ``models/mobilenetv2.py`` ``mobile_half`` (expansion 6, width 0.5).
Differences from torchvision's MobileNetV2 that the state dict depends on:
- every inverted residual has the 1x1 expansion conv, even the first one (expansion 1);
- channel counts are ``int(c * 0.5)`` with no rounding to multiples of 8;
- the last 1x1 conv keeps 1280 channels (it is only widened for width > 1);
- the stem has stride 2 and the stage strides are 1, 1, 2, 2, 1, 2, 1, so a 32x32 input
  ends at 2x2, which RepDistiller averages away (here: global average pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from cocord_fast.models.base import Classifier, global_pool

# (output channels at width 1, blocks, stride of the first block); the first stage does not
# expand (expansion 1), the others use the model's expansion.
_STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
_LAST_CHANNELS = 1280


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),  # expand
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear projection
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(Classifier):
    def __init__(self, num_classes: int, expansion: int = 6, width: float = 0.5) -> None:
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for k, (c, n, s) in enumerate(_STAGES):
            cout, t = int(c * width), (expansion if k > 0 else 1)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.num_features = int(_LAST_CHANNELS * width) if width > 1.0 else _LAST_CHANNELS
        self.conv2 = _conv_bn_relu(cin, self.num_features, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.num_features, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return global_pool(self.conv2(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def mobilenetv2_half(num_classes: int) -> MobileNetV2:
    return MobileNetV2(num_classes, expansion=6, width=0.5)
