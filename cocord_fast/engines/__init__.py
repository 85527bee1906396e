"""What wraps the student: the torch engine (one process, or DDP) and DeepSpeed's (ZeRO 0-2).

`engine_class` is the one place that reads `engine.name`; everything else asks the engine.
"""
from __future__ import annotations

from typing import ContextManager

import torch

from .. import distributed
from ..config import Config
from ..methods import Method
from .base import Engine, autocast, check_optimizer_settings, optimizer_settings
from .deepspeed_engine import DeepSpeedEngine
from .torch_engine import TorchEngine

ENGINES: dict[str, type[Engine]] = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}


def engine_class(cfg: Config) -> type[Engine]:
    return ENGINES[cfg.engine.name]


def check_engine_config(cfg: Config) -> None:
    """Engine and optimizer settings that cannot work, refused before any data is read."""
    check_optimizer_settings(cfg.optim)
    engine_class(cfg).check_config(cfg)


def join_processes(cfg: Config, device: torch.device) -> None:
    """Joins the launcher's process group, and a group of one where the engine needs it."""
    distributed.init(device, cfg.engine.timeout_s,
                     group_of_one=engine_class(cfg).needs_group_of_one)


def build_engine(cfg: Config, method: Method, device: torch.device) -> Engine:
    """The engine `engine.name` names, around `method` (already on `device`, with its
    restored state: DeepSpeed copies the weights it is given into its own buffers)."""
    def forward_context() -> ContextManager:
        return autocast(cfg, device)

    return engine_class(cfg)(cfg, method, device, forward_context)


__all__ = ["ENGINES", "Engine", "autocast", "build_engine", "check_engine_config",
           "engine_class", "join_processes", "optimizer_settings"]
