"""A package of its own that adds a method and a data source to cocord_fast through entry
points (pyproject.toml beside it), without a line inside cocord_fast: the README's example.

`logit_mse` trains the student on cross-entropy plus the mean squared distance of its logits to
the teacher's (Ba and Caruana, 2014); it counts the images it has seen in a buffer, which a
checkpoint keeps. `memory` is a data set held in memory: ten classes of 16x16 images, each
class a colour, drawn from a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cocord_fast.config import setting
from cocord_fast.data.sources import Source
from cocord_fast.methods import EncoderPasses, StepOutput
from cocord_fast.methods.distiller import Distiller


@dataclass
class LogitMSESettings:
    weight: float = setting(1.0, "weight of the squared logit distance", min=0.0)


class LogitMSE(Distiller):
    name = "logit_mse"
    settings = LogitMSESettings
    label = "logit MSE"
    encoder_passes = EncoderPasses(student=1, teacher=1)

    def __init__(self, student, teacher, weight: float):
        super().__init__(student, teacher)
        self.weight = weight
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg, student, teacher, train_targets):
        return cls(student, teacher, cfg.logit_mse.weight)

    def forward(self, batch):
        x = batch.views[0]
        logits = self.student_encoder(x)
        with torch.no_grad():
            teacher_logits = self.teacher_encoder(x)
            self.images_seen += len(x)
        loss_cls = F.cross_entropy(logits, batch.labels)
        loss_mse = F.mse_loss(logits, teacher_logits.to(logits.dtype))
        return StepOutput(loss_cls + self.weight * loss_mse,
                          {"loss_cls": loss_cls.detach(), "loss_mse": loss_mse.detach()})


class InMemory(Source):
    """Ten classes of 16x16 images held in memory, each class a colour with noise."""

    name = "memory"
    image_size = 16
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    needs_root = False
    encoded = False
    SPLITS = {True: 20, False: 5}  # images per class

    @classmethod
    def open(cls, root: Path, train: bool, download: bool = False) -> InMemory:
        return cls(train)

    @classmethod
    def default_root(cls) -> Path:
        return Path(".")

    def __init__(self, train: bool):
        rng = np.random.default_rng(0 if train else 1)
        per_class = self.SPLITS[train]
        self.targets = np.repeat(np.arange(10), per_class).astype(np.int64)
        colours = np.linspace(0, 255, 30).reshape(10, 3)[self.targets]  # (N, 3)
        noise = rng.normal(0, 30, (len(self.targets), 16, 16, 3))
        self.images = np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8)
        self.classes = [f"colour_{i}" for i in range(10)]
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.targets)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]

    def fingerprint_bytes(self, start: int, end: int) -> bytes:
        return self.images[start:end].tobytes() + self.targets[start:end].tobytes()
