"""Where the index of a data split is kept, and how it is written and read: one `.npz` of
arrays beside the data when that folder is writable, else under the cache directory; written
atomically (a reader sees the old file or the new one), read back whole or not at all.

The two kinds of split, an ImageFolder (`folder_index.py`) and a folder of tar shards
(`shards.py`), keep an index of the same shape: every sample's name, label and image size,
and what tells a stale index from a current one.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np

from ..errors import UserError
from .demo import default_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class StoredIndex(Protocol):
    def changed(self) -> str | None: ...

    def write(self) -> Path: ...


Index = TypeVar("Index", bound=StoredIndex)


def index_locations(root: Path, file_name: str) -> list[Path]:
    """Where the index of `root` may be: beside the data, then in the cache directory."""
    digest = hashlib.sha256(f"{root.resolve()}/{file_name}".encode()).hexdigest()[:24]
    return [root / file_name, default_cache_dir() / "index" / f"{digest}.npz"]


def write_arrays(root: Path, file_name: str, arrays: dict[str, np.ndarray]) -> Path:
    """Writes the index of `root` where it can; returns where."""
    for path in index_locations(root, file_name):
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                np.savez(f, **arrays)
            os.replace(partial, path)
            return path
        except OSError:
            partial.unlink(missing_ok=True)
    raise UserError(f"cannot write the index of {root} beside it or under "
                    f"{index_locations(root, file_name)[1].parent} (set COCORD_FAST_CACHE to a "
                    f"writable folder)")


def read_arrays(path: Path, version: int) -> dict[str, np.ndarray] | None:
    """Every array of the index at `path`, or None (missing, damaged or of another version)."""
    try:
        with np.load(path) as stored:
            if int(stored["version"]) != version:
                return None
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def open_or_build(root: Path, file_name: str, read: Callable[[Path, Path], Index | None],
                  build: Callable[[Path, Index | None], Index], rebuilding: str,
                  say: Callable[[str], None], rescan: bool) -> Index:
    """The first current index of `root` stored (unless `rescan`), else `build(root, stale)`,
    written: `stale` is the first stored index found out of date (or None), for `build` to
    take over what is still true of it. `say` tells why a stored one was not used, and
    `rebuilding` what is done instead (its `{root}` filled in). `read(path, root)` gives a
    stored index or None; an index's `changed()` names what changed since it was written, or
    None."""
    stale = []
    for path in [] if rescan else index_locations(root, file_name):
        index = read(path, root) if path.is_file() else None
        if index is None:
            continue
        if (changed := index.changed()) is None:
            return index
        stale.append((f"{changed} changed since {path} was written", index))
    if stale:
        say(f"{stale[0][0]}: {rebuilding.format(root=root)}")
    index = build(root, stale[0][1] if stale else None)
    index.write()
    return index


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as UTF-8 bytes back to back (uint8) and (N + 1,) int64 offsets: string i is
    bytes[offsets[i]:offsets[i + 1]]. A million paths take a few tens of MB this way, against
    hundreds as a numpy string array padded to the longest."""
    encoded = [string.encode() for string in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(string) for string in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def unpack_string(packed: np.ndarray, offsets: np.ndarray, index: int) -> str:
    return packed[offsets[index]:offsets[index + 1]].tobytes().decode()
