"""Where a run resumes from, and whether it may: `train.resume` and `--resume RUN_DIR`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import UserError
from . import distributed
from .checkpoint import load_checkpoint, periodic_checkpoints
from .sealed import CorruptCheckpoint


def latest_intact(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The run's last.pt, or, when it is corrupt, its newest intact step_N.pt (saying so);
    None when the directory holds no checkpoint. Tensors are mapped, not read: the processes
    of a node share one copy in the page cache."""
    damaged: CorruptCheckpoint | None = None
    for path in [run_dir / "last.pt", *reversed(periodic_checkpoints(run_dir))]:
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint(path, mmap=True)
        except CorruptCheckpoint as err:
            damaged = damaged or err
            continue
        if damaged is not None and distributed.is_main():
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
    return path, load_checkpoint(path, mmap=True)


def config_for_resume(path: str | Path, overrides: list[str]) -> Config:
    """The saved config of the run at `path` (directory or checkpoint), with `overrides` on top."""
    path = Path(path)
    found = latest_intact(path) if path.is_dir() else (path, load_checkpoint(path, mmap=True))
    if found is None:
        raise UserError(f"--resume {path}: no checkpoint in {path}")
    checkpoint, state = found
    return load_config(base=state["config"], overrides=[f"train.resume={checkpoint}", *overrides])


def check_resumable(checkpoint: dict[str, Any], path: Path, cfg: Config, world_size: int) -> None:
    """Refuses a resume whose process count or engine differs from the checkpoint's."""
    saved_world = checkpoint["world_size"]
    if saved_world is not None and saved_world != world_size:
        raise UserError(
            f"{path} was written by {saved_world} process(es) and this run has {world_size}: "
            f"resume it with {saved_world} (each epoch's shards, every process's data position "
            f"and RNG state, and DeepSpeed's optimizer partitions belong to that number)")
    engine = checkpoint["engine"]
    if engine is None:
        return
    saved = f"engine.name={engine['name']}"
    if engine["name"] == "deepspeed":
        saved += f" engine.zero_stage={engine['zero_stage']}"
    wanted = f"engine.name={cfg.engine.name}"
    if cfg.engine.name == "deepspeed":
        wanted += f" engine.zero_stage={cfg.engine.zero_stage}"
    if saved != wanted:
        raise UserError(f"{path} was written with {saved}, which stores the optimizer state "
                        f"its own way; resume with those settings, not {wanted}")
