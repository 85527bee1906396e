"""CRD (Tian et al., ICLR 2020): contrastive representation distillation, METHOD.md section 2.

Loss = loss_cls * CE + loss_crd * CRD (+ loss_kd * KD when loss_kd > 0), with CRD computed on the
pooled features (`forward_features`) of student and frozen teacher, as RepDistiller does with
`feat[-1]`. The negatives come in `batch.contrast_index`, which the training loop fills from a
`NegativeSampler` (data/contrast.py) because this class declares `contrast_negatives`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data import Batch
from .base import StepOutput
from .crd_loss import CRDLoss
from .distiller import Distiller
from .losses import kd_loss


class CRD(Distiller):
    def __init__(self, student: nn.Module, teacher: nn.Module, num_data: int,
                 embed_dim: int = 128, temperature: float = 0.07, memory_momentum: float = 0.5,
                 loss_cls: float = 1.0, loss_crd: float = 0.8, loss_kd: float = 0.0,
                 kd_temperature: float = 4.0):
        super().__init__(student, teacher)
        self.crd = CRDLoss(student.num_features, teacher.num_features, num_data, embed_dim,
                           temperature, memory_momentum)
        self.weight_cls, self.weight_crd, self.weight_kd = loss_cls, loss_crd, loss_kd
        self.kd_temperature = kd_temperature

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    num_data: int) -> CRD:
        c = cfg.crd
        return cls(student, teacher, num_data, c.embed_dim, c.temperature, c.memory_momentum,
                   c.loss_cls, c.loss_crd, c.loss_kd, c.kd_temperature)

    @classmethod
    def contrast_negatives(cls, cfg: Config) -> int:
        return cfg.crd.num_negatives

    def trainable_module(self) -> nn.Module:
        # The memory banks are buffers refreshed by hand and the teacher is frozen: neither is
        # handed to the optimizer.
        return nn.ModuleList([self.student_encoder, self.crd.student_embed, self.crd.teacher_embed])

    def bank_bytes(self) -> int:
        banks = (self.crd.student_memory, self.crd.teacher_memory)
        return sum(bank.numel() * bank.element_size() for bank in banks)

    def forward(self, batch: Batch) -> StepOutput:
        if batch.index is None or batch.contrast_index is None:
            raise ValueError("CRD needs batch.index and batch.contrast_index (the training loop "
                             "fills contrast_index from the method's contrast_negatives)")
        x = batch.views[0]
        features = self.student_encoder.forward_features(x)  # (B, d_s)
        logits = self.student_encoder.forward_head(features)  # (B, classes)
        with torch.no_grad():
            teacher_features = self.teacher_encoder.forward_features(x)  # (B, d_t)
        loss_cls = F.cross_entropy(logits, batch.labels)
        loss_crd = self.crd(features, teacher_features, batch.index, batch.contrast_index,
                            batch.replaced)
        loss = self.weight_cls * loss_cls + self.weight_crd * loss_crd
        metrics = {"loss_cls": loss_cls.detach(), "loss_crd": loss_crd.detach()}
        if self.weight_kd > 0:
            with torch.no_grad():
                teacher_logits = self.teacher_encoder.forward_head(teacher_features)
            loss_kd = kd_loss(logits, teacher_logits, self.kd_temperature)
            loss = loss + self.weight_kd * loss_kd
            metrics["loss_kd"] = loss_kd.detach()
        return StepOutput(loss, metrics)
