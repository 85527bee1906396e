"""An epoch's optimizer steps read ahead of training, so that a file one rank cannot read
stops every rank after the last step all of them can take, with that step saved.

A rank that cannot read its batch of step t cannot take step t, while the others would enter
its collectives and wait there. The stop vote (preemption.StopSignals) tells every rank one
step late: a failure known at the end of step t - 2 is learned by all at the end of step
t - 1, and they stop there. Reading two steps ahead gives that warning (one step alone,
where the vote has no lag); the first steps of an epoch are agreed on before it starts
(`Trainer._unreadable_anywhere`).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator

from ..data import Batch
from ..errors import UserError


class ReadableSteps:
    """The optimizer steps (tuples of `accumulation` micro-batches; a shorter tail is
    dropped) of `batches`, each read `depth` steps before it is handed out. A step that
    cannot be read (a UserError: an unreadable file, not skipped) ends the reading:
    `failure` holds the error from then on, and the steps read before it are still handed
    out; asking for the failed step raises it.

    Reading happens on the calling thread: `take_waited()` is the time it spent blocked on
    the loader since it was last asked (the data wait a step sees)."""

    def __init__(self, batches: Iterable[Batch], accumulation: int, depth: int):
        self.steps: Iterator[tuple[Batch, ...]] = zip(*[iter(batches)] * accumulation)
        self.ready: deque[tuple[Batch, ...]] = deque()
        self.failure: UserError | None = None
        self.waited_s = 0.0
        for _ in range(depth):
            self._read()

    def _read(self) -> None:
        if self.failure is not None:
            return
        started = time.perf_counter()
        try:
            step = next(self.steps, None)
        except UserError as err:
            self.failure = err
            return
        finally:
            self.waited_s += time.perf_counter() - started
        if step is not None:
            self.ready.append(step)

    def take_waited(self) -> float:
        waited, self.waited_s = self.waited_s, 0.0
        return waited

    def __iter__(self) -> ReadableSteps:
        return self

    def __next__(self) -> tuple[Batch, ...]:
        if not self.ready:
            if self.failure is not None:
                raise self.failure
            raise StopIteration
        step = self.ready.popleft()
        self._read()
        return step
