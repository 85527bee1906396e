"""What a run says about where its time goes: data wait, this rank's and the slowest rank's
images/s (tests/test_distributed.py: two ranks), in metrics.jsonl, TensorBoard and the printed
line; the time ReadableSteps blocks on its loader; NVML's fields where there is no GPU; which NVML
GPU is the run's device (a fake pynvml), NVML shut down when it cannot be used, and the end of a
run not held up by a hung NVML call."""
import re
import sys
import threading
import time
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cocord_fast.config import load_config
from cocord_fast.training.metrics import ThroughputWindow, read_log
from cocord_fast.training.readable_steps import ReadableSteps
from cocord_fast.training import telemetry as telemetry_module
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

    steps = ReadableSteps(batches(), accumulation=2, depth=1)
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


class FakeNvml(types.ModuleType):
    """pynvml over two GPUs, NVML's 0 and 1, each reporting its own number as its utilisation;
    `blocked` (an Event) makes every reading wait for it."""

    GPUS = [{"uuid": "GPU-aaaa", "pci": "00000000:3B:00.0"},
            {"uuid": "GPU-bbbb", "pci": "00000000:AF:00.0"}]
    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    def __init__(self, blocked: threading.Event | None = None):
        super().__init__("pynvml")
        self.blocked, self.started, self.shutdowns = blocked, 0, 0

    def nvmlInit(self):
        self.started += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def _find(self, key: str, value: str) -> int:
        for number, gpu in enumerate(self.GPUS):
            if gpu[key].upper() == value.upper():
                return number
        raise LookupError(f"NVML: Not Found ({value})")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self._find("uuid", uuid)

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        return self._find("pci", bus_id)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUtilizationRates(self, handle):
        if self.blocked is not None:
            self.blocked.wait()
        return types.SimpleNamespace(gpu=handle)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=0)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 0

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 0

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 0


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch's cuda:0 is NVML's GPU 1 (CUDA_VISIBLE_DEVICES=1); `describe(**properties)` sets
    what torch says of it."""
    def describe(**properties):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda index: types.SimpleNamespace(**properties))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return describe


def nvml_gpu_sampled(nvml: FakeNvml, monkeypatch) -> Telemetry:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with Telemetry(torch.device("cuda", 0), interval_s=0.01) as telemetry:
        telemetry.label = "train"
        time.sleep(0.1)
    return telemetry


def test_telemetry_reads_the_gpu_whose_uuid_is_the_devices(fake_gpu, monkeypatch):
    fake_gpu(uuid="bbbb", pci_domain_id=0, pci_bus_id=0xAF, pci_device_id=0)
    nvml = FakeNvml()
    telemetry = nvml_gpu_sampled(nvml, monkeypatch)
    assert telemetry.available and telemetry.pop("train")["gpu_util_percent"] == 1.0
    assert nvml.shutdowns == nvml.started == 1


def test_without_a_known_uuid_telemetry_reads_the_gpu_at_the_devices_pci_bus_id(
        fake_gpu, monkeypatch):
    """Not the GPU NVML numbers as CUDA does the device: that is another GPU here."""
    fake_gpu(uuid="cccc", pci_domain_id=0, pci_bus_id=0xAF, pci_device_id=0)
    telemetry = nvml_gpu_sampled(FakeNvml(), monkeypatch)
    assert telemetry.available and telemetry.pop("train")["gpu_util_percent"] == 1.0


@pytest.mark.parametrize("properties, tried", [
    ({"uuid": "cccc", "pci_domain_id": 0, "pci_bus_id": 0x18, "pci_device_id": 0},
     r"\(UUID GPU-cccc: NVML: Not Found \(GPU-cccc\); PCI bus id 00000000:18:00.0: NVML: Not "
     r"Found \(00000000:18:00.0\)\)"),
    ({}, r"\(torch gives neither its UUID nor its PCI bus id\)"),
])
def test_a_device_nvml_cannot_match_has_no_telemetry_and_nvml_is_shut_down(
        fake_gpu, monkeypatch, properties, tried):
    fake_gpu(**properties)
    nvml = FakeNvml()
    telemetry = nvml_gpu_sampled(nvml, monkeypatch)
    assert not telemetry.available and telemetry.pop("train") is None
    assert re.fullmatch(rf"no telemetry: NVML has no GPU matching cuda:0 {tried}",
                        telemetry.reason)
    assert nvml.shutdowns == nvml.started == 1  # once started, shut down


def test_nvml_is_shut_down_when_torch_cannot_describe_the_device(monkeypatch):
    def fails(index):
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "get_device_properties", fails)
    nvml = FakeNvml()
    telemetry = nvml_gpu_sampled(nvml, monkeypatch)
    assert telemetry.reason == ("no telemetry: torch cannot describe cuda:0 (CUDA driver "
                                "initialization failed)")
    assert nvml.shutdowns == nvml.started == 1


def test_a_hung_nvml_call_does_not_hold_up_the_end_of_the_run(fake_gpu, monkeypatch, capsys):
    """The sampler blocks in NVML: leaving the block waits `STOP_TIMEOUT_S`, says so, and leaves
    NVML up under the call in flight."""
    fake_gpu(uuid="bbbb")
    monkeypatch.setattr(telemetry_module, "STOP_TIMEOUT_S", 0.2)
    released = threading.Event()
    nvml = FakeNvml(blocked=released)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    telemetry = Telemetry(torch.device("cuda", 0), interval_s=0.01)
    telemetry.__enter__()
    telemetry.label = "train"
    time.sleep(0.05)  # the sampler is in its first reading by now
    leaving = threading.Thread(target=telemetry.__exit__, args=(None, None, None), daemon=True)
    started = time.perf_counter()
    leaving.start()
    leaving.join(5)
    try:
        assert not leaving.is_alive() and time.perf_counter() - started < 2
        assert ("telemetry: the NVML sampler did not stop within 0.2 s (an NVML call hangs); "
                "it is left running") in capsys.readouterr().err
        assert nvml.shutdowns == 0
    finally:
        released.set()  # the sampler's reading returns; the thread sees the stop and ends
