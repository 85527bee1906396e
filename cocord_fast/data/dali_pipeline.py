"""DALI graphs: read, decode each image once, then one augmentation chain per view.

The recipes are those of `transforms.py` (METHOD.md, "Views") expressed as DALI operators:
- fixed-size images (a source with an `image_size`: CIFAR-100, demo): 4 px of zero padding, a
  random crop of that size at an integer offset in [0, 8], a random horizontal flip, normalise;
- ImageFolder/ImageNet: random-resized crop (area 0.08-1, aspect 3/4-4/3) to `image_size`,
  flip, normalise; evaluation resizes to image_size/crop_pct (0.875 unless a teacher's
  preprocessing says otherwise) the shorter side, both sides or the longer side (the crop mode:
  center, squash, border) and centre-crops, padding with the mean colour in border mode, with
  the recipe's filter.

Everything enters through one external source, fed batch by batch by the loader: the images
(encoded files, or CIFAR's decoded arrays), their dataset indices and, for training, every
view's random parameters (crop window, flip). Those are drawn on the host by `draw_views`, from a
numpy generator the loader seeds per batch, and reach the operators as argument inputs: the
graph holds no random state, so one pipeline serves every epoch and any batch can be
reproduced without it. `draw_views` consumes a fixed amount of randomness per batch, whatever
the images.

Every operator after the decoder runs where the decoder's output lives: on the GPU after a
`mixed` decode, on the CPU in a CPU-only pipeline (`device_id=None`); the parameters are
host tensors, as argument inputs must be.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from .transforms import SMALL_IMAGE_PAD, Preprocessing

# torchvision's RandomResizedCrop: area fraction, log aspect ratio, and 10 tries for a window
# that fits before it falls back to a centre crop.
CROP_AREA = (0.08, 1.0)
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_ATTEMPTS = 10


# A window's position a hair before the centre: DALI rounds a centred window's half-pixel
# offset away from zero, which pads the odd pixel before the image; timm's border mode pads it
# after.
PAD_ODD_PIXEL_AFTER = 0.5 - 1e-6

# torchvision's filters as DALI's (both antialias when they shrink).
INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


@dataclass(frozen=True)
class DaliRecipe:
    fixed_size: int  # the side of every image of a fixed-size source; 0 where they vary
    image_size: int
    preprocessing: Preprocessing

    @property
    def small(self) -> bool:
        return self.fixed_size > 0

    @property
    def mean_std(self) -> tuple[list[float], list[float]]:
        mean, std = self.preprocessing.mean, self.preprocessing.std
        return [255 * m for m in mean], [255 * s for s in std]  # DALI normalises raw uint8

    @property
    def view_params(self) -> list[tuple[types.DALIDataType, int]]:
        """(type, ndim) of each random parameter of one training view, as `draw_views` gives
        them: small images (crop_pos_x, crop_pos_y, mirror), others (roi_start, roi_end,
        mirror) with the window's corners as (y, x) fractions of the image."""
        if self.small:
            return [(types.FLOAT, 0), (types.FLOAT, 0), (types.INT32, 0)]
        return [(types.FLOAT, 1), (types.FLOAT, 1), (types.INT32, 0)]

    def draw_views(self, rng: np.random.Generator, num_views: int, batch: int,
                   sizes: np.ndarray | None) -> list[np.ndarray]:
        """Every view's parameters for a batch of `batch` images, view after view
        (`view_params`). `sizes`: (B, 2) decoded (height, width) of each image; None for the
        small recipe, whose crops do not depend on them."""
        params = []
        for _ in range(num_views):
            if self.small:
                # crop_pos is relative to the 8 px of slack: k/8 is the integer offset k in
                # 0..8, each with probability 1/9, as torchvision's RandomCrop(32, padding=4).
                slack = 2 * SMALL_IMAGE_PAD
                offsets = rng.integers(0, slack + 1, (2, batch)) / slack
                params += [offsets[0].astype(np.float32), offsets[1].astype(np.float32)]
            else:
                params += resized_crop_windows(rng, sizes)
            params.append(rng.integers(0, 2, batch, dtype=np.int32))  # flip
        return params

    @property
    def interp_type(self) -> types.DALIInterpType:
        return INTERPOLATION[self.preprocessing.interpolation]

    def normalize(self, images, **crop):
        mean, std = self.mean_std
        return fn.crop_mirror_normalize(images, mean=mean, std=std, dtype=types.FLOAT,
                                        output_layout="HWC", **crop)  # channels-last

    def train_view(self, images, params: list):
        if self.small:
            crop_x, crop_y, flip = params
            padded = self.fixed_size + 2 * SMALL_IMAGE_PAD
            # A centred 40x40 window over a 32x32 image: 4 px of zeros on every side.
            images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad",
                             fill_values=0)
            return self.normalize(images, crop=(self.fixed_size, self.fixed_size), mirror=flip,
                                  crop_pos_x=crop_x, crop_pos_y=crop_y)
        start, end, flip = params
        size = self.image_size
        images = fn.resize(images, size=(size, size), roi_start=start, roi_end=end,
                           roi_relative=True, interp_type=self.interp_type)
        return self.normalize(images, mirror=flip)

    def eval_view(self, images):
        if self.small:
            return self.normalize(images)
        size, resize = self.image_size, self.preprocessing.eval_resize(self.image_size)
        fit = {"center": {"resize_shorter": resize}, "squash": {"size": (resize, resize)},
               "border": {"resize_longer": resize}}[self.preprocessing.crop_mode]
        images = fn.resize(images, interp_type=self.interp_type, **fit)
        if self.preprocessing.crop_mode == "border":  # padded in uint8, as the torch path pads
            images = fn.crop(images, crop=(size, size), out_of_bounds_policy="pad",
                             fill_values=list(self.preprocessing.border_fill),
                             crop_pos_x=PAD_ODD_PIXEL_AFTER, crop_pos_y=PAD_ODD_PIXEL_AFTER)
        return self.normalize(images, crop=(size, size))


