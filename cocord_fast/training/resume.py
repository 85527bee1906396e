"""Where a run resumes from, and whether it may: `train.resume` and `--resume RUN_DIR`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import distributed
from ..checkpoints.files import load_checkpoint, periodic_checkpoints
from ..checkpoints.sealed import CorruptCheckpoint, verify_files
from ..config import Config, load_config
from ..data.fingerprint import Fingerprint
from ..errors import UserError
from ..plugins import METHODS


def load_intact(path: Path, engine_files: bool = True) -> dict[str, Any]:
    """The training checkpoint at `path`, its bytes verified (`sealed.py`), and with
    `engine_files` also the files it names beside it (DeepSpeed's model states and optimizer
    partitions): a damaged or missing one makes the whole checkpoint corrupt. Tensors are
    mapped, not read: the processes of a node share one copy in the page cache."""
    checkpoint = load_checkpoint(path, mmap=True)
    if engine_files:
        verify_files((checkpoint["engine"] or {}).get("files", {}), path.parent, str(path))
    return checkpoint


def latest_intact(run_dir: Path, engine_files: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The run's last.pt, or, when it is corrupt, its newest intact step_N.pt (saying so on
    rank 0, with the first damaged file); None when the directory holds no checkpoint.
    `engine_files`: as in `load_intact` (without, the run's config can be read, no more)."""
    damaged: CorruptCheckpoint | None = None
    for path in [run_dir / "last.pt", *reversed(periodic_checkpoints(run_dir))]:
        if not path.exists():
            continue
        try:
            checkpoint = load_intact(path, engine_files)
        except CorruptCheckpoint as err:
            damaged = damaged or err
            continue
        if damaged is not None and engine_files and distributed.is_main():
            print(f"warning: {damaged}; resuming from {path} (step {checkpoint['step']}), the "
                  f"newest intact checkpoint", flush=True)
        return path, checkpoint
    if damaged is not None:
        raise damaged
    return None


def resume_point(cfg: Config) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint `train.resume` names, loaded: 'auto' (output_dir's newest intact
    checkpoint, if any), a run directory (the same) or a checkpoint file."""
    resume = cfg.train.resume
    if not resume:
        return None, None
    directory = Path(cfg.train.output_dir) if resume == "auto" else Path(resume)
    if resume == "auto" or directory.is_dir():
        found = latest_intact(directory)
        if found is None and resume != "auto":
            raise UserError(f"train.resume={resume}: no checkpoint in {directory}")
        return found or (None, None)
    path = Path(resume)
    if not path.exists():
        raise UserError(f"train.resume={resume}: no checkpoint at {path}")
    return path, load_intact(path)


def is_finished(checkpoint: dict[str, Any], cfg: Config) -> bool:
    """Whether `checkpoint` has reached the end of the schedule `cfg` describes."""
    return checkpoint["epoch"] >= cfg.train.epochs or 0 < cfg.train.max_steps <= checkpoint["step"]


def config_for_resume(path: str | Path, overrides: list[str]) -> Config:
    """The saved config of the run at `path` (directory or checkpoint), with `overrides` on
    top; `train.resume` is `path`, so that the trainer chooses the checkpoint itself, with
    every rank, once DeepSpeed's files are verified too."""
    path = Path(path)
    found = (latest_intact(path, engine_files=False) if path.is_dir()
             else (path, load_checkpoint(path, mmap=True)))
    if found is None:
        raise UserError(f"--resume {path}: no checkpoint in {path}")
    _, state = found
    return load_config(base=state["config"], overrides=[f"train.resume={path}", *overrides])


# Settings a resumed run may not change: they change what the saved weights mean (the
# teacher's too: the checkpoint holds them, and a resumed run reads no teacher file), or what a
# step is (the checkpoint's data position counts steps of this many images per process). The
# method adds its own (`Method.shape_settings`: the shapes of its state).
FIXED = {
    "model.student", "model.teacher", "model.teacher_checkpoint", "model.teacher_weights",
    "model.student_weights", "method.name",
    "data.dataset", "data.image_size", "data.mean", "data.std", "data.interpolation",
    "data.crop_pct", "data.crop_mode", "data.batch_size",
    "optim.grad_accum_steps", "engine.name", "engine.zero_stage",
}


