"""The small MLPs CoCoRD puts on top of the encoders: projection heads and the predictor.

Both are `Linear -> BatchNorm1d -> ReLU -> Linear` in an `nn.Sequential`, so their parameters
are named `0.*` (first linear), `1.*` (batch norm) and `3.*` (second linear): the same inner
names as the reference implementation's heads, which makes importing its checkpoints a prefix
rename.
"""
from __future__ import annotations

from torch import nn


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """(B, in_dim) -> (B, out_dim) through one batch-normalised hidden layer."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def build_projector(feature_dim: int, hidden_dim: int, embed_dim: int) -> nn.Sequential:
    """f: encoder feature (B, d) -> embedding (B, E)."""
    return build_mlp(feature_dim, hidden_dim, embed_dim)


def build_predictor(embed_dim: int, hidden_dim: int) -> nn.Sequential:
    """h: embedding (B, E) -> prediction (B, E), hidden width P."""
    return build_mlp(embed_dim, hidden_dim, embed_dim)
