"""Knowledge distillation (Hinton et al.): cross-entropy plus KL to the teacher's soft labels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, setting
from ..data import Batch
from .base import EncoderPasses, Recipe, StepOutput
from .distiller import Distiller
from .losses import kd_loss


@dataclass
class KDSettings:
    """Hinton KD; RepDistiller's recipe weighs 0.1 CE + 0.9 KD."""

    temperature: float = setting(4.0, "softmax temperature T (the loss is scaled by T^2)",
                                 min=1e-6)
    loss_cls: float = setting(0.1, "weight of the cross-entropy term", min=0.0)
    loss_kd: float = setting(0.9, "weight of the KD term", min=0.0)


RECIPE = Recipe(
    "kd", "KD (Hinton)", "KD",
    {"method": {"name": "kd"}, "kd": {"temperature": 4.0, "loss_cls": 0.1, "loss_kd": 0.9}},
    {("wrn_40_2", "wrn_16_2"): 74.92, ("wrn_40_2", "wrn_40_1"): 73.54,
     ("resnet56", "resnet20"): 70.66, ("resnet110", "resnet20"): 70.67,
     ("resnet110", "resnet32"): 73.08, ("resnet32x4", "resnet8x4"): 73.33,
     ("vgg13", "vgg8"): 72.98, ("vgg13", "MobileNetV2"): 67.37,
     ("ResNet50", "MobileNetV2"): 67.35, ("ResNet50", "vgg8"): 73.81,
     ("resnet32x4", "ShuffleV1"): 74.07, ("resnet32x4", "ShuffleV2"): 74.45,
     ("wrn_40_2", "ShuffleV1"): 74.83},
    "METHOD.md section 5",
    imagenet_results={("resnet34", "resnet18"): "KD's 70.66 top-1 (CRD, ICLR 2020, Table 4)"})


class KD(Distiller):
    name = "kd"
    settings = KDSettings
    recipes = (RECIPE,)
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

    def forward(self, batch: Batch) -> StepOutput:
        x = batch.views[0]
        logits = self.student_encoder(x)
        with torch.no_grad():
            teacher_logits = self.teacher_encoder(x)
        loss_cls = F.cross_entropy(logits, batch.labels)
        loss_kd = kd_loss(logits, teacher_logits, self.temperature)
        loss = self.weight_cls * loss_cls + self.weight_kd * loss_kd
        return StepOutput(loss, {"loss_cls": loss_cls.detach(), "loss_kd": loss_kd.detach()})
