"""Top-1 / top-5 accuracy of a classifier over a loader of `Batch`es."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .. import distributed
from ..data import Batch


def describe_samples(result: dict[str, float]) -> str:
    """'N images', and the unreadable ones `data.skip_corrupt` left out, if any."""
    left_out = result["skipped_files"]
    return f"{result['num_samples']} images" + (
        f", {left_out} unreadable image{'s' * (left_out != 1)} left out" if left_out else "")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Accuracy over every sample of `loader`; unreadable files it dropped (data.skip_corrupt)
    are counted in `skipped_files`. Under several processes each rank's `loader` holds its
    shard of the evaluation set, and the counts are summed over the ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, device=device)  # (top-1 hits, top-5 hits), summed on the device
    seen = skipped = 0
    for batch in loader:
        skipped += len(batch.skipped)
        batch = batch.to(device, non_blocking=True)
        logits = model(batch.views[0])
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hits = top == batch.labels[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).float()
        seen += len(batch)
        distributed.heartbeat("an evaluation batch")
    model.train(was_training)
    counts = torch.tensor([seen, skipped], dtype=correct.dtype, device=device)
    totals = distributed.all_reduce_sum(torch.cat([correct, counts]))  # (4,)
    top1, top5, seen, skipped = torch.cat(
        [100.0 * totals[:2] / totals[2].clamp(min=1), totals[2:]]).tolist()  # the one host sync
    return {"top1": top1, "top5": top5, "num_samples": int(seen), "skipped_files": int(skipped)}
