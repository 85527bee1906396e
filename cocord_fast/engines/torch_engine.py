"""The torch engine: a torch optimizer, and DistributedDataParallel across processes."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from .. import distributed
from ..config import Config
from ..data import Batch
from ..errors import UserError
from ..methods import Method, StepOutput
from .base import StepModule, build_optimizer


class TorchEngine:
    """A torch optimizer, and DistributedDataParallel when there are several processes.

    DDP runs with `forward_sync_buffers=False`: by default it would copy rank 0's buffers
    (BatchNorm statistics) into every rank at each forward, so per-rank statistics would never
    persist; they are averaged across ranks before evaluation and saving instead
    (`distributed.averaged_batchnorm_statistics`), as under DeepSpeed, which never syncs them.
    """

    holds_channels_last = True
    needs_group_of_one = False

    def __init__(self, cfg: Config, method: Method, device: torch.device,
                 forward_context: Callable[[], ContextManager]):
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

    @staticmethod
    def check_config(cfg: Config) -> None:
        given = [f"engine.{key}" for key in ("zero_stage", "deepspeed_config",
                                             "deepspeed_overrides") if getattr(cfg.engine, key)]
        if given:
            raise UserError(f"{', '.join(given)} set, but engine.name=torch: they apply to "
                            f"engine.name=deepspeed")
