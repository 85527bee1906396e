"""The embedded default job: `cocord-fast train` with no arguments, or `cocord-fast demo`.

Offline, on CPU: make the demo data set (once), train the demo teacher, train the student alone
and with KD, CRD and CoCoRD, and print `compare`'s table of the four. Every stage resumes
(`train.resume=auto`), so a second run reuses whatever the first finished. Several seeds run the
whole job once each, teacher included, and end with the mean and standard deviation over them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .compare import compare, format_seed_summary, group, seed_summary, summarize
from .config import Config, load_config
from .configs import ROOT as CONFIGS
from .engine import distributed
from .engine.resume import is_finished, latest_intact
from .engine.trainer import train

DEFAULT_OUT = Path("runs/demo")
# (stage, recipe under configs/demo/): the teacher first, then the student alone (the baseline
# every other student is measured against), then the three ways of distilling into it.
STAGES = [
    ("teacher", "teacher.yaml"),
    ("vanilla", "student.yaml"),
    ("kd", "kd.yaml"),
    ("crd", "crd.yaml"),
    ("cocord", "cocord.yaml"),
]


# A stage's settings of where its data is, how it is read and where it runs: a missing
# demo teacher is trained with them too (they do not change what the teacher learns).
CARRIED_TO_TEACHER = ("data.root", "data.backend", "data.num_workers", "train.device",
                      "train.progress")


def ensure_demo_teacher(cfg: Config) -> None:
    """Makes sure the demo teacher a demo recipe distils from is trained (and finished).

    A finished teacher is only read, by any number of processes; only an unfinished one is
    resumed, which ties it to the number of processes that started it."""
    teacher = load_config(CONFIGS / "demo" / "teacher.yaml", ["train.resume=auto"])
    run_dir = Path(teacher.train.output_dir)
    if Path(cfg.model.teacher_checkpoint) != run_dir / "last.pt":
        return
    for key in CARRIED_TO_TEACHER:
        section, name = key.split(".")
        setattr(getattr(teacher, section), name, getattr(getattr(cfg, section), name))
    found = latest_intact(run_dir) if run_dir.is_dir() else None
    if found is None or not is_finished(found[1], teacher):
        train(teacher)


def seed_dir(out: Path, seed: int) -> Path:
    """Seed 0 is the default job and lives in `out` itself, where the single-stage recipes put
    their runs; seed S in `out/seedS`."""
    return out if seed == 0 else out / f"seed{seed}"


def stage_config(stage: str, recipe: str, base: Path, seed: int,
                 overrides: tuple[str, ...]) -> Config:
    placed = ["train.resume=auto", f"train.seed={seed}", f"train.output_dir={base / stage}"]
    if stage != "teacher":
        placed.append(f"model.teacher_checkpoint={base / 'teacher' / 'last.pt'}")
    return load_config(CONFIGS / "demo" / recipe, [*placed, *overrides])


def run_default_job(seeds: tuple[int, ...] = (0,), out: Path = DEFAULT_OUT,
                    overrides: tuple[str, ...] = ()) -> dict[int, list[dict]]:
    """Every stage of every seed in turn; the summary rows of each seed's runs, teacher first.
    Under a launcher every process runs the stages and rank 0 reports."""
    def say(text: str) -> None:
        if distributed.is_main():
            print(text, flush=True)

    job_started = time.perf_counter()
    rows: dict[int, list[dict]] = {}
    for seed in seeds:
        base, runs = seed_dir(out, seed), []
        for stage, recipe in STAGES:
            cfg = stage_config(stage, recipe, base, seed, overrides)
            say(f"== seed {seed}, {stage}: {CONFIGS / 'demo' / recipe} -> {cfg.train.output_dir}")
            started = time.perf_counter()
            result = train(cfg)
            say(f"   top-1 {result.top1:.2f}, {time.perf_counter() - started:.0f} s")
            runs.append(Path(cfg.train.output_dir))
        if distributed.is_main():
            teacher, *students = runs
            student_rows = [summarize(run) for run in students]
            group(student_rows)  # adds each student's difference to the student alone
            rows[seed] = [summarize(teacher), *student_rows]
            say(f"\nseed {seed}: the teacher ({rows[seed][0]['student']}) reached top-1 "
                f"{rows[seed][0]['top1']:.2f}")
            say(compare(students, base / "compare"))
    if len(seeds) > 1 and distributed.is_main():
        summary = seed_summary(rows)
        (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± standard deviation\n"
            f"{format_seed_summary(summary)}\nwrote {out / 'seeds.json'}")
    say(f"\nthe job took {time.perf_counter() - job_started:.0f} s")
    return rows
