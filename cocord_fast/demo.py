"""The embedded default job: `cocord-fast train` with no arguments.

Offline, on CPU: make the demo data set (once), train the demo teacher (once), train the
student with each method, and print a table of top-1 accuracies. Every stage resumes
(`train.resume=auto`), so a second run reuses whatever the first finished.
"""
from __future__ import annotations

import time
from pathlib import Path

from .config import Config, load_config
from .configs import ROOT as CONFIGS
from .engine import distributed
from .engine.trainer import train

# (row label, recipe under configs/demo/)
STAGES = [
    ("teacher", "teacher.yaml"),
    ("student: vanilla", "student.yaml"),
    ("student: KD", "kd.yaml"),
    ("student: CRD", "crd.yaml"),
    ("student: CoCoRD", "cocord.yaml"),
]


def ensure_demo_teacher(cfg: Config) -> None:
    """Makes sure the demo teacher a demo recipe distils from is trained (and finished)."""
    teacher = load_config(CONFIGS / "demo" / "teacher.yaml", ["train.resume=auto"])
    if Path(cfg.model.teacher_checkpoint) == Path(teacher.train.output_dir) / "last.pt":
        train(teacher)  # resumes an unfinished teacher; returns at once for a finished one


def run_default_job(overrides: tuple[str, ...] = ()) -> list[tuple[str, str, float, float]]:
    """Every stage in turn; under a launcher every process runs them, rank 0 reports."""
    def say(text: str) -> None:
        if distributed.is_main():
            print(text, flush=True)

    rows = []
    for label, recipe in STAGES:
        cfg = load_config(CONFIGS / "demo" / recipe, ["train.resume=auto", *overrides])
        say(f"== {label}: {CONFIGS / 'demo' / recipe} -> {cfg.train.output_dir}")
        started = time.perf_counter()
        result = train(cfg)
        say(f"   done in {time.perf_counter() - started:.0f} s")
        rows.append((label, cfg.model.student, result.top1, result.best_top1))
    if distributed.is_main():
        print_table(rows)
    return rows


def print_table(rows: list[tuple[str, str, float, float]]) -> None:
    print()
    print(f"{'run':24s} {'model':10s} {'top-1':>7s} {'best':>7s}")
    for label, model, top1, best in rows:
        print(f"{label:24s} {model:10s} {top1:7.2f} {best:7.2f}")
