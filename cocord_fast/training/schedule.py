"""Learning-rate schedules as pure functions of the optimizer step (nothing to save on resume)."""
from __future__ import annotations

import math

from ..config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of `cfg.lr` for 0-based optimizer step `step`.

    Linear warm-up over `warmup_epochs`, then either step decay (x`gamma` at each milestone
    epoch) or a cosine from 1 to 0 over the remaining steps.
    """
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "step":
        passed = sum(step >= milestone * steps_per_epoch for milestone in cfg.milestones)
        return cfg.gamma ** passed
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
