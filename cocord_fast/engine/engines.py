"""The engine seam: what wraps the method's trainable part, runs each micro-batch's forward
and backward, steps the optimizer, and saves and restores the optimizer's state.

The trainer calls only `Engine`'s methods; `build_engine` is the one place that reads
`engine.name`. Both engines wrap a `StepModule`, whose only parameters are the method's
trainable ones: the frozen teacher, the momentum copies, CoCoRD's queue and CRD's memory banks
stay outside the wrapper, in fp32, identical on every rank by construction (the methods gather
what they enqueue or write through `distributed.py`).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch
from torch import nn

from ..config import Config, OptimConfig
from ..data import Batch
from ..errors import UserError
from ..methods import Method, StepOutput
from . import distributed


def autocast(cfg: Config, device: torch.device) -> ContextManager:
    """`train.precision=bf16`: forward passes under autocast; weights, gradients, optimizer
    state, momentum copies and the queue stay fp32."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class StepModule(nn.Module):
    """What an engine wraps: the method's trainable part as the only submodule, so DDP and
    DeepSpeed see exactly the parameters the optimizer steps, and the method's forward as its
    forward, so the wrapper's forward runs (DDP arms its gradient hooks there)."""

    def __init__(self, method: Method):
        super().__init__()
        self.trainable = method.trainable_module()
        self.__dict__["method"] = method  # not a submodule: the rest stays outside the engine

    def forward(self, batch: Batch) -> StepOutput:
        return self.method(batch)


def build_optimizer(cfg: OptimConfig, parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=cfg.lr, **optimizer_settings(cfg))


def optimizer_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The SGD settings of every parameter group, but the learning rate (set at each step).
    A resumed run sets them again after loading the optimizer state, which holds the saved
    run's values."""
    return {"momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "nesterov": cfg.nesterov}


def check_optimizer_settings(cfg: OptimConfig) -> None:
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum above 0")


class Engine(Protocol):
    optimizer: torch.optim.Optimizer  # its param_groups take the learning rate of each step
    description: str  # for the run's first line, e.g. "DeepSpeed ZeRO-1"

    def micro_step(self, batch: Batch, boundary: bool) -> StepOutput:
        """Forward and backward of one micro-batch; at `boundary` (the last micro-batch of an
        optimizer step) also the gradient reduction, clipping and optimizer step."""

    def state_dict(self, run_dir: Path, step: int) -> dict[str, Any]:
        """What a checkpoint holds to restore the optimizer. Every rank calls it."""

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None: ...

    def release_unreferenced(self, run_dir: Path) -> None:
        """Rank 0, after checkpoint files were written: deletes engine files that no
        checkpoint in `run_dir` refers to any more."""


class TorchEngine:
    """A torch optimizer, and DistributedDataParallel when there are several processes.

    DDP runs with `forward_sync_buffers=False`: by default it would copy rank 0's buffers
    (BatchNorm statistics) into every rank at each forward, so per-rank statistics would never
    persist; they are averaged across ranks before evaluation and saving instead
    (`distributed.averaged_batchnorm_statistics`), as under DeepSpeed, which never syncs them.
    """

    def __init__(self, cfg: Config, method: Method, forward_context: Callable[[], ContextManager]):
        self.optimizer = build_optimizer(cfg.optim, method.trainable_module().parameters())
        self.accumulation, self.grad_clip = cfg.optim.grad_accum_steps, cfg.optim.grad_clip
        self.forward_context = forward_context
        module = StepModule(method)
        self.ddp = distributed.world_size() > 1
        if self.ddp:
            module = nn.parallel.DistributedDataParallel(module, forward_sync_buffers=False)
        self.module = module
        self.description = "torch DDP" if self.ddp else "torch"

    def micro_step(self, batch: Batch, boundary: bool) -> StepOutput:
        # Gradients of the micro-batches before the boundary accumulate locally: one
        # all-reduce per optimizer step.
        with nullcontext() if boundary or not self.ddp else self.module.no_sync():
            with self.forward_context():
                out = self.module(batch)
            (out.loss / self.accumulation).backward()
        if boundary:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def state_dict(self, run_dir: Path, step: int) -> dict[str, Any]:
        # Gradients are averaged before every step, so the optimizer state is the same on
        # every rank: rank 0's is the run's.
        return {"name": "torch", "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def release_unreferenced(self, run_dir: Path) -> None:
        """Nothing to release: the optimizer state lives inside the checkpoint files."""


def check_engine_config(cfg: Config) -> None:
    """Engine and optimizer settings that cannot work, refused before any data is read."""
    check_optimizer_settings(cfg.optim)
    engine = cfg.engine
    if engine.name == "torch":
        given = [f"engine.{key}" for key in ("zero_stage", "deepspeed_config",
                                             "deepspeed_overrides") if getattr(engine, key)]
        if given:
            raise UserError(f"{', '.join(given)} set, but engine.name=torch: they apply to "
                            f"engine.name=deepspeed")
        return
    from .deepspeed_engine import check_deepspeed_config

    check_deepspeed_config(cfg)


def join_processes(cfg: Config, device: torch.device) -> None:
    """Joins the launcher's process group; DeepSpeed needs one even for a single process."""
    distributed.init(device, cfg.engine.timeout_s, group_of_one=cfg.engine.name == "deepspeed")


def build_engine(cfg: Config, method: Method, device: torch.device) -> Engine:
    """The engine `engine.name` names, around `method` (already on `device`, with its
    restored state: DeepSpeed copies the weights it is given into its own buffers)."""
    def forward_context() -> ContextManager:
        return autocast(cfg, device)

    if cfg.engine.name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, method, device, forward_context)
    return TorchEngine(cfg, method, forward_context)
