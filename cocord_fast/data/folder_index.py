"""The index of an ImageFolder split: its files, labels, classes and (once measured) each
image's size, so that a start reads one file instead of listing and testing every image.

A scan lists every directory of every class; on a network file system that is a metadata call
per file, repeated by every process at every start. The index is written once (next to the
data when that folder is writable, else in the cache directory) and read in well under a
second per million files. It holds every directory's modification time: a file added to or
removed from a folder changes that folder's, and the index is then rebuilt, saying so. The
image sizes measured before (`cocord-fast index`) are kept for the files whose own size and
mtime have not changed since. A copy that sets folders' times (`cp -a`, `rsync -a` over an
older tree), or a file rewritten in place under its name, does not change a folder's time:
`cocord-fast index ROOT` always lists and measures anew.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import index_files
from .index_files import (IMAGE_EXTENSIONS, open_or_build, pack_strings, read_arrays,
                          stamp_of, unpack_string, write_arrays)

INDEX_NAME = ".cocord_fast-index.npz"
INDEX_VERSION = 2  # 2: each measured size kept with its file's size and mtime (`stamps`)


@dataclass
class FolderIndex:
    """`root/<class name>/.../<image file>`: classes are the sorted folder names, and each class's
    files are in the order of their path components (pathlib's order)."""

    root: Path
    classes: list[str]
    names: np.ndarray  # (bytes,) uint8: every file's path under root, UTF-8, back to back
    offsets: np.ndarray  # (N + 1,) int64: file i is names[offsets[i]:offsets[i + 1]]
    targets: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N, 2) int64 (height, width); -1 where not read yet
    stamps: np.ndarray  # (N, 2) int64 the file's size and mtime (ns) when its size was read
    directories: list[str]  # every directory scanned, relative to root
    directory_mtimes: np.ndarray  # (D,) int64 nanoseconds

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> Path:
        return self.root / unpack_string(self.names, self.offsets, index)

    def write(self, cache: bool = True) -> Path:
        """Writes the index where it can (`index_files.write_arrays`); returns where."""
        return write_arrays(self.root, INDEX_NAME, cache, dict(
            version=np.int64(INDEX_VERSION), classes=np.asarray(self.classes), names=self.names,
            offsets=self.offsets, targets=self.targets, sizes=self.sizes, stamps=self.stamps,
            directories=np.asarray(self.directories), directory_mtimes=self.directory_mtimes))

    def changed(self) -> str | None:
        """A directory that changed since the index was written (or the first class folder
        added or removed), or None. One stat per directory, none per file."""
        if _class_folders(self.root) != self.classes:
            return str(self.root)
        for name, mtime in zip(self.directories, self.directory_mtimes.tolist()):
            try:
                if os.stat(self.root / name).st_mtime_ns != mtime:
                    return str(self.root / name)
            except FileNotFoundError:
                return str(self.root / name)
        return None


def _class_folders(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError as err:
        raise UserError(f"cannot list {root}: {err.strerror or err}") from None


def _walk(directory: Path, relative: str, files: list[str], directories: list[str],
          mtimes: list[int]) -> None:
    """The image files under `directory` (symbolic links to files count; links to directories
    are not followed, as pathlib's rglob does) and every directory with its mtime."""
    try:
        # The time before the listing: a file created meanwhile then changes the folder's
        # time after the one kept, and the next start lists the folder again.
        mtime = os.stat(directory).st_mtime_ns
        entries = list(os.scandir(directory))
    except OSError as err:
        raise UserError(f"cannot list {directory}: {err.strerror or err} (its images would be "
                        f"left out of the data set)") from None
    mtimes.append(mtime)
    directories.append(relative)
    for entry in entries:
        path = f"{relative}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), path, files, directories, mtimes)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            if not entry.is_file():
                raise UserError(f"{entry.path} is not a file (a broken link?)")
            files.append(path)


def scan(root: Path, stale: FolderIndex | None = None) -> FolderIndex:
    """Lists `root` as the ImageFolder it is. Image sizes are unread, but those `stale` (an
    earlier index of `root`) measured for a file it lists too are kept."""
    if not root.is_dir():
        raise UserError(f"image directory {root} does not exist")
    classes = _class_folders(root)
    if not classes:
        raise UserError(f"image directory {root} has no class folders")
    files: list[str] = []
    targets: list[int] = []
    directories: list[str] = []
    mtimes: list[int] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        _walk(root / name, name, found, directories, mtimes)
        if not found:
            raise UserError(f"class folder {root / name} has no images "
                            f"(extensions: {' '.join(IMAGE_EXTENSIONS)})")
        files += sorted(found, key=lambda path: path.split("/"))
        targets += [label] * len(found)
    return FolderIndex(root, classes, *pack_strings(files), np.asarray(targets, np.int64),
                       *_sizes_kept(root, files, stale), directories,
                       np.asarray(mtimes, np.int64))


def _sizes_kept(root: Path, files: list[str],
                stale: FolderIndex | None) -> tuple[np.ndarray, np.ndarray]:
    """(len(files), 2) sizes and stamps: those `stale` measured for a file it lists too whose
    size and mtime are still those it had then (a file replaced under the same name is
    measured again), else -1. One stat per kept size."""
    sizes, stamps = np.full((len(files), 2), -1, np.int64), np.full((len(files), 2), -1, np.int64)
    if stale is None or not (stale.sizes[:, 0] >= 0).any():
        return sizes, stamps
    measured = {unpack_string(stale.names, stale.offsets, i): (size, stamp)
                for i, (size, stamp) in enumerate(zip(stale.sizes.tolist(), stale.stamps.tolist()))
                if size[0] >= 0}
    for i, path in enumerate(files):
        if (found := measured.get(path)) is not None and stamp_of(root / path) == found[1]:
            sizes[i], stamps[i] = found
    return sizes, stamps


def index_locations(root: Path) -> list[Path]:
    return index_files.index_locations(root, INDEX_NAME)


def read_index(path: Path, root: Path) -> FolderIndex | None:
    """The index of `root` stored at `path`, or None (missing, damaged or of another version)."""
    if (stored := read_arrays(path, INDEX_VERSION)) is None:
        return None
    return FolderIndex(root, stored["classes"].tolist(), stored["names"], stored["offsets"],
                       stored["targets"], stored["sizes"], stored["stamps"],
                       stored["directories"].tolist(),
                       stored["directory_mtimes"])


def open_index(root: Path, say=print, rescan: bool = False) -> FolderIndex:
    """The index of `root`: the stored one if current (unless `rescan`), else a new scan."""
    return open_or_build(Path(root), INDEX_NAME, read_index, scan, "listing {root} again", say,
                         rescan)
