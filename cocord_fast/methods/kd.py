"""Knowledge distillation (Hinton et al.): cross-entropy plus KL to the teacher's soft labels."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data import Batch
from .base import EncoderPasses, StepOutput
from .distiller import Distiller
from .losses import kd_loss


class KD(Distiller):
    label = "KD"
    encoder_passes = EncoderPasses(student=1, teacher=1)

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float,
                 loss_cls: float, loss_kd: float):
        super().__init__(student, teacher)
        self.temperature, self.weight_cls, self.weight_kd = temperature, loss_cls, loss_kd

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> KD:
        return cls(student, teacher, cfg.kd.temperature, cfg.kd.loss_cls, cfg.kd.loss_kd)

    def trainable_module(self) -> nn.Module:
        return self.student_encoder

    def forward(self, batch: Batch) -> StepOutput:
        x = batch.views[0]
        logits = self.student_encoder(x)
        with torch.no_grad():
            teacher_logits = self.teacher_encoder(x)
        loss_cls = F.cross_entropy(logits, batch.labels)
        loss_kd = kd_loss(logits, teacher_logits, self.temperature)
        loss = self.weight_cls * loss_cls + self.weight_kd * loss_kd
        return StepOutput(loss, {"loss_cls": loss_cls.detach(), "loss_kd": loss_kd.detach()})
