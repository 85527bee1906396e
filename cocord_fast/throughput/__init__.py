"""`cocord-fast bench`: the training step of each method against its model-only floor.

settings.py  what to measure (`BenchSettings`) and the checks on it
clock.py     per-step times: CUDA events on the GPU (no host sync in the timed loop)
floor.py     the networks' forward/backward alone, per method
synthetic.py random data set, teacher and resident batch (when no data is given)
runner.py    builds the trainers, interleaves the rounds, summarises
report.py    the JSON, the console table and the PNG
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI and the scripts in bench/ import this package: keep it light
    from .settings import BenchSettings


def bench(settings: BenchSettings) -> Path:
    """Measures, prints the table, writes the JSON and PNG; returns the JSON's path."""
    from .report import build_report, format_table, write_report
    from .runner import run_benchmark

    report = build_report(settings, run_benchmark(settings))
    print(format_table(report))
    return write_report(report, settings)
