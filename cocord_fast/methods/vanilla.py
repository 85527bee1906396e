"""Plain cross-entropy training: baseline students, and how teachers are trained."""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data import Batch
from .base import Method, StepOutput


class Vanilla(Method):
    name = "vanilla"
    label = "vanilla"

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student_encoder = student

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> Vanilla:
        return cls(student)

    def trainable_module(self) -> nn.Module:
        return self.student_encoder

    def student(self) -> nn.Module:
        return self.student_encoder

    def forward(self, batch: Batch) -> StepOutput:
        logits = self.student_encoder(batch.views[0])
        loss_cls = F.cross_entropy(logits, batch.labels)
        return StepOutput(loss_cls, {"loss_cls": loss_cls.detach()})