def fixed_settings(cfg: Config) -> set[str]:
    """`FIXED` and the shape settings of the run's method."""
    method = METHODS.get(cfg.method.name, "method.name")
    return FIXED | {f"{method.name}.{key}" for key in method.shape_settings}


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """`section.key` -> (saved value, new value) for every setting that differs (keys the
    saved config predates count as unchanged)."""
    changes = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            old = saved.get(section, {}).get(key, value)
            if old != value and f"{section}.{key}" != "train.resume":
                changes[f"{section}.{key}"] = (old, value)
    return changes


def check_resumable(checkpoint: dict[str, Any], path: Path, cfg: Config,
                    world_size: int) -> dict[str, tuple[Any, Any]]:
    """Refuses a resume whose settings change what the checkpoint means (listing each
    difference) or whose process count differs; returns the changes it allows."""
    changes = config_changes(checkpoint["config"], cfg)
    fixed = fixed_settings(cfg)
    if checkpoint["ranks"] is None:  # imported: its data settings were only defaults
        fixed = {key for key in fixed if not key.startswith("data.")}
    refused = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()
               if key in fixed]
    if refused:
        raise UserError(f"{path} cannot continue with other values of settings that define "
                        f"its weights and steps ({'; '.join(refused)}); start a new run (another "
                        f"train.output_dir) for them")
    engine = (checkpoint["engine"] or {}).get("name", cfg.engine.name)
    if engine != cfg.engine.name:  # a checkpoint older than the engine section
        raise UserError(f"{path} was written with engine.name={engine}, which stores the "
                        f"optimizer state its own way; resume with engine.name={engine}")
    saved_world = checkpoint["world_size"]
    if saved_world is not None and saved_world != world_size:
        raise UserError(
            f"{path} was written by {saved_world} process(es) and this run has {world_size}: "
            f"resume it with {saved_world} (each epoch's shards, every process's data position "
            f"and RNG state, and DeepSpeed's optimizer partitions belong to that number)")
    return changes


def check_same_data(checkpoint: dict[str, Any], path: Path, data: dict[str, Fingerprint],
                    cfg: Config, indexes_samples: bool) -> list[str]:
    """Refuses to resume on data other than the checkpoint's (`data`: this run's fingerprint
    of each split), unless `train.resume_on_changed_data`; a method whose state holds a row
    per training sample (`indexes_samples`: CRD's memory) never continues on another number
    of samples. Returns what to tell the user."""
    saved = checkpoint.get("data")
    if saved is None:
        return [] if checkpoint["ranks"] is None else [
            f"{path} was written before checkpoints kept their data's fingerprint: that the "
            f"data is unchanged is not checked"]
    changes = {split: change for split, fingerprint in data.items() if split in saved
               and (change := Fingerprint.from_dict(saved[split]).first_difference(fingerprint))}
    if not changes:
        return []
    described = "; ".join(f"{split} split: {change} (then against now)"
                          for split, change in changes.items())
    samples_then = saved["train"]["num_samples"]
    if indexes_samples and samples_then != data["train"].num_samples:
        raise UserError(f"{path} was trained on other data ({described}), and its "
                        f"{cfg.method.name} state holds one row per training sample "
                        f"({samples_then}): it cannot continue on "
                        f"{data['train'].num_samples}; start a new run")
    if not cfg.train.resume_on_changed_data:
        where = cfg.data.root or cfg.data.dataset
        raise UserError(f"{path} was trained on other data than {where} holds now "
                        f"({described}): its data position and every dataset index would name "
                        f"other images. Restore the data, or continue on purpose with "
                        f"train.resume_on_changed_data=true")
    return [f"continuing on changed data (train.resume_on_changed_data): {described}"]
