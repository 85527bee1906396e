"""The one thing every data backend yields and every method consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# The memory layout of image batches and conv weights, on every device: cuDNN's convolutions
# ran a bf16 ResNet-18/34 step about 2x faster in it on an H100, and oneDNN's every CIFAR zoo
# model's fp32 step 1.04x (ShuffleV2) to 1.5x (MobileNetV2) faster on 2 CPU cores.
IMAGE_LAYOUT = torch.channels_last


@dataclass
class Batch:
    """A training or evaluation batch.

    views: `num_views` tensors of shape (B, C, H, W): independent augmentations of the same images.
    labels: (B,) class indices. index: (B,) dataset indices.
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
