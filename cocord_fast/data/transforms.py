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
    if is_small_image(dataset):
        return _small_image_recipe(*normalization(dataset))
    normalize = [T.ToTensor(), T.Normalize(*normalization(dataset))]
    return Recipe(
        train=T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + normalize),
        eval=T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size)] + normalize))


def eval_resize(image_size: int) -> int:
    """Standard ImageNet evaluation: resize the shorter side to size/0.875 (256 for 224), then
    centre crop."""
    return round(image_size / 0.875)


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel of a dataset kind, on the [0, 1] scale."""
    return {"cifar100": (CIFAR_MEAN, CIFAR_STD), "demo": (DEMO_MEAN, DEMO_STD)}.get(
        dataset, (IMAGENET_MEAN, IMAGENET_STD))


def is_small_image(dataset: str) -> bool:
    """32x32 data sets take the CIFAR recipe (pad-4 random crop + flip; no resize)."""
    return dataset in ("cifar100", "demo")
