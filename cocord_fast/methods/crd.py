"""CRD (Tian et al., ICLR 2020): contrastive representation distillation, METHOD.md section 2.

Loss = loss_cls * CE + loss_crd * CRD (+ loss_kd * KD when loss_kd > 0), with CRD computed on the
pooled features (`forward_features`) of student and frozen teacher, as RepDistiller does with
`feat[-1]`. Each row's negatives are drawn by the method's own `NegativeSampler`
(crd_negatives.py) from the batch's dataset indices.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import Config
from ..data import Batch
from .base import EncoderPasses, StepOutput
from .crd_loss import CRDLoss
from .crd_negatives import NegativeSampler
from .distiller import Distiller


class CRD(Distiller):
    label = "CRD"
    indexes_samples = True  # the memory banks: a row per training sample
    encoder_passes = EncoderPasses(student=1, teacher=1)

    def __init__(self, student: nn.Module, teacher: nn.Module, train_targets: np.ndarray,
                 num_negatives: int, seed: int = 0, embed_dim: int = 128,
                 temperature: float = 0.07, memory_momentum: float = 0.5, loss_cls: float = 1.0,
                 loss_crd: float = 0.8, loss_kd: float = 0.0, kd_temperature: float = 4.0):
        super().__init__(student, teacher)
        # Seeded per (seed, rank, micro-batch): a resumed run draws the same negatives and
        # every rank its own. Its tensors follow the batch's device (no module state).
        self.negatives = NegativeSampler(train_targets, num_negatives, seed,
                                         rank=distributed.rank())
        self.micro_batch = 0  # `begin_micro_batch`'s number
        self.crd = CRDLoss(student.num_features, teacher.num_features, len(train_targets),
                           embed_dim, temperature, memory_momentum)
        self.weight_cls, self.weight_crd, self.weight_kd = loss_cls, loss_crd, loss_kd
        self.kd_temperature = kd_temperature

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> CRD:
        c = cfg.crd
        return cls(student, teacher, train_targets, c.num_negatives, cfg.train.seed,
                   c.embed_dim, c.temperature, c.memory_momentum, c.loss_cls, c.loss_crd,
                   c.loss_kd, c.kd_temperature)

    @classmethod
    def run_label(cls, cfg: Config) -> str:
        return cls.label + "+KD" * (cfg.crd.loss_kd > 0)

    def trainable_module(self) -> nn.Module:
        # The memory banks are buffers refreshed by hand and the teacher is frozen: neither is
        # handed to the optimizer.
        return nn.ModuleList([self.student_encoder, self.crd.student_embed, self.crd.teacher_embed])

    def bank_bytes(self) -> int:
        banks = (self.crd.student_memory, self.crd.teacher_memory)
        return sum(bank.numel() * bank.element_size() for bank in banks)

    def begin_micro_batch(self, number: int) -> None:
        self.micro_batch = number

    def forward(self, batch: Batch) -> StepOutput:
        if batch.index is None:
            raise ValueError("CRD needs batch.index: the dataset index of every row")
        contrast_index = self.negatives.sample(batch.index, self.micro_batch)  # (B, K+1)
        x = batch.views[0]
        features = self.student_encoder.forward_features(x)  # (B, d_s)
        logits = self.student_encoder.forward_head(features)  # (B, classes)
        with torch.no_grad():
            teacher_features = self.teacher_encoder.forward_features(x)  # (B, d_t)
        loss_cls = F.cross_entropy(logits, batch.labels)
        loss_crd = self.crd(features, teacher_features, batch.index, contrast_index,
                            batch.replaced)
        out = StepOutput(self.weight_cls * loss_cls + self.weight_crd * loss_crd,
                         {"loss_cls": loss_cls.detach(), "loss_crd": loss_crd.detach()})
        if self.weight_kd > 0:
            out = self.with_kd(out, logits, teacher_features, self.weight_kd, self.kd_temperature)
        return out
