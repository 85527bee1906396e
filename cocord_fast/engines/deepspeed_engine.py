"""The DeepSpeed engine: ZeRO stages 0-2 around the method's trainable part.

One source of truth: the DeepSpeed JSON is generated from our config (batch per GPU, gradient
accumulation, clipping, ZeRO stage); `engine.deepspeed_config` (a JSON file) and
`engine.deepspeed_overrides` add settings we do not own, and setting one we own there is an
error naming the field to use instead. DeepSpeed's own parser checks the result before any
data is read (`check_deepspeed_config`).

Precision: our autocast (`train.precision=bf16`) with fp32 weights, gradients and optimizer
state, and no DeepSpeed `bf16`/`fp16` mode. Those modes cast the wrapped module's parameters
(BatchNorm's too) to 16 bits and keep the fp32 masters inside the optimizer, so the momentum
copies would average bf16 weights: with m = 0.999 an EMA step (1 - m) * delta falls below
bf16's resolution and the teacher head stops moving. On CPU bf16 BatchNorm does not even run
with fp32 running statistics. Autocast keeps BatchNorm, the momentum copies, the teacher head
and the queue in fp32.

ZeRO-3 is refused: it partitions the student's parameters across ranks, and CoCoRD's momentum
update reads all of them after every step (it would need a gather of the whole student per
step, which is what ZeRO-3 exists to avoid).

Checkpoints: every rank writes DeepSpeed's own files (each rank its optimizer partition under
ZeRO 1/2) under `RUN_DIR/deepspeed/step_<N>/`, then fsyncs and hashes the ones it wrote; our
sealed checkpoint file, written after every rank has, names that directory and records each
file's digest, so a damaged or missing partition makes the checkpoint corrupt (resume falls
back to an older one, `resume.latest_intact`). A directory is written once and deleted when no
checkpoint file names it any more, so a crash mid-save leaves the previous checkpoint whole.
DeepSpeed's files are written as ours are (`save_atomic`): each is whole or absent, and a write
that fails (a full disk) stops the run naming that file. No checkpoint file is then written, so
nothing names that step's directory: the next save deletes it, or writes over it if it is of
the same step.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from .. import distributed
from ..checkpoints.files import load_file, periodic_checkpoints, save_atomic
from ..checkpoints.sealed import file_digest
from ..config import Config
from ..data import Batch
from ..errors import UserError
from ..methods import Method, StepOutput
from .base import StepModule, build_optimizer

CHECKPOINT_DIR = "deepspeed"

# DeepSpeed key -> the cocord_fast setting it comes from.
OWNED_KEYS = {
    "train_batch_size": "data.batch_size, optim.grad_accum_steps and the number of processes",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "the optim section (SGD)",
    "scheduler": "the optim section (optim.schedule)",
    "bf16": "train.precision (autocast with fp32 weights)",
    "fp16": "train.precision (autocast with fp32 weights)",
    "torch_autocast": "train.precision",
    "zero_allow_untested_optimizer": "cocord_fast (ZeRO steps its partitions with torch's SGD)",
    "steps_per_print": "train.log_every (the trainer logs)",
}


# DeepSpeed's warnings that are noise for this trainer, dropped; every other one is shown.
# We hand ZeRO torch's SGD on purpose (zero_allow_untested_optimizer), and pick the CPU
# ourselves on a machine without a GPU.
KNOWN_NOISE = ("You are using ZeRO with an untested optimizer", "Setting accelerator to CPU")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in KNOWN_NOISE)


def import_deepspeed() -> Any:
    """`deepspeed`, with its logger showing warnings but not its INFO lines (its whole config,
    per-step timers) nor `KNOWN_NOISE`. The filter goes on before the import, which warns."""
    logger = logging.getLogger("DeepSpeed")  # the one DeepSpeed's logger factory makes
    if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
        logger.addFilter(_DropKnownNoise())
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _user_settings(cfg: Config) -> tuple[dict[str, Any], dict[str, str]]:
    """`engine.deepspeed_config` with `engine.deepspeed_overrides` on top, checked for keys
    that our config owns; and the source of each top-level key (the field to name)."""
    settings: dict[str, Any] = {}
    source_of: dict[str, str] = {}
    sources = []
    if cfg.engine.deepspeed_config:
        path = Path(cfg.engine.deepspeed_config).expanduser()
        try:
            from_file = json.loads(path.read_text())
        except OSError as err:
            raise UserError(f"engine.deepspeed_config: cannot read {path}: "
                            f"{err.strerror}") from None
        except json.JSONDecodeError as err:
            raise UserError(f"engine.deepspeed_config: {path} is not valid JSON: {err}") from None
        if not isinstance(from_file, dict):
            raise UserError(f"engine.deepspeed_config: {path} must hold a JSON object")
        sources.append((f"engine.deepspeed_config ({path})", from_file))
    sources.append(("engine.deepspeed_overrides", cfg.engine.deepspeed_overrides))
    for source, values in sources:
        owned = [key for key in values if key in OWNED_KEYS]
        if "stage" in (values.get("zero_optimization") or {}):
            raise UserError(f"{source} sets zero_optimization.stage: set engine.zero_stage instead")
        if owned:
            raise UserError(f"{source} sets {owned[0]}: it comes from {OWNED_KEYS[owned[0]]}")
        settings = _deep_merge(settings, values)
        source_of.update(dict.fromkeys(values, source))
    return settings, source_of


def deepspeed_config(cfg: Config, world_size: int,
                     user_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: ours, merged over the user's settings (read from
    `cfg` unless given)."""
    batch, accumulation = cfg.data.batch_size, cfg.optim.grad_accum_steps
    ours = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": batch * accumulation * world_size,
        # DeepSpeed clips at 1.0 when the key is missing; 0 turns clipping off.
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # ZeRO refuses optimizers outside its tested list unless told; torch's SGD steps
        # this rank's fp32 partition like any other set of parameters.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,  # the trainer logs
    }
    if user_settings is None:
        user_settings, _ = _user_settings(cfg)
    return _deep_merge(user_settings, ours)


