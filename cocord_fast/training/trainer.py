"""The training loop: build everything from the config, then step, log, evaluate, checkpoint."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import distributed
from ..checkpoints.files import (remove_old_periodic, remove_partial_saves, rng_state, save_atomic,
                                 set_rng_state, training_checkpoint)
from ..config import Config, save_config
from ..data import Batch, Loaders, build_loaders
from ..data.build import check_data_config, prepare_sources
from ..data.fingerprint import agree_across_ranks
from ..data.transforms import Preprocessing
from ..engines import (autocast, build_engine, check_engine_config, engine_class, join_processes,
                       optimizer_settings)
from ..errors import UserError
from ..kernels import implementations_used, triton_unavailable
from ..methods import Method, build_method, method_class
from .acceleration import compiled_graphs, mark_step_begin, prepare
from .evaluate import describe_samples, evaluate
from .metrics import MetricAccumulator, PeakMemory, RunLog, ThroughputWindow, read_log, rewrite_log
from .networks import build_student, build_teacher, check_model_names, take_teacher_preprocessing
from .preemption import Preempted, StopSignals, StoppedTogether, parse_signals
from .readable_steps import ReadableSteps
from .resume import check_resumable, check_same_data, resume_point
from .schedule import lr_factor
from .telemetry import Telemetry


@dataclass
class RunResult:
    run_dir: Path
    step: int
    top1: float
    best_top1: float


class Trainer:
    """One run: `Trainer(cfg).fit()`. Everything that affects the next step is checkpointed.

    Under a launcher every process runs a Trainer: each takes its shard of every epoch,
    the engine averages gradients, and only rank 0 prints, logs and writes checkpoint files.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        check_engine_config(cfg)
        check_data_config(cfg.data)
        # Before the resume check: a resumed run compares the settings it resolves.
        self.notes: list[str] = take_teacher_preprocessing(  # said once the run starts (fit)
            cfg, method_class(cfg.method.name).needs_teacher)
        stop_signals = parse_signals(cfg.train.stop_signals)
        self.device = distributed.process_device(cfg.train.device)
        self.peak_memory = PeakMemory(self.device)  # from here: what the run builds counts
        if reason := triton_unavailable(cfg.train.kernels, self.device.type == "cuda"):
            raise UserError(f"train.kernels=triton on {self.device}: {reason}; or set "
                            f"train.kernels=auto")
        join_processes(cfg, self.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        # Every rank reads the run directory itself; where one sees another checkpoint (or a
        # missing or damaged file) they all stop with one message instead of some waiting.
        resume_from, checkpoint, self.resume_changes = distributed.decide_together(
            self._resume_point, describe=lambda found: (
                "a new run" if found[1] is None else f"{found[0]} (step {found[1]['step']})"),
            why="every process must resume from one checkpoint: is train.output_dir on a file "
                "system every node sees?")
        self.stop_requests = StopSignals(stop_signals)

        method = method_class(cfg.method.name)
        check_model_names(cfg, method.needs_teacher)
        torch.manual_seed(cfg.train.seed)
        prepare_sources(cfg.data)  # rank 0 first: the demo data set, the folders' indexes
        self.loaders: Loaders = build_loaders(
            cfg.data, method.num_views, cfg.train.seed, self.device,
            torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32,
            self.rank, self.world_size)
        # Every process must give each dataset index the same image and label.
        self.data = agree_across_ranks(self.loaders.sources,
                                       f"data.root={cfg.data.root or cfg.data.dataset}")
        if checkpoint is not None and checkpoint["num_classes"] != self.loaders.num_classes:
            raise UserError(f"{resume_from} predicts {checkpoint['num_classes']} classes, but "
                            f"{cfg.data.root or cfg.data.dataset} has {self.loaders.num_classes}")
        if checkpoint is not None:
            self.notes += check_same_data(checkpoint, resume_from, self.data, cfg,
                                          method.indexes_samples)
        self.accumulation = cfg.optim.grad_accum_steps
        self.steps_per_epoch = len(self.loaders.train) // self.accumulation
        if self.steps_per_epoch == 0:
            raise UserError(f"optim.grad_accum_steps={self.accumulation} is more than the "
                            f"{len(self.loaders.train)} batches of an epoch")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)

        student = build_student(cfg, self.loaders.num_classes, checkpoint is not None,
                                say=self.notes.append)
        teacher = (build_teacher(cfg, self.loaders.num_classes, resuming=checkpoint is not None)
                   if method.needs_teacher else None)
        self.method: Method = build_method(cfg.method.name, cfg, student, teacher,
                                           self.loaders.train_targets).to(self.device)
        if checkpoint is not None:  # before the engine: DeepSpeed copies the weights it wraps
            self.method.load_state_dict(checkpoint["method"])
        # What no engine wraps (slow copies, random teacher head, queue, banks) must be equal
        # on every rank too, whatever each rank's RNG drew while building it.
        distributed.broadcast_module_(self.method)
        prepare(self.method, self.device, cfg.train.compile, engine_class(cfg))
        self.engine = build_engine(cfg, self.method, self.device)
        implementations_used(reset=True)  # what this run's steps use is logged after the first
        self.step, self.best_top1, self.last_top1 = 0, 0.0, 0.0
        self.last_eval: dict[str, float] | None = None
        self.eval_pending = False  # stopped at an epoch's end before its evaluation
        self.skipped_files = 0  # unreadable training images this rank replaced (skip_corrupt)
        self.bar: tqdm | None = None
        self.log: RunLog | None = None
        self.metrics, self.window = MetricAccumulator(), ThroughputWindow()
        self.kernels_reported = False
        self.wall_offset = 0.0  # wall-clock of this run's earlier processes (resume)
        # A checkpoint imported from another code base holds no optimizer, RNG or data state.
        self.imported_from = (resume_from if checkpoint is not None and checkpoint["ranks"] is None
                              else None)
        if checkpoint is not None:
            self._restore(checkpoint, resume_from.parent)
        distributed.heartbeat("setting up the run")

    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None,
                                     dict[str, tuple[Any, Any]]]:
        """The checkpoint to resume from (or none), and the settings changed since it (allowed
        ones; the others are refused here)."""
        resume_from, checkpoint = resume_point(self.cfg)
        if checkpoint is None:
            if (self.run_dir / "last.pt").exists():
                raise UserError(f"{self.run_dir} already holds a run; continue it with "
                                f"train.resume=auto, or choose another train.output_dir")
            return None, None, {}
        return resume_from, checkpoint, check_resumable(checkpoint, resume_from, self.cfg,
                                                        distributed.launched_world_size())

    def _restore(self, checkpoint: dict[str, Any], checkpoint_dir: Path) -> None:
        if checkpoint["engine"] is not None:
            self.engine.load_state_dict(checkpoint["engine"], checkpoint_dir)
        for group in self.engine.optimizer.param_groups:  # a resume may change them
            group.update(optimizer_settings(self.cfg.optim))
        if checkpoint["ranks"] is not None:
            mine = checkpoint["ranks"][self.rank]
            # The checkpoint's model has the ranks' average; each rank continues with its own
            # (after the engine is built: DDP broadcasts rank 0's buffers when it starts).
            distributed.restore_batchnorm_statistics_(self.method, mine.get("batchnorm"))
            set_rng_state(mine["rng"], self.device)
            # (A `data_state` of older checkpoints, DALI's per-epoch pipeline state, is not
            # needed: the data of every step follows from the step.)
            self.skipped_files = mine["skipped_files"]
        self.step = checkpoint["step"]
        self.best_top1, self.last_top1 = checkpoint["best_top1"], checkpoint["last_top1"]
        self.eval_pending = checkpoint.get("eval_pending", False)
        if distributed.is_main():
            # Records written after this checkpoint describe steps that will be run again.
            rewrite_log(self.run_dir, keep=lambda record: record["step"] <= self.step)
            kept = read_log(self.run_dir)
            self.wall_offset = kept[-1].get("wall_s", 0.0) if kept else 0.0

    def save(self, *names: str) -> None:
        """Writes the checkpoint of this step to each of `names` in the run directory.
        Every rank calls it; rank 0 writes the files."""
        engine_state = self.engine.state_dict(self.run_dir, self.step)
        ranks = distributed.all_gather_objects({
            "rng": rng_state(self.device), "skipped_files": self.skipped_files,
            "batchnorm": distributed.own_batchnorm_statistics(self.method)})
        # With BatchNorm averaged every rank holds the same method state: it is saved once.
        with distributed.averaged_batchnorm_statistics(self.method):
            if distributed.is_main():
                checkpoint = training_checkpoint(
                    self.cfg.to_dict(), self.method, self.loaders.num_classes, self.step,
                    self.steps_per_epoch, engine_state, ranks, self.best_top1, self.last_top1,
                    self.last_eval, {key: value for key, (value, _)
                                     in self.method.effective_settings().items()},
                    self.eval_pending, {split: fingerprint.to_dict()
                                        for split, fingerprint in self.data.items()})
                for name in names:
                    save_atomic(checkpoint, self.run_dir / name)
        if distributed.is_main():
            remove_old_periodic(self.run_dir, self.cfg.train.keep_last)
            self.engine.release_unreferenced(self.run_dir)
        distributed.heartbeat(f"saving step {self.step}")

    def set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg.optim, self.steps_per_epoch,
                                           self.total_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, micro_batches: tuple[Batch, ...]) -> None:
        """One optimizer step over `micro_batches` (optim.grad_accum_steps of them)."""
        for i, batch in enumerate(micro_batches):
            self._report_skipped(batch)
            batch = batch.to(self.device, non_blocking=True)
            self.method.begin_micro_batch(self.step * self.accumulation + i)
            mark_step_begin(self.cfg.train.compile)
            out = self.engine.micro_step(batch, boundary=i == len(micro_batches) - 1)
            self.metrics.add({"loss": out.loss.detach(), **out.metrics})
        # Momentum (EMA) updates follow the optimizer step they average in.
        self.method.on_optimizer_step()
        if not self.kernels_reported:
            self._report_kernels()

    def _report_kernels(self) -> None:
        """After this process's first step: which implementation each fused op ran."""
        self.kernels_reported = True
        if used := implementations_used():
            self._record("kernels", {"step": self.step + 1, **used})
            self._print("fused ops: " + ", ".join(f"{op} ran {how}" for op, how in used.items()))

    def _report_skipped(self, batch: Batch) -> None:
        for path in batch.skipped:
            self.skipped_files += 1
            where = f"rank {self.rank}: " if self.world_size > 1 else ""
            self._print(f"{where}warning: skipped unreadable image {path} (the next readable "
                        f"one trained in its place, its memory rows left as they are; "
                        f"{self.skipped_files} so far)", every_rank=True)

    def run_eval(self) -> None:
        self.eval_pending = False
        self.telemetry.label = None  # the GPU while it evaluates is not the GPU training
        # Sharded over the ranks, which hold the same student once BatchNorm is averaged.
        with distributed.averaged_batchnorm_statistics(self.method), autocast(self.cfg,
                                                                               self.device):
            result = evaluate(self.method.student(), self.loaders.val, self.device)
        self.telemetry.label = "train"
        self.last_top1, self.last_eval = result["top1"], result
        is_best = self.last_top1 >= self.best_top1
        self.best_top1 = max(self.best_top1, self.last_top1)
        self._record("eval", {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              **result})
        self.save("last.pt", *(["best.pt"] if is_best else []))
        self._print(f"step {self.step} epoch {self.step / self.steps_per_epoch:.2f}: "
                    f"top1 {result['top1']:.2f} top5 {result['top5']:.2f} "
                    f"(best {self.best_top1:.2f}; {describe_samples(result)})")

    def _print(self, text: str, every_rank: bool = False) -> None:
        if not (every_rank or distributed.is_main()):
            return
        if self.bar is not None:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def _record(self, kind: str, record: dict[str, Any]) -> None:
        """A metrics.jsonl record (rank 0), with the run's wall-clock time so far."""
        if self.log is not None:
            wall_s = self.wall_offset + time.perf_counter() - self.fit_started
            self.log.write(kind, {**record, "wall_s": wall_s})

    def _configured(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self.cfg, section), name)

    def _describe(self) -> str:
        cfg, world = self.cfg, self.world_size
        processes = f" x {world} processes" if world > 1 else ""
        global_batch = cfg.data.batch_size * self.accumulation * world
        return (f"{cfg.method.name} on {self.device}{processes} ({self.engine.description}): "
                f"{self.loaders.num_train} training images, {self.steps_per_epoch} steps per "
                f"epoch of {global_batch} images, data through {self.loaders.backend}; run in "
                f"{self.run_dir}")

    def fit(self) -> RunResult:
        """Trains to `train.max_steps` or the end of the schedule; raises `Preempted` after
        saving when a stop signal arrives."""
        cfg = self.cfg
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(self.run_dir)
            self.engine.release_unreferenced(self.run_dir)  # what a failed save left
            save_config(cfg, self.run_dir / "config.yaml")
            self.log = RunLog(self.run_dir, resumed_at=self.step if self.step else None)
            if cfg.train.progress and sys.stderr.isatty():
                self.bar = tqdm(total=self.stop_step, initial=self.step, unit="step",
                                dynamic_ncols=True, desc=self.run_dir.name)
        self.fit_started = time.perf_counter()
        self._print(self._describe())
        self._record("start", {"step": self.step, "processes": self.world_size,
                               "device": str(self.device), "engine": self.engine.description,
                               "bank_mb": self.method.bank_bytes() / 2 ** 20})
        for note in self.notes:
            self._print(note)
        self._record("preprocessing", {"step": self.step, **dataclasses.asdict(
            Preprocessing.of(cfg.data))})
        if self.imported_from is not None:
            self._print(f"{self.imported_from} was imported: it holds weights but no optimizer "
                        f"state or data position, so the schedule starts at step {self.step} "
                        f"(epoch 0) with a fresh optimizer")
        for key, (value, why) in self.method.effective_settings().items():
            self._print(f"{key} is {value} in this run, not {self._configured(key)!r}: {why}")
            self._record("effective", {"step": self.step, "key": key, "value": value})
        if self.resume_changes:
            self._print(f"resuming at step {self.step} with changed settings: " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in self.resume_changes.items()))
            self._record("resume", {"step": self.step, "changes": {
                key: {"saved": old, "now": new} for key, (old, new) in self.resume_changes.items()}})
        self.window.restart()
        try:
            # NVML samples (on CUDA) are filed under "train" while the run trains.
            with self.stop_requests, Telemetry(self.device, interval_s=0.5) as self.telemetry:
                self.telemetry.label = "train"
                if self.eval_pending:  # as the uninterrupted run did before its next epoch
                    self.run_eval()
                self._train_until_stop()
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.log is not None:
                self.log.close()
        return RunResult(self.run_dir, self.step, self.last_top1, self.best_top1)

    def _train_until_stop(self) -> None:
        """Epochs of steps until `stop_step`, or until a stop signal (`Preempted`) or a file
        some rank cannot read (`StoppedTogether`), after saving the last step all could take."""
        cfg = self.cfg
        while self.step < self.stop_step:
            epoch, consumed = divmod(self.step, self.steps_per_epoch)
            self.loaders.train.start(epoch, consumed * self.accumulation)
            self.method.begin_epoch(epoch)
            self.method.train()
            # Read ahead by the stop vote's lag (one step with several processes) plus one.
            steps = ReadableSteps(self.loaders.train, self.accumulation,
                              depth=2 if self.world_size > 1 else 1)
            if self._unreadable_anywhere(steps) is not None:  # one of the epoch's first steps
                self.save("last.pt")
                self._stop(steps)
            for micro_batches in steps:
                lr = self.set_lr()
                self.train_step(micro_batches)
                self.step += 1
                distributed.heartbeat(f"step {self.step}")
                self.window.count(sum(map(len, micro_batches)), steps.take_waited())
                if self.bar is not None:
                    self.bar.update(1)
                epoch_end = self.step % self.steps_per_epoch == 0
                save_due = cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0
                final = self.step == self.stop_step
                # Every rank votes every step (a stop signal, or a step read ahead that it
                # cannot read); all learn the same outcome.
                stopping = (self.stop_requests.should_stop(steps.failure is not None)
                            and not final)
                # Every save follows a log step, which checks that the metrics are finite:
                # a diverged run never overwrites a good checkpoint.
                if (self.step % cfg.train.log_every == 0 or epoch_end or save_due or final
                        or stopping):
                    self._log_train(lr)
                eval_due = (epoch_end and (epoch + 1) % cfg.train.eval_every == 0) or final
                self.eval_pending = stopping and eval_due
                if save_due or stopping:
                    self.save("last.pt", *([f"step_{self.step:08d}.pt"] if save_due else []))
                if stopping:
                    self._stop(steps)
                if final or epoch_end:
                    break
            if eval_due:
                self.run_eval()
            elif epoch_end:
                self.save("last.pt")
            self.window.restart()  # evaluation and saving are not training throughput

    def _stop(self, steps: ReadableSteps) -> None:
        """After the stop vote, with last.pt saved: say why (a file some rank cannot read, or
        a stop signal), the same on every rank, then end the run."""
        if (unreadable := self._unreadable_anywhere(steps)) is not None:
            self._record("stop", {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "error": unreadable})
            raise StoppedTogether(f"{unreadable}; {self.run_dir}/last.pt holds step {self.step}, "
                                  f"the last whose data every process could read: replace "
                                  f"the file with a readable image or set "
                                  f"data.skip_corrupt=true, then continue with --resume "
                                  f"{self.run_dir}")
        stop = Preempted(self.stop_requests.reason(), self.step, str(self.run_dir))
        self._record("stop", {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              "signal": stop.signal_name})
        raise stop

    def _unreadable_anywhere(self, steps: ReadableSteps) -> str | None:
        """The error of the first rank that cannot read a step it read ahead, on every rank."""
        errors = distributed.all_gather_objects(None if steps.failure is None
                                                else str(steps.failure))
        where = (f"rank {r}: " if self.world_size > 1 else "" for r in range(self.world_size))
        return next((prefix + error for prefix, error in zip(where, errors) if error), None)

    def _log_train(self, lr: float) -> None:
        # The one collective of a log step: every metric and counter summed over the ranks.
        means = self.metrics.pop(totals={"skipped_files": self.skipped_files})
        if not all(map(math.isfinite, means.values())):
            raise UserError(
                f"training diverged: non-finite metrics at step {self.step}: {means}; the last "
                f"checkpoint in {self.run_dir} is from before this point (lower optim.lr?)")
        speed = self._speed()
        # With train.compile, a count that grows after the first steps means recompilation.
        graphs = {"compiled_graphs": compiled_graphs()} if self.cfg.train.compile else {}
        gpu = {name if name.startswith("gpu_") else f"gpu_{name}": value
               for name, value in (self.telemetry.pop("train") or {}).items()}
        self._record("train", {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                               "lr": lr, **means, **speed,
                               "peak_memory_mb": self.peak_memory.read_mb(), **graphs, **gpu})
        img_per_s, waiting = speed["img_per_s"], f"{speed['data_wait_share']:.0%}"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.3g}",
                                 img_s=f"{img_per_s:.0f}", data=waiting)
        else:
            self._print(f"step {self.step}/{self.stop_step} loss {means['loss']:.4f} "
                        f"lr {lr:.4g} {img_per_s:.0f} img/s, data wait {waiting}")

    def _speed(self) -> dict[str, float | int]:
        """The window's images/s (all ranks), this rank's rate and data wait, and the slowest
        rank: gathered at log steps only (a slow node holds every rank back in the
        collectives, so the run's rate is its)."""
        window = self.window.read()
        ranks = distributed.all_gather_objects(window)
        slowest = min(range(len(ranks)), key=lambda r: ranks[r]["rank_img_per_s"])
        return {"img_per_s": sum(r["rank_img_per_s"] for r in ranks), **window,
                "slowest_rank": slowest,
                "slowest_rank_img_per_s": ranks[slowest]["rank_img_per_s"],
                "data_wait_share_max": max(r["data_wait_share"] for r in ranks)}


def train(cfg: Config) -> RunResult:
    return Trainer(cfg).fit()
