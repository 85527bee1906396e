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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import shard_headers
from .index_files import (open_or_build, pack_strings, read_arrays, stamp_of, unpack_string,
                          write_arrays)
from .open_files import OPEN_FILES
from .shard_headers import Sample

SHARD_INDEX_NAME = ".cocord_fast-shards.npz"
SHARD_INDEX_VERSION = 2  # 2: shards checked to their end (shard_headers.py)
SHARD_SUFFIX = ".tar"


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

    def samples_of(self, shard: int) -> tuple[list[Sample], np.ndarray]:
        """Shard number `shard`'s samples and their image sizes (samples are numbered shard
        by shard)."""
        first, end = np.searchsorted(self.shard_of, [shard, shard + 1]).tolist()
        return ([Sample(unpack_string(self.names, self.offsets, i), int(self.starts[i]),
                        int(self.lengths[i]), int(self.targets[i])) for i in range(first, end)],
                self.sizes[first:end])

    def changed(self) -> str | None:
        """A shard added, removed or rewritten since the index was written, or None: one
        listing of the folder and one stat per shard."""
        if _shard_names(self.root) != self.shards:
            return str(self.root)
        for name, stamp in zip(self.shards, self.shard_stamps.tolist()):
            if stamp_of(self.root / name) != stamp:
                return str(self.root / name)
        return None

    def write(self, cache: bool = True) -> Path:
        """Writes the index where it can (`index_files.write_arrays`); returns where."""
        return write_arrays(self.root, SHARD_INDEX_NAME, cache, dict(
            version=np.int64(SHARD_INDEX_VERSION), shards=np.asarray(self.shards),
            shard_stamps=self.shard_stamps, names=self.names, offsets=self.offsets,
            shard_of=self.shard_of, starts=self.starts, lengths=self.lengths,
            targets=self.targets, sizes=self.sizes))


def _shard_names(root: Path) -> list[str]:
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_file())
    compressed = [(name, hint) for name in names
                  if (hint := shard_headers.compressed_shard_hint(name)) is not None]
    if compressed:
        name, hint = compressed[0]
        others = f" (and {len(compressed) - 1} more)" if len(compressed) > 1 else ""
        raise UserError(f"{root / name}{others} is compressed: {hint}")
    return [name for name in names if name.endswith(SHARD_SUFFIX)]


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
        stamps.append(stamp := stamp_of(root / name))  # before the read: a change then shows
        if name in kept and kept[name][0] == stamp:
            found, found_sizes = stale.samples_of(kept[name][1])
        else:
            found = shard_headers.read_samples(root / name)
            found_sizes = np.full((len(found), 2), -1, np.int64)
        if not found:
            raise UserError(f"shard {root / name} holds no samples (<key>.jpg with <key>.cls)")
        shard_of += [number] * len(found)
        samples += found
        sizes.append(found_sizes)
    names, offsets = pack_strings([sample.name for sample in samples])
    starts, lengths, targets = (np.asarray([getattr(sample, field) for sample in samples],
                                           np.int64) for field in ("start", "length", "label"))
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
    """The shards of one index, read through the process's open files (`open_files.py`)."""

    def __init__(self, index: ShardIndex):
        self.paths = [index.root / name for name in index.shards]
        OPEN_FILES.expect(len(self.paths))

    def read(self, shard: int, start: int, length: int) -> np.ndarray:
        data = OPEN_FILES.read(self.paths[shard], start, length)
        if len(data) != length:
            raise UserError(f"{self.paths[shard]} ends before byte {start + length}: it changed "
                            f"while this run read it")
        return np.frombuffer(data, np.uint8)

    def __del__(self):
        OPEN_FILES.expect(-len(self.paths))
        OPEN_FILES.close(self.paths)

    def __getstate__(self) -> dict:  # a spawned DataLoader worker has its own open files
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.paths = state["paths"]
        OPEN_FILES.expect(len(self.paths))
