"""The contract between the training loop and a method (docs/DESIGN.md, "One training step")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..config import Config
from ..data import Batch


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
    def name(self) -> str:
        parts = [f"student fwd+bwd x{self.student}"]
        if self.slow_student:
            parts.append(f"slow student fwd x{self.slow_student}")
        if self.teacher:
            parts.append(f"teacher fwd x{self.teacher}")
        return ", ".join(parts)


class Method(nn.Module):
    """A training method. The loop never branches on which one it runs.

    Declarations read before anything is built: `num_views` (augmented views per image),
    `needs_teacher`, `label` (its name in tables), `encoder_passes`, and `indexes_samples`
    (its state holds a row per training sample, so that a checkpoint cannot continue on a
    data set of another size).
    """

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
