"""The embedded default job: `cocord-fast train` with no arguments, or `cocord-fast demo`.

Offline, on CPU: make the demo data set (once), train the demo teacher, train the student alone
and with KD, DKD, DIST, CRD and CoCoRD, and print `compare`'s table of the six. Every stage resumes
(`train.resume=auto`), so a second run reuses whatever the first finished. Several seeds run the
whole job once each, teacher included, and end with the mean and standard deviation over them.
Each stage runs in a process of its own, so that the table's peak memory is the stage's.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from . import distributed
from .compare import compare, format_seed_summary, group, seed_summary, summarize
from .config import Config, load_config
from .configs import ROOT as CONFIGS
from .errors import StageExited
from .training.preemption import parse_signals
from .training.resume import config_for_resume, is_finished, latest_intact
from .training.trainer import train

DEFAULT_OUT = Path("runs/demo")
# (stage, recipe under configs/demo/): the teacher first, then the student alone (the baseline
# every other student is measured against), then the five ways of distilling into it: the
# logit methods, which cost what KD costs, before the contrastive ones.
STAGES = [
    ("teacher", "teacher.yaml"),
    ("vanilla", "student.yaml"),
    ("kd", "kd.yaml"),
    ("dkd", "dkd.yaml"),
    ("dist", "dist.yaml"),
    ("crd", "crd.yaml"),
    ("cocord", "cocord.yaml"),
]


# A stage's settings of where its data is, how it is read and where it runs: a missing
# demo teacher is trained with them too (they do not change what the teacher learns).
CARRIED_TO_TEACHER = ("data.root", "data.backend", "data.num_workers", "train.device",
                      "train.progress")


def train_command(config_path: str | None, overrides: list[str], resume: str | None) -> None:
    """`cocord-fast train`: the run `config_path` and `overrides` describe (a demo recipe's
    teacher trained first where it is missing), the run at `resume` continued, or, given
    nothing, the default job."""
    if resume:
        cfg = config_for_resume(resume, overrides)
    elif config_path is None and not overrides:
        run_default_job()
        return
    else:
        cfg = load_config(config_path, overrides)
    ensure_demo_teacher(cfg)
    result = train(cfg)
    if distributed.is_main():
        print(f"{result.run_dir}: step {result.step}, top-1 {result.top1:.2f} "
              f"(best {result.best_top1:.2f})")


def ensure_demo_teacher(cfg: Config) -> None:
    """Makes sure the demo teacher a demo recipe distils from is trained (and finished).

    A teacher that finished its own schedule (the default job's, say, with its overrides) is
    only read, by any number of processes; only an unfinished one is resumed, which ties it to
    the number of processes that started it."""
    recipe, overrides = CONFIGS / "demo" / "teacher.yaml", ["train.resume=auto"]
    for key in CARRIED_TO_TEACHER:
        section, name = key.split(".")
        overrides.append(f"{key}={json.dumps(getattr(getattr(cfg, section), name))}")
    teacher = load_config(recipe, overrides)
    run_dir = Path(teacher.train.output_dir)
    if Path(cfg.model.teacher_checkpoint) != run_dir / "last.pt":
        return
    if not finished(teacher, as_saved=True):
        train_stage(recipe, overrides)


def finished(cfg: Config, as_saved: bool = False) -> bool:
    """Whether the run `cfg` describes has reached the end of its schedule: the one `cfg`
    sets, or with `as_saved`, the one the run was started with."""
    run_dir = Path(cfg.train.output_dir)
    found = latest_intact(run_dir) if run_dir.is_dir() else None
    if found is None:
        return False
    return is_finished(found[1], load_config(base=found[1]["config"]) if as_saved else cfg)


def train_stage(recipe: Path, overrides: list[str]) -> bool:
    """Trains `load_config(recipe, overrides)` unless it finished earlier (False then): in a
    process of its own (`cocord-fast train RECIPE OVERRIDES`), because a process keeps the
    memory an earlier stage freed and its peak would not be the stage's. Under a launcher the
    processes are the launcher's: the stage runs in this one, whose trainer decides with the
    other ranks whether any step is left (and a CPU stage after the first logs no peak memory)."""
    cfg = load_config(recipe, overrides)
    if distributed.launched_world_size() > 1:
        train(cfg)
        return True
    if finished(cfg):
        return False
    # A session of its own: a terminal's Ctrl-C reaches the stage once, through this process.
    stage = subprocess.Popen([sys.executable, "-m", "cocord_fast", "train", str(recipe),
                              *overrides], start_new_session=True)
    heard = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, *parse_signals(cfg.train.stop_signals)}
    with forwarding(heard, stage):
        code = stage.wait()
    if code != 0:
        code = code if code > 0 else 128 - code  # killed by signal -code, as a shell says it
        raise StageExited(f"the stage in {cfg.train.output_dir} ended with exit code {code}; "
                          f"run the job again to continue from its last checkpoint", code)
    return True


@contextlib.contextmanager
def forwarding(signals: set[signal.Signals], child: subprocess.Popen) -> Iterator[None]:
    """While entered, each of `signals` this process receives is sent on to `child` instead."""
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum))
                for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def seed_dir(out: Path, seed: int) -> Path:
    """Seed 0 is the default job and lives in `out` itself, where the single-stage recipes put
    their runs; seed S in `out/seedS`."""
    return out if seed == 0 else out / f"seed{seed}"


def stage_overrides(stage: str, base: Path, seed: int, overrides: tuple[str, ...]) -> list[str]:
    placed = ["train.resume=auto", f"train.seed={seed}", f"train.output_dir={base / stage}"]
    if stage != "teacher":
        placed.append(f"model.teacher_checkpoint={base / 'teacher' / 'last.pt'}")
    return [*placed, *overrides]


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
        for stage, recipe_name in STAGES:
            recipe = CONFIGS / "demo" / recipe_name
            stage_args = stage_overrides(stage, base, seed, overrides)
            run_dir = Path(load_config(recipe, stage_args).train.output_dir)
            say(f"== seed {seed}, {stage}: {recipe} -> {run_dir}")
            started = time.perf_counter()
            trained = train_stage(recipe, stage_args)
            say(f"   {time.perf_counter() - started:.0f} s" if trained
                else "   finished earlier: reused")
            runs.append(run_dir)
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