def check_deepspeed_config(cfg: Config) -> None:
    """Everything about `engine.*` that can be checked before any work starts."""
    if cfg.engine.zero_stage == 3:
        raise UserError("engine.zero_stage=3 is not supported: ZeRO-3 partitions the student's "
                        "parameters, which the momentum copies read in full after every step; "
                        "use engine.zero_stage=0, 1 or 2")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("engine.name=deepspeed, but DeepSpeed is not installed "
                        "(pip install 'cocord_fast[deepspeed]')")
    settings, source_of = _user_settings(cfg)
    _check_with_deepspeeds_parser(deepspeed_config(cfg, 1, settings), source_of)


class _ReadRecord(dict):
    """A mapping that records the keys looked up in it. DeepSpeed's parser reads its config
    with `get`, `[]`, `in` and `in .keys()`, and copies it with `copy.copy` first, which keeps
    this type and shares the record."""

    def __init__(self, values: dict[str, Any]):
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):
        return self  # `in`, iteration and len as the keys view's, with `in` recorded


def _check_with_deepspeeds_parser(config: dict[str, Any], source_of: dict[str, str]) -> None:
    """Runs DeepSpeed's own config parser over `config` before any data is read, so what it
    refuses (an unknown key inside `zero_optimization`, a bad value) and the top-level keys
    it would ignore without a word (a misspelt section) are errors naming their source, not
    failures inside `deepspeed.initialize` after the data was built."""
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    # The batch size follows from the per-GPU batch and the accumulation: the parser cannot
    # know the launcher's process count here (no process group yet).
    record = _ReadRecord({key: value for key, value in config.items()
                          if key != "train_batch_size"})
    sources = " and ".join(sorted(set(source_of.values())))
    try:
        DeepSpeedConfig(record)
    except Exception as err:  # pydantic's ValidationError, ValueError, AssertionError, ...
        lines = [line.strip() for line in str(err).splitlines()
                 if line.strip() and "errors.pydantic.dev" not in line]
        raise UserError(f"{sources or 'the DeepSpeed config'}: DeepSpeed refuses it: "
                        f"{'; '.join(lines)}") from None
    if not {"train_micro_batch_size_per_gpu", "zero_optimization"} <= record.read:
        return  # a parser that reads its config otherwise: which keys it ignores is unknown
    for key, source in source_of.items():
        if key not in record.read:
            raise UserError(f"{source}: DeepSpeed does not read {key!r} (misspelt? see "
                            f"https://www.deepspeed.ai/docs/config-json/)")


def _unlink_shared_memory_buffer() -> None:
    """Removes the name of this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce, which
    DeepSpeed never removes: each launch on CPU left 66 MB per rank behind, until /dev/shm was
    full. Every rank maps every peer's buffer inside `deepspeed.initialize`, so after a barrier
    the names can go; the mappings last as long as the processes."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{distributed.rank()}")
    distributed.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


def _use_accelerator_of(device: torch.device) -> None:
    """DeepSpeed picks its accelerator (and so the device it moves the model to) by itself,
    CUDA wherever CUDA exists: make it the one of the run's device."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() == device.type:
        return
    if device.type == "cuda":
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
    else:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
    set_accelerator(Accelerator())


def _owner(file_name: str) -> int:
    """The rank that wrote a file of DeepSpeed's checkpoint: rank r its optimizer partition
    (`zero_pp_rank_<r>_...`), rank 0 everything else."""
    found = re.search(r"zero_pp_rank_(\d+)_", file_name)
    return int(found.group(1)) if found else 0


