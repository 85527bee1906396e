"""Training methods, built by name from a plain registry."""
from __future__ import annotations

from torch import nn

from ..config import Config
from ..errors import UserError
from .base import Method, StepOutput
from .cocord import CoCoRD
from .crd import CRD
from .kd import KD
from .vanilla import Vanilla

# Name -> Method subclass; its class attributes (num_views, needs_teacher) are read
# before anything is built, and `from_config` builds it.
METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "kd": KD,
    "cocord": CoCoRD,
    "crd": CRD,
}


def build_method(name: str, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                 num_data: int) -> Method:
    if name not in METHODS:
        raise UserError(f"method.name: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name].from_config(cfg, student, teacher, num_data)


__all__ = ["METHODS", "Method", "StepOutput", "build_method"]
