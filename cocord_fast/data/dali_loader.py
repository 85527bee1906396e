"""The DALI data path: the same `Batch`es as the torch path, decoded and augmented by DALI.

An epoch's samples and order are those of `order.epoch_order`, exactly as on the torch path
(and evaluation's those of `order.eval_shards`). DALI's own shuffling is not used: it shuffles
through a buffer of `initial_fill` samples, whose order cannot be reproduced per epoch nor
resumed mid-epoch.

One pipeline per loader serves every epoch. Its only input is an external source (`_Batches`)
that hands DALI this rank's batches in order: the files' bytes (or CIFAR's arrays), their
dataset indices, and each training view's crop window and flip, drawn on the host from a
generator seeded with `derived_seed(seed, epoch, rank, batch)` (`dali_pipeline.draw_views`).
A new epoch, or a resume at any batch, is a new plan for that source and a reset of the
pipeline, not a new pipeline; and since the graph holds no random state, `start(epoch, skip)`
alone continues an epoch exactly, with the same samples, crops and flips as an uninterrupted
run: there is no loader state to save. What an epoch boundary still costs is one batch
decoded with nothing to overlap it (DALI stops prefetching at an epoch's end: the next
`start` is not known yet).

Why this design: a file-reader pipeline built per epoch (as before) paid a build and a cold
queue at every epoch. Measured 2026-11-26 at 09f19d1: on an H100 any throughput window holding
an epoch boundary fell to ~350 img/s; on 2 CPU threads (`bench/data.py`) `start(epoch)` to the
first batch took 0.105 s (1 view) and 0.21-0.24 s (3 views) against 0.041 s and 0.07-0.09 s
after, and the steady rate over 8-batch epochs rose from ~780 to ~1,010 img/s (1 view).
Keeping DALI's random operators in one pipeline would have tied an epoch's crops to every batch
drawn before it, so that a resume at an epoch boundary would need a DALI checkpoint there too.
The host pays for reading the files' bytes (in parallel, `DaliFeed.images`), each header once
unless the folder's index holds the sizes (`DaliFeed.image_sizes`, `cocord-fast index`) and a
few vectorised numpy draws per batch.

A pipeline is rebuilt only when it cannot be reset: after a decode failure (DALI's pipeline is
then invalid), and when an iteration was left unfinished (its prefetched batches are still
queued). Unreadable files surface as DALI decoder errors that do not name the file: the files
of the failing batch are then decoded with PIL to find it. It is named in a UserError, or, with
`data.skip_corrupt=true`, replaced by the next readable file in dataset order (training: batches
keep their size, and their random views, which depend on the position only; the row keeps the
unreadable file's dataset index and is marked `replaced`) or dropped (evaluation), and the
pipeline is rebuilt from that batch on.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Iterator

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..errors import UserError
from .batch import Batch
from .dali_pipeline import DaliRecipe, eval_pipeline, training_pipeline
from .order import derived_seed, epoch_order, eval_shards, steps_per_epoch
from .sources import header_size

# How many batches past the failing one DALI may have been working on: its prefetch queue
# (depth 2), and one more for safety.
PREFETCH_DEPTH = 3


class DaliFeed:
    """What one pipeline reads and how it is decoded and laid out, for one device."""

    def __init__(self, source, recipe: DaliRecipe, threads: int, device: torch.device,
                 dtype: torch.dtype, read_ahead: bool = True):
        self.source, self.device, self.threads = source, device, max(1, threads)
        self.read_ahead = read_ahead  # `data.read_ahead`
        self.gpu = device.type == "cuda"
        self.dtype = dtype if self.gpu else torch.float32
        self.recipe = recipe
        self.targets = torch.as_tensor(source.targets, dtype=torch.long, device=device)  # (n,)
        if source.encoded:  # files to decode, else pixel arrays
            # File reads release the GIL: a batch's files are read in parallel by these
            # threads, and the next batch's are started before this one is handed over, so
            # the training thread (which runs DALI's external source) finds them read.
            self.reader = ThreadPoolExecutor(self.threads, thread_name_prefix="dali-read")
            self.ahead: tuple[list[int], list[Future]] | None = None  # the next batch's reads
            # (height, width) of each image: the index's (`cocord-fast index` measures them
            # all), else read from each file's header once (-1: not yet).
            self.sizes = source.sizes.copy()

    def file(self, index: int) -> str:
        return self.source.where(index)

    def images(self, indices: list[int],
               next_indices: list[int] | None = None) -> np.ndarray | list[np.ndarray]:
        """(B, H, W, 3) uint8 arrays (a decoded source), or the B files' bytes. Files: the
        reads of `next_indices` (the batch expected next) start before this returns; a batch
        asked for that was not expected (a new epoch, a rebuilt pipeline) is read now."""
        if not self.source.encoded:
            return np.ascontiguousarray(self.source.pixels(np.asarray(indices)))
        if self.ahead is not None and self.ahead[0] == indices:
            reads = self.ahead[1]
        else:
            reads = [self.reader.submit(self.source.read, i) for i in indices]
        self.ahead = (None if not next_indices else
                      (next_indices, [self.reader.submit(self.source.read, i)
                                      for i in next_indices]))
        return [read.result() for read in reads]

    def image_sizes(self, indices: list[int], encoded: list[np.ndarray]) -> np.ndarray:
        """(B, 2) (height, width) of the decoded images (`sources.header_size`)."""
        for index, data in zip(indices, encoded):
            if self.sizes[index, 0] < 0:
                self.sizes[index] = header_size(data)
        return self.sizes[indices]

    def iterator(self, pipeline, outputs: list[str]) -> DALIGenericIterator:
        # The external source ends each epoch and sizes each batch (evaluation's last is partial).
        return DALIGenericIterator(pipeline, outputs, size=-1,
                                   last_batch_policy=LastBatchPolicy.PARTIAL)

    def pipeline_args(self, batch_size: int) -> dict:
        return dict(batch_size=batch_size, num_threads=self.threads, device_id=self.device_id,
                    encoded=self.source.encoded, gpu=self.gpu)

    @property
    def device_id(self) -> int | None:
        """None makes a CPU-only pipeline; "cuda" alone means torch's current device."""
        if not self.gpu:
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def batch(self, views: list[torch.Tensor], index: torch.Tensor, skipped: list[str],
              substitutes: dict[int, int] | None) -> Batch:
        """`substitutes` (training): unreadable index -> the index whose image replaced it."""
        # (B, H, W, C) -> a channels-last (B, C, H, W) view (`IMAGE_LAYOUT`), in the dtype
        views = [v.permute(0, 3, 1, 2).to(self.dtype) for v in views]
        # The index output is a host tensor: small copies, then CRD's negatives and the
        # labels are drawn and looked up on the device.
        index = index.view(-1).to(torch.long)
        replaced = None if substitutes is None else torch.zeros(len(index), dtype=torch.bool)
        image_index = index
        if substitutes:  # only once a file was found unreadable: no per-row work before
            rows = index.tolist()
            replaced = torch.tensor([i in substitutes for i in rows])
            image_index = torch.tensor([substitutes.get(i, i) for i in rows])
        on_device = index.to(self.device, non_blocking=True)
        labels = self.targets[on_device if image_index is index
                              else image_index.to(self.device, non_blocking=True)]
        return Batch(views=views, labels=labels, index=on_device, skipped=tuple(skipped),
                     replaced=None if replaced is None
                     else replaced.to(self.device, non_blocking=True))


