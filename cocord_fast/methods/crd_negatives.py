"""CRD's negative sampler: per sample, K dataset indices of other classes, positive first.

RepDistiller (`dataset/cifar100.py`, `CIFAR100InstanceSample`, mode 'exact') draws, for each
sample, its own index followed by K indices from the samples of all other classes, without
replacement. Here the same is done per batch, on the device of the indices, vectorised.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data.order import derived_seed
from ..errors import UserError

# Above this many batch x dataset elements, sample with replacement (see NegativeSampler).
# 2**24 float64 keys are 128 MiB: CIFAR-100 (50,000 samples) stays exact up to batch 335.
EXACT_BUDGET = 2 ** 24

_STREAM = 0x43524400  # keeps these seeds apart from the data order's (seed, epoch) stream


class NegativeSampler:
    """Draws `contrast_index` (B, K+1) for a batch of dataset indices: column 0 is the index
    itself (the positive), columns 1..K are indices of samples of other classes.

    The class of every sample comes from a lookup tensor of the training targets (not from the
    batch labels), so a loader that yields only indices works too.

    Two modes, chosen by the batch's B x n_data against `exact_budget`:
    - exact (CIFAR scale): without replacement, as RepDistiller: each row a uniform K-subset
      of the other-class pool, for B x n_data work and memory. On a GPU each row draws a
      float64 key per dataset sample, same-class samples are masked out, and the K smallest
      keys win. On the CPU numpy's generator draws each row's subset (`choice` without
      replacement, over positions in the pool) and a (B, n_data) mask puts it in order: at
      B 64 of 50,000 samples in 100 classes on 2 cores, 60 ms a call against the keys' 111 ms
      (their draw, topk and sort), a part of CRD's step that its floor does not have.
    - with replacement (ImageNet scale): each negative is uniform over the other-class pool,
      drawn directly rather than by rejection: with the dataset ordered by class, a uniform
      position u in [0, n - n_c) skips class c's block [start_c, start_c + n_c). O(B x K) work,
      O(n) memory, no redraw loop and no host sync. Expected repeats per row are
      K - P(1 - (1 - 1/P)^K) ~ K^2 / 2P for a pool of P: about 105 of K = 16384 for
      ImageNet's ~1.27M-sample pool (METHOD.md accepts this; for CIFAR-100's 49,500 it would
      be ~2,430, hence the exact mode there).

    K larger than the smallest pool (n minus the largest class) is a UserError naming
    `crd.num_negatives`, raised when the sampler is built; RepDistiller instead falls back to
    drawing with replacement for the classes whose pool is too small.

    Reproducible: each call seeds its own generator from (seed, rank, draw), where `draw`
    numbers the micro-batches of the run, so a resumed run draws the same negatives, ranks
    draw independently, and the global RNG is untouched. Streams differ between CPU and CUDA.
    Within a row the negatives are returned in ascending index order (the order does not
    change the loss; a canonical order keeps results independent of topk's internals).
    """

    def __init__(self, targets: np.ndarray | Tensor, num_negatives: int, seed: int,
                 device: torch.device | str | None = None, exact_budget: int = EXACT_BUDGET,
                 rank: int = 0):
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)  # (n,)
        counts = torch.bincount(targets)  # (C,)
        smallest_pool = len(targets) - int(counts.max())
        if num_negatives > smallest_pool:
            raise UserError(f"crd.num_negatives={num_negatives} is larger than the "
                            f"{smallest_pool} training samples outside the largest class; "
                            f"set crd.num_negatives <= {smallest_pool}")
        self.targets, self.num_negatives = targets, num_negatives
        self.seed, self.rank = seed, rank
        self.exact_budget = exact_budget
        # Class-sorted layout for the with-replacement mode.
        self.by_class = torch.argsort(targets, stable=True)  # (n,) dataset indices
        self.class_count = counts  # (C,)
        self.class_start = torch.cumsum(counts, 0) - counts  # (C,)
        self._generator: torch.Generator | None = None

    @property
    def num_data(self) -> int:
        return len(self.targets)

    def with_replacement(self, batch_size: int) -> bool:
        return batch_size * self.num_data > self.exact_budget

    def to(self, device: torch.device | str) -> NegativeSampler:
        for name in ("targets", "by_class", "class_count", "class_start"):
            setattr(self, name, getattr(self, name).to(device))
        self._generator = None
        return self

    def _seeded(self, draw: int) -> torch.Generator:
        device = self.targets.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        # One stream per rank (rank 0's is the single-process stream).
        return self._generator.manual_seed(derived_seed(self.seed, _STREAM + self.rank, draw))

    def sample(self, index: Tensor, draw: int) -> Tensor:
        """(B,) dataset indices -> (B, K+1) int64 contrast indices, drawn on the indices'
        device (the sampler moves there once); `draw` numbers the call (the micro-batch)
        within the run."""
        if index.device != self.targets.device:
            self.to(index.device)
        index = index.long()
        labels = self.targets[index]  # (B,)
        if self.with_replacement(len(index)):
            negatives = self._with_replacement(labels, self._seeded(draw))
        elif index.device.type == "cpu":
            negatives = self._exact_on_the_host(labels, draw)
        else:
            negatives = self._exact(labels, self._seeded(draw))
        return torch.cat([index[:, None], negatives], dim=1)  # (B, K+1)

    def _exact_on_the_host(self, labels: Tensor, draw: int) -> Tensor:
        rng = np.random.default_rng(derived_seed(self.seed, _STREAM + self.rank, draw))
        by_class = self.by_class.numpy()
        chosen = np.zeros((len(labels), self.num_data), dtype=bool)  # (B, n)
        for row, (count, start) in enumerate(zip(self.class_count[labels].tolist(),
                                                 self.class_start[labels].tolist())):
            position = rng.choice(self.num_data - count, self.num_negatives, replace=False,
                                  shuffle=False)  # (K,) distinct positions in the pool
            position += (position >= start) * count  # skip the row's class block
            chosen[row, by_class[position]] = True
        return torch.from_numpy(np.nonzero(chosen)[1].reshape(len(labels), -1))  # ascending

    def _exact(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        keys = torch.rand((len(labels), self.num_data), generator=generator,
                          device=labels.device, dtype=torch.float64)  # (B, n)
        # float64 keys: ties (which topk would break by position) are practically impossible.
        keys.masked_fill_(self.targets[None, :] == labels[:, None], 2.0)  # same class: never picked
        chosen = keys.topk(self.num_negatives, dim=1, largest=False, sorted=False).indices
        return chosen.sort(dim=1).values  # (B, K)

    def _with_replacement(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        count = self.class_count[labels][:, None]  # (B, 1)
        start = self.class_start[labels][:, None]  # (B, 1)
        # Uniform over [0, n - n_c): the modulo bias of a 62-bit draw is below 2**-40.
        raw = torch.randint(0, 2 ** 62, (len(labels), self.num_negatives), generator=generator,
                            device=labels.device)  # (B, K)
        position = raw % (self.num_data - count)  # (B, K) position in the other-class pool
        position = position + (position >= start) * count  # skip class c's block
        return self.by_class[position].sort(dim=1).values  # (B, K)
