"""One run, killed again and again: `cocord-fast train ... train.resume=auto` SIGKILLed at
random moments and while it writes a checkpoint, stopped once with SIGTERM, and started again
after each, must log the per-step losses of a run that was never interrupted."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from cocord_fast.config import load_config
from cocord_fast.training.metrics import read_log
from cocord_fast.training.preemption import EXIT_PREEMPTED
from cocord_fast.training.trainer import train

from launch import LAUNCH_TIMEOUT, train_losses, write_teacher
from markers import BACKENDS

STEPS = 28  # 4 epochs of 7
FAULTS = ["kill", "kill during a save", "term", "kill", "kill during a save"]


def logged_steps(run) -> int:
    return sum(r["kind"] == "train" for r in read_log(run))


def saving(run) -> bool:
    """A checkpoint is being written: its temporary file exists."""
    return any(run.glob(".*.pt.*.tmp"))


def inject(fault: str, job: subprocess.Popen, run, rng: random.Random) -> str:
    """Waits for the fault's moment in the running `job`, then injects it; says what it hit."""
    target = logged_steps(run) + rng.randint(1, 3)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while True:
        assert job.poll() is None, f"the run ended ({job.returncode}) before '{fault}'"
        assert time.monotonic() < deadline
        if fault.endswith("save") and saving(run):
            job.send_signal(signal.SIGKILL)
            return "killed while a checkpoint was written"
        if logged_steps(run) >= target + 3 * fault.endswith("save"):  # no save seen in time
            job.send_signal(signal.SIGTERM if fault == "term" else signal.SIGKILL)
            return f"{fault} after step {logged_steps(run)}"
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["cocord", "crd"])
def test_a_run_killed_again_and_again_logs_the_uninterrupted_losses(tiny_overrides, tmp_path,
                                                                     method, backend):
    teacher = write_teacher(tmp_path)
    overrides = tiny_overrides + [
        f"method.name={method}", f"data.backend={backend}", "model.teacher=resnet8",
        f"model.teacher_checkpoint={teacher}", "cocord.queue_size=40", "cocord.embed_dim=16",
        "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8", "crd.num_negatives=16",
        "crd.embed_dim=16", "train.ckpt_every=2", "train.keep_last=2", "train.log_every=1",
        # The schedule of the first 28 steps does not depend on the epochs (lr steps at 150).
        "train.epochs=200", f"train.max_steps={STEPS}"]
    train(load_config(overrides=overrides + [f"train.output_dir={tmp_path / 'full'}"]))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cocord_fast", "train", *overrides,
               f"train.output_dir={run}", "train.resume=auto"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}  # torch threads as here: the same sums
    rng = random.Random(f"{method}-{backend}")
    what_happened = []
    for fault in FAULTS:
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        what_happened.append(inject(fault, job, run, rng))
        _, stderr = job.communicate(timeout=LAUNCH_TIMEOUT)
        expected = EXIT_PREEMPTED if fault == "term" else -signal.SIGKILL
        assert job.returncode == expected, (fault, stderr[-2000:])
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"{method}/{backend}: " + "; ".join(what_happened))
    assert train_losses(run) == train_losses(tmp_path / "full")
    assert not saving(run)  # what the killed saves left is gone
