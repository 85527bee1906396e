"""The index of an ImageFolder split: its files, labels, classes and (once measured) each
image's size, so that a start reads one file instead of listing and testing every image.

A scan lists every directory of every class; on a network file system that is a metadata call
per file, repeated by every process at every start. The index is written once (next to the
data when that folder is writable, else in the cache directory) and read in well under a
second per million files. It holds every directory's modification time: a file added to or
removed from a folder changes that folder's, and the index is then rebuilt, saying so. A copy
that sets folders' times (`cp -a`, `rsync -a` over an older tree) can hide a change:
`cocord-fast index ROOT` always lists anew.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .demo import default_cache_dir

INDEX_NAME = ".cocord_fast-index.npz"
INDEX_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    directories: list[str]  # every directory scanned, relative to root
    directory_mtimes: np.ndarray  # (D,) int64 nanoseconds

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> Path:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.root / self.names[start:end].tobytes().decode()

    def stale_directory(self) -> str | None:
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
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _walk(directory: Path, relative: str, files: list[str], directories: list[str],
          mtimes: list[int]) -> None:
    """The image files under `directory` (symbolic links to files count; links to directories
    are not followed, as pathlib's rglob does) and every directory with its mtime."""
    try:
        entries = list(os.scandir(directory))
        mtimes.append(os.stat(directory).st_mtime_ns)
    except PermissionError:
        return
    directories.append(relative)
    for entry in entries:
        path = f"{relative}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), path, files, directories, mtimes)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            files.append(path)


def scan(root: Path) -> FolderIndex:
    """Lists `root` as the ImageFolder it is (sizes unread)."""
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
    encoded = [name.encode() for name in files]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(name) for name in encoded], out=offsets[1:])
    return FolderIndex(root, classes, np.frombuffer(b"".join(encoded), np.uint8).copy(),
                       offsets, np.asarray(targets, np.int64), np.full((len(files), 2), -1),
                       directories, np.asarray(mtimes, np.int64))


def index_locations(root: Path) -> list[Path]:
    """Where the index of `root` may be: beside the data, then in the cache directory."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return [root / INDEX_NAME, default_cache_dir() / "index" / f"{digest}.npz"]


def write_index(index: FolderIndex) -> Path:
    """Writes `index` where it can (atomically: a reader sees the old file or the new one)."""
    arrays = dict(version=np.int64(INDEX_VERSION), classes=np.asarray(index.classes),
                  names=index.names, offsets=index.offsets, targets=index.targets,
                  sizes=index.sizes, directories=np.asarray(index.directories),
                  directory_mtimes=index.directory_mtimes)
    for path in index_locations(index.root):
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                np.savez(f, **arrays)
            os.replace(partial, path)
            return path
        except OSError:
            partial.unlink(missing_ok=True)
    raise UserError(f"cannot write the index of {index.root} beside it or under "
                    f"{index_locations(index.root)[1].parent} (set COCORD_FAST_CACHE to a "
                    f"writable folder)")


def read_index(path: Path, root: Path) -> FolderIndex | None:
    """The index of `root` stored at `path`, or None (missing, damaged or of another version)."""
    try:
        with np.load(path) as stored:
            if int(stored["version"]) != INDEX_VERSION:
                return None
            return FolderIndex(root, stored["classes"].tolist(), stored["names"],
                               stored["offsets"], stored["targets"], stored["sizes"],
                               stored["directories"].tolist(), stored["directory_mtimes"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def open_index(root: Path, say=print, rescan: bool = False) -> FolderIndex:
    """The index of `root`: the first current one stored (unless `rescan`), else a new scan,
    written (`say` tells why a stored one was not used)."""
    root = Path(root)
    stale = []
    for path in [] if rescan else index_locations(root):
        index = read_index(path, root) if path.is_file() else None
        if index is None:
            continue
        if (changed := index.stale_directory()) is None:
            return index
        stale.append(f"{changed} changed since {path} was written")
    if stale:
        say(f"{stale[0]}: listing {root} again")
    index = scan(root)
    write_index(index)
    return index
