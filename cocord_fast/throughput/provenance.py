"""What every bench result records about where it was measured (`cocord-fast bench` and the
scripts in bench/ alike)."""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=PACKAGE_DIR,
                          check=True).stdout.strip()


def commit() -> str:
    """The short hash of the checked-out commit, or 'unknown' outside a git checkout."""
    try:
        return _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def uncommitted_changes() -> bool | None:
    """Whether tracked files differ from the commit (a result then measured code that no
    commit holds); None outside a git checkout."""
    try:
        return bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None


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


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def provenance(device: str) -> dict:
    """The fields every report starts with: where, with what, from which commit, when."""
    return {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version(), "python": platform.python_version(),
            "commit": commit(), "uncommitted_changes": uncommitted_changes(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
