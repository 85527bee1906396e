"""Metric accumulation without per-step host syncs, and the JSONL + TensorBoard log."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .. import distributed


class MetricAccumulator:
    """Sums detached metric tensors on their device; only `pop()` synchronises."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def pop(self, totals: dict[str, int] | None = None) -> dict[str, float]:
        """Means since the last pop, and the integer `totals` summed, over all ranks.

        The one host sync of a log step, and with several processes its one collective: sums,
        count and totals travel as one tensor (every rank adds the same number of steps)."""
        totals = totals or {}
        if not self.count and not totals:
            return {}
        names = list(self.sums)
        sums = torch.stack([self.sums[n] for n in names]) if names else torch.zeros(0)
        counts = torch.tensor([self.count, *totals.values()], dtype=torch.float32,
                              device=sums.device)
        summed = distributed.all_reduce_sum(torch.cat([sums, counts]))
        values = torch.cat([summed[:len(names)] / summed[len(names)],
                            summed[len(names) + 1:]]).tolist()
        self.sums, self.count = {}, 0
        return {**dict(zip(names, values)),
                **{n: int(v) for n, v in zip(totals, values[len(names):])}}


class PeakMemory:
    """The most memory a run held. CUDA: the most tensors held on the device since the last
    reading. CPU: the process's peak resident set size, which is this run's own only when it is
    the first run of the process (the allocator keeps what an earlier run freed, so a later
    run's peak would be a running maximum over all of them): `None` in any later run."""

    cpu_runs_in_process = 0

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.own_peak = True
        else:
            PeakMemory.cpu_runs_in_process += 1
            self.own_peak = PeakMemory.cpu_runs_in_process == 1

    def read_mb(self) -> float | None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / 2 ** 20
        return resident_peak_mb() if self.own_peak else None


def resident_peak_mb() -> float | None:
    """The peak resident set size of this process's own memory (Linux's VmHWM), or None where
    there is no /proc. Not `ru_maxrss`: a process started by another inherits that one's peak
    (the forked copy's, up to exec), so a stage started from a large process would read it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 10  # kB
    except OSError:
        pass
    return None


class ThroughputWindow:
    """This process's images, and its time blocked on the data, since the last `read()` or
    `restart()`."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.images, self.data_wait_s, self.started = 0, 0.0, time.perf_counter()

    def count(self, images: int, data_wait_s: float = 0.0) -> None:
        self.images += images
        self.data_wait_s += data_wait_s

    def read(self) -> dict[str, float]:
        """`rank_img_per_s`, `data_wait_s`, and `data_wait_share` of the window's time."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        reading = {"rank_img_per_s": self.images / elapsed, "data_wait_s": self.data_wait_s,
                   "data_wait_share": min(self.data_wait_s / elapsed, 1.0)}
        self.restart()
        return reading


class RunLog:
    """Appends one JSON object per record to `metrics.jsonl`, and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resumed_at: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides the scalars its previous process logged after the checkpoint,
            # as `rewrite_log` drops them from metrics.jsonl.
            purge = None if resumed_at is None else resumed_at + 1
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, kind: str, record: dict[str, Any]) -> None:
        record = {"kind": kind, **record}
        # One unbuffered append per record: a reader, or a kill, sees whole lines plus at most
        # one unfinished last line, which `read_log` leaves out.
        with open(self.path, "ab", buffering=0) as f:
            f.write((json.dumps(record) + "\n").encode())
        if self.writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The log's records; a last line without its newline (being written, or cut short by a
    kill) is not a record yet."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    *complete, _unfinished = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def rewrite_log(run_dir: str | Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Drops the records `keep` rejects (atomically: a temporary file renamed over the log)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [json.dumps(r) + "\n" for r in read_log(run_dir) if keep(r)]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
