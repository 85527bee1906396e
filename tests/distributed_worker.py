"""A training process for the multi-process tests, started by `torchrun` or `deepspeed`.

    torchrun --nproc_per_node 2 tests/distributed_worker.py SPEC.json

SPEC.json: {"runs": [{"overrides": [...], "resume": RUN_DIR or null, "bn_eval": bool,
"dump": PATH, ...}, ...]}. Each run is a `Trainer` built as `cocord-fast train` builds it;
with `bn_eval` every BatchNorm stays in eval mode (a model without batch-dependent layers).
After `fit()`, each rank writes `PATH.rank<R>.pt`: its method state, the dataset indices and
CRD contrast indices of every micro-batch it trained on, the keys CoCoRD computed before
gathering them, its losses as the engine returned them, DeepSpeed's /dev/shm buffers as they
were when the engine removed this rank's name, and what the options below saw.

Faults and probes: "hang": [RANK, STEP] (that rank stops answering in that step, as a process
blocked for good in a GPU synchronisation would), "fail": [RANK, STEP] (that rank raises a
UserError there), "skew_rng": RANK (that rank draws extra random numbers before the models
are built), "setup_only" (dump right after the Trainer is built, no training),
"inspect_gathers" (record the device of every tensor handed to `all_gather_object`),
"trace_convolutions" (record the layouts of every convolution of the first step), "hide":
[RANK, PATH] (on that rank, files under PATH do not exist, as on another node's disk).
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cocord_fast import distributed
from cocord_fast.cli import run_command
from cocord_fast.config import load_config
from cocord_fast.engines import deepspeed_engine
from cocord_fast.errors import UserError
from cocord_fast.training import networks
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import Trainer


def freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm in eval mode for good: `train()` no longer reaches them."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False),
                                           layer)
            layer.eval()


def hang(trainer: Trainer, rank: int, step: int) -> None:
    """Rank `rank` stops answering in step `step` (a stuck process: alive, silent)."""
    micro_step = trainer.engine.micro_step

    def stuck_micro_step(batch, boundary):
        if distributed.rank() == rank and trainer.step + 1 == step:
            time.sleep(3600)
        return micro_step(batch, boundary)

    trainer.engine.micro_step = stuck_micro_step


def fail(trainer: Trainer, rank: int, step: int) -> None:
    """Rank `rank` stops with a UserError in step `step`."""
    micro_step = trainer.engine.micro_step

    def failing_micro_step(batch, boundary):
        if distributed.rank() == rank and trainer.step + 1 == step:
            raise UserError(f"injected failure in step {step}")
        return micro_step(batch, boundary)

    trainer.engine.micro_step = failing_micro_step


def skew_rng(rank: int) -> None:
    """Rank `rank` draws extra random numbers before the first model is built."""
    build_model = networks.build_model

    def skewed_build_model(*args, **kwargs):
        if distributed.rank() == rank:
            torch.rand(1000)
        networks.build_model = build_model
        return build_model(*args, **kwargs)

    networks.build_model = skewed_build_model


def inspect_gathers(seen: dict[str, list]) -> None:
    """Records the device of every tensor in every object this rank hands to a gather."""
    gather = dist.all_gather_object

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            seen["gathered_devices"].append(str(obj.device))
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    def inspected_gather(output, obj, *args, **kwargs):
        walk(obj)
        return gather(output, obj, *args, **kwargs)

    dist.all_gather_object = inspected_gather


class ConvolutionLayouts(TorchDispatchMode):
    """Every convolution and convolution backward, with whether each activation tensor is
    channels-last, the weight's layout (a 1x1 kernel's weight is both), and whether the weight
    is one of `teacher`'s."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.convolution.default,
                    torch.ops.aten.convolution_backward.default):
            backward = func is torch.ops.aten.convolution_backward.default
            activations = ([args[0], args[1], out[0]] if backward else [args[0], out])
            weight = args[2] if backward else args[1]
            self.calls.append({
                "backward": backward,
                "activations_channels_last": all(
                    t.is_contiguous(memory_format=torch.channels_last)
                    for t in activations if t is not None),
                "weight_channels_last": weight.is_contiguous(memory_format=torch.channels_last),
                "weight_contiguous": weight.is_contiguous(),
                "teacher": weight.untyped_storage().data_ptr() in self.teacher})
        return out


