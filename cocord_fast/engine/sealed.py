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
    """A write-only file that hashes what passes through it."""

    def __init__(self, out: BinaryIO):
        self.out, self.sha, self.length = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.length += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def write_sealed(obj: Any, out: BinaryIO) -> None:
    """`torch.save(obj)` into `out`, then the trailer."""
    payload = _Hashing(out)
    torch.save(obj, payload)
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
        sha = hashlib.sha256()
        while length:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                break
            sha.update(chunk)
            length -= len(chunk)
    if sha.digest() != expected:
        raise CorruptCheckpoint(f"corrupt or truncated checkpoint {path} (expected digest "
                                f"sha256:{expected.hex()[:16]}..., found "
                                f"sha256:{sha.hexdigest()[:16]}...)")
