"""The torchvision data path: sources + recipes -> DataLoaders yielding `Batch`.

Reproducibility is by construction rather than by RNG bookkeeping: the order of an epoch is a
function of (seed, epoch) (`order.epoch_order`), and the augmentation of a sample is a function
of (seed, epoch, index). So the number of workers does not change the data, and a run resumed
mid-epoch sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import signal
from functools import partial
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .batch import IMAGE_LAYOUT, Batch
from .order import derived_seed, epoch_order, eval_shards, steps_per_epoch
from .sources import CorruptImage
from .transforms import Recipe

# A run of this many unreadable files in a row is not a few bad files but a broken data set.
MAX_CONSECUTIVE_CORRUPT = 100


class EpochBatchSampler:
    """Yields this rank's batches of `(dataset index, epoch)` pairs for one epoch at a time.

    `start(epoch, skip)` picks the epoch and how many of its batches were already consumed
    (resume).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps = steps_per_epoch(num_samples, batch_size, world_size)
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = epoch_order(self.num_samples, self.batch_size, self.seed, self.epoch,
                           self.world_size)[self.rank]
        for b in range(self.skip, self.steps):
            chunk = mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(i, self.epoch) for i in chunk]


def load_or_substitute(source, index: int, skip_corrupt: bool) -> tuple[object, int, int, list[str]]:
    """(image, label, index of the image, skipped files): with `skip_corrupt`, an unreadable
    sample is replaced by the next readable one in dataset order, so batches keep their size
    (every rank must run the same steps, and BatchNorm and the queue expect full batches)."""
    skipped: list[str] = []
    for offset in range(MAX_CONSECUTIVE_CORRUPT):
        candidate = (index + offset) % len(source)
        try:
            image, label = source.load(candidate)
            return image, label, candidate, skipped
        except CorruptImage as err:
            if not skip_corrupt:
                raise
            skipped.append(str(err.path))
    raise CorruptImage(source.where(index), f"it and the next {MAX_CONSECUTIVE_CORRUPT - 1} "
                                            f"files in dataset order are all unreadable")


class Sample(NamedTuple):
    views: tuple[torch.Tensor, ...] | None  # None: an unreadable evaluation file, dropped
    label: int | None
    index: int  # the dataset index the sample stands for
    skipped: list[str]
    replaced: bool = False  # the image and label are a substitute's (training)


class MultiViewDataset(Dataset):
    """Item `(index, epoch)` -> a `Sample` of `num_views` independent augmentations."""

    def __init__(self, source, transform, num_views: int, seed: int, skip_corrupt: bool = False):
        self.source, self.transform = source, transform
        self.num_views, self.seed, self.skip_corrupt = num_views, seed, skip_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> Sample:
        index, epoch = item
        image, label, used, skipped = load_or_substitute(self.source, index, self.skip_corrupt)
        # The transforms draw from torch's global RNG: seed it per sample inside a forked
        # state so the caller's RNG (model init, dropout) is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, used))
            views = tuple(self.transform(image) for _ in range(self.num_views))
        return Sample(views, label, index, skipped, replaced=used != index)


class EvalDataset(Dataset):
    """Item index -> one view; with `skip_corrupt`, an unreadable file gives None (dropped by
    `collate`: substituting would count another image twice in the accuracy)."""

    def __init__(self, source, transform, skip_corrupt: bool = False):
        self.source, self.transform, self.skip_corrupt = source, transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Sample:
        try:
            image, label = self.source.load(index)
        except CorruptImage as err:
            if not self.skip_corrupt:
                raise
            return Sample(None, None, index, [str(err.path)])
        return Sample((self.transform(image),), label, index, [])


def collate(samples: list[Sample], training: bool = False) -> Batch:
    """Samples -> a Batch whose views are laid out as `IMAGE_LAYOUT`, here in the worker so
    that pinning and the copy to the device keep it."""
    skipped = tuple(path for sample in samples for path in sample.skipped)
    kept = [sample for sample in samples if sample.views is not None]
    return Batch(views=[torch.stack(v).contiguous(memory_format=IMAGE_LAYOUT)
                        for v in zip(*[sample.views for sample in kept])],
                 labels=torch.tensor([sample.label for sample in kept]),
                 index=torch.tensor([sample.index for sample in kept]), skipped=skipped,
                 replaced=(torch.tensor([sample.replaced for sample in kept]) if training
                           else None))


class TorchTrainLoader:
    """The training side of the `TrainLoader` contract (see `build.py`) over a DataLoader.
    (epoch, skip) determine the data exactly, so there is no further state."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def start(self, epoch: int, skip: int = 0) -> None:
        self.loader.batch_sampler.start(epoch, skip)

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A scheduler signals every process of the job; a worker killed by it would fail the
    step the trainer is finishing before it saves and stops (`train.stop_signals`)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def build_torch_loaders(cfg: DataConfig, train_source, val_source, recipe: Recipe,
                        num_views: int, seed: int, device: torch.device, rank: int,
                        world_size: int) -> tuple[TorchTrainLoader, DataLoader]:
    """DataLoaders whose batches are pinned for a CUDA `device`."""
    workers = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                   pin_memory=device.type == "cuda",
                   worker_init_fn=leave_stop_signals_to_the_trainer)
    sampler = EpochBatchSampler(len(train_source), cfg.batch_size, seed, rank, world_size)
    train = DataLoader(MultiViewDataset(train_source, recipe.train, num_views, seed,
                                        cfg.skip_corrupt), batch_sampler=sampler,
                       collate_fn=partial(collate, training=True), **workers)
    val = DataLoader(EvalDataset(val_source, recipe.eval, cfg.skip_corrupt), collate_fn=collate,
                     batch_size=cfg.eval_batch_size,
                     sampler=eval_shards(len(val_source), world_size)[rank], **workers)
    return TorchTrainLoader(train), val
