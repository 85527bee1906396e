"""What every distillation method shares: a frozen teacher that always runs in eval mode."""
from __future__ import annotations

from torch import nn

from .base import Method


class Distiller(Method):
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student_encoder = student
        self.teacher_encoder = teacher.eval().requires_grad_(False)

    def student(self) -> nn.Module:
        return self.student_encoder

    def encoders(self) -> list[nn.Module]:
        return [self.student_encoder, self.teacher_encoder]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.teacher_encoder]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher_encoder.eval()  # BatchNorm keeps the teacher's running statistics
        return self
