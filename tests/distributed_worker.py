"""A training process for the multi-process tests, started by `torchrun` or `deepspeed`.

    torchrun --nproc_per_node 2 tests/distributed_worker.py SPEC.json

SPEC.json: {"runs": [{"overrides": [...], "resume": RUN_DIR or null, "bn_eval": bool,
"dump": PATH, "hang": [RANK, STEP]}, ...]}. Each run is a `Trainer` built as `cocord-fast
train` builds it; with `bn_eval` every BatchNorm stays in eval mode (a model without
batch-dependent layers); with `hang`, rank RANK stops answering in step STEP. After
`fit()`, each rank writes `PATH.rank<R>.pt`: its method state, the dataset indices and CRD
contrast indices of every micro-batch it trained on, the keys CoCoRD computed before
gathering them, and its losses as the engine returned them.
"""
from __future__ import annotations

import json
import sys
import time
import types

import torch
from torch import nn

from cocord_fast.cli import run_command
from cocord_fast.config import load_config
from cocord_fast.engine import distributed
from cocord_fast.engine.resume import config_for_resume
from cocord_fast.engine.trainer import Trainer


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


def record(trainer: Trainer) -> dict[str, list]:
    """Wraps the engine's micro-step (and CoCoRD's enqueue) to keep what this rank saw."""
    seen: dict[str, list] = {"index": [], "contrast_index": [], "keys": [], "loss": []}
    micro_step = trainer.engine.micro_step

    def recorded_micro_step(batch, boundary):
        seen["index"].append(batch.index.cpu())
        if batch.contrast_index is not None:
            seen["contrast_index"].append(batch.contrast_index.cpu())
        out = micro_step(batch, boundary)
        seen["loss"].append(out.loss.detach().cpu())
        return out

    trainer.engine.micro_step = recorded_micro_step
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
    trainer = Trainer(cfg)
    if spec.get("bn_eval"):
        freeze_batchnorm(trainer.method)
    if spec.get("hang"):
        hang(trainer, *spec["hang"])
    seen = record(trainer)
    trainer.fit()
    if spec.get("dump"):
        torch.save({"method": trainer.method.state_dict(), **seen,
                    "world_size": distributed.world_size()},
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