def trace_convolutions(trainer: Trainer, seen: dict[str, list]) -> None:
    """Runs the first optimizer step under `ConvolutionLayouts`."""
    train_step = trainer.train_step

    def traced_train_step(micro_batches):
        if trainer.step > 0:
            return train_step(micro_batches)
        with ConvolutionLayouts(trainer.method.teacher_encoder) as trace:
            train_step(micro_batches)
        seen["convolutions"] = trace.calls

    trainer.train_step = traced_train_step


def hide(rank: int, path: str) -> None:
    """On rank `rank`, files under `path` are missing."""
    is_file = Path.is_file

    def hidden_is_file(self):
        if distributed.rank() == rank and str(self).startswith(path):
            return False
        return is_file(self)

    Path.is_file = hidden_is_file


UNLINK_SHARED_MEMORY = deepspeed_engine._unlink_shared_memory_buffer


def watch_shared_memory(seen: list[list[str]]) -> None:
    """Lists DeepSpeed's /dev/shm buffers each time the engine is about to remove this rank's."""
    def watched_unlink():
        seen.append(sorted(p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")))
        UNLINK_SHARED_MEMORY()

    deepspeed_engine._unlink_shared_memory_buffer = watched_unlink


def record(trainer: Trainer) -> dict[str, list]:
    """Wraps the engine's micro-step (and CoCoRD's enqueue) to keep what this rank saw."""
    seen: dict[str, list] = {"index": [], "contrast_index": [], "keys": [], "loss": [],
                             "gathered_devices": []}
    micro_step = trainer.engine.micro_step

    def recorded_micro_step(batch, boundary):
        seen["index"].append(batch.index.cpu())
        out = micro_step(batch, boundary)
        seen["loss"].append(out.loss.detach().cpu())
        return out

    trainer.engine.micro_step = recorded_micro_step
    if hasattr(trainer.method, "negatives"):  # CRD's draws
        sample = trainer.method.negatives.sample

        def recorded_sample(index, draw):
            seen["contrast_index"].append(sample(index, draw).cpu())
            return seen["contrast_index"][-1].to(index.device)

        trainer.method.negatives.sample = recorded_sample
    if hasattr(trainer.method, "enqueue_"):
        enqueue = trainer.method.enqueue_

        def recorded_enqueue(keys):
            seen["keys"].append(keys.detach().cpu())
            return enqueue(keys)

        trainer.method.enqueue_ = recorded_enqueue
    return seen


def run(spec: dict) -> None:
    if spec.get("resume"):
        cfg = config_for_resume(spec["resume"], spec.get("overrides", []))
    else:
        cfg = load_config(overrides=spec["overrides"])
    if spec.get("skew_rng") is not None:
        skew_rng(spec["skew_rng"])
    if spec.get("hide"):
        hide(*spec["hide"])
    shared_memory: list[list[str]] = []
    watch_shared_memory(shared_memory)
    trainer = Trainer(cfg)
    if spec.get("bn_eval"):
        freeze_batchnorm(trainer.method)
    if spec.get("hang"):
        hang(trainer, *spec["hang"])
    if spec.get("fail"):
        fail(trainer, *spec["fail"])
    seen = record(trainer)
    if spec.get("inspect_gathers"):
        inspect_gathers(seen)
    if spec.get("trace_convolutions"):
        trace_convolutions(trainer, seen)
    if not spec.get("setup_only"):
        trainer.fit()
    if spec.get("dump"):
        Path(spec["dump"]).parent.mkdir(parents=True, exist_ok=True)
        groups = [{key: value for key, value in group.items() if key != "params"}
                  for group in trainer.engine.optimizer.param_groups]
        torch.save({"method": trainer.method.state_dict(), **seen, "optimizer_groups": groups,
                    "world_size": distributed.world_size(), "shared_memory": shared_memory,
                    "master_port": os.environ.get("MASTER_PORT")},
                   f"{spec['dump']}.rank{distributed.rank()}.pt")


def main(argv: list[str]) -> int:
    # The deepspeed launcher puts --local_rank=N first; the rank comes from the environment.
    spec_path = next(arg for arg in argv if not arg.startswith("--local"))
    with open(spec_path) as f:
        specs = json.load(f)["runs"]

    def run_all() -> int:
        for spec in specs:
            run(spec)
        return 0

    return distributed.finish(run_command(run_all))  # errors handled as by the CLI


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
