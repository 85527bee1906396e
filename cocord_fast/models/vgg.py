"""CIFAR VGGs with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19).

Matches RepDistiller ``models/vgg.py`` ``vgg*_bn`` (RepDistiller's ``model_dict`` maps the
plain names to the BN variants). Five conv blocks ``block0..block4``, each a Sequential of
(conv3x3 with bias, BN, ReLU) units whose *last* ReLU is left out of the Sequential and
applied in ``forward`` instead, so the indices in the state-dict names are 0, 1, 3, 4, 6, 7...
Max-pools sit between blocks; the single Linear ``classifier`` reads a global average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cocord_fast.models.base import Classifier, global_pool

# Output channels of the convs in each of the five blocks.
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cout in widths:
        layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers[:-1])  # the block's final ReLU is applied in forward_features


class VGG(Classifier):
    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int) -> None:
        super().__init__()
        cins = (3,) + tuple(widths[-1] for widths in cfg[:-1])
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(cin, widths) for cin, widths in zip(cins, cfg)
        )
        self.num_features = cfg[-1][-1]
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # RepDistiller applies the pool after block3 only when the input is 64 pixels high
        # (its Tiny-ImageNet setting); at 32x32 block4 runs on the 4x4 map. Kept for parity.
        pool_after_block3 = x.shape[2] == 64
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if pool_after_block3:
            x = F.max_pool2d(x, 2)
        return global_pool(F.relu(self.block4(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def vgg8(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes)
