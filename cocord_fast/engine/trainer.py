"""The training loop: build everything from the config, then step, log, evaluate, checkpoint."""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import Config, load_config, save_config
from ..data import Loaders, build_loaders
from ..data.contrast import NegativeSampler
from ..errors import UserError
from ..methods import METHODS, Method, build_method
from ..models import MODELS, build_model
from .checkpoint import (load_checkpoint, load_model_weights, load_strict, rng_state,
                         save_atomic, set_rng_state, training_checkpoint)
from .evaluate import evaluate
from .metrics import MetricAccumulator, RunLog, ThroughputWindow, rewrite_log
from .schedule import lr_factor


@dataclass
class RunResult:
    run_dir: Path
    step: int
    top1: float
    best_top1: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name}, but CUDA is not available on this machine")
    return device


def autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint `train.resume` points at: 'auto' (last.pt of output_dir, if any), a run
    directory or a checkpoint file."""
    resume = cfg.train.resume
    if not resume:
        return None
    if resume == "auto":
        last = Path(cfg.train.output_dir) / "last.pt"
        return last if last.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise UserError(f"train.resume={resume}: no checkpoint at {path}")
    return path


def config_for_resume(path: str | Path, overrides: list[str]) -> Config:
    """The saved config of the run at `path` (directory or checkpoint), with `overrides` on top."""
    path = Path(path)
    checkpoint = path / "last.pt" if path.is_dir() else path
    saved = load_checkpoint(checkpoint)["config"]
    return load_config(base=saved, overrides=[f"train.resume={checkpoint}", *overrides])


def check_model_names(cfg: Config, needs_teacher: bool) -> None:
    """Fails on a misspelt architecture before any data is read or made."""
    fields = [("model.student", cfg.model.student)]
    if needs_teacher:
        if not cfg.model.teacher or not cfg.model.teacher_checkpoint:
            raise UserError(f"method.name={cfg.method.name} needs model.teacher and "
                            f"model.teacher_checkpoint")
        fields.append(("model.teacher", cfg.model.teacher))
    for field_name, name in fields:
        if name not in MODELS:
            raise UserError(f"{field_name}: unknown model {name!r}; known models: "
                            f"{', '.join(MODELS)}")


def build_teacher(cfg: Config, num_classes: int) -> torch.nn.Module:
    teacher = build_model(cfg.model.teacher, num_classes)
    load_strict(teacher, load_model_weights(cfg.model.teacher_checkpoint),
                cfg.model.teacher_checkpoint)
    teacher.requires_grad_(False)
    return teacher.eval()


class Trainer:
    """One run: `Trainer(cfg).fit()`. Everything that affects the next step is checkpointed."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.device = resolve_device(cfg.train.device)
        resume_from = find_resume_checkpoint(cfg)
        checkpoint = load_checkpoint(resume_from) if resume_from else None
        if checkpoint is None and (self.run_dir / "last.pt").exists():
            raise UserError(f"{self.run_dir} already holds a run; continue it with "
                            f"train.resume=auto, or choose another train.output_dir")

        method_class = METHODS[cfg.method.name]
        check_model_names(cfg, method_class.needs_teacher)
        torch.manual_seed(cfg.train.seed)
        self.loaders: Loaders = build_loaders(
            cfg.data, method_class.num_views, cfg.train.seed, self.device,
            torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
        self.steps_per_epoch = self.loaders.steps_per_epoch
        negatives = method_class.contrast_negatives(cfg)  # CRD's K; 0 for the other methods
        self.negative_sampler = (NegativeSampler(self.loaders.train_targets, negatives,
                                                 cfg.train.seed, self.device)
                                 if negatives else None)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)

        student = build_model(cfg.model.student, self.loaders.num_classes)
        teacher = build_teacher(cfg, self.loaders.num_classes) if method_class.needs_teacher else None
        self.method: Method = build_method(cfg.method.name, cfg, student, teacher,
                                           self.loaders.num_train).to(self.device)
        self.optimizer = torch.optim.SGD(
            self.method.trainable_module().parameters(), lr=cfg.optim.lr,
            momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov)
        self.step, self.best_top1, self.last_top1 = 0, 0.0, 0.0
        self.skipped_files = 0  # unreadable training images replaced (data.skip_corrupt)
        self.data_state: bytes | None = None  # the loader's state at the resumed step
        self.bar: tqdm | None = None
        if checkpoint is not None:
            self._restore(checkpoint)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.method.load_state_dict(checkpoint["method"])
        # A checkpoint imported from another code base carries weights but no optimizer or RNG
        # state: those then start fresh.
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("rng") is not None:
            set_rng_state(checkpoint["rng"])
        self.step = checkpoint["step"]
        self.best_top1, self.last_top1 = checkpoint["best_top1"], checkpoint["last_top1"]
        self.skipped_files = checkpoint.get("skipped_files", 0)
        self.data_state = checkpoint.get("data_state")
        # Records written after this checkpoint describe steps that will be run again.
        rewrite_log(self.run_dir, keep=lambda record: record["step"] <= self.step)

    def save(self, name: str) -> None:
        checkpoint = training_checkpoint(
            self.cfg.to_dict(), self.method, self.loaders.num_classes, self.step,
            self.steps_per_epoch, self.optimizer.state_dict(), rng_state(), self.best_top1,
            self.last_top1)
        mid_epoch = self.step % self.steps_per_epoch != 0
        save_atomic({**checkpoint, "skipped_files": self.skipped_files,
                     "data_state": self.loaders.train.state() if mid_epoch else None},
                    self.run_dir / name)

    def set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg.optim, self.steps_per_epoch,
                                           self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        for path in batch.skipped:
            self.skipped_files += 1
            self._print(f"warning: skipped unreadable image {path} (replaced by the next "
                        f"readable one; {self.skipped_files} so far)")
        batch = batch.to(self.device, non_blocking=True)
        if self.negative_sampler is not None:
            # Drawn on the device from (seed, step): a resumed run draws the same negatives.
            batch.contrast_index = self.negative_sampler.sample(batch.index, self.step)
        with autocast(self.cfg, self.device):
            out = self.method(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        # Momentum (EMA) updates follow the optimizer step they average in.
        self.method.on_optimizer_step()
        return {"loss": out.loss.detach(), **out.metrics}

    def run_eval(self, log: RunLog) -> None:
        with autocast(self.cfg, self.device):
            result = evaluate(self.method.student(), self.loaders.val, self.device)
        self.last_top1 = result["top1"]
        is_best = self.last_top1 >= self.best_top1
        self.best_top1 = max(self.best_top1, self.last_top1)
        log.write("eval", {"step": self.step, "epoch": self.step / self.steps_per_epoch, **result})
        self.save("last.pt")
        if is_best:
            self.save("best.pt")
        self._print(f"step {self.step} epoch {self.step / self.steps_per_epoch:.2f}: "
                    f"top1 {result['top1']:.2f} top5 {result['top5']:.2f} "
                    f"(best {self.best_top1:.2f})")

    def _print(self, text: str) -> None:
        if self.bar is not None:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def fit(self) -> RunResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        log = RunLog(self.run_dir)
        print(f"{cfg.method.name} on {self.device}: {self.loaders.num_train} training images, "
              f"{self.steps_per_epoch} steps per epoch, data through {self.loaders.backend}",
              flush=True)
        use_bar = cfg.train.progress and sys.stderr.isatty()
        self.bar = tqdm(total=self.stop_step, initial=self.step, unit="step", dynamic_ncols=True,
                        desc=self.run_dir.name) if use_bar else None
        self.metrics, self.window = MetricAccumulator(), ThroughputWindow()
        try:
            while self.step < self.stop_step:
                epoch, consumed = divmod(self.step, self.steps_per_epoch)
                # The data state only ever describes the position the run resumed from.
                self.loaders.train.start(epoch, consumed, self.data_state if consumed else None)
                self.data_state = None
                self.method.train()
                for batch in self.loaders.train:
                    lr = self.set_lr()
                    self.metrics.add(self.train_step(batch))
                    self.step += 1
                    self.window.count(len(batch))
                    if self.bar is not None:
                        self.bar.update(1)
                    epoch_end = self.step % self.steps_per_epoch == 0
                    save_due = cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0
                    final = self.step == self.stop_step
                    # Every save follows a log step, which checks that the metrics are finite:
                    # a diverged run never overwrites a good checkpoint.
                    if self.step % cfg.train.log_every == 0 or epoch_end or save_due or final:
                        self._log_train(log, lr)
                    if save_due:
                        self.save("last.pt")
                        self.save(f"step_{self.step:08d}.pt")
                    if final:
                        break
                if (epoch_end and (epoch + 1) % cfg.train.eval_every == 0) or final:
                    self.run_eval(log)
                elif epoch_end:
                    self.save("last.pt")
                self.window.restart()  # evaluation and saving are not training throughput
        finally:
            if self.bar is not None:
                self.bar.close()
            log.close()
        return RunResult(self.run_dir, self.step, self.last_top1, self.best_top1)

    def _log_train(self, log: RunLog, lr: float) -> None:
        means = self.metrics.pop()
        if not all(map(math.isfinite, means.values())):
            raise UserError(
                f"training diverged: non-finite metrics at step {self.step}: {means}; the last "
                f"checkpoint in {self.run_dir} is from before this point (lower optim.lr?)")
        img_per_s = self.window.rate()
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr,
                  **means, "img_per_s": img_per_s, "skipped_files": self.skipped_files}
        log.write("train", record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.3g}",
                                 img_s=f"{img_per_s:.0f}")
        else:
            print(f"step {self.step}/{self.stop_step} loss {means['loss']:.4f} lr {lr:.4g} "
                  f"{img_per_s:.0f} img/s", flush=True)


def train(cfg: Config) -> RunResult:
    return Trainer(cfg).fit()
