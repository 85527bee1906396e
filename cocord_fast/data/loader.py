"""The torch data path: sources + recipes -> DataLoaders yielding `Batch`.

Reproducibility is by construction rather than by RNG bookkeeping: the order of an epoch is a
function of (seed, epoch), and the augmentation of a sample is a function of (seed, epoch,
index). So the number of workers does not change the data, and a run resumed mid-epoch sees
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..errors import UserError
from .batch import Batch
from .demo import ensure_demo_dataset
from .sources import open_source
from .transforms import build_recipe


def derived_seed(*keys: int) -> int:
    """A 32-bit seed for the stream named by `keys` (e.g. seed, epoch, index); independent
    streams for different keys, including keys of different lengths."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class EpochBatchSampler:
    """Yields batches of `(dataset index, epoch)` pairs for one epoch at a time.

    The permutation comes from (seed, epoch); each rank takes every `world_size`-th sample of
    it, and the incomplete last batch is dropped (BatchNorm needs more than one sample, and
    every rank must take the same number of steps). `start(epoch, skip)` picks the epoch and
    how many of its batches were already consumed (resume).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        if len(self) == 0:
            raise UserError(f"data.batch_size={batch_size} is larger than the {num_samples} "
                            f"training samples per epoch{' (over all ranks)' * (world_size > 1)}")

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        mine = order[self.rank:len(self) * self.batch_size * self.world_size:self.world_size]
        for b in range(self.skip, len(self)):
            chunk = mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(i, self.epoch) for i in chunk]


class MultiViewDataset(Dataset):
    """Item `(index, epoch)` -> `num_views` independent augmentations, label, index."""

    def __init__(self, source, transform, num_views: int, seed: int):
        self.source, self.transform = source, transform
        self.num_views, self.seed = num_views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        image, label = self.source.load(index)
        # The transforms draw from torch's global RNG: seed it per sample inside a forked
        # state so the caller's RNG (model init, dropout) is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            views = tuple(self.transform(image) for _ in range(self.num_views))
        return views, label, index


class EvalDataset(Dataset):
    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source.load(index)
        return (self.transform(image),), label, index


def collate(samples: list) -> Batch:
    views, labels, index = zip(*samples)
    return Batch(views=[torch.stack(v) for v in zip(*views)], labels=torch.tensor(labels),
                 index=torch.tensor(index))


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    num_classes: int
    num_train: int
    train_targets: np.ndarray  # (num_train,) class of every training sample

    @property
    def sampler(self) -> EpochBatchSampler:
        return self.train.batch_sampler

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train.batch_sampler)


def resolve_root(cfg: DataConfig) -> Path:
    if cfg.dataset == "demo":
        return ensure_demo_dataset(cfg.root or None)
    if not cfg.root:
        raise UserError(f"data.root is required for data.dataset={cfg.dataset}")
    return Path(cfg.root).expanduser()


def build_loaders(cfg: DataConfig, num_views: int, seed: int, pin_memory: bool = False,
                  rank: int = 0, world_size: int = 1) -> Loaders:
    root = resolve_root(cfg)
    train_source = open_source(cfg.dataset, root, train=True, download=cfg.download)
    val_source = open_source(cfg.dataset, root, train=False, download=cfg.download)
    if getattr(train_source, "classes", None) != getattr(val_source, "classes", None):
        raise UserError(f"the class folders of {root}/train and {root}/val differ")
    recipe = build_recipe(cfg.dataset, cfg.image_size)
    workers = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                   pin_memory=pin_memory, collate_fn=collate)
    train = DataLoader(MultiViewDataset(train_source, recipe.train, num_views, seed),
                       batch_sampler=EpochBatchSampler(len(train_source), cfg.batch_size, seed,
                                                       rank, world_size), **workers)
    val = DataLoader(EvalDataset(val_source, recipe.eval), batch_size=cfg.eval_batch_size,
                     shuffle=False, **workers)
    return Loaders(train, val, train_source.num_classes, len(train_source), train_source.targets)
