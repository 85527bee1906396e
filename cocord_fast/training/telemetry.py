"""NVML telemetry while steps run: GPU utilisation, memory used, power, temperature and SM
clock, sampled off the training thread.

A thread samples every `interval_s` and files each sample under the label its user sets (the
bench: the entry it is timing; the trainer: "train" while it trains; None in between). Without
a CUDA device, or without pynvml (package nvidia-ml-py), a working NVML or an NVML GPU that is
the run's device (matched by UUID or PCI bus id), there is no telemetry and `reason` says why.
"""
from __future__ import annotations

import statistics
import sys
import threading
from collections import defaultdict
from typing import Any

import torch

# How long the end of a run waits for the sampler to finish its reading.
STOP_TIMEOUT_S = 5.0
FIELDS = ("gpu_util_percent", "memory_used_mb", "power_w", "temperature_c", "sm_clock_mhz")


def open_nvml(device: torch.device) -> tuple[Any, Any, str | None]:
    """(pynvml, handle of `device`, None), or (None, None, why there is no telemetry)."""
    if device.type != "cuda":
        return None, None, f"no telemetry on {device.type}: NVML reports on NVIDIA GPUs only"
    try:
        import pynvml
    except ImportError:
        return None, None, "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError subclasses, or a missing libnvidia-ml
        return None, None, f"NVML did not start: {err}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    handle, reason = nvml_handle(pynvml, index)
    if handle is not None:
        return pynvml, handle, None
    try:
        pynvml.nvmlShutdown()  # started above, and nothing will use it
    except Exception:
        pass  # `reason` is what there is to say
    return None, None, reason


def nvml_handle(pynvml: Any, index: int) -> tuple[Any, str | None]:
    """(NVML's handle of CUDA device `index`, None), or (None, why none). Matched by UUID, else
    by PCI bus id, never by index: CUDA numbers the devices it is shown (CUDA_VISIBLE_DEVICES,
    CUDA_DEVICE_ORDER), NVML every GPU of the machine, so one index can name two GPUs."""
    try:
        properties = torch.cuda.get_device_properties(index)
    except Exception as err:
        return None, f"no telemetry: torch cannot describe cuda:{index} ({err})"
    tried = []
    if uuid := str(getattr(properties, "uuid", "") or ""):
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid), None
        except Exception as err:  # NVMLError_NotFound and kin
            tried.append(f"UUID {uuid}: {err}")
    if (bus_id := pci_bus_id(properties)) is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), None
        except Exception as err:
            tried.append(f"PCI bus id {bus_id}: {err}")
    return None, (f"no telemetry: NVML has no GPU matching cuda:{index} ("
                  f"{'; '.join(tried) or 'torch gives neither its UUID nor its PCI bus id'})")


def pci_bus_id(properties: Any) -> str | None:
    """The device's PCI address as NVML writes it (domain:bus:device.function, hexadecimal);
    None where torch does not give all three numbers."""
    numbers = [getattr(properties, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
    if any(not isinstance(number, int) for number in numbers):
        return None
    domain, bus, device = numbers
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def read_sample(pynvml: Any, handle: Any) -> dict[str, float | None]:
    """One reading of every field; a field the GPU does not report is None."""
    readers = {
        "gpu_util_percent": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "memory_used_mb": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 20,
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle,
                                                                 pynvml.NVML_TEMPERATURE_GPU),
        "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
    }
    sample: dict[str, float | None] = {}
    for name, read in readers.items():
        try:
            sample[name] = float(read())
        except Exception:  # NVMLError_NotSupported and kin
            sample[name] = None
    return sample


class Telemetry:
    """`with Telemetry(device) as telemetry:` samples in the background; set `label` to file
    the samples under an entry; `summary(label)` afterwards."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.pynvml, self.handle, self.reason = open_nvml(device)
        self.interval_s = interval_s
        self.label: str | None = None
        self.samples: dict[str, list[dict]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def __enter__(self) -> Telemetry:
        if self.available:
            self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():  # a daemon thread: it ends with the process
            # NVML stays up: shutting it down under a call in flight is undefined.
            print(f"cocord-fast: telemetry: the NVML sampler did not stop within "
                  f"{STOP_TIMEOUT_S:g} s (an NVML call hangs); it is left running",
                  file=sys.stderr, flush=True)
            return
        self.pynvml.nvmlShutdown()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            label = self.label  # read once: the main thread may change it meanwhile
            if label is not None:
                self.samples[label].append(read_sample(self.pynvml, self.handle))

    def summary(self, label: str) -> dict[str, Any] | None:
        """Mean of each field over `label`'s samples, and the most memory used; None without
        telemetry."""
        if not self.available:
            return None
        samples = self.samples.get(label, [])
        result: dict[str, Any] = {"samples": len(samples)}
        for name in FIELDS:
            values = [s[name] for s in samples if s[name] is not None]
            result[name] = ((max(values) if name == "memory_used_mb" else statistics.fmean(values))
                            if values else None)
        return result

    def pop(self, label: str) -> dict[str, Any] | None:
        """`summary(label)`, then forgets `label`'s samples (the next summary starts anew)."""
        summary = self.summary(label)
        self.samples.pop(label, None)
        return summary

    def describe(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason,
                "interval_s": self.interval_s if self.available else None,
                "fields": list(FIELDS) if self.available else [],
                "aggregate": "the mean of each field over an entry's samples; memory_used_mb "
                             "the most" if self.available else None}
