"""Tar shards in the WebDataset layout: their index, and reading a sample by its offset.

A split is a folder of plain (uncompressed) tar files, taken in the order of their names
(`shard-000000.tar`, ...). Members are grouped into samples by key, WebDataset's rule: a
member `<key>.<extension>` belongs to the sample `<key>` (the member's path up to the first dot
of its file name), and a sample's members are consecutive. Each sample has one image
(`jpg`, `png`, ... as an ImageFolder's) and one `cls` member, its class number in decimal
text; other members (`json`, `txt`) are ignored. Samples are numbered shard by shard in member
order: that is the dataset index every loader, sampler and CRD bank uses.

Each shard's headers are read once into an index (`index_files.py`): every sample's shard,
the offset and length of its image's bytes there, its label and name, and (once measured) its
image size, with every shard's size and modification time so that a shard added, removed or
rewritten makes the index stale; the next start then reads the headers of those shards only.
A read is then one `pread` into a shard held open: no extraction, and no open or stat per
sample.
"""
from __future__ import annotations

import os
import re
import resource
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .index_files import (IMAGE_EXTENSIONS, open_or_build, pack_strings, read_arrays,
                          unpack_string, write_arrays)

SHARD_INDEX_NAME = ".cocord_fast-shards.npz"
SHARD_INDEX_VERSION = 1
SHARD_SUFFIX = ".tar"
# WebDataset's split of a member's name into key and extension.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
IMAGE_MEMBERS = tuple(extension[1:] for extension in IMAGE_EXTENSIONS)


@dataclass
class ShardIndex:
    root: Path
    shards: list[str]  # file names under root, sorted
    shard_stamps: np.ndarray  # (S, 2) int64: each shard's size and mtime (ns)
    names: np.ndarray  # packed image member names (`index_files.pack_strings`)
    offsets: np.ndarray  # (N + 1,) int64
    shard_of: np.ndarray  # (N,) int64: the shard each sample is in
    starts: np.ndarray  # (N,) int64: where its image's bytes start in that shard
    lengths: np.ndarray  # (N,) int64: how many bytes
    targets: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N, 2) int64 (height, width); -1 where not read yet

    def __len__(self) -> int:
        return len(self.targets)

    def name(self, index: int) -> str:
        """`<shard path>:<image member>`, how messages name a sample."""
        shard = self.root / self.shards[self.shard_of[index]]
        return f"{shard}:{unpack_string(self.names, self.offsets, index)}"

    def samples_of(self, shard: int) -> tuple[list[tuple[str, int, int, int]], np.ndarray]:
        """Shard number `shard`'s (image member name, offset, length, label) of each sample,
        and their image sizes (samples are numbered shard by shard)."""
        first, end = np.searchsorted(self.shard_of, [shard, shard + 1]).tolist()
        return ([(unpack_string(self.names, self.offsets, i), int(self.starts[i]),
                  int(self.lengths[i]), int(self.targets[i])) for i in range(first, end)],
                self.sizes[first:end])

    def changed(self) -> str | None:
        """A shard added, removed or rewritten since the index was written, or None: one
        listing of the folder and one stat per shard."""
        if _shard_names(self.root) != self.shards:
            return str(self.root)
        for name, stamp in zip(self.shards, self.shard_stamps.tolist()):
            if _stamp(self.root / name) != stamp:
                return str(self.root / name)
        return None

    def write(self) -> Path:
        return write_arrays(self.root, SHARD_INDEX_NAME, dict(
            version=np.int64(SHARD_INDEX_VERSION), shards=np.asarray(self.shards),
            shard_stamps=self.shard_stamps, names=self.names, offsets=self.offsets,
            shard_of=self.shard_of, starts=self.starts, lengths=self.lengths,
            targets=self.targets, sizes=self.sizes))


def _shard_names(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.name.endswith(SHARD_SUFFIX) and entry.is_file())


