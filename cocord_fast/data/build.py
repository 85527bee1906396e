"""One entry point for every data backend: `build_loaders(cfg, ...) -> Loaders`.

Both backends give a training loader with the same contract (`TrainLoader`) and an evaluation
iterable, both yielding `Batch`; the loop and the methods cannot tell which one fed them.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from ..plugins import SOURCES
from ..turns import in_turns
from .batch import Batch
from .imagefolder import ImageFolder
from .sources import Source, open_source, source_kind
from .tar_shards import TarShards
from .transforms import Preprocessing, image_size_of, refuse_resizing_small_images


class TrainLoader(Protocol):
    """Both backends' batches, random views included, are a function of (seed, epoch, rank,
    position): a resumed run needs nothing but its step to see what an uninterrupted one
    would have."""

    def start(self, epoch: int, skip: int = 0) -> None:
        """Selects the epoch the next iteration yields, minus its first `skip` batches."""

    def __len__(self) -> int:
        """Batches (steps) per epoch, equal on every rank."""

    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class Loaders:
    train: TrainLoader
    val: Iterable[Batch]
    num_classes: int
    num_train: int
    train_targets: np.ndarray  # (num_train,) class of every training sample
    backend: str  # "dali" or "torch"
    sources: dict[str, Source]  # "train" and "val": what the loaders read

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


def resolve_backend(backend: str) -> str:
    """`data.backend`: auto is DALI where it is installed, torchvision otherwise."""
    if backend == "auto":
        return "dali" if dali_installed() else "torch"
    if backend == "dali" and not dali_installed():
        raise UserError("data.backend=dali, but NVIDIA DALI is not installed (pip install "
                        "'cocord_fast[dali]'), or set data.backend=torch")
    return backend


def check_data_config(cfg: DataConfig) -> None:
    """Fails on settings that cannot work together or that the data set would ignore, before
    any data is read or made."""
    if resolve_backend(cfg.backend) == "torch" and not cfg.read_ahead:
        raise UserError("data.read_ahead=false is for data.backend=dali: the torch DataLoader's "
                        "workers read ahead (data.num_workers=0 reads on the training thread)")
    if cfg.download and not source_kind(cfg.dataset).downloads:
        fetched = [name for name, kind in SOURCES.all().items() if kind.downloads]
        raise UserError(f"data.download=true: data.dataset={cfg.dataset} is not downloaded "
                        f"(these are: {', '.join(fetched)})")
    refuse_resizing_small_images(cfg)


def prepare_sources(cfg: DataConfig) -> Path:
    """Makes what the source reads at every start where it is missing or stale
    (`Source.prepare`: the demo data set, the index of each split of image files or shards);
    returns the data root. Under a launcher the processes take turns (`turns.in_turns`): they
    read the index rank 0 or their node's first process wrote instead of listing every file or
    reading every shard's headers."""
    with in_turns("making the data set's indexes"):
        root = resolve_root(cfg)
        source_kind(cfg.dataset).prepare(root)
    return root


def index_data_root(root: Path, threads: int) -> Iterator[str]:
    """`cocord-fast index`: lists each split of `root` anew (class folders of images, or tar
    shards) and reads every image's size into its index; a line per split."""
    splits = [split for split in ("train", "val") if (root / split).is_dir()]
    if not splits:
        raise UserError(f"{root} has no train/ or val/ folder (expected ROOT/train/<class>/... "
                        f"and ROOT/val/<class>/..., or ROOT/train/*.tar and ROOT/val/*.tar)")
    for split in splits:
        started = time.perf_counter()
        kind = TarShards if any((root / split).glob("*.tar")) else ImageFolder
        source = kind(root / split, rescan=True)
        where = source.measure_sizes(threads)
        yield (f"{split}: {len(source)} images in {source.num_classes} classes, every size "
               f"read, in {time.perf_counter() - started:.1f} s; index: {where}")


def resolve_root(cfg: DataConfig) -> Path:
    kind = source_kind(cfg.dataset)
    if cfg.root:
        return Path(cfg.root).expanduser()
    if kind.needs_root:
        raise UserError(f"data.root is required for data.dataset={cfg.dataset}")
    return kind.default_root()


def build_loaders(cfg: DataConfig, num_views: int, seed: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32, rank: int = 0,
                  world_size: int = 1) -> Loaders:
    """Loaders for `num_views` views per training sample, sharded for `rank` of `world_size`
    (training: `order.epoch_order`; evaluation: `order.eval_shards`).
    Batches are (B, C, H, W) in the channels-last layout (`IMAGE_LAYOUT`). On a CUDA
    `device` the DALI backend decodes and augments on that GPU and yields them in `dtype`,
    the torch backend pinned float32 CPU batches; elsewhere, float32 batches on the CPU."""
    device = torch.device("cpu") if device is None else device
    check_data_config(cfg)
    backend = resolve_backend(cfg.backend)
    preprocessing, image_size = Preprocessing.of(cfg), image_size_of(cfg)
    root = resolve_root(cfg)
    train_source = open_source(cfg.dataset, root, train=True, download=cfg.download)
    val_source = open_source(cfg.dataset, root, train=False, download=cfg.download)
    if train_source.classes != val_source.classes:
        raise UserError(f"the class folders of {root}/train and {root}/val differ")
    if val_source.num_classes > train_source.num_classes:
        raise UserError(f"{root}/val has class {val_source.num_classes - 1}, but {root}/train "
                        f"only {train_source.num_classes} classes")
    if backend == "dali":
        from .dali_loader import DaliEvalLoader, DaliFeed, DaliTrainLoader
        from .dali_pipeline import DaliRecipe

        def feed(source):
            return DaliFeed(source, DaliRecipe(train_source.image_size, image_size, preprocessing),
                            cfg.num_workers, device, dtype, cfg.read_ahead)
        train = DaliTrainLoader(feed(train_source), num_views, cfg.batch_size, seed, rank,
                                world_size, cfg.skip_corrupt)
        val = DaliEvalLoader(feed(val_source), cfg.eval_batch_size, cfg.skip_corrupt, rank,
                             world_size)
    else:
        from .torch_loader import build_torch_loaders

        train, val = build_torch_loaders(cfg, train_source, val_source, preprocessing,
                                         image_size, num_views, seed, device, rank, world_size)
    return Loaders(train, val, train_source.num_classes, len(train_source), train_source.targets,
                   backend, {"train": train_source, "val": val_source})
