"""Sealed files: a `torch.save` payload followed by a trailer with its SHA-256 and length.

Checkpoints are written whole (temporary file, fsync, rename), but bytes can still be damaged
afterwards, by a copy, a disk or a transfer. The trailer lets a reader tell a damaged or cut
file from a good one before unpickling anything: `torch.load` ignores the 48 bytes after the
zip archive it reads, so sealed files load like any other. Files without a trailer (older
checkpoints, other code bases' weights) are read as they are.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import UserError

MAGIC = b"CCFSEAL1"
TRAILER = struct.Struct("<8s32sQ")  # magic, SHA-256 of the payload, payload length
CHUNK = 1 << 24


class CorruptCheckpoint(UserError):
    """A checkpoint whose bytes are not those that were written."""


class _Hashing:
    """A write-only file that hashes what passes through it, and keeps the error of a write
    that failed."""

    def __init__(self, out: BinaryIO):
        self.out, self.sha, self.length = out, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha.update(data)
        self.length += len(data)
        try:
            return self.out.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.out.flush()


def write_sealed(obj: Any, out: BinaryIO) -> None:
    """`torch.save(obj)` into `out`, then the trailer. A write that fails raises its OSError
    (a full disk: ENOSPC), not the RuntimeError torch's zip writer makes of it ("unexpected
    pos"), which no longer says why."""
    payload = _Hashing(out)
    try:
        torch.save(obj, payload)
    except RuntimeError:
        if payload.error is None:
            raise
        raise payload.error from None
    out.write(TRAILER.pack(MAGIC, payload.sha.digest(), payload.length))


def verify_seal(path: str | os.PathLike) -> None:
    """Raises CorruptCheckpoint when `path` has a trailer that its bytes do not match."""
    path = Path(path)
    size = path.stat().st_size
    if size < TRAILER.size:
        return
    with open(path, "rb") as f:
        f.seek(size - TRAILER.size)
        magic, expected, length = TRAILER.unpack(f.read(TRAILER.size))
        if magic != MAGIC:
            return
        if length != size - TRAILER.size:
            raise CorruptCheckpoint(f"corrupt or truncated checkpoint {path}: {size} bytes, its "
                                    f"seal says {length + TRAILER.size}")
        f.seek(0)
        sha = _sha256(f, length)
    if sha.digest() != expected:
        raise CorruptCheckpoint(f"corrupt or truncated checkpoint {path} (expected digest "
                                f"sha256:{expected.hex()[:16]}..., found "
                                f"sha256:{sha.hexdigest()[:16]}...)")


def _sha256(f: BinaryIO, length: int | None = None) -> "hashlib._Hash":
    """The SHA-256 of the next `length` bytes of `f` (None: up to its end)."""
    sha = hashlib.sha256()
    while length is None or length > 0:
        chunk = f.read(CHUNK if length is None else min(CHUNK, length))
        if not chunk:
            break
        sha.update(chunk)
        if length is not None:
            length -= len(chunk)
    return sha


def file_digest(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of a whole file."""
    with open(path, "rb") as f:
        return f"sha256:{_sha256(f).hexdigest()}"


def verify_files(files: dict[str, str], directory: str | os.PathLike, needed_by: str) -> None:
    """Raises CorruptCheckpoint naming the first of `files` (path relative to `directory` ->
    `file_digest`) that is missing or whose bytes differ: the files a checkpoint (`needed_by`)
    names, such as DeepSpeed's optimizer partitions, are part of its integrity."""
    for relative, digest in files.items():
        path = Path(directory) / relative
        if not path.is_file():
            raise CorruptCheckpoint(f"{needed_by} needs {path}, which is missing")
        found = file_digest(path)
        if found != digest:
            raise CorruptCheckpoint(f"{path}, which {needed_by} needs, is damaged (expected "
                                    f"digest {digest[:23]}..., found {found[:23]}...)")
