"""DALI graphs: read, decode each image once, then one augmentation chain per view.

The recipes are those of `transforms.py` (METHOD.md, "Views") expressed as DALI operators:
- small images (CIFAR-100, demo): 4 px of zero padding, a random 32x32 crop at an integer
  offset in [0, 8], a random horizontal flip, normalise;
- ImageFolder/ImageNet: random-resized crop (area 0.08-1, aspect 3/4-4/3) to `image_size`,
  flip, normalise; evaluation resizes the shorter side to image_size/0.875 and centre-crops.
Every operator after the decoder runs where the decoder's output lives: on the GPU after a
`mixed` decode, on the CPU in a CPU-only pipeline (`device_id=None`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from nvidia.dali import fn, pipeline_def, types

from .transforms import eval_resize, is_small_image, normalization

READER = "Reader"  # the file reader's name: DALI's iterators size an epoch from it
SMALL_PAD = 4


@dataclass(frozen=True)
class DaliRecipe:
    dataset: str
    image_size: int
    layout: str  # "CHW" (CPU) or "HWC" (GPU: a permuted view of it is channels-last)

    @property
    def mean_std(self) -> tuple[list[float], list[float]]:
        mean, std = normalization(self.dataset)
        return [255 * m for m in mean], [255 * s for s in std]  # DALI normalises raw uint8

    def normalize(self, images, **crop):
        mean, std = self.mean_std
        return fn.crop_mirror_normalize(images, mean=mean, std=std, dtype=types.FLOAT,
                                        output_layout=self.layout, **crop)

    def train_view(self, images):
        flip = fn.random.coin_flip()
        if is_small_image(self.dataset):
            size, padded = 32, 32 + 2 * SMALL_PAD
            # A centred 40x40 window over a 32x32 image: 4 px of zeros on every side.
            images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad",
                             fill_values=0)
            # crop_pos is relative to the 8 px of slack: these values are the integer offsets
            # 0..8, each with probability 1/9, as torchvision's RandomCrop(32, padding=4).
            offsets = [k / (padded - size) for k in range(padded - size + 1)]
            return self.normalize(images, crop=(size, size), mirror=flip,
                                  crop_pos_x=fn.random.uniform(values=offsets),
                                  crop_pos_y=fn.random.uniform(values=offsets))
        size = self.image_size
        images = fn.random_resized_crop(images, size=(size, size), random_area=[0.08, 1.0],
                                        random_aspect_ratio=[3 / 4, 4 / 3])
        return self.normalize(images, mirror=flip)

    def eval_view(self, images):
        if is_small_image(self.dataset):
            return self.normalize(images)
        images = fn.resize(images, resize_shorter=eval_resize(self.image_size))
        return self.normalize(images, crop=(self.image_size, self.image_size))


def read_files(files: Sequence[str], indices: Sequence[int], decoder: str,
               pad_last_batch: bool) -> Callable:
    """Reader + decoder over an explicit file list (this rank's shard, in order) whose "label"
    is the dataset index (the file reader yields only labels; the class comes from the index
    through a lookup table)."""
    def read():
        encoded, index = fn.readers.file(
            files=list(files), labels=list(indices), random_shuffle=False,
            pad_last_batch=pad_last_batch, name=READER)
        return fn.decoders.image(encoded, device=decoder, output_type=types.RGB), index
    return read


def read_arrays(batches, gpu: bool) -> Callable:
    """An external source of `(images (B, H, W, 3) uint8, index (B,) int32)` batches; the
    iterable's end is the epoch's end."""
    def read():
        images, index = fn.external_source(source=batches, num_outputs=2, batch=True,
                                           layout=["HWC", ""])
        return (images.gpu() if gpu else images), index
    return read


@pipeline_def
def training_pipeline(read: Callable, recipe: DaliRecipe, num_views: int):
    images, index = read()  # decoded once ...
    views = [recipe.train_view(images) for _ in range(num_views)]  # ... augmented per view
    return (*views, index)


@pipeline_def
def eval_pipeline(read: Callable, recipe: DaliRecipe):
    images, index = read()
    return recipe.eval_view(images), index
