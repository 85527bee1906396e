"""What a run says about where its time goes: data wait, this rank's and the slowest rank's
images/s (tests/test_distributed.py: two ranks), in metrics.jsonl, TensorBoard and the printed
line; the time ReadAhead blocks on its loader; NVML's fields where there is no GPU."""
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cocord_fast.config import load_config
from cocord_fast.training.metrics import ThroughputWindow, read_log
from cocord_fast.training.read_ahead import ReadAhead
from cocord_fast.training.telemetry import Telemetry
from cocord_fast.training.trainer import Trainer

DELAY_S = 0.1


class Slowed:
    """A training loader whose every batch arrives `DELAY_S` late, as from a slow disk."""

    def __init__(self, loader):
        self.loader = loader

    def start(self, epoch, skip=0):
        self.loader.start(epoch, skip)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(DELAY_S)
            yield batch


def train_records(tiny_overrides, run_dir, slow: bool) -> list[dict]:
    cfg = load_config(overrides=tiny_overrides + [
        "data.backend=torch", "train.max_steps=6", "train.log_every=2",
        f"train.output_dir={run_dir}"])
    trainer = Trainer(cfg)
    if slow:
        trainer.loaders.train = Slowed(trainer.loaders.train)
    trainer.fit()
    return [r for r in read_log(run_dir) if r["kind"] == "train"]


def test_data_wait_rises_when_the_loader_is_slowed(tiny_overrides, tmp_path, capsys):
    fast = train_records(tiny_overrides, tmp_path / "fast", slow=False)
    slow = train_records(tiny_overrides, tmp_path / "slow", slow=True)
    assert [r["step"] for r in slow] == [2, 4, 6]
    # Every one of the 6 steps waited for its late batch at least once.
    assert sum(r["data_wait_s"] for r in slow) >= 6 * DELAY_S
    assert all(0 <= r["data_wait_share"] <= 1 for r in fast + slow)
    assert min(r["data_wait_share"] for r in slow) > max(r["data_wait_share"] for r in fast)
    for r in fast + slow:  # one process: it is the slowest rank, and the whole run
        assert r["slowest_rank"] == 0 and r["rank_img_per_s"] == r["img_per_s"]
        assert r["slowest_rank_img_per_s"] == r["img_per_s"] > 0
        assert r["data_wait_share_max"] == r["data_wait_share"]
        assert not any(key.startswith("gpu_") for key in r)  # NVML reports GPUs only
    assert "data wait" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "slow" / "tensorboard"))
    events.Reload()
    shares = [e.value for e in events.Scalars("train/data_wait_share")]
    assert shares == pytest.approx([r["data_wait_share"] for r in slow])


def test_read_ahead_counts_the_time_it_blocks_on_its_loader():
    def batches():
        for i in range(4):
            time.sleep(DELAY_S)
            yield i

    steps = ReadAhead(batches(), accumulation=2, depth=1)
    assert steps.take_waited() >= 2 * DELAY_S  # the first step, read ahead
    assert steps.take_waited() == 0.0
    assert next(steps) == (0, 1)  # hands out step 1, reads step 2
    assert steps.take_waited() >= 2 * DELAY_S


def test_the_window_splits_its_time_into_images_and_data_wait():
    window = ThroughputWindow()
    time.sleep(DELAY_S)
    window.count(10, data_wait_s=DELAY_S / 2)
    reading = window.read()
    assert reading["data_wait_s"] == DELAY_S / 2
    assert 0 < reading["data_wait_share"] <= 0.5
    assert 0 < reading["rank_img_per_s"] <= 10 / DELAY_S
    assert window.read()["data_wait_s"] == 0.0  # read() starts a new window


def test_without_a_gpu_telemetry_says_why_and_samples_nothing():
    with Telemetry(torch.device("cpu"), interval_s=0.01) as telemetry:
        telemetry.label = "train"
        time.sleep(0.05)
    assert not telemetry.available and "NVIDIA GPUs only" in telemetry.reason
    assert telemetry.pop("train") is None
