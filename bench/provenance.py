"""What every bench result records about where it was measured: the installed package's
`cocord_fast.benchmark.provenance`, plus where the scripts here write their results."""
from __future__ import annotations

from pathlib import Path

from cocord_fast.benchmark.provenance import commit, device_name, provenance, slug

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "commit", "device_name", "provenance", "slug"]
