"""Checkpoints: written atomically and sealed, read with clear errors, and weights in several
formats."""
from __future__ import annotations

import os
import pickle
import random
import shutil
import tarfile
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError
from ..weights_only import SAFE_CLASSES, refused_by_weights_only_load
from .sealed import CorruptCheckpoint, verify_seal, write_sealed

FORMAT = "cocord_fast"
# 2: `engine`, `world_size` and per-process `ranks` (1: one process: `optimizer`, `rng`, ...).
FORMAT_VERSION = 2


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Writes a sealed file (`sealed.py`) to a temporary file in the same directory, then
    renames it over `path`.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX. A write
    the file system refuses (a full disk, a quota, a size limit) removes the temporary file
    and raises a UserError naming `path` and the space left on its file system.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write_sealed(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err} "
                        f"({_free_space(path.parent)})") from None


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MB free on its file system"
    except OSError as err:
        return f"its free space unknown: {err.strerror or err}"


def remove_partial_saves(run_dir: str | os.PathLike) -> None:
    """Deletes the temporary files of saves a killed process never finished, the engine's
    under the run directory included."""
    for partial in Path(run_dir).rglob(".*.pt.*.tmp"):
        partial.unlink(missing_ok=True)


def periodic_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's step_N.pt files, oldest first."""
    return sorted(Path(run_dir).glob("step_*.pt"), key=lambda path: int(path.stem[5:]))


def remove_old_periodic(run_dir: str | os.PathLike, keep: int) -> None:
    """Deletes all but the newest `keep` step_N.pt files (keep=0: none), once the newest is
    complete (files appear only whole: `save_atomic`)."""
    if keep:
        for path in periodic_checkpoints(run_dir)[:-keep]:
            path.unlink(missing_ok=True)


def student_prefix(method: torch.nn.Module) -> str:
    """Where the online student sits in the method's state dict (e.g. 'student_encoder.')."""
    student = method.student()
    name = next(name for name, module in method.named_modules() if module is student)
    return f"{name}." if name else ""


def training_checkpoint(config: dict[str, Any], method: torch.nn.Module, num_classes: int,
                        step: int, steps_per_epoch: int, engine: dict | None,
                        ranks: list[dict] | None, best_top1: float, last_top1: float,
                        last_eval: dict | None = None,
                        effective_settings: dict | None = None,
                        eval_pending: bool = False, data: dict | None = None) -> dict[str, Any]:
    """The one layout of a cocord_fast checkpoint.

    `engine`: what the engine needs to restore the optimizer (`Engine.state_dict`). `ranks`:
    one entry per process, in rank order, with what differs between them: `rng` (RNG
    states), `skipped_files`, and with several processes `batchnorm` (the rank's own
    BatchNorm running statistics; the method state holds their average). Both are None for a
    run imported from another code base (the optimizer, RNG and data position then start
    fresh on resume). The method state is saved once: it is the same on every rank.
    `last_eval`: the last evaluation's result (with the images it left out);
    `effective_settings`: `Method.effective_settings` values. `eval_pending`: the run stopped
    at the end of an epoch before that epoch's evaluation, which the resumed run runs first.
    `data`: the fingerprint of each split it trained and evaluated on (`data/fingerprint.py`),
    which a resumed run compares with its own.
    """
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config, "step": step,
            "epoch": step / steps_per_epoch,
            "num_classes": num_classes, "method": method.state_dict(),
            "student_prefix": student_prefix(method), "engine": engine,
            "world_size": None if ranks is None else len(ranks), "ranks": ranks,
            "best_top1": best_top1, "last_top1": last_top1, "last_eval": last_eval,
            "effective_settings": effective_settings or {}, "eval_pending": eval_pending,
            "data": data}


def load_file(path: str | os.PathLike, mmap: bool = False, verify: bool = True) -> Any:
    """`torch.load` of a file the user named, restricted to tensors, plain containers and
    `SAFE_CLASSES`.

    A sealed file's bytes are checked first (`verify=False` skips reading them all). With
    `mmap`, tensors are mapped rather than read: cheap when only small entries are used.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if verify:
        verify_seal(path)
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> UserError:
    """What to tell the user about a file torch.load could not read."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return CorruptCheckpoint(f"checkpoint {path} is empty")
    # A torch.save file is a zip archive, a pickle (the format before torch 1.6) or, older
    # still, a tar archive.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or tarfile.is_tarfile(path)):
        return UserError(f"{path} is not a checkpoint (not a file written by torch.save)")
    if (refused := refused_by_weights_only_load(err, str(path))) is not None:
        return refused
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    return CorruptCheckpoint(f"corrupt or truncated checkpoint {path}: {first_line}")


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A cocord_fast training checkpoint (config, method state, optimizer, position, RNG)."""
    state = load_file(path, mmap)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a cocord_fast training checkpoint")
    if state.get("format_version", 1) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer cocord_fast (checkpoint format "
                        f"{state['format_version']}; this one reads up to {FORMAT_VERSION})")
    if "ranks" not in state:  # written before multi-process runs: one process, torch engine
        optimizer, rng = state.pop("optimizer", None), state.pop("rng", None)
        state.pop("data_state", None)  # no longer needed: see Trainer._restore
        rank0 = {"rng": rng, "skipped_files": state.pop("skipped_files", 0)}
        torch_engine = {"name": "torch", "optimizer": optimizer}
        state.update(engine=None if optimizer is None else torch_engine,
                     ranks=None if rng is None else [rank0],
                     world_size=None if rng is None else 1)
    return state


def student_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The online student's weights, in the model's own parameter names, with the modules'
    versions (the state dict's metadata) that some models' loaders read."""
    prefix, method = checkpoint["student_prefix"], checkpoint["method"]
    state = OrderedDict((k[len(prefix):], v) for k, v in method.items() if k.startswith(prefix))
    if (metadata := getattr(method, "_metadata", None)) is not None:
        state._metadata = OrderedDict((module[len(prefix):], entry)
                                      for module, entry in metadata.items()
                                      if f"{module}.".startswith(prefix))
    return state


def load_model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model state dict from a cocord_fast checkpoint (its student), a RepDistiller checkpoint
    (`{'model': state_dict}`), or a plain state dict."""
    state = load_file(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return student_state_dict(state)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model state dict (expected a cocord_fast checkpoint, "
                        f"{{'model': state_dict}} or a state dict)")
    return state


def fit_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 shown_as: Callable[[str], str] = str) -> list[str]:
    """What keeps `state` from loading strictly into a module whose state dict is `own`:
    missing, unexpected and mis-shaped keys, each named by `shown_as` (the file's naming)."""
    missing = [shown_as(k) for k in own if k not in state]
    unexpected = [shown_as(k) for k in state if k not in own]
    mismatched = [f"{shown_as(k)} {tuple(state[k].shape)} (the model's: {tuple(own[k].shape)})"
                  for k in own if k in state and own[k].shape != state[k].shape]
    return [f"{label}: {_some(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatch", mismatched)) if keys]


def _some(keys: list[str], shown: int = 8) -> str:
    return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with an error that names the file and the keys."""
    if problems := fit_problems(model.state_dict(), state):
        raise UserError(f"weights in {source} do not fit {type(model).__name__}: "
                        + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a step draws from: torch's, Python's, NumPy's, and on a CUDA `device` that
    GPU's (only this process's: reading every visible GPU's would open a CUDA context on each
    of them from every process of a node)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible GPU
            cuda = cuda[min(device.index or 0, len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, device)
