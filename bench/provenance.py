"""What every bench result records about where it was measured."""
from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The short hash of the checked-out commit, or 'unknown' outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with the number of torch threads."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} x{torch.get_num_threads()} threads"


def slug(name: str) -> str:
    """A device name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def provenance(device: str) -> dict:
    """The fields every report starts with: where, with what, from which commit, when."""
    return {"device": device, "torch": torch.__version__, "commit": commit(),
            "date": time.strftime("%Y-%m-%d")}
