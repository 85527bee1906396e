"""The engine seam: what an engine is, and what every engine shares.

An engine wraps the method's trainable part, runs each micro-batch's forward and backward,
steps the optimizer, and saves and restores the optimizer's state. It wraps a `StepModule`,
whose only parameters are the method's trainable ones: the frozen teacher, the momentum
copies, CoCoRD's queue and CRD's memory banks stay outside the wrapper, in fp32, identical on
every rank by construction (the methods gather what they enqueue or write through
`distributed.py`).
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
    """What the trainer calls; `engines.ENGINES` names each engine by its `engine.name`.

    Class-level answers, read before an engine is built: `holds_channels_last` (the
    trainable parameters may take `IMAGE_LAYOUT`) and `needs_group_of_one` (a single process
    still joins a process group)."""

    holds_channels_last: bool
    needs_group_of_one: bool
    optimizer: torch.optim.Optimizer  # its param_groups take the learning rate of each step
    description: str  # for the run's first line, e.g. "DeepSpeed ZeRO-1"

    def __init__(self, cfg: Config, method: Method, device: torch.device,
                 forward_context: Callable[[], ContextManager]):
        """Wraps `method` (already on `device`, with its restored state: an engine may copy
        the weights it is given into buffers of its own)."""

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Refuses `engine.*` settings this engine cannot run, before any data is read."""

    def micro_step(self, batch: Batch, boundary: bool) -> StepOutput:
        """Forward and backward of one micro-batch; at `boundary` (the last micro-batch of an
        optimizer step) also the gradient reduction, clipping and optimizer step."""

    def state_dict(self, run_dir: Path, step: int) -> dict[str, Any]:
        """What a checkpoint holds to restore the optimizer. Every rank calls it."""

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None: ...

    def release_unreferenced(self, run_dir: Path) -> None:
        """Rank 0, after checkpoint files were written: deletes engine files that no
        checkpoint in `run_dir` refers to any more."""
