"""DKD (Zhao et al., CVPR 2022): KD decoupled into a target-class term and a non-target-class
term, weighed alpha and beta, as mdistiller's `mdistiller/distillers/DKD.py` (METHOD.md).

TCKD is the KL divergence between teacher and student of the binary distribution (target
class, every other class); NCKD is the KL divergence of the distribution among the non-target
classes alone. Both are scaled by T^2 and averaged over the batch; the two terms grow linearly
over the first `warmup_epochs` epochs (epoch e, counted from 1, weighs min(e / warm-up, 1)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, setting
from ..data import Batch
from .base import EncoderPasses, Recipe, StepOutput
from .distiller import Distiller


@dataclass
class DKDSettings:
    """mdistiller's CIFAR-100 defaults (`mdistiller/engine/cfg.py`)."""

    temperature: float = setting(4.0, "softmax temperature T (both terms are scaled by T^2)",
                                 min=1e-6)
    alpha: float = setting(1.0, "weight of TCKD, the target-class term", min=0.0)
    beta: float = setting(8.0, "weight of NCKD, the non-target-class term", min=0.0)
    loss_cls: float = setting(1.0, "weight of the cross-entropy term", min=0.0)
    warmup_epochs: int = setting(20, "the distillation terms grow linearly over this many "
                                     "epochs (mdistiller's WARMUP); 0: full weight at once", min=0)


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
              temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each T^2 x a KL divergence averaged over the batch. Logits (B, C),
    labels (B,)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits: fp32 sums
    s, t = (x.to(dtype) / temperature for x in (student_logits, teacher_logits))
    target = F.one_hot(labels, s.shape[1]).bool()  # (B, C)
    batch, classes = s.shape

    def binary_log_probs(z: Tensor) -> Tensor:  # (B, 2): log p(target), log p(any other)
        total = z.logsumexp(1)
        others = z[~target].view(batch, classes - 1).logsumexp(1)
        return torch.stack([z[target] - total, others - total], dim=1)

    def non_target_log_probs(z: Tensor) -> Tensor:  # (B, C-1): softmax over the others alone
        return F.log_softmax(z[~target].view(batch, classes - 1), dim=1)

    def kl(log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)

    scale = temperature ** 2
    return (scale * kl(binary_log_probs(s), binary_log_probs(t)),
            scale * kl(non_target_log_probs(s), non_target_log_probs(t)))


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """mdistiller's min(epoch / WARMUP, 1), its epochs counted from 1 (`epoch` from 0)."""
    return 1.0 if warmup_epochs == 0 else min((epoch + 1) / warmup_epochs, 1.0)


RECIPE = Recipe(
    "dkd", "DKD (decoupled KD)", "DKD",
    {"method": {"name": "dkd"},
     "dkd": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "loss_cls": 1.0, "warmup_epochs": 20}},
    {("wrn_40_2", "wrn_16_2"): 76.23, ("wrn_40_2", "wrn_40_1"): 74.81,
     ("resnet56", "resnet20"): 71.97, ("resnet110", "resnet32"): 74.11,
     ("resnet32x4", "resnet8x4"): 76.32, ("vgg13", "vgg8"): 74.68,
     ("vgg13", "MobileNetV2"): 69.71, ("ResNet50", "MobileNetV2"): 70.35,
     ("resnet32x4", "ShuffleV1"): 76.45, ("resnet32x4", "ShuffleV2"): 77.07,
     ("wrn_40_2", "ShuffleV1"): 76.70},
    "DKD, CVPR 2022, as mdistiller's README; beta per pair as its configs/cifar100/dkd/",
    # resnet110 -> resnet20 has no config there: beta 2, as its other resnet pairs (METHOD.md).
    pair_settings={pair: {"dkd": {"beta": beta}} for pair, beta in {
        ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
        ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
        ("resnet110", "resnet20"): 2.0, ("vgg13", "vgg8"): 6.0,
        ("vgg13", "MobileNetV2"): 6.0}.items()},
    imagenet_settings={"dkd": {"temperature": 1.0, "alpha": 1.0, "beta": 0.5, "loss_cls": 1.0,
                               "warmup_epochs": 1}},
    imagenet_results={("resnet34", "resnet18"): "DKD's 71.70 top-1 (mdistiller's README; "
                                                "configs/imagenet/r34_r18/dkd.yaml)"})


class DKD(Distiller):
    name = "dkd"
    settings = DKDSettings
    recipes = (RECIPE,)
    label = "DKD"
    encoder_passes = EncoderPasses(student=1, teacher=1)

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: DKDSettings):
        super().__init__(student, teacher)
        self.config = settings
        self.warmup = 1.0  # `begin_epoch` sets it

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> DKD:
        return cls(student, teacher, cfg.dkd)

    def begin_epoch(self, epoch: int) -> None:
        self.warmup = warmup_factor(epoch, self.config.warmup_epochs)

    def forward(self, batch: Batch) -> StepOutput:
        c = self.config
        x = batch.views[0]
        logits = self.student_encoder(x)
        with torch.no_grad():
            teacher_logits = self.teacher_encoder(x)
        loss_cls = F.cross_entropy(logits, batch.labels)
        tckd, nckd = dkd_terms(logits, teacher_logits, batch.labels, c.temperature)
        loss = c.loss_cls * loss_cls + self.warmup * (c.alpha * tckd + c.beta * nckd)
        return StepOutput(loss, {"loss_cls": loss_cls.detach(), "loss_tckd": tckd.detach(),
                                 "loss_nckd": nckd.detach()})
