"""The one thing every data backend yields and every method consumes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# The memory layout of image batches and conv weights, on every device: cuDNN's and oneDNN's
# convolutions ran every model measured faster in it (README, "Speed").
IMAGE_LAYOUT = torch.channels_last


@dataclass
class Batch:
    """A training or evaluation batch.

    views: `num_views` tensors of shape (B, C, H, W): independent augmentations of the same images.
    labels: (B,) class indices of the images. index: (B,) the dataset indices the rows stand
    for in the epoch's order.
    skipped: unreadable files the loader replaced (training) or dropped (evaluation) in this
    batch, with `data.skip_corrupt=true`. replaced: (B,) bool, training only, True where the
    image (and label) is the next readable file's, standing in for the unreadable file at
    `index`: a row whose memory (CRD's banks) must not learn from that image.
    """

    views: list[Tensor]
    labels: Tensor
    index: Tensor | None = None
    skipped: tuple[str, ...] = ()
    replaced: Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map(Tensor.pin_memory)

    def _map(self, move: Callable[[Tensor], Tensor]) -> Batch:
        def maybe(t: Tensor | None) -> Tensor | None:
            return None if t is None else move(t)

        return Batch([move(v) for v in self.views], move(self.labels), maybe(self.index),
                     self.skipped, maybe(self.replaced))
