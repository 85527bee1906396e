"""What every distillation method shares: a frozen teacher that always runs in eval mode, and
the KD term on its logits."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Method, StepOutput
from .losses import kd_loss


class Distiller(Method):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student_encoder = student
        self.teacher_encoder = teacher.eval().requires_grad_(False)

    def student(self) -> nn.Module:
        return self.student_encoder

    def trainable_module(self) -> nn.Module:
        """The student alone; a method that trains heads of its own returns them with it."""
        return self.student_encoder

    def encoders(self) -> list[nn.Module]:
        return [self.student_encoder, self.teacher_encoder]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher_encoder]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher_encoder.eval()  # BatchNorm keeps the teacher's running statistics
        return self

    def with_kd(self, out: StepOutput, logits: Tensor, teacher_features: Tensor, weight: float,
                temperature: float) -> StepOutput:
        """`out` plus `weight` x the KD term between the student's `logits` and the teacher's
        logits on its pooled `teacher_features` (of the same images)."""
        with torch.no_grad():
            teacher_logits = self.teacher_encoder.forward_head(teacher_features)
        loss_kd = kd_loss(logits, teacher_logits, temperature)
        return StepOutput(out.loss + weight * loss_kd, {**out.metrics, "loss_kd": loss_kd.detach()})
