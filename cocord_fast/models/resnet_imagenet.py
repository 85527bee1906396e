"""ImageNet ResNets (resnet18, resnet34, resnet50, resnet101): torchvision's, unchanged.

Not from RepDistiller. Subclassing ``torchvision.models.ResNet`` keeps the parameter and
buffer names exactly torchvision's, so torchvision checkpoints load with ``strict=True``.
No pretrained weights are fetched; the weights start from torchvision's default init.
"""

from __future__ import annotations

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class TorchvisionResNet(ResNet):
    """torchvision ResNet with the zoo's ``forward_features`` / ``forward_head`` split."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        self.num_features: int = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet18(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet101(num_classes: int) -> TorchvisionResNet:
    return TorchvisionResNet(Bottleneck, [3, 4, 23, 3], num_classes)
