"""Where samples come from: CIFAR-100's python arrays, an ImageFolder tree of image files, or
tar shards in the WebDataset layout.

A source maps a dataset index to a decoded RGB image and its label. Every problem a user can
cause (missing directory, wrong format, empty class) is a UserError raised when the source is
opened, before training starts; an unreadable image names its file.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import UserError
from . import folder_index, shards
from .index_files import stamp_of, unpack_string

DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


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


class CIFAR100:
    """CIFAR-100 from the standard `cifar-100-python` folder (as torchvision stores it).

    `root` may be that folder or its parent. With `download=True` a missing folder is fetched
    through torchvision.
    """

    FOLDER = "cifar-100-python"
    classes = None  # numbered, not named (the names are in `meta`, not needed)

    def __init__(self, root: str | Path, train: bool, download: bool = False):
        folder = self._find_folder(Path(root), download)
        path = folder / ("train" if train else "test")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        except FileNotFoundError:
            raise UserError(f"CIFAR-100 file {path} is missing (data.root={root})") from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} is not a CIFAR-100 python-format file ({err!r}); "
                            f"data.root must hold the 'cifar-100-python' folder") from None
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
            raise UserError(f"{path}: expected 'data' of shape (N, 3072) and N 'fine_labels', "
                            f"got {images.shape} and {len(labels)}")
        self.images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3) HWC
        self.targets = labels
        self.num_classes = 100

    @classmethod
    def _find_folder(cls, root: Path, download: bool) -> Path:
        for candidate in (root / cls.FOLDER, root):
            if (candidate / "train").is_file() and (candidate / "meta").is_file():
                return candidate
        if download:
            from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

            try:
                TorchvisionCIFAR100(str(root), train=True, download=True)
            except Exception as err:  # network errors come in many types
                raise UserError(f"could not download CIFAR-100 into {root}: {err}") from None
            return root / cls.FOLDER
        raise UserError(f"no CIFAR-100 data under data.root={root}: expected {root / cls.FOLDER}/"
                        f"{{train,test,meta}} (set data.download=true to fetch it)")

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.targets[index])

    def fingerprint_bytes(self, start: int, end: int) -> bytes:
        """What identifies samples [start, end) (`fingerprint.py`): pixels and labels."""
        return self.images[start:end].tobytes() + self.targets[start:end].tobytes()

    def sample_names(self, start: int, end: int) -> list[str]:
        return [f"image {i} (pixels sha256:"
                f"{hashlib.sha256(self.images[i].tobytes()).hexdigest()[:12]})"
                for i in range(start, end)]


class EncodedImages:
    """A split of encoded image files with an index (labels, classes, image sizes): what an
    ImageFolder and tar shards share. A subclass gives `name(i)`, how messages call sample i,
    and `_read(i)`, its bytes."""

    index = None  # a FolderIndex or a ShardIndex
    classes: list[str] | None
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def name(self, index: int) -> str:
        raise NotImplementedError

    def _read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        """The encoded bytes of image `index` (uint8). The file system failing (permissions, a
        failing disk) is a UserError, never skipped as a damaged image: only decoding, which
        reads from memory, finds those."""
        try:
            return self._read(index)
        except OSError as err:
            raise UserError(f"cannot read {self.name(index)}: {err.strerror or err} (an I/O "
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
        """(N, 2) every image's (height, width) as the index holds it; -1 where not measured."""
        return self.index.sizes

    def load(self, index: int) -> tuple[Image.Image, int]:
        data = self.read(index)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB"), int(self.targets[index])
        except DECODE_ERRORS as err:
            raise CorruptImage(self.name(index), str(err) or type(err).__name__) from None

    def decode_error(self, index: int) -> str | None:
        """Why image `index` cannot be fully decoded, or None if it can (a whole decode, not a
        header check: a truncated JPEG has a valid header)."""
        try:
            with Image.open(io.BytesIO(self.read(index))) as image:
                image.load()
        except DECODE_ERRORS as err:
            return str(err) or type(err).__name__
        return None

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


class ImageFolder(EncodedImages):
    """`root/<class name>/.../<image file>`; classes are the sorted folder names. Listed through
    its index (folder_index.py): a start reads one file instead of testing every image."""

    def __init__(self, root: str | Path, say: Callable[[str], None] = print,
                 rescan: bool = False):
        self.index = folder_index.open_index(Path(root), say, rescan)
        self.classes, self.targets = self.index.classes, self.index.targets
        self.num_classes = len(self.classes)

    def path(self, index: int) -> Path:
        return self.index.path(index)

    def name(self, index: int) -> str:
        return str(self.index.path(index))

    def _read(self, index: int) -> np.ndarray:
        return np.fromfile(self.index.path(index), dtype=np.uint8)

    def _measure_size(self, index: int) -> tuple[int, int]:
        # The file's size and time before its bytes: a size is kept while they stay the same.
        self.index.stamps[index] = stamp_of(self.index.path(index))
        return super()._measure_size(index)


class TarShards(EncodedImages):
    """Tar shards in the WebDataset layout (shards.py), read by offset through their index.
    Class names, where known, are the lines of `classes.txt` beside the split folders (what
    `cocord-fast convert` writes); without it the classes are numbered 0 to the largest label."""

    CLASSES_FILE = "classes.txt"

    def __init__(self, root: str | Path, say: Callable[[str], None] = print,
                 rescan: bool = False):
        self.index = shards.open_index(Path(root), say, rescan)
        self.targets = self.index.targets
        classes_file = Path(root).parent / self.CLASSES_FILE
        self.classes = (classes_file.read_text().splitlines() if classes_file.is_file()
                        else None)
        self.num_classes = (len(self.classes) if self.classes is not None
                            else int(self.targets.max()) + 1)
        if (largest := int(self.targets.max())) >= self.num_classes:
            raise UserError(f"{self.name(int(self.targets.argmax()))} has class {largest}, but "
                            f"{classes_file} names {self.num_classes} classes")
        self.files = shards.ShardFiles(self.index)

    def name(self, index: int) -> str:
        return self.index.name(index)

    def _read(self, index: int) -> np.ndarray:
        return self.files.read(int(self.index.shard_of[index]), int(self.index.starts[index]),
                               int(self.index.lengths[index]))


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image from its header. A header PIL cannot read counts as
    1x1 (a whole-image crop): DALI's decoder then names the file, or decodes a format PIL does
    not know."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[1], image.size[0]
    except (Image.DecompressionBombError, *DECODE_ERRORS):
        return 1, 1


def open_source(dataset: str, root: str | Path, train: bool, download: bool = False):
    """The training or validation source of a dataset kind (`data.dataset`)."""
    if dataset == "cifar100":
        return CIFAR100(root, train=train, download=download)
    split = Path(root) / ("train" if train else "val")
    layout = ("<shard>.tar" if dataset == "shards" else "<class>/...")
    if not Path(root).is_dir():
        raise UserError(f"data.root={root} does not exist")
    if not split.is_dir():
        raise UserError(f"data.root={root} has no '{split.name}' folder (expected "
                        f"{root}/train/{layout} and {root}/val/{layout})")
    return TarShards(split) if dataset == "shards" else ImageFolder(split)
