"""The one thing every data backend yields and every method consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def image_layout(device: torch.device) -> torch.memory_format:
    """The memory layout of image batches and conv weights on `device`: channels-last on CUDA,
    where cuDNN's convolutions run about 2x faster in it (a bf16 ResNet-18/34 step on an H100);
    the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


@dataclass
class Batch:
    """A training or evaluation batch.

    views: `num_views` tensors of shape (B, C, H, W): independent augmentations of the same images.
    labels: (B,) class indices. index: (B,) dataset indices (methods that declare `needs_index`).
    contrast_index: (B, K+1) CRD's positive-then-negative dataset indices, when the loader samples them.
    skipped: unreadable files the loader replaced (training) or dropped (evaluation) in this
    batch, with `data.skip_corrupt=true`.
    """

    views: list[Tensor]
    labels: Tensor
    index: Tensor | None = None
    contrast_index: Tensor | None = None
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch([v.to(device, non_blocking=non_blocking) for v in self.views],
                     move(self.labels), move(self.index), move(self.contrast_index), self.skipped)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return Batch([v.pin_memory() for v in self.views], pin(self.labels), pin(self.index),
                     pin(self.contrast_index), self.skipped)
