"""Momentum (EMA) updates of parameter copies, all pairs in one multi-tensor operation.

`momentum_update_` is the single dispatch point a fused kernel can replace later.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def momentum_update_(targets: Sequence[Tensor], sources: Sequence[Tensor],
                     momenta: Sequence[float]) -> None:
    """targets[i] <- momenta[i] * targets[i] + (1 - momenta[i]) * sources[i], in place.

    One `_foreach_lerp_` over every pair: its per-tensor scalar-weight overload (ScalarList,
    present in torch 2.14) lets pairs with different momenta share the call, so there is no
    Python loop over parameters and no grouping by momentum. lerp(t, s, w) = t + w * (s - t)
    with w = 1 - m: momentum 0 gives an exact copy and momentum 1 leaves the target exactly as
    it is (torch's lerp is exact at both ends).
    """
    if not (len(targets) == len(sources) == len(momenta)):
        raise ValueError(f"momentum_update_: {len(targets)} targets, {len(sources)} sources, "
                         f"{len(momenta)} momenta")
    if not targets:
        return
    torch._foreach_lerp_(list(targets), list(sources), [1.0 - float(m) for m in momenta])
