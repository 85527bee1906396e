"""A checkpoint save that fails part way (a full disk): the run stops with one line naming the
file and the space left on its file system, the checkpoints saved before stay whole
(DeepSpeed's partitions too), nothing half-written is left where a resume would take it, and
the run resumed afterwards continues from the previous checkpoint.

A full disk is simulated with a limit on the size of the files a process writes
(RLIMIT_FSIZE): past it a write fails with EFBIG, as one fails with ENOSPC on a full disk,
once SIGXFSZ is ignored (its default action ends the process).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocord_fast.checkpoints.files import load_checkpoint, save_atomic
from cocord_fast.checkpoints.sealed import MAGIC, TRAILER, verify_seal
from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.training.metrics import read_log
from cocord_fast.training.resume import load_intact
from cocord_fast.training.trainer import train

from launch import BIN, LAUNCH_TIMEOUT, launch, start, train_losses

# `cocord-fast ARGS`, in a process whose files may not grow past LIMIT bytes.
LIMITED_CLI = """import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from cocord_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(args: list, limit: int | None = None) -> subprocess.CompletedProcess:
    """`cocord-fast ARGS` in a process of its own, its files limited to `limit` bytes."""
    command = ([sys.executable, "-c", LIMITED_CLI.format(limit=limit)] if limit
               else [sys.executable, "-m", "cocord_fast"])
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([*command, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)


def assert_stopped_with_one_line(done: subprocess.CompletedProcess, path: Path) -> None:
    """Exit code 2 and, as the last line, the error naming `path` and the space left on its
    file system (within a GiB of what is free now: other processes write too)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.count("cocord-fast: error:") == 1
    last = done.stderr.strip().splitlines()[-1]
    found = re.fullmatch(rf"cocord-fast: error: cannot write {re.escape(str(path))}: File too "
                         rf"large \((\d+) MB free on its file system\)", last)
    assert found, last
    assert abs(int(found.group(1)) - shutil.disk_usage(path.parent).free / 2 ** 20) < 1024


def partial_saves(run: Path) -> list[Path]:
    return list(run.rglob(".*.tmp"))


def sealed_whole(path: Path) -> bool:
    """Written to its end: its seal is there and its bytes match it."""
    verify_seal(path)
    with open(path, "rb") as f:
        f.seek(-TRAILER.size, os.SEEK_END)
        return f.read(len(MAGIC)) == MAGIC


class FullDisk:
    """A file that takes `room` bytes, then fails every write as a full disk does."""

    def __init__(self, out, room: int):
        self.out, self.room = out, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.out.write(data)

    def __getattr__(self, name):
        return getattr(self.out, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.out.close()


def test_a_save_that_fills_the_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "weights": torch.zeros(10)}, path)
    before = path.read_bytes()
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(fdopen(fd, mode), 1000))
    with pytest.raises(UserError) as failed:
        save_atomic({"step": 2, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert re.fullmatch(rf"cannot write {re.escape(str(path))}: No space left on device "
                        rf"\(\d+ MB free on its file system\)", str(failed.value))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_a_run_whose_disk_fills_stops_and_resumes_from_its_previous_checkpoint(tiny_overrides,
                                                                                 tmp_path):
    """The torch engine, one process: a run saved at step 7 (last.pt, best.pt) is resumed
    with files limited to half a checkpoint. It trains to step 14 and fails to save there;
    the files of step 7 are untouched, and the next resume continues from step 7 with the
    same losses."""
    run = tmp_path / "run"
    train(load_config(overrides=tiny_overrides + ["train.max_steps=7"]))
    saved = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt")}
    full = cli(["train", "--resume", run, "train.max_steps=14"],
               limit=len(saved["last.pt"]) // 2)
    assert_stopped_with_one_line(full, run / "last.pt")
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert partial_saves(run) == []
    trained = train_losses(run)
    assert list(trained) == list(range(1, 15))
    done = cli(["train", "--resume", run, "train.max_steps=14"])
    assert done.returncode == 0, done.stderr[-3000:]
    # The records of the failed run up to step 7 stay; its steps from 8 on are run again.
    assert [r["step"] for r in read_log(run) if r["kind"] == "start"] == [0, 7, 7]
    assert train_losses(run) == trained
    assert load_checkpoint(run / "last.pt")["step"] == 14


def test_a_deepspeed_partition_that_fills_the_disk_leaves_the_previous_checkpoint_whole(
        tiny_overrides, tmp_path):
    """DeepSpeed ZeRO-1, one process: step 7 is saved, stopped before its evaluation (as a
    stop signal after the last step of an epoch leaves it). The resumed run evaluates and
    saves step 7 again, then trains to step 14, where its optimizer partition is past the
    limit (its model states are not). Step 7's checkpoints and their DeepSpeed files stay
    whole, step 14's directory holds no half-written file, and the next resume continues from
    step 7; afterwards only the directories the checkpoints name are kept."""
    run = tmp_path / "run"
    overrides = tiny_overrides + ["engine.name=deepspeed", "engine.zero_stage=1"]
    first = cli(["train", *overrides, "train.max_steps=7"])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = load_checkpoint(run / "last.pt")
    save_atomic({**checkpoint, "eval_pending": True}, run / "last.pt")
    step_7 = run / "deepspeed" / "step_00000007"
    model_states, partition = (step_7 / name for name in (
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert model_states.stat().st_size < partition.stat().st_size
    limit = (model_states.stat().st_size + partition.stat().st_size) // 2
    full = cli(["train", "--resume", run, "train.max_steps=14"], limit=limit)
    step_14 = run / "deepspeed" / "step_00000014"
    assert_stopped_with_one_line(full, step_14 / partition.name)
    for name in ("last.pt", "best.pt"):
        intact = load_intact(run / name)  # DeepSpeed's files checked against their digests
        assert intact["step"] == 7 and intact["engine"]["tag"] == "deepspeed/step_00000007"
    assert not load_checkpoint(run / "last.pt")["eval_pending"]  # its evaluation was saved
    assert partial_saves(run) == [] and not (step_14 / partition.name).exists()
    assert all(map(sealed_whole, step_14.iterdir()))
    done = cli(["train", "--resume", run, "train.max_steps=14"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_log(run) if r["kind"] == "start"] == [0, 7, 7]
    tags = {load_checkpoint(run / name)["engine"]["tag"] for name in ("last.pt", "best.pt")}
    kept = {f"deepspeed/{d.name}" for d in (run / "deepspeed").iterdir() if d.is_dir()}
    assert kept == tags and "deepspeed/step_00000014" in tags


# `cocord-fast ARGS`; on rank 1, files may not grow past LIMIT bytes from its first save on
# (DeepSpeed's shared-memory buffer, made before, is larger).
RANK_1_LIMITED_FROM_ITS_FIRST_SAVE = """import os, resource, signal, sys
from cocord_fast.cli import main
from cocord_fast.engines.deepspeed_engine import DeepSpeedEngine

state_dict = DeepSpeedEngine.state_dict


def limited_state_dict(self, run_dir, step):
    if os.environ["RANK"] == "1":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    return state_dict(self, run_dir, step)


DeepSpeedEngine.state_dict = limited_state_dict
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_whose_partition_fills_the_disk_stops_every_rank_with_its_reason(
        tiny_demo_root, tmp_path):
    """Two processes, ZeRO-1: rank 1 cannot write its optimizer partition of step 6. It
    stops with the error naming that file; rank 0 stops saying rank 1 did and why; step 3's
    checkpoint and both of its partitions stay whole."""
    run = tmp_path / "run"
    overrides = [f"data.root={tiny_demo_root}", "data.dataset=demo", "data.batch_size=16",
                 "train.device=cpu", "data.num_workers=0", "data.backend=torch",
                 "model.student=resnet8", "train.epochs=2", "train.progress=false",
                 f"train.output_dir={run}", "engine.name=deepspeed", "engine.zero_stage=1"]
    launch("deepspeed", [BIN / "cocord-fast", "train", *overrides, "train.max_steps=3"], tmp_path)
    partition = run / "deepspeed" / "step_00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    script = tmp_path / "limited.py"
    script.write_text(RANK_1_LIMITED_FROM_ITS_FIRST_SAVE.format(
        limit=partition.stat().st_size // 2))
    job = start("deepspeed", [script, "train", "--resume", run, "train.max_steps=6"], tmp_path,
                tmp_path / "limited.log")
    assert job.wait(timeout=LAUNCH_TIMEOUT) != 0
    output = (tmp_path / "limited.log").read_text()
    failed = run / "deepspeed" / "step_00000006" / partition.name
    reason = (rf"cannot write {re.escape(str(failed))}: File too large "
              rf"\(\d+ MB free on its file system\)")
    assert re.search(rf"cocord-fast: error: {reason}\n", output), output[-3000:]
    assert re.search(rf"cocord-fast: error: stopped because rank 1: {reason}\n", output), \
        output[-3000:]
    for name in ("last.pt", "best.pt"):
        assert load_intact(run / name)["step"] == 3
    assert partial_saves(run) == [] and not failed.exists()
