"""What a data source is (`Source`), the part encoded splits share (`EncodedImages`), and
how a split is opened by its kind's name (`data.dataset`, `plugins.SOURCES`).

A source maps a dataset index to an image and its label. Every problem a user can cause
(missing directory, wrong format, empty class) is a UserError raised when the source is
opened, before training starts; an unreadable image names its file. The kinds are one module
each: cifar100.py, imagefolder.py, tar_shards.py, demo.py, or a package's (README, "Adding a
method or a data source").
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import UserError
from ..plugins import SOURCES
from .index_files import unpack_string

DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CorruptImage(UserError):
    """An image file that cannot be decoded; `data.skip_corrupt=true` replaces it instead."""

    def __init__(self, path: Path | str, reason: str | None = None):
        if reason is None:  # torch's DataLoader re-raises a worker's error from its text alone
            super().__init__(str(path))
            self.path = None
            return
        super().__init__(f"cannot decode image {path}: {reason} (set data.skip_corrupt=true to "
                         f"skip unreadable files)")
        self.path = path


class Source:
    """One split of a data set: everything the loaders, the augmentation and the checks ask.

    The kind's declarations, read before a split is opened: `name` (`data.dataset`),
    `image_size` (every image has this side, and takes the small-image recipe: a padded random
    crop, never a resize; 0: images of any size, random-resized crops), `mean` and `std` (its
    normalisation where `data.mean`/`data.std` are unset), `needs_root` (else it makes its data
    itself: `default_root`), `downloads` (`data.download` fetches it) and `encoded` (`read`
    gives a sample's encoded bytes, decoded by the pipeline; else `pixels` gives decoded
    arrays).

    A split gives `len`, `targets` (N,) int64, `classes` (names, or None: numbered),
    `num_classes`, `where(i)` (how messages call sample i), `load(i)` (a PIL image and its
    label), `fingerprint_bytes` and `sample_names` (what identifies samples, `fingerprint.py`),
    and by `encoded` either `read`, `sizes` and `decode_error`, or `pixels`.
    """

    name: ClassVar[str] = ""
    image_size: ClassVar[int] = 0
    mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    needs_root: ClassVar[bool] = True
    downloads: ClassVar[bool] = False
    encoded: ClassVar[bool] = True

    classes: list[str] | None = None
    targets: np.ndarray
    num_classes: int

    @classmethod
    def open(cls, root: Path, train: bool, download: bool = False) -> Source:
        """The training or validation split under `root`."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, root: Path) -> None:
        """Makes what every start reads (an index of each split), where it is missing or
        stale; runs in turns before the processes open their splits (`build.prepare_sources`)."""

    @classmethod
    def default_root(cls) -> Path:
        """Where the data lies when `data.root` is empty, for a kind without `needs_root`,
        made there if missing."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def where(self, index: int) -> str:
        return f"image {index}"

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Sample `index` decoded to RGB, and its label."""
        if not self.encoded:
            return Image.fromarray(self.pixels(np.asarray([index]))[0]), int(self.targets[index])
        data = self.read(index)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB"), int(self.targets[index])
        except DECODE_ERRORS as err:
            raise CorruptImage(self.where(index), str(err) or type(err).__name__) from None

    def fingerprint_bytes(self, start: int, end: int) -> bytes:
        """What identifies samples [start, end) (`fingerprint.py`)."""
        raise NotImplementedError

    def sample_names(self, start: int, end: int) -> list[str]:
        return [self.where(i) for i in range(start, end)]

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """Decoded sources: (B, H, W, 3) uint8 images of `indices`."""
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        """Encoded sources: the encoded bytes of sample `index` (uint8)."""
        raise NotImplementedError

    @property
    def sizes(self) -> np.ndarray:
        """Encoded sources: (N, 2) every image's (height, width) where known; -1 where not."""
        return np.full((len(self), 2), -1, np.int64)

    def decode_error(self, index: int) -> str | None:
        """Why image `index` cannot be fully decoded, or None if it can (a whole decode, not a
        header check: a truncated JPEG has a valid header)."""
        if not self.encoded:
            return None
        try:
            with Image.open(io.BytesIO(self.read(index))) as image:
                image.load()
        except DECODE_ERRORS as err:
            return str(err) or type(err).__name__
        return None


# A run of this many unreadable files in a row is not a few bad files but a broken data set.
MAX_CONSECUTIVE_CORRUPT = 100


