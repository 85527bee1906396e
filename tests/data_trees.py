"""Image trees whose pixels say which file they came from, and the batches loaders give on
them, for the data-pipeline tests.

Image `id` of class `c` is a JPEG whose red channel is flat at `red(id)` and whose blue channel
is flat at `blue(c)`; the green channel is a horizontal ramp, so different crops and flips of
one image differ while red and blue still identify it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cocord_fast.config import DataConfig
from cocord_fast.data import build_loaders

ID_STEP, CLASS_STEP = 12, 70


def red(image_id: int) -> int:
    return 20 + ID_STEP * image_id


def blue(label: int) -> int:
    return 30 + CLASS_STEP * label


def identity_image(image_id: int, label: int, size: tuple[int, int]) -> Image.Image:
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = red(image_id)
    pixels[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 2] = blue(label)
    return Image.fromarray(pixels)


def write_identity_tree(root: Path, classes: int = 3, per_class: int = 4,
                        size: tuple[int, int] = (48, 36), val_per_class: int = 2) -> Path:
    """root/{train,val}/class_<c>/<id>.jpg with ids unique over the whole tree (at most 19)."""
    image_id = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for _ in range(count):
                identity_image(image_id, label, size).save(folder / f"{image_id:02d}.jpg",
                                                           quality=95)
                image_id += 1
    return root


def decode_identity(view, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, H, W) normalised views -> (image ids, labels), from the red and blue means."""
    pixels = (view.float() * std[:, None, None] + mean[:, None, None]) * 255
    r, b = pixels[:, 0].mean(dim=(1, 2)), pixels[:, 2].mean(dim=(1, 2))
    ids = np.rint(((r - 20) / ID_STEP).numpy()).astype(int)
    labels = np.rint(((b - 30) / CLASS_STEP).numpy()).astype(int)
    return ids, labels


def file_id(path: Path) -> int:
    return int(Path(path).stem)


def loaders(kind, root, backend, rank=0, world_size=1, **overrides):
    """Both loaders of a data set at 16 px, 2 views, batches of 2 (evaluation: 4)."""
    fields = dict(dataset=kind, root=str(root), image_size=16, batch_size=2, eval_batch_size=4,
                  num_workers=1, backend=backend)
    return build_loaders(DataConfig(**{**fields, **overrides}), num_views=2, seed=5, rank=rank,
                         world_size=world_size)


def epoch(loader, number, skip=0) -> list:
    """Epoch `number`'s training batches, less the first `skip`."""
    loader.train.start(number, skip)
    return list(loader.train)


def assert_same_batches(these, those) -> None:
    """The same samples, labels, views (bit for bit) and skipped files, batch for batch."""
    assert len(these) == len(those)
    for a, b in zip(these, those):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
        assert a.skipped == b.skipped
