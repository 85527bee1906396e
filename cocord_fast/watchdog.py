"""Why a multi-process run stops, said by every process on every backend.

On gloo a dead or silent peer makes the next collective raise, and the CLI's error path names
the peer's reason (left in the group's store) or the timeout. On NCCL it usually does not: a
collective waits on the GPU, the host blocks in a synchronisation, and NCCL's own watchdog
tears the process down at the group's timeout with a C++ trace, or it hangs. So a thread of
ours watches instead, the same way on both backends:

- every `poll_s` it reads the store; a reason another process left there ends this process
  with "stopped because rank R: REASON";
- when the loop has not reported progress (`beat`: a step, an evaluation batch, a save) for
  `engine.timeout_s`, it leaves "no answer ..." in the store for the others and ends this
  process with that message.

The process group's own timeout is longer (`distributed.BACKEND_GRACE_S`), so these messages
come first; NCCL's teardown stays as the backstop.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable


class Watchdog:
    """The thread described above; `beat` is cheap enough for every step."""

    def __init__(self, timeout_s: float, peer_failure: Callable[[], str | None],
                 report_failure: Callable[[str], None], poll_s: float = 2.0):
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.peer_failure, self.report_failure = peer_failure, report_failure
        self.last_beat, self.where = time.monotonic(), "joining the process group"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cocord-fast-watchdog",
                                       daemon=True)
        self.thread.start()

    def beat(self, where: str) -> None:
        """The loop made progress (`where`, e.g. "step 12", for the timeout message)."""
        self.last_beat, self.where = time.monotonic(), where

    def stop(self) -> None:
        """Returns once the thread is gone; if it is ending the process already, never (the
        process then ends with the thread's message, and the caller's is not printed too)."""
        self.stopped.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            if failure := self.peer_failure():
                self._end(f"stopped because {failure}")
            elif time.monotonic() - self.last_beat > self.timeout_s:
                message = (f"no answer from the other processes within engine.timeout_s="
                           f"{self.timeout_s:g}s (this one is waiting after {self.where}; one "
                           f"is stuck or gone)")
                self.report_failure(message)
                self._end(message)

    @staticmethod
    def _end(message: str) -> None:
        print(f"cocord-fast: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the main thread may be blocked in a collective for good