class _Batches:
    """The pipeline's external source: DALI calls it for every batch it prefetches. It hands
    over the planned `piece` (this rank's dataset indices, in order) a batch at a time from
    batch `position` on, then raises StopIteration (DALI's end of epoch) until the next plan.
    With a `key` (training), batch b's random views are drawn from `derived_seed(*key, b)`."""

    def __init__(self, feed: DaliFeed, batch_size: int, num_views: int,
                 substitutes: dict[int, int]):
        self.feed, self.batch_size, self.num_views = feed, batch_size, num_views
        self.substitutes = substitutes  # unreadable index -> the one whose image is read
        self.plan([], 0, None)

    def plan(self, piece: list[int], position: int, key: tuple[int, ...] | None) -> None:
        self.piece, self.position, self.key = piece, position, key

    def __call__(self) -> list:
        start = self.position * self.batch_size
        indices = self.piece[start:start + self.batch_size]
        if not indices:
            raise StopIteration
        read = self._read_in_place_of(indices)
        upcoming = (self.piece[start + self.batch_size:start + 2 * self.batch_size]
                    if self.feed.read_ahead else [])
        images = self.feed.images(read, self._read_in_place_of(upcoming))
        out = [images, np.asarray(indices, np.int32)]
        if self.key is not None:
            recipe = self.feed.recipe
            sizes = None if recipe.small else self.feed.image_sizes(read, images)
            rng = np.random.default_rng(derived_seed(*self.key, self.position))
            out += recipe.draw_views(rng, self.num_views, len(indices), sizes)
        self.position += 1
        return out

    def _read_in_place_of(self, indices: list[int]) -> list[int]:
        """The files read for `indices`: a substitute's in an unreadable file's place."""
        return [self.substitutes.get(i, i) for i in indices] if self.substitutes else indices


