"""Where the index of a data split is kept, and how it is written and read: one `.npz` of
arrays beside the data when that folder is writable, else under the cache directory; written
atomically (a reader sees the old file or the new one), read back whole or not at all. Where
neither can be written (a read-only data set, no writable cache, a full disk), the index is
kept in memory for the run, which says so once.

The cache is keyed by the data's path, and by the host too unless that path is on a network
file system: nodes that share a cache directory but each hold a local copy of the data at the
same path keep an index each, rather than rebuilding one another's or, where the copies'
folder times match, reading another copy's list.

The two kinds of split, an ImageFolder (`folder_index.py`) and a folder of tar shards
(`shards.py`), keep an index of the same shape: every sample's name, label and image size,
and what tells a stale index from a current one. Names are stored in the operating system's
encoding (`os.fsencode`), so that file names that are not UTF-8 are kept as they are.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Protocol, TypeVar

import numpy as np

from ..errors import UserError

def default_cache_dir() -> Path:
    """The demo data set and the indexes that cannot lie beside their data go here."""
    root = os.environ.get("COCORD_FAST_CACHE") or Path.home() / ".cache" / "cocord_fast"
    return Path(root) / "demo"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Where every node that mounts a path sees the same files: one index in a shared cache serves
# them all. On any other file system each host keeps its own.
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs",
                        "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs", "panfs", "wekafs",
                        "fuse.juicefs", "afs", "orangefs"}


class IndexNotWritten(UserError):
    """No location could take an index (the run keeps it in memory; `cocord-fast index`,
    whose job it is, stops)."""


class StoredIndex(Protocol):
    def changed(self) -> str | None: ...

    def write(self, cache: bool = True) -> Path: ...


Index = TypeVar("Index", bound=StoredIndex)


def file_system_type(path: Path) -> str | None:
    """The type of the file system `path` is on (`/proc/self/mounts`), or None."""
    try:
        with open("/proc/self/mounts", "rb") as f:
            mounts = [line.split()[1:3] for line in f.read().splitlines()]
    except OSError:
        return None
    target = os.fsencode(path.resolve())
    found, found_type = b"", None
    for mount_point, kind in mounts:
        mount_point = mount_point.replace(b"\\040", b" ")
        inside = target == mount_point or target.startswith(mount_point.rstrip(b"/") + b"/")
        if inside and len(mount_point) >= len(found):
            found, found_type = mount_point, kind.decode()
    return found_type


def cache_key(root: Path, file_name: str) -> str:
    """What names the cached index of `root`: its path, and the host where it is not on a
    network file system."""
    where = f"{root.resolve()}/{file_name}"
    if file_system_type(root) not in NETWORK_FILE_SYSTEMS:
        where += f"@{socket.gethostname()}"
    return hashlib.sha256(os.fsencode(where)).hexdigest()[:24]


def index_locations(root: Path, file_name: str) -> list[Path]:
    """Where the index of `root` may be: beside the data, then in the cache directory."""
    return [root / file_name, default_cache_dir() / "index" / f"{cache_key(root, file_name)}.npz"]


def write_arrays(root: Path, file_name: str, cache: bool,
                 arrays: dict[str, np.ndarray]) -> Path:
    """Writes the index of `root` beside it, or else (with `cache`) in the cache directory;
    returns where. A write that fails leaves what was there before (and no temporary file)."""
    failures = []
    for path in index_locations(root, file_name)[:2 if cache else 1]:
        try:
            write_atomic(path, lambda f: np.savez(f, **arrays))
            return path
        except OSError as err:
            failures.append(f"{path}: {err.strerror or err}{free_space(path)}")
    hint = "; set COCORD_FAST_CACHE to a writable folder" if cache else ""
    raise IndexNotWritten(f"cannot write the index of {root} ({'; '.join(failures)}){hint}")


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file beside `path`, renamed over it once written: a
    reader sees the old file or the new one, and a write that fails leaves the old one and
    no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: a process id alone repeats across containers sharing the folder.
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                           suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as f:
            write(f)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def free_space(path: Path) -> str:
    """`, N MB free there`, of the file system `path` (or its nearest existing folder) is on."""
    for folder in [path, *path.parents]:
        try:
            return f", {shutil.disk_usage(folder).free / 2 ** 20:.0f} MB free there"
        except OSError:
            continue
    return ""


def stamp_of(path: Path) -> list[int]:
    """[size, mtime in ns] of the file at `path` ([-1, -1] when it is gone): what tells a
    file rewritten since from the one an index describes."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return [-1, -1]
    return [stat.st_size, stat.st_mtime_ns]


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
    try:
        index.write()
    except IndexNotWritten as err:
        say(f"warning: {err}: it is kept in memory for this run, and built again at the next "
            f"start")
    return index


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as bytes in the file system's encoding, back to back (uint8), and (N + 1,)
    int64 offsets: string i is bytes[offsets[i]:offsets[i + 1]]. A million paths take a few
    tens of MB this way, against hundreds as a numpy string array padded to the longest."""
    encoded = [os.fsencode(string) for string in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(string) for string in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def unpack_string(packed: np.ndarray, offsets: np.ndarray, index: int) -> str:
    return os.fsdecode(packed[offsets[index]:offsets[index + 1]].tobytes())
