"""Which samples a rank sees in an epoch, and in what order: shared by every data backend.

The order of an epoch is a function of (seed, epoch) alone. Ranks take contiguous, equal
shards of one permutation (DALI's readers shard the same way), each cut to whole batches, so
every rank runs the same number of steps. The remainder of the permutation, fewer than
batch_size x world_size samples, is left out of that epoch; being a different random set each
epoch, no sample is left out systematically.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError


def derived_seed(*keys: int) -> int:
    """A 32-bit seed for the stream named by `keys` (e.g. seed, epoch, index); independent
    streams for different keys, including keys of different lengths. (SeedSequence alone pads
    its entropy with zeros, so (s, e) and (s, e, 0) would name one stream: hence the length.)"""
    return int(np.random.SeedSequence([len(keys), *keys]).generate_state(1)[0])


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    steps = num_samples // (batch_size * world_size)
    if steps == 0:
        raise UserError(f"data.batch_size={batch_size} is larger than the {num_samples} "
                        f"training samples per epoch{' (over all ranks)' * (world_size > 1)}")
    return steps


def epoch_order(num_samples: int, batch_size: int, seed: int, epoch: int,
                world_size: int = 1) -> torch.Tensor:
    """(world_size, steps x batch_size) dataset indices: row r is rank r's shard of the epoch,
    in the order its batches are taken."""
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))
    order = torch.randperm(num_samples, generator=generator)
    return order[:steps * batch_size * world_size].view(world_size, steps * batch_size)


def eval_shards(num_samples: int, world_size: int) -> list[range]:
    """Every evaluation sample once over all ranks: rank r takes the contiguous range
    [n r / R, n (r + 1) / R) (sizes differ by at most one; the counts are summed)."""
    return [range(num_samples * r // world_size, num_samples * (r + 1) // world_size)
            for r in range(world_size)]
