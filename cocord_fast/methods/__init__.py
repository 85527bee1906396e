"""Training methods, built by name from a plain registry."""
from __future__ import annotations

import numpy as np
from torch import nn

from ..config import Config
from ..errors import UserError
from .base import EncoderPasses, Method, StepOutput
from .cocord import CoCoRD
from .crd import CRD
from .kd import KD
from .vanilla import Vanilla

# Name -> Method subclass; its class attributes (num_views, needs_teacher, label,
# encoder_passes) are read before anything is built, and `from_config` builds it. A new
# method is a module of this package and a line here.
METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "kd": KD,
    "cocord": CoCoRD,
    "crd": CRD,
}


def build_method(name: str, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                 train_targets: np.ndarray) -> Method:
    """`train_targets`: (N,) the class of every training sample."""
    if name not in METHODS:
        raise UserError(f"method.name: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name].from_config(cfg, student, teacher, train_targets)


__all__ = ["METHODS", "EncoderPasses", "Method", "StepOutput", "build_method"]
