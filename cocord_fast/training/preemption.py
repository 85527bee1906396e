"""Graceful pre-emption: a scheduler's signal ends the run after the current step, with a
checkpoint, instead of losing everything since the last one.

Schedulers stop jobs with SIGTERM (SLURM: then SIGKILL after a grace period; it can also send
SIGUSR1 ahead of time, `--signal=USR1@120`). `train.stop_signals` lists the signals that mean
"save and stop". Every rank must stop after the same step, although a signal may reach only
some of them, or reach them between different steps: each step, every rank casts its vote
(has it received one?) and learns the outcome of the previous step's vote, which is the same
on every rank. So a run stops one step after the first signal anywhere, without a host sync
on the training device.
"""
from __future__ import annotations

import signal
import threading

from .. import distributed
from ..errors import UserError

# EX_TEMPFAIL (sysexits.h): a temporary failure, try again later; here, resume the run.
EXIT_PREEMPTED = 75


class StoppedTogether(UserError):
    """Bad input every rank stopped for after the same step, which the stop vote agreed on
    (e.g. a file one rank cannot read): a one-line error, exit 2, with that step saved."""


class Preempted(Exception):
    """The run stopped at a signal after saving `last.pt`; `train.resume=auto` continues it.
    The process should exit (with EXIT_PREEMPTED): the stop signals are ignored from here on."""

    def __init__(self, signal_name: str, step: int, run_dir: str):
        super().__init__(f"stopped by {signal_name} after step {step}; {run_dir}/last.pt holds "
                         f"that step: continue with train.resume=auto or --resume {run_dir}")
        self.signal_name, self.step = signal_name, step


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """`train.stop_signals` as signals; a name that is not a catchable signal is a UserError."""
    found = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if full not in signal.Signals.__members__ or full in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"train.stop_signals: {name!r} is not a signal a process can catch "
                            f"(e.g. SIGTERM, SIGUSR1)")
        found.append(signal.Signals[full])
    return found


class StopSignals:
    """While entered, records the first of `signals` this process receives (later ones, e.g.
    a second SIGTERM during the final save or the exit after it, are absorbed).
    `should_stop()`, called once per step by every rank, says the same thing on every rank."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals = signals
        self.received: str | None = None
        self.previous: dict[signal.Signals, object] = {}
        self.vote = distributed.LaggedAny()

    def __enter__(self) -> StopSignals:
        # Handlers can only be set from the main thread (a Trainer driven from another
        # thread keeps the default behaviour).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # After a stop the process is on its way out with EXIT_PREEMPTED: the signals are
        # then ignored, so that a late repeat (a scheduler insisting) cannot kill it first.
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if exc_type is Preempted else handler)
        self.previous.clear()
        if exc_type in (None, Preempted, StoppedTogether):  # every rank cast the same votes
            self.vote.close()

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def should_stop(self, cannot_go_on: bool = False) -> bool:
        """The vote of the previous call on every rank: whether any received a stop signal
        or could not go on (`cannot_go_on`, e.g. a step read ahead it cannot read)."""
        return self.vote(self.received is not None or cannot_go_on)

    def reason(self) -> str:
        return self.received or "a stop signal to another process"