def _stamp(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _samples(path: Path) -> list[tuple[str, int, int, int]]:
    """(image member name, offset, length, label) of every sample of the shard at `path`."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:  # reads the headers, seeking over the data
            grouped: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
            for member in tar:
                if member.isfile() and member.offset_data + member.size > size:
                    raise UserError(f"{path} is cut short inside {member.name} (a copy that "
                                    f"did not finish?)")
                if not member.isfile() or (match := MEMBER_NAME.match(member.name)) is None:
                    continue
                key, extension = match[1], match[2].lower()
                if not grouped or grouped[-1][0] != key:
                    grouped.append((key, {}))
                if extension in grouped[-1][1]:
                    raise UserError(f"{path}: sample {key!r} has two {extension!r} members "
                                    f"(a sample's members must have distinct extensions)")
                grouped[-1][1][extension] = member
            return [sample for key, parts in grouped
                    if (sample := _sample(path, tar, key, parts)) is not None]
    except tarfile.TarError as err:
        raise UserError(f"{path} is not an uncompressed tar file ({err}); shards are read by "
                        f"offset, so they cannot be compressed") from None


def _sample(path: Path, tar: tarfile.TarFile, key: str,
            parts: dict[str, tarfile.TarInfo]) -> tuple[str, int, int, int] | None:
    """One sample's (image member name, offset, length, label); None for a group of members
    with neither an image nor a class (metadata, ignored)."""
    images = [extension for extension in parts if extension in IMAGE_MEMBERS]
    if not images and "cls" not in parts:
        return None
    if len(images) != 1:
        raise UserError(f"{path}: sample {key!r} has {len(images) or 'no'} image members "
                        f"({', '.join(sorted(parts))}); each needs exactly one of "
                        f"{', '.join(IMAGE_MEMBERS)}")
    image = parts[images[0]]
    if "cls" not in parts:
        raise UserError(f"{path}: sample {image.name} has no .cls member (its class number)")
    text = tar.extractfile(parts["cls"]).read().decode(errors="replace").strip()
    if not text.isdigit():
        raise UserError(f"{path}: {parts['cls'].name} holds {text[:20]!r}, not a class number")
    return image.name, image.offset_data, image.size, int(text)


def scan(root: Path, stale: ShardIndex | None = None) -> ShardIndex:
    """Reads the headers of every shard in `root` (sizes unread), except of a shard `stale`
    (an earlier index of `root`) holds unchanged (the same size and modification time): its
    samples, image sizes included, are taken from there. Adding a shard to a thousand reads
    one shard's headers."""
    if not root.is_dir():
        raise UserError(f"shard directory {root} does not exist")
    shards = _shard_names(root)
    if not shards:
        raise UserError(f"shard directory {root} has no {SHARD_SUFFIX} files")
    kept = {} if stale is None else {
        name: (stamp, number)
        for number, (name, stamp) in enumerate(zip(stale.shards, stale.shard_stamps.tolist()))}
    stamps, shard_of, samples, sizes = [], [], [], []
    for number, name in enumerate(shards):
        stamps.append(stamp := _stamp(root / name))  # before the read: a change then shows
        if name in kept and kept[name][0] == stamp:
            found, found_sizes = stale.samples_of(kept[name][1])
        else:
            found = _samples(root / name)
            found_sizes = np.full((len(found), 2), -1, np.int64)
        if not found:
            raise UserError(f"shard {root / name} holds no samples (<key>.jpg with <key>.cls)")
        shard_of += [number] * len(found)
        samples += found
        sizes.append(found_sizes)
    names, offsets = pack_strings([sample[0] for sample in samples])
    starts, lengths, targets = (np.asarray([sample[i] for sample in samples], np.int64)
                                for i in (1, 2, 3))
    return ShardIndex(root, shards, np.asarray(stamps, np.int64), names, offsets,
                      np.asarray(shard_of, np.int64), starts, lengths, targets,
                      np.concatenate(sizes))


def read_index(path: Path, root: Path) -> ShardIndex | None:
    if (stored := read_arrays(path, SHARD_INDEX_VERSION)) is None:
        return None
    return ShardIndex(root, stored["shards"].tolist(), stored["shard_stamps"], stored["names"],
                      stored["offsets"], stored["shard_of"], stored["starts"],
                      stored["lengths"], stored["targets"], stored["sizes"])


def open_index(root: Path, say=print, rescan: bool = False) -> ShardIndex:
    """The index of the shards in `root`: the stored one if current (unless `rescan`), else
    every shard's headers read anew."""
    return open_or_build(Path(root), SHARD_INDEX_NAME, read_index, scan,
                         "reading the headers of the new and changed shards of {root}", say,
                         rescan)


class ShardFiles:
    """The shards of one index, each opened once per process and shared by its threads: a
    sample is one `os.pread` (no seek, so threads do not disturb each other, nor processes
    forked with the files open). Files are not closed while the source lives, so no thread can
    read through a descriptor another has closed and the system has reused. Where the limit
    on open files would be exceeded, the remaining shards are opened for each read instead."""

    RESERVED = 256  # descriptors left for everything else a process opens

    def __init__(self, index: ShardIndex):
        self.paths = [index.root / name for name in index.shards]
        self.open: dict[int, int] = {}
        self.lock = threading.Lock()
        self.capacity = _raise_open_file_limit(len(self.paths) + self.RESERVED) - self.RESERVED

    def read(self, shard: int, start: int, length: int) -> np.ndarray:
        descriptor = self.open.get(shard)
        if descriptor is None:
            with self.lock:
                if shard not in self.open and len(self.open) < self.capacity:
                    self.open[shard] = os.open(self.paths[shard], os.O_RDONLY)
                descriptor = self.open.get(shard)
        if descriptor is None:
            with open(self.paths[shard], "rb", buffering=0) as f:
                data = os.pread(f.fileno(), length, start)
        else:
            data = os.pread(descriptor, length, start)
        if len(data) != length:
            raise UserError(f"{self.paths[shard]} ends before byte {start + length}: it changed "
                            f"while this run read it")
        return np.frombuffer(data, np.uint8)

    def __del__(self):
        for descriptor in self.open.values():
            os.close(descriptor)

    def __getstate__(self) -> dict:  # a spawned DataLoader worker opens its own
        return {"paths": self.paths, "capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, open={}, lock=threading.Lock())


def _raise_open_file_limit(wanted: int) -> int:
    """Raises this process's soft limit on open files towards `wanted` (up to the hard
    limit); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return wanted if soft == resource.RLIM_INFINITY else soft
