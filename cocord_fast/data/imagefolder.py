"""An ImageFolder tree (`root/train/<class>/...`, `root/val/<class>/...`): the `imagefolder`
data source."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from . import folder_index
from .index_files import stamp_of
from .sources import EncodedImages


class ImageFolder(EncodedImages):
    """`root/<class name>/.../<image file>`; classes are the sorted folder names. Listed through
    its index (folder_index.py): a start reads one file instead of testing every image."""

    name = "imagefolder"
    LAYOUT = "<class>/..."

    def __init__(self, root: str | Path, say: Callable[[str], None] = print,
                 rescan: bool = False):
        self.index = folder_index.open_index(Path(root), say, rescan)
        self.classes, self.targets = self.index.classes, self.index.targets
        self.num_classes = len(self.classes)

    def path(self, index: int) -> Path:
        return self.index.path(index)

    def where(self, index: int) -> str:
        return str(self.index.path(index))

    def _read(self, index: int) -> np.ndarray:
        return np.fromfile(self.index.path(index), dtype=np.uint8)

    def _measure_size(self, index: int) -> tuple[int, int]:
        # The file's size and time before its bytes: a size is kept while they stay the same.
        self.index.stamps[index] = stamp_of(self.index.path(index))
        return super()._measure_size(index)
