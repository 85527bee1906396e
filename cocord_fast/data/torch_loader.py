"""The torch data path: sources + recipes -> DataLoaders yielding `Batch`.

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
from .fixed_size_batches import FixedSizeEvalBatches, FixedSizeTrainBatches, as_made
from .sources import CorruptImage, Source, first_readable
from .transforms import Preprocessing, build_recipe


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
        (image, label), used, skipped = first_readable(self.source, index, self.skip_corrupt,
                                                       self.source.load)
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


def build_torch_loaders(cfg: DataConfig, train_source: Source, val_source: Source,
                        preprocessing: Preprocessing, image_size: int, num_views: int, seed: int,
                        device: torch.device, rank: int,
                        world_size: int) -> tuple[TorchTrainLoader, DataLoader]:
    """DataLoaders whose batches are pinned for a CUDA `device`: of a fixed-size source, whole
    batches at once (`fixed_size_batches.py`); of others, image by image through the recipe
    of `transforms.build_recipe`, resizing to `image_size`."""
    workers = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                   pin_memory=device.type == "cuda",
                   worker_init_fn=leave_stop_signals_to_the_trainer)
    if train_source.image_size:
        train_set = FixedSizeTrainBatches(train_source, preprocessing, num_views, seed,
                                          cfg.skip_corrupt)
        val_set = FixedSizeEvalBatches(val_source, preprocessing, cfg.skip_corrupt)
        train_collate = val_collate = as_made
    else:
        recipe = build_recipe(image_size, preprocessing)
        train_set = MultiViewDataset(train_source, recipe.train, num_views, seed, cfg.skip_corrupt)
        val_set = EvalDataset(val_source, recipe.eval, cfg.skip_corrupt)
        train_collate, val_collate = partial(collate, training=True), collate
    sampler = EpochBatchSampler(len(train_source), cfg.batch_size, seed, rank, world_size)
    train = DataLoader(train_set, batch_sampler=sampler, collate_fn=train_collate, **workers)
    val = DataLoader(val_set, collate_fn=val_collate, batch_size=cfg.eval_batch_size,
                     sampler=eval_shards(len(val_source), world_size)[rank], **workers)
    return TorchTrainLoader(train), val
