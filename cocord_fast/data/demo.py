"""The `demo` data source: procedural 32x32 images written once as JPEG files, made offline.

Ten classes: five shapes (disc, bar, triangle, cross, ring), each either solid or striped.
Colour, size, position, rotation, stripe angle, background, distractor blobs and noise all vary,
so a small network learns it well but not perfectly. The images go through the real
ImageFolder decoding path. Generation is deterministic and happens once per cache directory.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError
from .cifar100 import CIFAR_MEAN, CIFAR_STD
from .imagefolder import ImageFolder
from .index_files import default_cache_dir

SHAPES = ("disc", "bar", "triangle", "cross", "ring")
FILLS = ("solid", "striped")
CLASSES = tuple(f"{shape}_{fill}" for shape in SHAPES for fill in FILLS)
SPLITS = {"train": 400, "val": 100}  # images per class
SIZE, SCALE = 32, 4  # drawn at 4x and downsampled, for anti-aliased edges
FORMAT_VERSION = 1


class Demo(ImageFolder):
    """The demo set as an ImageFolder tree, made where `data.root` points (default: the cache
    directory) on first use. Its channel statistics are close enough to CIFAR's."""

    name = "demo"
    image_size = SIZE
    mean, std = CIFAR_MEAN, CIFAR_STD
    needs_root = False

    @classmethod
    def default_root(cls) -> Path:
        return default_cache_dir() / "data"

    @classmethod
    def open(cls, root: Path, train: bool, download: bool = False) -> Demo:
        return super().open(ensure_demo_dataset(root), train)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "bar":  # a 3:1 rectangle
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        points = [(x * r, y * r / 3) for x, y in corners]
    elif shape == "triangle":
        points = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    else:  # cross: a plus sign of arm width r/2.5
        w = r / 2.5
        points = [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r),
                  (w, -w), (r, -w), (r, w), (w, w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _shape_mask(shape: str, rng: np.random.Generator) -> Image.Image:
    big = SIZE * SCALE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(8, 13) * SCALE
    cx, cy = rng.uniform(r * 0.8, big - r * 0.8, size=2)
    if shape in ("disc", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            inner = r * rng.uniform(0.45, 0.65)
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=255)
    return mask


def _stripes(rng: np.random.Generator) -> np.ndarray:
    big = SIZE * SCALE
    y, x = np.mgrid[0:big, 0:big].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(4.0, 6.0) * SCALE
    phase = (x * math.cos(angle) + y * math.sin(angle)) / period
    return (np.sin(2 * math.pi * phase) > 0).astype(np.float32)


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    shape, fill = CLASSES[label].split("_")
    big = SIZE * SCALE
    y, x = np.mgrid[0:big, 0:big].astype(np.float32) / big
    gradient = rng.uniform(-0.3, 0.3, size=(2, 1, 1, 3))
    canvas = rng.uniform(0.2, 0.8, size=3) + gradient[0] * x[..., None] + gradient[1] * y[..., None]
    for _ in range(rng.integers(0, 3)):  # distractor blobs, drawn under the object
        blob = Image.new("L", (big, big), 0)
        bx, by, br = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(2, 6) * SCALE
        ImageDraw.Draw(blob).ellipse([bx - br, by - br, bx + br, by + br], fill=255)
        alpha = np.asarray(blob.filter(ImageFilter.GaussianBlur(2 * SCALE)), np.float32)[..., None] / 255
        canvas = canvas * (1 - alpha) + rng.uniform(0, 1, size=3) * alpha
    alpha = np.asarray(_shape_mask(shape, rng), np.float32)[..., None] / 255
    background = canvas.reshape(-1, 3).mean(axis=0)
    color = rng.uniform(0, 1, size=3)
    while np.abs(color - background).max() < 0.35:  # keep the object visible
        color = rng.uniform(0, 1, size=3)
    if fill == "striped":
        second = np.clip(color + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6), 0, 1)
        stripes = _stripes(rng)[..., None]
        color = color * stripes + second * (1 - stripes)
    canvas = canvas * (1 - alpha) + color * alpha
    image = Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8)).resize(
        (SIZE, SIZE), Image.Resampling.BOX)
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(3, 10), size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_demo_dataset(root: Path, seed: int = 0) -> None:
    for split_index, (split, per_class) in enumerate(SPLITS.items()):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_index, label])
            for i in range(per_class):
                make_image(label, rng).save(folder / f"{i:05d}.jpg", quality=90)


def ensure_demo_dataset(root: str | os.PathLike | None = None) -> Path:
    """The demo ImageFolder tree under `root` (default: the cache directory), made if missing.

    Written into a temporary sibling and renamed into place, so an interrupted generation never
    leaves a half-written data set behind.
    """
    root = Path(root).expanduser() if root else Demo.default_root()
    marker = root / f".complete-v{FORMAT_VERSION}"
    if marker.exists():
        return root
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root={root} is a file, not a directory; point data.root at a "
                        f"directory for the demo data set")
    if root.exists() and any(root.iterdir()):
        raise UserError(f"data.root={root} exists but does not hold a complete demo data set; "
                        f"remove it or point data.root elsewhere")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"making the demo data set in {root} (once) ...", flush=True)
    write_demo_dataset(staging)
    (staging / marker.name).touch()
    if root.exists():
        root.rmdir()
    staging.rename(root)
    return root
