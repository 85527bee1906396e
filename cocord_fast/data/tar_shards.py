"""Tar shards in the WebDataset layout (`root/train/*.tar`, `root/val/*.tar`): the `shards`
data source."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from . import shards
from .sources import EncodedImages


class TarShards(EncodedImages):
    """Tar shards in the WebDataset layout (shards.py), read by offset through their index.
    Class names, where known, are the lines of `classes.txt` beside the split folders (what
    `cocord-fast convert` writes); without it the classes are numbered 0 to the largest label."""

    name = "shards"
    CLASSES_FILE = "classes.txt"
    LAYOUT = "<shard>.tar"

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
            raise UserError(f"{self.where(int(self.targets.argmax()))} has class {largest}, but "
                            f"{classes_file} names {self.num_classes} classes")
        self.files = shards.ShardFiles(self.index)

    def where(self, index: int) -> str:
        return self.index.name(index)

    def _read(self, index: int) -> np.ndarray:
        return self.files.read(int(self.index.shard_of[index]), int(self.index.starts[index]),
                               int(self.index.lengths[index]))
