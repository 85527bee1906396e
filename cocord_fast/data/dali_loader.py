"""The DALI data path: the same `Batch`es as the torch path, decoded and augmented by DALI.

An epoch's samples and order are those of `order.epoch_order`, exactly as on the torch path;
each rank's file reader is given its shard of this epoch's permuted file list, in order (and
evaluation readers their shard of `order.eval_shards`). DALI's own `random_shuffle` is not
used: it shuffles through a buffer of `initial_fill` samples, whose order cannot be
reproduced per epoch nor resumed mid-epoch. A pipeline is built per epoch, its random
operators seeded from (seed, epoch, rank).

Resume is exact through DALI's pipeline checkpoints: `state()` is the checkpoint of the
training pipeline after the last batch it yielded (its reader position and the state of every
random operator), and `start(epoch, skip, state)` rebuilds the pipeline from it, so the rest of
the epoch has the same samples, crops and flips as an uninterrupted run. Without a state (or
when a corrupt file was repaired in that epoch), `start(epoch, skip)` still gives the same
samples in the same batches, with other random crops and flips.

Unreadable files surface as DALI decoder errors that do not name the file: the files of the
failing batch are then decoded with PIL to find it. It is named in a UserError, or, with
`data.skip_corrupt=true`, replaced by the next readable file in dataset order (training: batches
keep their size) or dropped (evaluation), and the pipeline is rebuilt from that batch on.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Iterator

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..errors import UserError
from .batch import Batch
from .dali_pipeline import READER, DaliRecipe, eval_pipeline, read_arrays, read_files, training_pipeline
from .order import derived_seed, epoch_order, eval_shards, steps_per_epoch
from .sources import CIFAR100, decode_error

# How many batches past the failing one DALI may have been working on: its prefetch queue
# (depth 2), and one more for safety.
PREFETCH_DEPTH = 3
_DALI_SEED_RANGE = 2 ** 31


class DaliFeed:
    """What one pipeline reads and how it is decoded and laid out, for one device."""

    def __init__(self, source, dataset: str, image_size: int, threads: int, device: torch.device,
                 dtype: torch.dtype):
        self.source, self.device, self.threads = source, device, max(1, threads)
        self.gpu = device.type == "cuda"
        self.dtype = dtype if self.gpu else torch.float32
        self.recipe = DaliRecipe(dataset, image_size, layout="HWC" if self.gpu else "CHW")
        self.targets = torch.as_tensor(source.targets, dtype=torch.long, device=device)  # (n,)
        self.files = None if isinstance(source, CIFAR100) else [str(f) for f in source.files]

    def reader(self, piece: list[int], batch_size: int, pad_last_batch: bool,
               restored_batches: int = 0):
        """The read graph over `piece` (this rank's dataset indices, in order).
        `restored_batches`: how many batches a pipeline restored from a checkpoint has already
        read; a file reader's checkpoint holds its position, an external source starts there."""
        if self.files is None:
            remaining = piece[restored_batches * batch_size:]
            return read_arrays(_ArrayBatches(self.source.images, remaining, batch_size), self.gpu)
        return read_files([self.files[i] for i in piece], piece, "mixed" if self.gpu else "cpu",
                          pad_last_batch)

    def iterator(self, pipeline, outputs: list[str], last_batch: LastBatchPolicy):
        sizing = {"size": -1} if self.files is None else {"reader_name": READER}
        return DALIGenericIterator(pipeline, outputs, last_batch_policy=last_batch, **sizing)

    def pipeline_args(self, batch_size: int, seed: int, checkpoint: bytes | None) -> dict:
        return dict(batch_size=batch_size, num_threads=self.threads, seed=seed % _DALI_SEED_RANGE,
                    device_id=self.device_id, enable_checkpointing=True, checkpoint=checkpoint)

    @property
    def device_id(self) -> int | None:
        """None makes a CPU-only pipeline; "cuda" alone means torch's current device."""
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def batch(self, views: list[torch.Tensor], index: torch.Tensor, skipped: list[str]) -> Batch:
        if self.gpu:  # (B, H, W, C) -> a channels-last (B, C, H, W) view, in the training dtype
            views = [v.permute(0, 3, 1, 2).to(self.dtype) for v in views]
        # The reader's index output is a host tensor: one small copy, then CRD's negatives and
        # the labels are drawn and looked up on the device.
        index = index.view(-1).to(self.device, torch.long, non_blocking=True)
        return Batch(views=views, labels=self.targets[index], index=index, skipped=tuple(skipped))


class _ArrayBatches:
    """The external source's iterable: this shard's remaining samples, a batch at a time."""

    def __init__(self, images: np.ndarray, indices: list[int], batch_size: int):
        self.images, self.indices, self.batch_size = images, np.asarray(indices), batch_size

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            yield np.ascontiguousarray(self.images[chunk]), chunk.astype(np.int32)


def _is_decode_failure(err: RuntimeError) -> bool:
    return "decoders.image" in str(err) or "nvImageCodec" in str(err)


def _decoder_message(err: Exception) -> str:
    """The decoder's own words from DALI's multi-line error (which quotes pipeline code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if "nvImageCodec" in line or "decode" in line.lower()]
    return (found or lines or [type(err).__name__])[-1]


class _Resilient:
    """Runs pipelines over a `piece` (this rank's dataset indices, in order), rebuilding after
    a decode failure with the unreadable files repaired. Files found unreadable are
    remembered, and repaired up front in later epochs."""

    def __init__(self, feed: DaliFeed, make_pipeline, outputs: list[str], batch_size: int,
                 skip_corrupt: bool, training: bool):
        self.feed, self.make_pipeline, self.outputs = feed, make_pipeline, outputs
        self.batch_size = batch_size
        self.skip_corrupt, self.training = skip_corrupt, training
        self.unreadable: dict[int, int | None] = {}  # index -> substitute (None: dropped)
        self.iterator: DALIGenericIterator | None = None
        self.checkpointable = False  # whether the running pipeline's checkpoints resume exactly

    def run(self, piece: list[int], seed: int, position: int = 0,
            checkpoint: bytes | None = None) -> Iterator[Batch]:
        """Batches from batch `position` of `piece` on; with `checkpoint`, the pipeline is
        restored to the state it had there (built over the same `piece` and `seed`)."""
        skipped = self._apply_repairs(piece)
        self.checkpointable = not skipped and (position == 0 or checkpoint is not None)
        while position * self.batch_size < len(piece):
            self.iterator, consumed = None, 0
            while True:
                try:
                    if self.iterator is None:  # DALI's iterator decodes its first batch here
                        self.iterator = self._start(piece, position, seed, checkpoint)
                    out = next(self.iterator)[0]
                except StopIteration:
                    return
                except RuntimeError as err:
                    if self.feed.files is None or not _is_decode_failure(err):
                        raise
                    piece = piece[(position + consumed) * self.batch_size:]
                    self._find_unreadable(piece, err)
                    skipped += self._apply_repairs(piece)
                    position, checkpoint, seed = 0, None, seed + 1
                    self.checkpointable = False
                    break
                consumed += 1
                yield self.feed.batch([out[name] for name in self.outputs[:-1]], out["index"],
                                      skipped)
                skipped = []

    def _start(self, piece: list[int], position: int, seed: int,
               checkpoint: bytes | None) -> DALIGenericIterator:
        if checkpoint is None:  # a fresh pipeline over what is left
            piece = piece[position * self.batch_size:]
        read = self.feed.reader(piece, self.batch_size,
                                pad_last_batch=not self.training,
                                restored_batches=position if checkpoint is not None else 0)
        with warnings.catch_warnings():
            # An external source's position is not in DALI's checkpoints: `reader` starts it
            # at the restored position itself.
            warnings.filterwarnings("ignore", "Checkpointing enabled in a pipeline with external")
            pipeline = self.make_pipeline(
                read, **self.feed.pipeline_args(self.batch_size, seed, checkpoint))
            return self.feed.iterator(
                pipeline, self.outputs,
                LastBatchPolicy.DROP if self.training else LastBatchPolicy.PARTIAL)

    def state(self) -> bytes | None:
        """The running pipeline's checkpoint after the last batch it yielded, if it resumes
        exactly."""
        if not self.checkpointable or self.iterator is None:
            return None
        return self.iterator.checkpoints()[0]

    def _find_unreadable(self, piece: list[int], err: RuntimeError) -> None:
        """Decodes, with PIL, the files of the batches DALI may have been working on."""
        window = piece[:self.batch_size * (1 + PREFETCH_DEPTH)]
        bad = {i: reason for i in dict.fromkeys(window)
               if (reason := decode_error(self.feed.source.files[i])) is not None}
        if not bad:
            files = ", ".join(self.feed.files[i] for i in window[:self.batch_size])
            raise UserError(f"DALI could not decode a batch of these files, which PIL reads: "
                            f"{files}: {_decoder_message(err)} (data.backend=torch decodes "
                            f"with PIL)")
        if not self.skip_corrupt:
            index, reason = next(iter(bad.items()))
            raise UserError(f"cannot decode image {self.feed.files[index]}: {reason} "
                            f"(set data.skip_corrupt=true to skip unreadable files)")
        for index in bad:
            # Training replaces (batches keep their size); evaluation drops (a substitute
            # would count another image twice in the accuracy).
            self.unreadable[index] = self._next_readable(index, bad) if self.training else None

    def _apply_repairs(self, piece: list[int]) -> list[str]:
        """Repairs the known unreadable files in `piece` in place; returns their paths."""
        found = [i for i in piece if i in self.unreadable]
        if found:
            piece[:] = [self.unreadable.get(i, i) for i in piece]
            piece[:] = [i for i in piece if i is not None]
        return [self.feed.files[i] for i in found]

    def _next_readable(self, index: int, bad: dict[int, str]) -> int:
        n = len(self.feed.files)
        for offset in range(1, n):
            candidate = (index + offset) % n
            if (candidate not in bad and candidate not in self.unreadable
                    and decode_error(self.feed.source.files[candidate]) is None):
                return candidate
        raise UserError("no readable image is left in the data set")


class DaliTrainLoader:
    """The `TrainLoader` contract (see `build.py`) over per-epoch DALI pipelines."""

    def __init__(self, feed: DaliFeed, num_views: int, batch_size: int, seed: int, rank: int,
                 world_size: int, skip_corrupt: bool):
        self.feed, self.batch_size, self.seed = feed, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps = steps_per_epoch(len(feed.source), batch_size, world_size)
        outputs = [f"view{v}" for v in range(num_views)] + ["index"]
        make = partial(training_pipeline, recipe=feed.recipe, num_views=num_views)
        self.runner = _Resilient(feed, make, outputs, batch_size, skip_corrupt, training=True)
        self.epoch, self.skip, self.resume_state = 0, 0, None

    def start(self, epoch: int, skip: int = 0, state: bytes | None = None) -> None:
        self.epoch, self.skip, self.resume_state = epoch, skip, state

    def state(self) -> bytes | None:
        return self.runner.state()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        order = epoch_order(len(self.feed.source), self.batch_size, self.seed, self.epoch,
                            self.world_size)  # (world_size, steps x batch_size)
        seed = derived_seed(self.seed, self.epoch, self.rank)
        if self.skip and self.resume_state is None:
            # Same samples, but no way to put the random operators where they were.
            seed = derived_seed(self.seed, self.epoch, self.rank, self.skip)
        return self.runner.run(order[self.rank].tolist(), seed, self.skip, self.resume_state)


class DaliEvalLoader:
    """This rank's shard of the evaluation set (`order.eval_shards`), in dataset order, the
    last batch partial."""

    def __init__(self, feed: DaliFeed, batch_size: int, skip_corrupt: bool, rank: int = 0,
                 world_size: int = 1):
        self.shard = eval_shards(len(feed.source), world_size)[rank]
        self.runner = _Resilient(feed, partial(eval_pipeline, recipe=feed.recipe),
                                 ["view0", "index"], batch_size, skip_corrupt, training=False)

    def __iter__(self) -> Iterator[Batch]:
        return self.runner.run(list(self.shard), seed=0)
