"""The contract between the training loop and a method (DESIGN.md, "Data flow of one run")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..config import Config
from ..data import Batch


@dataclass
class StepOutput:
    """`loss` carries the graph; `metrics` are detached scalars (each loss term, unweighted)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A training method. The loop never branches on which one it runs.

    Declarations the loop reads before building anything: `num_views` (augmented views per
    image) and `needs_teacher`.
    """

    num_views: int = 1
    needs_teacher: bool = False

    @classmethod
    def from_config(cls, cfg: Config, student: nn.Module, teacher: nn.Module | None,
                    num_data: int) -> Method:
        raise NotImplementedError

    @classmethod
    def contrast_negatives(cls, cfg: Config) -> int:
        """Negatives per sample the loop must draw into `batch.contrast_index` (CRD); 0: none."""
        return 0

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
