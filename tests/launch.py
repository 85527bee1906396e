"""Starting 2-process runs with the real launchers, and the 1-process references they must
equal, for the multi-process tests (CPU, gloo)."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from cocord_fast.data import Batch, build_loaders
from cocord_fast.data.contrast import NegativeSampler
from cocord_fast.engine.trainer import Trainer

BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT = 900  # seconds: a hung collective fails the test instead of CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, args: list[str], cwd: Path, nproc: int = 2) -> str:
    """Runs `args` under `torchrun` or `deepspeed` with `nproc` processes on its own port;
    returns stdout + stderr, and fails with them if the launch failed."""
    port = str(free_port())
    if launcher == "torchrun":
        command = [BIN / "torchrun", "--nproc_per_node", str(nproc), "--master_port", port]
    else:
        command = [BIN / "deepspeed", "--num_gpus", str(nproc), "--master_port", port]
    # One thread per process on the 2-core machine; the launchers find python and each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run([*map(str, command), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{launcher} failed ({done.returncode}):\n{output[-6000:]}"
    return output


def launch_worker(launcher: str, runs: list[dict], cwd: Path) -> str:
    spec = cwd / f"spec_{launcher}.json"
    spec.write_text(json.dumps({"runs": runs}))
    return launch(launcher, [WORKER, spec], cwd)


def rank_dumps(path: Path, world_size: int = 2) -> list[dict]:
    return [torch.load(f"{path}.rank{r}.pt", weights_only=True) for r in range(world_size)]


class ConcatenatedRanks:
    """A training loader whose batch of each step is the global batch of a 2-rank run: rank
    0's samples, then rank 1's (the order in which the queue and the banks receive them)."""

    def __init__(self, loaders):
        self.loaders = loaders

    def start(self, epoch: int, skip: int = 0, state=None) -> None:
        for loader in self.loaders:
            loader.start(epoch, skip)

    def state(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for parts in zip(*self.loaders):
            yield Batch(views=[torch.cat(views) for views in zip(*(p.views for p in parts))],
                        labels=torch.cat([p.labels for p in parts]),
                        index=torch.cat([p.index for p in parts]))


class ConcatenatedSamplers:
    """CRD's negatives of a 2-rank run for its global batch: each half drawn by its rank."""

    def __init__(self, samplers: list[NegativeSampler]):
        self.samplers = samplers

    def sample(self, index: torch.Tensor, draw: int) -> torch.Tensor:
        halves = index.chunk(len(self.samplers))
        return torch.cat([s.sample(half, draw) for s, half in zip(self.samplers, halves)])


def one_process_reference(cfg, per_rank_batch: int, world_size: int = 2) -> Trainer:
    """A 1-process Trainer for `cfg` (whose data.batch_size is the global batch) that sees the
    global batches of a `world_size`-rank run with `per_rank_batch` per rank."""
    trainer = Trainer(cfg)
    data = dataclasses.replace(cfg.data, batch_size=per_rank_batch)
    method = type(trainer.method)
    trainer.loaders.train = ConcatenatedRanks([
        build_loaders(data, method.num_views, cfg.train.seed, trainer.device, rank=r,
                      world_size=world_size).train for r in range(world_size)])
    if trainer.negative_sampler is not None:
        trainer.negative_sampler = ConcatenatedSamplers([
            NegativeSampler(trainer.loaders.train_targets, method.contrast_negatives(cfg),
                            cfg.train.seed, trainer.device, rank=r) for r in range(world_size)])
    return trainer
