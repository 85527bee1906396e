"""The interface every model in the zoo implements.

A model is ``forward_head(forward_features(x))``: ``forward_features`` returns the pooled,
flattened feature vector that feeds the final linear layer, whose width is ``num_features``.
Distillation code that needs the feature width reads ``model.num_features``, never the
architecture name.
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Base class: subclasses set ``num_features`` and implement the two halves."""

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling to (B, C).

    RepDistiller pools with fixed kernels sized for 32x32 inputs (e.g. ``AvgPool2d(8)``), which
    cover the whole final map there; a global mean gives the same result at 32x32 and keeps
    the models usable at other input sizes.
    """
    return x.mean(dim=(2, 3))
