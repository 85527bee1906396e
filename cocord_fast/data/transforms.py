"""Augmentation recipes (METHOD.md, "Views"), applied once per view: images of one fixed size
(the source's `image_size`: CIFAR-100, the demo set) take a padded random crop and are never
resized (on the torch path a whole batch at once: `fixed_size_batches.py`); others a
random-resized crop, image by image (`build_recipe`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from ..config import DataConfig
from ..errors import UserError
from .sources import source_kind

DEFAULT_INTERPOLATION, DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE = "bilinear", 0.875, 224
# How the evaluation fits an image to its square crop, as timm's `crop_mode`: center resizes
# the shorter side and crops the centre, squash resizes both sides (the aspect changes) and
# crops, border resizes the longer side and pads the rest with the mean colour.
CROP_MODES, DEFAULT_CROP_MODE = ("center", "squash", "border"), "center"
SMALL_IMAGE_PAD = 4  # the zero padding of a fixed-size image's random crop


def image_size_of(cfg: DataConfig) -> int:
    """`data.image_size`, 224 where it is 0 (no pretrained teacher gave one)."""
    if 0 < cfg.image_size < 8:
        raise UserError(f"data.image_size: {cfg.image_size} is below the minimum 8")
    return cfg.image_size or DEFAULT_IMAGE_SIZE


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become a network's input: the per-channel mean and std (on the [0, 1]
    scale), the resize filter, the share of the evaluation resize kept by its crop (0.875:
    resize the shorter side to 256, crop 224) and how the evaluation fits an image to that
    resize (`CROP_MODES`). `data.mean`, `data.std`, `data.interpolation`, `data.crop_pct` and
    `data.crop_mode` where set (a pretrained teacher's, filled in by the trainer), else the
    data source's."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = DEFAULT_CROP_MODE

    @classmethod
    def of(cls, cfg: DataConfig) -> Preprocessing:
        kind = source_kind(cfg.dataset)
        mean, std = kind.mean, kind.std
        for name in ("mean", "std"):
            if getattr(cfg, name) and len(getattr(cfg, name)) != 3:
                raise UserError(f"data.{name}: expected 3 values (red, green, blue), got "
                                f"{getattr(cfg, name)}")
        if cfg.std and min(cfg.std) <= 0:
            raise UserError(f"data.std: every value must be positive, got {cfg.std}")
        return cls(tuple(cfg.mean or mean), tuple(cfg.std or std),
                   cfg.interpolation or DEFAULT_INTERPOLATION, cfg.crop_pct or DEFAULT_CROP_PCT,
                   cfg.crop_mode or DEFAULT_CROP_MODE)

    def eval_resize(self, image_size: int) -> int:
        """The side the evaluation resizes to before its crop (256 for 224 at 0.875): the
        shorter one (center), both (squash) or the longer one (border). Rounded down, as timm's
        evaluation transform does."""
        return math.floor(image_size / self.crop_pct)

    @property
    def border_fill(self) -> tuple[int, ...]:
        """The mean colour, on the 0-255 scale, that the border mode pads with."""
        return tuple(round(255 * m) for m in self.mean)


@dataclass(frozen=True)
class Recipe:
    train: Callable
    eval: Callable


def build_recipe(image_size: int, preprocessing: Preprocessing) -> Recipe:
    """The image-by-image recipe of images of any size, cropped or resized to `image_size`
    (a fixed-size source's padded crops: `fixed_size_batches.py`)."""
    normalize = [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    resample = T.InterpolationMode(preprocessing.interpolation)
    return Recipe(
        train=T.Compose([T.RandomResizedCrop(image_size, interpolation=resample),
                         T.RandomHorizontalFlip()] + normalize),
        eval=T.Compose(eval_fit(image_size, preprocessing) + normalize))


def eval_fit(image_size: int, preprocessing: Preprocessing) -> list[Callable]:
    """The evaluation's resize and crop to `image_size`, by `preprocessing.crop_mode`."""
    resize = preprocessing.eval_resize(image_size)
    resample = T.InterpolationMode(preprocessing.interpolation)
    if preprocessing.crop_mode == "squash":
        return [T.Resize((resize, resize), interpolation=resample), T.CenterCrop(image_size)]
    if preprocessing.crop_mode == "border":
        return [ResizeLonger(resize, resample),
                CenterCropOrPad(image_size, preprocessing.border_fill)]
    return [T.Resize(resize, interpolation=resample), T.CenterCrop(image_size)]


class ResizeLonger:
    """Resizes an image's longer side to `size`, keeping its aspect (each side rounded)."""

    def __init__(self, size: int, interpolation: T.InterpolationMode):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        ratio = max(width, height) / self.size
        return F.resize(image, [round(height / ratio), round(width / ratio)], self.interpolation)


class CenterCropOrPad:
    """The centre `size` x `size` of an image, a side shorter than `size` padded evenly (the
    odd pixel after it) with the colour `fill`."""

    def __init__(self, size: int, fill: tuple[int, ...]):
        self.size, self.fill = size, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        pad_x, pad_y = max(self.size - width, 0), max(self.size - height, 0)
        if pad_x or pad_y:
            image = F.pad(image, [pad_x // 2, pad_y // 2, (pad_x + 1) // 2, (pad_y + 1) // 2],
                          fill=self.fill)
        return F.center_crop(image, [self.size, self.size])


def refuse_resizing_small_images(cfg: DataConfig) -> None:
    """A data set of fixed-size images is never resized: its resize settings would be ignored.
    The image size may be the images' own, or the default a run resolves (224, in its
    config.yaml)."""
    fixed_size = source_kind(cfg.dataset).image_size
    if not fixed_size:
        return
    ignored = [f"data.{key}={getattr(cfg, key)}"
               for key, unset in (("image_size", (0, fixed_size, DEFAULT_IMAGE_SIZE)),
                                  ("interpolation", ("",)), ("crop_pct", (0.0,)),
                                  ("crop_mode", ("",)))
               if getattr(cfg, key) not in unset]
    if ignored:
        raise UserError(f"{', '.join(ignored)}: data.dataset={cfg.dataset} has {fixed_size}x"
                        f"{fixed_size} images, "
                        f"which are never resized (a padded random crop for training, the "
                        f"image itself for evaluation); leave "
                        f"{'it' if len(ignored) == 1 else 'them'} unset")
