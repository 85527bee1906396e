"""Files held open for reads by offset, under one budget for the whole process.

A shard is read by `os.pread` through a descriptor held open: no open or stat per sample, and
no seek, so threads (DALI's readers, the prefetching reads) and processes forked with the files
open do not disturb each other. Every split of every source shares one budget, the limit on
open files less a reserve for everything else a process opens (sockets, DataLoader pipes,
libraries): a training and a validation split of a thousand shards each cannot together exceed
it. Beyond the budget the least recently used descriptor that no read is using is closed; when
every one is in use, the read opens its file for itself.
"""
from __future__ import annotations

import os
import resource
import threading
from collections import OrderedDict
from pathlib import Path

RESERVED = 256  # descriptors left for everything else a process opens


class _Open:
    __slots__ = ("descriptor", "readers")

    def __init__(self, descriptor: int):
        self.descriptor, self.readers = descriptor, 0


class OpenFiles:
    """`read(path, start, length)`; one instance per process (`OPEN_FILES`). A source says
    how many files it will read (`expect`), so that the limit on open files is raised to fit
    them all where the system allows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: OrderedDict[Path, _Open] = OrderedDict()  # least recently used first
        self.expected = 0
        self.budget = 0

    def expect(self, count: int) -> None:
        """`count` more (or, negative, fewer) files will be read."""
        with self.lock:
            self.expected += count
            self.budget = open_file_budget(self.expected + RESERVED)

    def read(self, path: Path, start: int, length: int) -> bytes:
        entry = self._lease(path)
        if entry is None:  # every descriptor of the budget is in use
            with open(path, "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, start)
        try:
            return os.pread(entry.descriptor, length, start)
        finally:
            with self.lock:
                entry.readers -= 1

    def _lease(self, path: Path) -> _Open | None:
        """The open file of `path`, marked in use (so that it is not closed under the read)."""
        with self.lock:
            entry = self.files.get(path)
            if entry is None:
                self._close_unused_beyond(self.budget - 1)
                if len(self.files) >= self.budget:
                    return None
                entry = self.files[path] = _Open(os.open(path, os.O_RDONLY))
            self.files.move_to_end(path)
            entry.readers += 1
            return entry

    def _close_unused_beyond(self, count: int) -> None:
        while len(self.files) > count:
            oldest = next((path for path, entry in self.files.items() if entry.readers == 0),
                          None)
            if oldest is None:
                return
            os.close(self.files.pop(oldest).descriptor)

    def close(self, paths: list[Path]) -> None:
        """Closes the files of `paths` that no read is using (a source that is gone)."""
        with self.lock:
            for path in paths:
                entry = self.files.get(path)
                if entry is not None and entry.readers == 0:
                    os.close(self.files.pop(path).descriptor)

    def after_fork(self) -> None:
        """In a forked child: the descriptors were inherited and stay usable, but a lock
        another thread held at the fork would never be released there."""
        self.lock = threading.Lock()
        for entry in self.files.values():
            entry.readers = 0


def open_file_budget(wanted: int) -> int:
    """How many files `OPEN_FILES` may hold: this process's limit on open files, raised
    towards `wanted` (up to the hard limit), less `RESERVED`, and at least a quarter of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limit = wanted if soft == resource.RLIM_INFINITY else soft
    return max(limit - RESERVED, limit // 4)


OPEN_FILES = OpenFiles()
os.register_at_fork(after_in_child=OPEN_FILES.after_fork)
