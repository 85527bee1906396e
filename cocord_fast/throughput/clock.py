"""Per-step times without a host sync inside the timed loop."""
from __future__ import annotations

import time

import torch


class StepClock:
    """`mark()` before the first step and after each one; `seconds()` after the loop gives
    each step's time.

    On CUDA each mark records an event on the current stream, so a step's time is the GPU's
    own timeline between two marks, including any gap where the GPU waited for the host (a
    launch-bound or data-bound step shows as such); the only sync is in `seconds()`. On the
    CPU the ops run synchronously and the host clock is the step's time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()  # the one sync: after the last step was queued
            return [start.elapsed_time(end) / 1e3 for start, end in zip(self.marks, self.marks[1:])]
        return [end - start for start, end in zip(self.marks, self.marks[1:])]


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (outside timed loops: before and after warm-up)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