def _write_whole(state_dict: dict[str, Any], path: str) -> None:
    """How DeepSpeed's checkpoint engine writes each file here (it passes both by keyword).
    Its own `torch.save(path)` leaves a half-written file under the file's name when a write
    fails, and says only "unexpected pos"; `save_atomic` leaves the old file or none, and
    names the file and the space left."""
    save_atomic(state_dict, path)


def _seal_own_files(directory: Path, run_dir: Path) -> dict[str, str]:
    """Fsyncs the files of `directory` this rank wrote and returns their digests, by path
    relative to `run_dir`, for every rank's files (a collective)."""
    mine = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and _owner(path.name) == distributed.rank():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            mine[str(path.relative_to(run_dir))] = file_digest(path)
    if distributed.is_main():  # the directory entries too
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return {name: digest for files in distributed.all_gather_objects(mine)
            for name, digest in files.items()}


class DeepSpeedEngine:
    """The `Engine` contract (base.py) over `deepspeed.initialize` with our torch SGD.

    DeepSpeed views every parameter it wraps as bytes (`_broadcast_model`), which a
    channels-last weight cannot be, and ZeRO 1-2 re-point them into flat buffers anyway: the
    trainable part keeps the default layout. A single process still needs a process group."""

    holds_channels_last = False
    needs_group_of_one = True
    check_config = staticmethod(check_deepspeed_config)

    def __init__(self, cfg: Config, method: Method, device: torch.device,
                 forward_context: Callable[[], ContextManager]):
        deepspeed = import_deepspeed()
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated",
                                category=FutureWarning)  # DeepSpeed's own call, every step
        _use_accelerator_of(device)
        self.optimizer = build_optimizer(cfg.optim, method.trainable_module().parameters())
        self.config = deepspeed_config(cfg, distributed.world_size())
        self.wrapped, *_ = deepspeed.initialize(model=StepModule(method), optimizer=self.optimizer,
                                               config=self.config)
        if self.wrapped.device != device:  # it takes the GPU from LOCAL_RANK
            raise RuntimeError(f"DeepSpeed put the student on {self.wrapped.device}, the run "
                               f"is on {device}")
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine)

        # DeepSpeed's default writer; one chosen in its settings (`checkpoint.writer`) stays.
        if type(self.wrapped.checkpoint_engine) is TorchCheckpointEngine:
            self.wrapped.checkpoint_engine.save = _write_whole
        _unlink_shared_memory_buffer()
        self.forward_context = forward_context
        self.zero_stage = cfg.engine.zero_stage
        self.description = f"DeepSpeed ZeRO-{self.zero_stage}"
        self.saved_directory: Path | None = None  # resolved; holds this step's state
        self.saved_files: dict[str, str] = {}  # in it: path relative to the run -> digest

    def micro_step(self, batch: Batch, boundary: bool) -> StepOutput:
        if boundary != self.wrapped.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's gradient accumulation is out of step with the "
                               "trainer's")
        with self.forward_context():
            out = self.wrapped(batch)
        self.wrapped.backward(out.loss)  # scaled by 1 / gradient_accumulation_steps
        self.wrapped.step()  # clips and steps the optimizer at the boundary only
        return out

    def state_dict(self, run_dir: Path, step: int) -> dict[str, Any]:
        tag = f"step_{step:08d}"
        directory = run_dir / CHECKPOINT_DIR / tag
        # Several checkpoint files of one step share the files, and so does a save before the
        # first step of a resumed run (the evaluation a stopped run still owed): writing the
        # files that run resumed from again would put the checkpoints naming them at risk.
        if directory.resolve() != self.saved_directory:
            self.wrapped.save_checkpoint(str(directory.parent), tag=tag, client_state={},
                                        save_latest=False)
            self.saved_files = _seal_own_files(directory, run_dir)
            self.saved_directory = directory.resolve()
        return {"name": "deepspeed", "zero_stage": self.zero_stage,
                "tag": f"{CHECKPOINT_DIR}/{tag}", "files": self.saved_files}

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        # Every rank has verified these files (`resume.load_intact`) and agreed on them.
        directory = checkpoint_dir / state["tag"]
        load_path, _ = self.wrapped.load_checkpoint(
            str(directory.parent), tag=directory.name, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load its checkpoint from {directory}")
        self.saved_directory, self.saved_files = directory.resolve(), state["files"]

    def release_unreferenced(self, run_dir: Path) -> None:
        root = run_dir / CHECKPOINT_DIR
        if not root.is_dir():
            return
        # A step_N.pt file names step_N; last.pt and best.pt name what they hold.
        referenced = {path.stem for path in periodic_checkpoints(run_dir)}
        for name in ("last.pt", "best.pt"):
            if (run_dir / name).exists():
                engine = load_file(run_dir / name, mmap=True, verify=False).get("engine") or {}
                referenced.add(Path(engine.get("tag", "")).name)
        for directory in root.iterdir():
            if directory.is_dir() and directory.name not in referenced:
                shutil.rmtree(directory, ignore_errors=True)