def resized_crop_windows(rng: np.random.Generator, sizes: np.ndarray) -> list[np.ndarray]:
    """torchvision's `RandomResizedCrop.get_params` for (B, 2) (height, width) sizes, as
    [roi_start, roi_end]: (B, 2) (y, x) corners in fractions of each image."""
    batch = len(sizes)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)  # (B,)
    area = (height * width)[:, None] * rng.uniform(*CROP_AREA, (batch, CROP_ATTEMPTS))
    ratio = np.exp(rng.uniform(*CROP_LOG_RATIO, (batch, CROP_ATTEMPTS)))
    tries_w, tries_h = np.rint(np.sqrt(area * ratio)), np.rint(np.sqrt(area / ratio))
    fits = ((tries_w > 0) & (tries_w <= width[:, None])
            & (tries_h > 0) & (tries_h <= height[:, None]))  # (B, attempts)
    first = fits.argmax(axis=1)  # the first window that fits: (B,)
    w, h = tries_w[np.arange(batch), first], tries_h[np.arange(batch), first]
    place = rng.uniform(size=(2, batch))
    top, left = np.floor(place[0] * (height - h + 1)), np.floor(place[1] * (width - w + 1))
    # No window fits: the centre crop of the largest window whose aspect is within bounds.
    aspect = width / height
    low, high = math.exp(CROP_LOG_RATIO[0]), math.exp(CROP_LOG_RATIO[1])
    centre_w = np.where(aspect > high, np.rint(height * high), width)
    centre_h = np.where(aspect < low, np.rint(width / low), height)
    fallback = ~fits.any(axis=1)
    w, h = np.where(fallback, centre_w, w), np.where(fallback, centre_h, h)
    top = np.where(fallback, (height - h) // 2, top)
    left = np.where(fallback, (width - w) // 2, left)
    start = np.stack([top / height, left / width], axis=1)
    end = np.stack([(top + h) / height, (left + w) / width], axis=1)
    return [start.astype(np.float32), end.astype(np.float32)]


def read(source: Callable, encoded: bool, gpu: bool, params: list[tuple] = ()):
    """The external source `source` (a batch per call: images, int32 dataset indices, then
    `params` as (type, ndim)), decoded where `gpu` says. `encoded`: files' bytes, decoded
    here; otherwise (H, W, 3) uint8 arrays."""
    images, index, *values = fn.external_source(
        source=source, num_outputs=2 + len(params), batch=True,
        dtype=[types.UINT8, types.INT32] + [t for t, _ in params],
        ndim=[1 if encoded else 3, 0] + [n for _, n in params],
        layout=["" if encoded else "HWC"])
    if encoded:
        # EXIF orientation is left alone, as PIL (the torch path) does: the size the loader
        # reads from a file's header is then the decoded image's size.
        images = fn.decoders.image(images, device="mixed" if gpu else "cpu",
                                   output_type=types.RGB, adjust_orientation=False)
    elif gpu:
        images = images.gpu()
    return images, index, values


@pipeline_def
def training_pipeline(source: Callable, recipe: DaliRecipe, num_views: int, encoded: bool,
                      gpu: bool):
    per_view = len(recipe.view_params)
    images, index, params = read(source, encoded, gpu, recipe.view_params * num_views)
    # Decoded once, augmented per view.
    views = [recipe.train_view(images, params[v * per_view:(v + 1) * per_view])
             for v in range(num_views)]
    return (*views, index)


@pipeline_def
def eval_pipeline(source: Callable, recipe: DaliRecipe, encoded: bool, gpu: bool):
    images, index, _ = read(source, encoded, gpu)
    return recipe.eval_view(images), index