def _is_decode_failure(err: RuntimeError) -> bool:
    return "decoders.image" in str(err) or "nvImageCodec" in str(err)


def _decoder_message(err: Exception) -> str:
    """The decoder's own words from DALI's multi-line error (which quotes pipeline code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if "nvImageCodec" in line or "decode" in line.lower()]
    return (found or lines or [type(err).__name__])[-1]


class _Resilient:
    """Runs one pipeline over the `piece`s it is given (this rank's dataset indices, in order),
    reset between iterations, rebuilt after a decode failure with the unreadable files
    repaired. Files found unreadable are remembered, and repaired up front in later epochs."""

    def __init__(self, feed: DaliFeed, make_pipeline, outputs: list[str], batch_size: int,
                 skip_corrupt: bool, training: bool, num_views: int = 1):
        self.feed, self.make_pipeline, self.outputs = feed, make_pipeline, outputs
        self.batch_size = batch_size
        self.skip_corrupt, self.training = skip_corrupt, training
        self.unreadable: dict[int, int | None] = {}  # index -> substitute (None: dropped)
        # Training reads a substitute's image in an unreadable file's place; evaluation drops.
        self.batches = _Batches(feed, batch_size, num_views,
                                self.unreadable if training else {})
        self.iterator: DALIGenericIterator | None = None
        self.in_flight = False  # an iteration started and not run to its end

    def run(self, piece: list[int], position: int = 0,
            key: tuple[int, ...] | None = None) -> Iterator[Batch]:
        """Batches from batch `position` of `piece` on; `key` names the stream of random views
        (training, see `_Batches`)."""
        if self.in_flight:  # batches of the unfinished iteration are still in DALI's queue
            self.iterator = None
        self.in_flight, rewind = True, self.iterator is not None
        skipped = self._apply_repairs(piece)
        self.batches.plan(piece, position, key)
        while True:
            try:
                if self.iterator is None:  # DALI's iterator decodes its first batch here
                    self.iterator = self._build()
                elif rewind:  # the end of the last epoch: DALI asks `_Batches` anew
                    self.iterator.reset()
                rewind = False
                out = next(self.iterator)[0]
            except StopIteration:
                self.in_flight = False
                return
            except RuntimeError as err:
                if not self.feed.source.encoded or not _is_decode_failure(err):
                    raise
                self.iterator = None  # DALI's pipeline is no longer valid after an error
                rest = piece[position * self.batch_size:]
                self._find_unreadable(rest, err)
                skipped += self._apply_repairs(rest)
                piece[position * self.batch_size:] = rest
                self.batches.plan(piece, position, key)
                continue
            position += 1
            yield self.feed.batch([out[name] for name in self.outputs[:-1]], out["index"],
                                  skipped, self.unreadable if self.training else None)
            skipped = []

    def _build(self) -> DALIGenericIterator:
        self.iterator = None  # the old pipeline goes before the new one is built
        pipeline = self.make_pipeline(self.batches, **self.feed.pipeline_args(self.batch_size))
        return self.feed.iterator(pipeline, self.outputs)

    def _find_unreadable(self, piece: list[int], err: RuntimeError) -> None:
        """Decodes, with PIL, the files of the batches DALI may have been working on."""
        window = [i for i in piece[:self.batch_size * (1 + PREFETCH_DEPTH)]
                  if i not in self.unreadable]  # those were not read: their substitutes were
        bad = {i: reason for i in dict.fromkeys(window)
               if (reason := self.feed.source.decode_error(i)) is not None}
        if not bad:
            files = ", ".join(self.feed.file(i) for i in window[:self.batch_size])
            raise UserError(f"DALI could not decode a batch of these files, which PIL reads: "
                            f"{files}: {_decoder_message(err)} (data.backend=torch decodes "
                            f"with PIL)")
        if not self.skip_corrupt:
            index, reason = next(iter(bad.items()))
            raise UserError(f"cannot decode image {self.feed.file(index)}: {reason} "
                            f"(set data.skip_corrupt=true to skip unreadable files)")
        for index in bad:
            # Training replaces (batches keep their size); evaluation drops (a substitute
            # would count another image twice in the accuracy).
            self.unreadable[index] = self._next_readable(index, bad) if self.training else None

    def _apply_repairs(self, piece: list[int]) -> list[str]:
        """The paths of the known unreadable files in `piece`; evaluation drops them from
        `piece` in place (training reads their substitutes, `_Batches`)."""
        found = [i for i in piece if i in self.unreadable]
        if found and not self.training:
            piece[:] = [i for i in piece if i not in self.unreadable]
        return [self.feed.file(i) for i in found]

    def _next_readable(self, index: int, bad: dict[int, str]) -> int:
        n = len(self.feed.source)
        for offset in range(1, n):
            candidate = (index + offset) % n
            if (candidate not in bad and candidate not in self.unreadable
                    and self.feed.source.decode_error(candidate) is None):
                return candidate
        raise UserError("no readable image is left in the data set")


class DaliTrainLoader:
    """The `TrainLoader` contract (see `build.py`) over one DALI pipeline for every epoch."""

    def __init__(self, feed: DaliFeed, num_views: int, batch_size: int, seed: int, rank: int,
                 world_size: int, skip_corrupt: bool):
        self.feed, self.batch_size, self.seed = feed, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps = steps_per_epoch(len(feed.source), batch_size, world_size)
        outputs = [f"view{v}" for v in range(num_views)] + ["index"]
        make = partial(training_pipeline, recipe=feed.recipe, num_views=num_views)
        self.runner = _Resilient(feed, make, outputs, batch_size, skip_corrupt, training=True,
                                 num_views=num_views)
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        """(epoch, skip) name the rest of the epoch, random views included."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        order = epoch_order(len(self.feed.source), self.batch_size, self.seed, self.epoch,
                            self.world_size)  # (world_size, steps x batch_size)
        return self.runner.run(order[self.rank].tolist(), self.skip,
                               key=(self.seed, self.epoch, self.rank))


class DaliEvalLoader:
    """This rank's shard of the evaluation set (`order.eval_shards`), in dataset order, the
    last batch partial."""

    def __init__(self, feed: DaliFeed, batch_size: int, skip_corrupt: bool, rank: int = 0,
                 world_size: int = 1):
        self.shard = eval_shards(len(feed.source), world_size)[rank]
        self.runner = _Resilient(feed, partial(eval_pipeline, recipe=feed.recipe),
                                 ["view0", "index"], batch_size, skip_corrupt, training=False)

    def __iter__(self) -> Iterator[Batch]:
        return self.runner.run(list(self.shard))
