"""Graceful pre-emption: a stop signal ends the run after the current step with last.pt
saved and exit code 75, and the resumed run continues exactly (one process here; two ranks
that received the signal at different moments in tests/test_distributed.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.training.metrics import read_log
from cocord_fast.training.preemption import EXIT_PREEMPTED, Preempted, StopSignals
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import Trainer, train

from launch import recipe, train_losses, write_teacher


@pytest.fixture
def cocord(tiny_demo_root, tmp_path):
    """Overrides of a 14-step CoCoRD run (2 epochs of 7), by run directory name."""
    teacher = write_teacher(tmp_path)
    return lambda name: recipe(tiny_demo_root, teacher, name, "cocord") + ["data.batch_size=16"]


def test_a_stop_signal_saves_the_step_and_the_resumed_run_is_exact(cocord, tmp_path):
    train(load_config(overrides=cocord("full")))
    trainer = Trainer(load_config(overrides=cocord("stopped")))
    train_step = trainer.train_step

    def signalled_at_step_4(micro_batches):
        train_step(micro_batches)
        if trainer.step == 3:  # the 4th step is running
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.train_step = signalled_at_step_4
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 4"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["step"] == 4
    (stop,) = [r for r in read_log(tmp_path / "stopped") if r["kind"] == "stop"]
    assert {k: stop[k] for k in ("step", "epoch", "signal")} == {
        "step": 4, "epoch": 4 / 7, "signal": "SIGUSR1"}
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN  # until the process exits
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    train(config_for_resume(tmp_path / "stopped", []))
    assert train_losses(tmp_path / "stopped") == train_losses(tmp_path / "full")


def evaluations(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_log(run)
            if r["kind"] == "eval"]


def test_a_stop_at_the_end_of_an_epoch_runs_its_evaluation_when_resumed(cocord, tmp_path):
    """Stopped after step 7, the last of epoch 1, before its evaluation: the resumed run
    evaluates first, so its records and best.pt are the uninterrupted run's."""
    train(load_config(overrides=cocord("full")))
    trainer = Trainer(load_config(overrides=cocord("stopped")))
    train_step = trainer.train_step

    def signalled_at_step_7(micro_batches):
        train_step(micro_batches)
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.train_step = signalled_at_step_7
    with pytest.raises(Preempted, match="after step 7"):
        trainer.fit()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    assert load_checkpoint(stopped / "last.pt")["eval_pending"] is True
    assert evaluations(stopped) == []
    train(config_for_resume(stopped, []))
    assert [r["step"] for r in evaluations(full)] == [7, 14]
    assert evaluations(stopped) == evaluations(full)
    best = [load_checkpoint(run / "best.pt") for run in (stopped, full)]
    assert best[0]["step"] == best[1]["step"] and best[0]["best_top1"] == best[1]["best_top1"]
    assert not load_checkpoint(stopped / "last.pt")["eval_pending"]


def test_signals_that_cannot_be_caught_are_refused(tmp_path):
    with pytest.raises(UserError, match="train.stop_signals: 'SIGKILL' is not a signal"):
        Trainer(load_config(overrides=["train.stop_signals=[SIGTERM, SIGKILL]",
                                       f"train.output_dir={tmp_path}"]))


@pytest.mark.slow
def test_stop_signals_stay_absorbed_after_a_stop_and_are_restored_otherwise():
    """After a stop the process exits with 75: a late repeat of the signal must not kill it
    first. A run that ends otherwise gives the handlers back."""
    default = signal.getsignal(signal.SIGUSR1)
    try:
        with StopSignals([signal.SIGUSR1]):
            pass
        assert signal.getsignal(signal.SIGUSR1) == default
        with pytest.raises(Preempted), StopSignals([signal.SIGUSR1]):
            raise Preempted("SIGUSR1", 3, "run")
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
    finally:
        signal.signal(signal.SIGUSR1, default)


# `cocord-fast train` with two probes: the first save after a stop signal waits, between
# touching MARKS/saving and its writing, for MARKS/sent; when done, it writes how many stop
# signals the process had received by then to MARKS/saved.
SAVE_WAITS_FOR_A_SECOND_SIGNAL = """
import sys, time
from pathlib import Path
from cocord_fast.cli import main
from cocord_fast.training.preemption import StopSignals
from cocord_fast.training.trainer import Trainer

marks, received, record, save = Path(sys.argv[1]), [], StopSignals._record, Trainer.save

def counting_record(self, signum, frame):
    received.append(signum)
    record(self, signum, frame)

def waiting_save(self, *names):
    if not received or (marks / "saving").exists():
        return save(self, *names)
    (marks / "saving").touch()
    while not (marks / "sent").exists():
        time.sleep(0.01)
    save(self, *names)
    (marks / "saved").write_text(str(len(received)))

StopSignals._record, Trainer.save = counting_record, waiting_save
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_twice_stops_the_cli_with_exit_75_and_it_resumes_exactly(cocord, tmp_path):
    """`cocord-fast train` gets SIGTERM, then SIGTERM again while it saves (the save waits for
    it, and counts the signals received before it ends); it exits 75, and `--resume` logs the
    losses of a run that never stopped."""
    train(load_config(overrides=cocord("full")))
    run, marks = tmp_path / "stopped", tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}  # torch threads as here: same sums
    # 200 epochs: the schedule of the first 14 steps is the same (lr steps at epoch 150).
    job = subprocess.Popen([sys.executable, "-c", SAVE_WAITS_FOR_A_SECOND_SIGNAL, str(marks),
                            "train", *cocord("stopped"), "train.epochs=200"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(r["kind"] == "train" for r in read_log(run)):
        assert job.poll() is None, job.communicate()
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    while not (marks / "saving").exists():
        assert job.poll() is None, job.communicate()
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    (marks / "sent").touch()
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == EXIT_PREEMPTED, stderr
    assert (marks / "saved").read_text() == "2"  # the second arrived before the save ended
    stopped_at = load_checkpoint(run / "last.pt")["step"]
    assert f"stopped by SIGTERM after step {stopped_at}" in stderr and "Traceback" not in stderr
    assert stopped_at < 14
    train(config_for_resume(run, ["train.max_steps=14"]))
    assert train_losses(run) == train_losses(tmp_path / "full")