def first_readable(source: Source, index: int, skip_corrupt: bool,
                   read: Callable[[int], Any]) -> tuple[Any, int, list[str]]:
    """(read(i), i, the files skipped) for the first sample i from `index` on, in dataset
    order, that `read` can decode: with `skip_corrupt` an unreadable sample is replaced by the
    next readable one, so batches keep their size (every rank must run the same steps, and
    BatchNorm and the queue expect full batches); else it raises."""
    skipped: list[str] = []
    for offset in range(MAX_CONSECUTIVE_CORRUPT):
        candidate = (index + offset) % len(source)
        try:
            return read(candidate), candidate, skipped
        except CorruptImage as err:
            if not skip_corrupt:
                raise
            skipped.append(str(err.path))
    raise CorruptImage(source.where(index), f"it and the next {MAX_CONSECUTIVE_CORRUPT - 1} "
                                            f"files in dataset order are all unreadable")


class EncodedImages(Source):
    """A split of encoded image files with an index (labels, classes, image sizes): what an
    ImageFolder and tar shards share: `root/train` and `root/val` each hold a split, laid out
    as `LAYOUT` says; the class is built from the split's folder. A subclass gives `where(i)`,
    how messages call sample i, and `_read(i)`, its bytes."""

    LAYOUT = ""
    index = None  # a FolderIndex or a ShardIndex

    @classmethod
    def open(cls, root: Path, train: bool, download: bool = False) -> EncodedImages:
        return cls(split_folder(root, train, cls.LAYOUT))

    @classmethod
    def prepare(cls, root: Path) -> None:
        for train in (True, False):  # opening a split writes its index where it is stale
            cls.open(root, train)

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        """The encoded bytes of image `index` (uint8). The file system failing (permissions, a
        failing disk) is a UserError, never skipped as a damaged image: only decoding, which
        reads from memory, finds those."""
        try:
            return self._read(index)
        except OSError as err:
            raise UserError(f"cannot read {self.where(index)}: {err.strerror or err} (an I/O "
                            f"error, not a damaged image: data.skip_corrupt does not skip it)") \
                from None

    def fingerprint_bytes(self, start: int, end: int) -> bytes:
        """What identifies samples [start, end) (`fingerprint.py`): their names (relative to
        the split) and labels."""
        names, offsets = self.index.names, self.index.offsets
        return (names[offsets[start]:offsets[end]].tobytes()
                + np.diff(offsets[start:end + 1]).tobytes() + self.targets[start:end].tobytes())

    def sample_names(self, start: int, end: int) -> list[str]:
        return [unpack_string(self.index.names, self.index.offsets, i) for i in range(start, end)]

    @property
    def sizes(self) -> np.ndarray:
        return self.index.sizes

    def measure_sizes(self, threads: int = 8, progress: bool = True) -> Path:
        """Reads every image's size from its header into the index (what DALI's crops need:
        the feed then reads no header at all) and writes it; returns where."""
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(tqdm(pool.map(self._measure_size, range(len(self))), total=len(self),
                              desc=f"sizes of {self.index.root}", unit="image",
                              disable=not progress, leave=False))
        self.index.sizes[:] = np.asarray(sizes, np.int64).reshape(-1, 2)
        return self.index.write()

    def _measure_size(self, index: int) -> tuple[int, int]:
        return header_size(self.read(index))


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image from its header. A header PIL cannot read counts as
    1x1 (a whole-image crop): DALI's decoder then names the file, or decodes a format PIL does
    not know."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[1], image.size[0]
    except (Image.DecompressionBombError, *DECODE_ERRORS):
        return 1, 1


def source_kind(name: str) -> type[Source]:
    """The source class registered as `name` (`data.dataset`)."""
    return SOURCES.get(name, "data.dataset")


def describe_sources() -> str:
    """Every registered source kind, for `cocord-fast sources`."""
    lines = []
    for name, kind in SOURCES.all().items():
        size = f"{kind.image_size} px images" if kind.image_size else "images of any size"
        root = "data.root required" if kind.needs_root else "made offline when data.root is empty"
        what = " ".join((kind.__doc__ or "").split()).split(". ")[0].rstrip(".")
        lines.append(f"{name} ({kind.__module__}): {what} [{size}; {root}"
                     f"{'; data.download=true fetches it' if kind.downloads else ''}]")
    return "\n".join(lines)


def open_source(dataset: str, root: str | Path, train: bool, download: bool = False) -> Source:
    """The training or validation split of the kind `dataset` under `root`."""
    return source_kind(dataset).open(Path(root), train, download)


def split_folder(root: Path, train: bool, layout: str) -> Path:
    """`root/train` or `root/val`, or a UserError saying what is missing (`layout`: what a
    split folder holds, e.g. `<class>/...`)."""
    split = root / ("train" if train else "val")
    if not root.is_dir():
        raise UserError(f"data.root={root} does not exist")
    if not split.is_dir():
        raise UserError(f"data.root={root} has no '{split.name}' folder (expected "
                        f"{root}/train/{layout} and {root}/val/{layout})")
    return split
