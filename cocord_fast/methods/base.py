"""The contract between the training loop and a method (docs/DESIGN.md, "One training step")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..config import Config
from ..data import Batch


@dataclass(frozen=True)
class Recipe:
    """A row of the recipe table (`configs/generate.py` writes a file per row and pair): the
    method's settings, and the published top-1 each file reproduces."""

    prefix: str  # the files' name before the pair: kd, cocord_kd
    title: str  # how the files' first line names the method: "KD (Hinton)"
    label: str  # how its results are named: "KD"
    settings: dict[str, dict[str, Any]]  # config sections on CIFAR-100 (method.name included)
    cifar100_top1: dict[tuple[str, str], float]  # (teacher, student) -> published top-1
    published_in: str  # where those numbers are published
    # (teacher, student) -> sections whose values differ for that pair (DKD's beta).
    pair_settings: dict[tuple[str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    imagenet_settings: dict[str, dict[str, Any]] | None = None  # ImageNet's where they differ
    # (teacher, student) -> the ImageNet result the recipe reproduces, in words.
    imagenet_results: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass
class StepOutput:
    """`loss` carries the graph; `metrics` are detached scalars (each loss term, unweighted)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EncoderPasses:
    """The passes one step of a method makes through its encoders (METHOD.md): what the bench
    times alone as the method's floor."""

    student: int  # forward and backward
    slow_student: int = 0  # forward, no gradient (CoCoRD's momentum copy, training mode)
    teacher: int = 0  # forward, no gradient (eval mode)

    @property
    def total(self) -> int:
        """Passes through an encoder per step, whatever their kind (CoCoRD: 5)."""
        return self.student + self.slow_student + self.teacher

    @property
    def name(self) -> str:
        parts = [f"student fwd+bwd x{self.student}"]
        if self.slow_student:
            parts.append(f"slow student fwd x{self.slow_student}")
        if self.teacher:
            parts.append(f"teacher fwd x{self.teacher}")
        return ", ".join(parts)


class Method(nn.Module):
    """A training method. The loop never branches on which one it runs.

    Declarations read before anything is built: `name` (`method.name`, and the section of its
    `settings`, a dataclass of `config.setting` fields; None: no settings), `shape_settings`
    (the settings that fix the shapes of its checkpointed state: a resume may not change
    them), `num_views` (augmented views per image), `needs_teacher`, `label` (its name in
    tables), `encoder_passes`, `indexes_samples` (its state holds a row per training sample,
    so that a checkpoint cannot continue on a data set of another size) and `recipes` (its
    rows in the recipe table).
    """

    name: str = ""
    settings: type | None = None
    shape_settings: tuple[str, ...] = ()
    recipes: tuple[Recipe, ...] = ()
    num_views: int = 1
    needs_teacher: bool = False
    indexes_samples: bool = False
    label: str = ""
    encoder_passes = EncoderPasses(student=1)

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    train_targets: np.ndarray) -> Method:
        """`train_targets`: (N,) the class of every training sample."""
        raise NotImplementedError

    @classmethod
    def run_label(cls, cfg: Config) -> str:
        """The method's name in tables, with what `cfg` adds to it (e.g. CoCoRD+KD)."""
        return cls.label

    def trainable_module(self) -> nn.Module:
        """The only parameters the optimizer (and any wrapping engine) sees."""
        raise NotImplementedError

    def student(self) -> nn.Module:
        """The online student, for evaluation and export."""
        raise NotImplementedError

    def encoders(self) -> list[nn.Module]:
        """The networks whose forward passes are nearly all of a step (`train.compile`
        compiles these)."""
        return [self.student()]

    def frozen_modules(self) -> list[nn.Module]:
        """Modules neither the optimizer nor a momentum update writes (the teacher): free to
        take a layout the engine cannot give the trainable part."""
        return []

    def begin_epoch(self, epoch: int) -> None:
        """Runs before the first step the run takes in epoch `epoch` (from 0), a resumed run's
        first epoch included."""

    def begin_micro_batch(self, number: int) -> None:
        """Runs before each micro-batch's forward. `number` counts the run's micro-batches
        (step x optim.grad_accum_steps + i), the same after a resume: what a method draws
        from it is drawn again identically."""

    def forward(self, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def on_optimizer_step(self) -> None:
        """Runs right after each optimizer step (momentum updates live here)."""

    def bank_bytes(self) -> int:
        """Memory of the method's banks of past samples (CoCoRD's queue, CRD's memory)."""
        return 0

    def effective_settings(self) -> dict[str, tuple[Any, str]]:
        """Settings this method runs with other values than the config's:
        'section.key' -> (value, why). The loop prints and saves them."""
        return {}
