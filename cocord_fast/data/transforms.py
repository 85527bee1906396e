"""Augmentation recipes (METHOD.md, "Views"): one per dataset kind, applied once per view."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torchvision import transforms as T

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The demo images are 32x32 like CIFAR's; their channel statistics are close enough to CIFAR's.
DEMO_MEAN, DEMO_STD = CIFAR_MEAN, CIFAR_STD


@dataclass(frozen=True)
class Recipe:
    train: Callable
    eval: Callable


def _small_image_recipe(mean: tuple, std: tuple) -> Recipe:
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    return Recipe(train=T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] + normalize),
                  eval=T.Compose(normalize))


def build_recipe(dataset: str, image_size: int) -> Recipe:
    if dataset == "cifar100":
        return _small_image_recipe(CIFAR_MEAN, CIFAR_STD)
    if dataset == "demo":
        return _small_image_recipe(DEMO_MEAN, DEMO_STD)
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    # Standard ImageNet evaluation: resize to size/0.875 (256 for 224), then centre crop.
    return Recipe(
        train=T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + normalize),
        eval=T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size)] + normalize))
