"""Runs `cocord-fast bench`: one `Trainer` per method with its floor beside it, warm-up apart,
then interleaved rounds, so that the machine's drift (clocks, heat, neighbours) hits every
method and floor alike."""
from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..config import load_config
from ..data import Batch
from ..data.build import resolve_root
from ..data.sources import open_source
from ..engines import autocast
from ..methods import EncoderPasses
from ..training.acceleration import compiled_graphs
from ..training.telemetry import Telemetry
from ..training.trainer import Trainer
from .clock import StepClock, synchronize
from .floor import floor_networks, floor_step
from .settings import BenchSettings
from .synthetic import CIFAR_CLASSES, resident_batch, write_random_teacher, write_synthetic_cifar


@dataclass
class Entry:
    """A method's training step or a floor, and what was measured of it."""

    name: str
    run_step: Callable[[], None]
    images_per_step: int
    trainer: Trainer | None = None  # methods only
    floor: str | None = None  # a method's floor entry
    floor_of: list[str] = field(default_factory=list)  # a floor's methods
    held: Callable[[], int] = lambda: 0  # bytes held between steps
    build_s: float | None = None
    warmup_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    round_img_per_s: list[float] = field(default_factory=list)
    step_peak_bytes: int | None = None  # CUDA: the most a step allocated above what was held


def say(text: str) -> None:
    """What the bench is doing, as it goes (a round of a large recipe takes minutes)."""
    print(f"bench: {text}", flush=True)


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared weights counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def trainer_held_bytes(trainer: Trainer) -> int:
    """What a method holds between steps: weights, copies, banks, buffers, optimizer state."""
    optimizer_state = [value for state in trainer.engine.optimizer.state.values()
                       for value in state.values() if isinstance(value, Tensor)]
    return tensor_bytes([*trainer.method.state_dict(keep_vars=True).values(), *optimizer_state])


def loader_batches(trainer: Trainer) -> Iterator[Batch]:
    """The trainer's training loader, epoch after epoch (`--data pipeline`)."""
    for epoch in itertools.count():
        trainer.loaders.train.start(epoch)
        yield from trainer.loaders.train


def loader_name(backend: str, device: torch.device) -> str:
    """What fed the steps of `--data pipeline`: DALI decodes on the GPU of a CUDA run."""
    return "dali-gpu" if backend == "dali" and device.type == "cuda" else backend


def method_step(trainer: Trainer, batches: Iterator[Batch]) -> None:
    """One optimizer step as `Trainer.fit` takes it."""
    trainer.set_lr()
    trainer.train_step(tuple(next(batches) for _ in range(trainer.accumulation)))
    trainer.step += 1


def prepare_data(settings: BenchSettings, work: Path) -> tuple[Path | None, int]:
    """(root of the synthetic data set, or None for the user's; number of classes)."""
    if settings.user_data():
        data = load_config(overrides=list(settings.overrides)).data
        return None, open_source(data.dataset, resolve_root(data), train=True).num_classes
    write_synthetic_cifar(work / "data", settings.num_train)
    return work / "data", CIFAR_CLASSES


def build_entries(settings: BenchSettings, device: torch.device, work: Path) -> list[Entry]:
    """Each method, followed by its floor the first time that floor is needed."""
    data_root, num_classes = prepare_data(settings, work)
    teacher = work / "teacher.pth"
    write_random_teacher(settings.teacher, num_classes, teacher)
    entries: list[Entry] = []
    floors: dict[EncoderPasses, Entry] = {}
    for number, name in enumerate(settings.methods, 1):
        started = time.perf_counter()
        trainer = Trainer(load_config(overrides=settings.trainer_overrides(
            name, data_root, teacher, work / name)))
        build_s = time.perf_counter() - started
        say(f"built {name} ({number}/{len(settings.methods)}) in {build_s:.1f} s")
        trainer.method.train()
        batch = resident_batch(trainer.method.num_views, settings.batch_size,
                               settings.image_size, trainer.loaders.num_classes,
                               trainer.loaders.num_train, device)
        batches = (itertools.repeat(batch) if settings.data == "resident"
                   else loader_batches(trainer))
        passes = type(trainer.method).encoder_passes
        new_floor = passes not in floors
        if new_floor:  # on this method's networks and batch
            networks = floor_networks(trainer.method, passes)
            floors[passes] = Entry(
                passes.name,
                partial(floor_step, passes, networks, batch.views,
                        partial(autocast, trainer.cfg, device)),
                settings.batch_size,
                held=partial(tensor_bytes, [t for network in networks.values()
                                            for t in network.state_dict(keep_vars=True).values()]))
        floors[passes].floor_of.append(name)
        images = settings.batch_size * trainer.accumulation
        entries.append(Entry(name, partial(method_step, trainer, batches), images, trainer,
                             passes.name, held=partial(trainer_held_bytes, trainer),
                             build_s=build_s))
        if new_floor:
            entries.append(floors[passes])
    return entries


