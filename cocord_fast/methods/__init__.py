"""Training methods: each a module of this package (or of an installed package, through the
entry-point group `cocord_fast.methods`) registered in `plugins.METHODS`."""
from __future__ import annotations

import dataclasses

import numpy as np
import yaml
from torch import nn

from ..config import Config
from ..plugins import METHODS
from .base import EncoderPasses, Method, Recipe, StepOutput


def method_class(name: str) -> type[Method]:
    """The class of `method.name`; its declarations (num_views, needs_teacher, label,
    encoder_passes, ...) are read before anything is built."""
    return METHODS.get(name, "method.name")


def build_method(name: str, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                 train_targets: np.ndarray) -> Method:
    """`train_targets`: (N,) the class of every training sample."""
    return method_class(name).from_config(cfg, student, teacher, train_targets)


def describe_methods() -> str:
    """Every registered method with what it runs and its settings, for `cocord-fast methods`."""
    blocks = []
    for name, method in METHODS.all().items():
        teacher = "needs a teacher" if method.needs_teacher else "no teacher"
        lines = [f"{name} ({method.label}, {method.__module__}): {teacher}, "
                 f"{method.num_views} view(s); per step {method.encoder_passes.name}"]
        if method.settings is None:
            lines.append("  (no settings)")
        for f in dataclasses.fields(method.settings) if method.settings else ():
            default = yaml.safe_dump(f.default, default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            fixed = " [fixed on resume]" if f.name in method.shape_settings else ""
            lines.append(f"  {name}.{f.name}: {default}    # {f.metadata['help']}{fixed}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


__all__ = ["EncoderPasses", "Method", "Recipe", "StepOutput", "build_method", "describe_methods",
           "method_class"]
