"""CRD (Tian et al., ICLR 2020): contrastive representation distillation, METHOD.md section 2.

Loss = loss_cls * CE + loss_crd * CRD (+ loss_kd * KD when loss_kd > 0), with CRD computed on the
pooled features (`forward_features`) of student and frozen teacher, as RepDistiller does with
`feat[-1]`. Each row's negatives are drawn by the method's own `NegativeSampler`
(crd_negatives.py) from the batch's dataset indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import Config, setting
from ..data import Batch
from .base import EncoderPasses, Recipe, StepOutput
from .crd_loss import CRDLoss
from .crd_negatives import NegativeSampler
from .distiller import Distiller


@dataclass
class CRDSettings:
    """CRD (Tian et al., ICLR 2020), METHOD.md section 2."""

    embed_dim: int = setting(128, "dimension of both embedding heads and memory banks", min=1)
    num_negatives: int = setting(16384, "negatives K drawn per sample from other classes", min=1)
    temperature: float = setting(0.07, "temperature of the exponential scores", min=1e-6)
    memory_momentum: float = setting(0.5, "memory-bank refresh: row <- m*row + (1-m)*embedding",
                                     min=0.0, max=1.0)
    loss_cls: float = setting(1.0, "weight of the cross-entropy term", min=0.0)
    loss_crd: float = setting(0.8, "weight of the CRD term", min=0.0)
    loss_kd: float = setting(0.0, "weight of the KD term (CRD+KD: 1.0)", min=0.0)
    kd_temperature: float = setting(4.0, "temperature of the KD term", min=1e-6)


RECIPE = Recipe(
    "crd", "CRD", "CRD",
    {"method": {"name": "crd"}, "crd": {"loss_cls": 1.0, "loss_crd": 0.8, "loss_kd": 0.0}},
    {("wrn_40_2", "wrn_16_2"): 75.48, ("wrn_40_2", "wrn_40_1"): 74.14,
     ("resnet56", "resnet20"): 71.16, ("resnet110", "resnet20"): 71.46,
     ("resnet110", "resnet32"): 73.48, ("resnet32x4", "resnet8x4"): 75.51,
     ("vgg13", "vgg8"): 73.94, ("vgg13", "MobileNetV2"): 69.73,
     ("ResNet50", "MobileNetV2"): 69.11, ("ResNet50", "vgg8"): 74.30,
     ("resnet32x4", "ShuffleV1"): 75.11, ("resnet32x4", "ShuffleV2"): 75.65,
     ("wrn_40_2", "ShuffleV1"): 76.05},
    "METHOD.md section 5",
    imagenet_results={("resnet34", "resnet18"): "CRD's 71.17 top-1 (71.38 with KD: CRD, ICLR "
                                                "2020, Table 4)"})


class CRD(Distiller):
    name = "crd"
    settings = CRDSettings
    shape_settings = ("embed_dim",)
    recipes = (RECIPE,)
    label = "CRD"
    indexes_samples = True  # the memory banks: a row per training sample
    encoder_passes = EncoderPasses(student=1, teacher=1)

    def __init__(self, student: nn.Module, teacher: nn.Module, train_targets: np.ndarray,
                 num_negatives: int, seed: int = 0, embed_dim: int = 128,
                 temperature: float = 0.07, memory_momentum: float = 0.5, loss_cls: float = 1.0,
                 loss_crd: float = 0.8, loss_kd: float = 0.0, kd_temperature: float = 4.0,
                 kernels: str = "auto"):
        super().__init__(student, teacher)
        # Seeded per (seed, rank, micro-batch): a resumed run draws the same negatives and
        # every rank its own. Its tensors follow the batch's device (no module state).
        self.negatives = NegativeSampler(train_targets, num_negatives, seed,
                                         rank=distributed.rank())
        self.micro_batch = 0  # `begin_micro_batch`'s number
        self.crd = CRDLoss(student.num_features, teacher.num_features, len(train_targets),
                           embed_dim, temperature, memory_momentum, kernels)
        self.weight_cls, self.weight_crd, self.weight_kd = loss_cls, loss_crd, loss_kd
        self.kd_temperature = kd_temperature

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> CRD:
        c = cfg.crd
        return cls(student, teacher, train_targets, c.num_negatives, cfg.train.seed,
                   c.embed_dim, c.temperature, c.memory_momentum, c.loss_cls, c.loss_crd,
                   c.loss_kd, c.kd_temperature, cfg.train.kernels)

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

    def on_optimizer_step(self) -> None:
        self.crd.refresh_banks_()  # the last micro-batch's rows, its backward done

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