def warm_up(entries: list[Entry], steps: int, device: torch.device) -> None:
    """The first steps of each entry, timed apart: allocator growth, cuDNN autotuning and
    compilation happen here (a network compiles in the first entry that runs it)."""
    for entry in entries:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            entry.run_step()
        synchronize(device)
        entry.warmup_s = time.perf_counter() - started
        say(f"warm-up of {entry.name}: {steps} steps in {entry.warmup_s:.1f} s")


def run_rounds(entries: list[Entry], settings: BenchSettings, device: torch.device,
               telemetry: Telemetry) -> None:
    cuda = device.type == "cuda"
    for number in range(1, settings.rounds + 1):
        for entry in entries:
            synchronize(device)  # the previous entry's work stays out of this one's times
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            clock = StepClock(device)
            telemetry.label = entry.name
            clock.mark()
            for _ in range(settings.steps):
                entry.run_step()
                clock.mark()
            seconds = clock.seconds()
            telemetry.label = None
            entry.step_s += seconds
            entry.round_img_per_s.append(entry.images_per_step * len(seconds) / sum(seconds))
            say(f"round {number}/{settings.rounds}, {entry.name}: {settings.steps} steps, "
                f"{entry.round_img_per_s[-1]:.1f} images/s")
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) - before
                entry.step_peak_bytes = max(entry.step_peak_bytes or 0, peak)


def summarise(entry: Entry, telemetry: Telemetry, warmup_steps: int) -> dict:
    """One row of the report."""
    step_ms = np.asarray(entry.step_s) * 1e3
    held = entry.held()
    row = {**({"method": entry.name, "floor": entry.floor} if entry.trainer is not None
              else {"floor": entry.name, "floor_of": entry.floor_of}),
           "img_per_s": entry.images_per_step * len(entry.step_s) / sum(entry.step_s),
           "step_ms_median": float(np.median(step_ms)),
           "step_ms_p90": float(np.percentile(step_ms, 90)),
           "round_img_per_s": entry.round_img_per_s,
           "timed_steps": len(entry.step_s), "images_per_step": entry.images_per_step,
           "warmup_steps": warmup_steps, "warmup_s": entry.warmup_s,
           "held_mb": held / 2 ** 20,
           "peak_memory_mb": (None if entry.step_peak_bytes is None
                              else (held + entry.step_peak_bytes) / 2 ** 20),
           "gpu": telemetry.summary(entry.name)}
    if entry.trainer is not None:
        losses = entry.trainer.metrics.pop()
        row.update(build_s=entry.build_s, bank_bytes=entry.trainer.method.bank_bytes(),
                   mean_loss=losses.get("loss"))
    return row


def run_benchmark(settings: BenchSettings) -> dict:
    """Measures every method and floor; returns the report's rows and context."""
    settings.check()
    device = settings.resolved_device()
    say(f"{', '.join(settings.methods)} and their floors on {device}: {settings.teacher} -> "
        f"{settings.student}, {settings.image_size} px, batch {settings.batch_size}, "
        f"{settings.precision}, compile {settings.compile}; {settings.warmup} warm-up steps, "
        f"then {settings.rounds} rounds of {settings.steps} steps")
    with tempfile.TemporaryDirectory(prefix="cocord-bench-") as work:
        entries = build_entries(settings, device, Path(work))
        warm_up(entries, settings.warmup, device)
        graphs_after_warmup = compiled_graphs() if settings.compile != "off" else None
        with Telemetry(device) as telemetry:
            run_rounds(entries, settings, device, telemetry)
        rows = [summarise(entry, telemetry, settings.warmup) for entry in entries]
    floors = {row["floor"]: row for row in rows if "method" not in row}
    for row in rows:
        if "method" in row:
            row["fraction_of_floor"] = row["img_per_s"] / floors[row["floor"]]["img_per_s"]
    loaders = entries[0].trainer.loaders
    return {"device": device, "methods": [row for row in rows if "method" in row],
            "floors": list(floors.values()), "telemetry": telemetry.describe(),
            "num_train": loaders.num_train, "num_classes": loaders.num_classes,
            "loader": loader_name(loaders.backend, device) if settings.data == "pipeline"
            else None,
            "compiled_graphs": None if graphs_after_warmup is None else {
                "after_warmup": graphs_after_warmup, "after_rounds": compiled_graphs()}}
