"""The torch path's batches of a fixed-size source (`Source.image_size` set: CIFAR-100, the
demo set): a whole batch of arrays padded, cropped, flipped and normalised at once, instead of
image by image through PIL and torchvision's transforms, which on 2 cores took longer than the
step they fed. An encoded source's images are decoded once per process and kept: a 32x32 image
is 3 KB.

The recipe is METHOD.md's for small images: 4 px of zero padding, a random crop back to the
image's side (each of the 9 x 9 offsets equally likely), a horizontal flip with probability
1/2, then ToTensor's and Normalize's arithmetic. A sample's crops and flips are a function of
(seed, epoch, dataset index), as the image-by-image path's: the number of workers and a resume
do not change them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from .batch import IMAGE_LAYOUT, Batch
from .sources import CorruptImage, Source, first_readable
from .transforms import SMALL_IMAGE_PAD, Preprocessing

# The decoded images an encoded source may keep per process; past it they are decoded anew
# at every use.
KEPT_IMAGES_BUDGET_BYTES = 2 << 30


def crop_draws(seed: int, epoch: int, indices: np.ndarray, num_views: int,
               pad: int = SMALL_IMAGE_PAD) -> np.ndarray:
    """(num_views, B, 3) int64: each view's row offset and column offset into the padded image
    (0 to 2 x `pad`) and its flip (1: mirrored), drawn from the stream of (seed, epoch, index).
    The modulo's bias is 4 in 2^32."""
    words = np.stack([np.random.SeedSequence([3, seed, epoch, int(i)]).generate_state(3 * num_views)
                      for i in indices]).astype(np.int64).reshape(len(indices), num_views, 3)
    draws = np.stack([words[..., 0] % (2 * pad + 1), words[..., 1] % (2 * pad + 1),
                      words[..., 2] & 1], axis=-1)
    return draws.transpose(1, 0, 2)


def crop_and_flip(images: np.ndarray, draws: np.ndarray, pad: int = SMALL_IMAGE_PAD) -> np.ndarray:
    """(B, H, W, C) images, each zero-padded by `pad`, cropped back to H x W at its (row,
    column) offset of `draws` (B, 3) and mirrored where its flip is 1: one gather."""
    batch, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = draws[:, 0, None] + np.arange(height)
    columns = draws[:, 1, None] + np.where(draws[:, 2, None] == 1, np.arange(width)[::-1],
                                           np.arange(width))
    return padded[np.arange(batch)[:, None, None], rows[:, :, None], columns[:, None, :]]


def normalised(images: np.ndarray, preprocessing: Preprocessing) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in the channels-last layout, by ToTensor's
    and Normalize's very operations (x / 255, then (x - mean) / std). The arithmetic runs on
    the (B, H, W, 3) array, whose (B, 3, H, W) view is already channels-last: no copy."""
    mean, std = torch.tensor(preprocessing.mean), torch.tensor(preprocessing.std)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float()
    return (pixels.div(255).sub(mean).div(std).permute(0, 3, 1, 2)
            .contiguous(memory_format=IMAGE_LAYOUT))  # a no-op in the channels-last layout


class FixedSizeImages:
    """A fixed-size source's images as arrays: an array source's own; an encoded source's
    decoded, checked for its side and kept while they fit `KEPT_IMAGES_BUDGET_BYTES` (an
    unreadable file is never kept: it is tried, and skipped, at every use)."""

    def __init__(self, source: Source, skip_corrupt: bool):
        self.source, self.skip_corrupt = source, skip_corrupt
        side = source.image_size
        self.keeps = len(source) * side * side * 3 <= KEPT_IMAGES_BUDGET_BYTES
        self.kept: dict[int, np.ndarray] = {}

    def training(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images, the dataset index each came from, files skipped): an unreadable file is
        replaced by the next readable one in dataset order (`skip_corrupt`), else raises."""
        if not self.source.encoded:
            return self.source.pixels(indices), indices, []
        images, used, skipped = [], [], []
        for index in indices.tolist():
            image, source_index, missed = first_readable(self.source, index, self.skip_corrupt,
                                                         self._decoded)
            images.append(image)
            used.append(source_index)
            skipped += missed
        return np.stack(images), np.asarray(used, np.int64), skipped

    def evaluation(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images, their dataset indices, files skipped): an unreadable file is dropped
        (`skip_corrupt`: a substitute would count another image twice), else raises."""
        if not self.source.encoded:
            return self.source.pixels(indices), indices, []
        images, kept, skipped = [], [], []
        for index in indices.tolist():
            try:
                images.append(self._decoded(index))
            except CorruptImage as err:
                if not self.skip_corrupt:
                    raise
                skipped.append(str(err.path))
                continue
            kept.append(index)
        side = self.source.image_size
        return (np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8),
                np.asarray(kept, np.int64), skipped)

    def _decoded(self, index: int) -> np.ndarray:
        pixels = self.kept.get(index)
        if pixels is None:
            pixels = np.asarray(self.source.load(index)[0])
            side = self.source.image_size
            if pixels.shape != (side, side, 3):
                raise UserError(f"{self.source.where(index)} is {pixels.shape[1]}x"
                                f"{pixels.shape[0]} pixels; every image of data.dataset="
                                f"{self.source.name} is {side}x{side}")
            if self.keeps:
                self.kept[index] = pixels
        return pixels


class FixedSizeTrainBatches(Dataset):
    """A batch sampler's list of `(dataset index, epoch)` -> a training `Batch` of `num_views`
    views (`__getitems__`: the DataLoader hands over the whole batch)."""

    def __init__(self, source: Source, preprocessing: Preprocessing, num_views: int, seed: int,
                 skip_corrupt: bool = False):
        self.images = FixedSizeImages(source, skip_corrupt)
        self.preprocessing, self.num_views, self.seed = preprocessing, num_views, seed

    def __len__(self) -> int:
        return len(self.images.source)

    def __getitems__(self, items: list[tuple[int, int]]) -> Batch:
        indices = np.asarray([index for index, _ in items], np.int64)
        images, used, skipped = self.images.training(indices)
        draws = crop_draws(self.seed, items[0][1], used, self.num_views)
        return Batch(views=[normalised(crop_and_flip(images, view), self.preprocessing)
                            for view in draws],
                     labels=torch.from_numpy(self.images.source.targets[used]),
                     index=torch.from_numpy(indices), skipped=tuple(skipped),
                     replaced=torch.from_numpy(used != indices))


class FixedSizeEvalBatches(Dataset):
    """A list of dataset indices -> an evaluation `Batch` of one view, the image itself."""

    def __init__(self, source: Source, preprocessing: Preprocessing, skip_corrupt: bool = False):
        self.images = FixedSizeImages(source, skip_corrupt)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.images.source)

    def __getitems__(self, indices: list[int]) -> Batch:
        images, kept, skipped = self.images.evaluation(np.asarray(indices, np.int64))
        return Batch(views=[normalised(images, self.preprocessing)],
                     labels=torch.from_numpy(self.images.source.targets[kept]),
                     index=torch.from_numpy(kept), skipped=tuple(skipped))


def as_made(batch: Batch) -> Batch:
    """The DataLoader's `collate_fn`: the datasets above make whole batches."""
    return batch
