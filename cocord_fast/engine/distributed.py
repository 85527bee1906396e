"""The one module that knows about processes: rank, world size, collectives, start and end.

A process belongs to a group of `world_size` processes when a launcher started it (`torchrun`
or the `deepspeed` launcher set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT). In
a single process every helper here is a no-op (gathers return their input), so methods and the
loop call them unconditionally. The DeepSpeed engine needs a process group even for one
process: `init` then makes a group of one on a free local port.

Collectives run on the backend that fits the device: NCCL for CUDA tensors, gloo on CPU. None
of them carries gradients.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


_timeout: timedelta | None = None  # of the joined group's collectives


def launched_world_size() -> int:
    """The number of processes a launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that prints, logs and writes the run directory (before the group
    is joined, the rank a launcher gave this process)."""
    return (rank() if is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: torch.device, timeout_s: float, group_of_one: bool = False) -> None:
    """Joins the launcher's process group (idempotent); its collectives give up after
    `timeout_s`. With `group_of_one`, a process started without a launcher forms a group of
    one (DeepSpeed needs a group)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed use the current device
    if is_initialized() or (launched_world_size() == 1 and not group_of_one):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    global _timeout
    timeout = _timeout = timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ:  # a launcher described the group
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, timeout=timeout)


def finish(exit_code: int) -> int:
    """Leaves the process group. A worker of a multi-process launch then ends at once: after
    a finished DeepSpeed run, interpreter shutdown aborted about 1 in 12 times ("terminate
    called without an active exception"). A failed worker skips the barrier (its peers may
    be blocked elsewhere); the launcher stops them when it sees the failure."""
    if not is_initialized():
        return exit_code
    launched = launched_world_size() > 1
    if exit_code == 0:
        dist.barrier()
    dist.destroy_process_group()
    if launched:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


_FAILURE, _FAILURES = "cocord_fast/failure", "cocord_fast/failures"


def report_failure(message: str) -> None:
    """Leaves why this process stops in the group's store, for the others to name when their
    next collective fails (the first failure wins). Best effort: the store may be gone."""
    if world_size() == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(_FAILURES, 1) == 1:
            store.set(_FAILURE, f"rank {rank()}: {message}")
    except (RuntimeError, ValueError):
        pass


def peer_failure() -> str | None:
    """What another process reported before it stopped, if one did."""
    if world_size() == 1:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        if not store.check([_FAILURE]):
            return None
        found = store.get(_FAILURE).decode()
    except (RuntimeError, ValueError):
        return None
    return None if found.startswith(f"rank {rank()}:") else found


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a shared cache), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


@torch.no_grad()
def all_gather(tensor: Tensor) -> Tensor:
    """(B, ...) on every rank -> (world_size * B, ...): every rank's tensor, in rank order.
    Every rank must pass the same shape."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks (a new tensor; the input is untouched)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (host data: RNG and data-loader states)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class LaggedAny:
    """Whether any rank raised its flag, known the same on every rank one call late.

    Each call waits for the all-reduce the previous call started, and starts one over this
    rank's flag, on a gloo group of its own on the CPU: no host sync with the training
    device, and the wait usually finds the result there. In one process, the flag itself.
    """

    def __init__(self) -> None:
        self.group = (dist.new_group(backend="gloo", timeout=_timeout) if world_size() > 1
                      else None)
        self.pending: tuple[Any, Tensor] | None = None

    def __call__(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        raised = self._wait()
        votes = torch.tensor([int(flag)])
        self.pending = (dist.all_reduce(votes, group=self.group, async_op=True), votes)
        return raised

    def _wait(self) -> bool:
        if self.pending is None:
            return False
        work, votes = self.pending
        work.wait()
        self.pending = None
        return bool(votes.item())

    def close(self) -> None:
        """Waits for the last vote (every rank casts the same number)."""
        self._wait()


def _batchnorm_statistics(module: nn.Module) -> dict[str, Tensor]:
    """Every BatchNorm's running mean and variance in `module`, by state-dict name (the live
    buffers, not copies)."""
    return {f"{name}.{stat}" if name else stat: getattr(layer, stat)
            for name, layer in module.named_modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
            for stat in ("running_mean", "running_var")}


def own_batchnorm_statistics(module: nn.Module) -> dict[str, Tensor] | None:
    """A copy of this rank's BatchNorm running statistics; None in a single process (where
    the model's own are the run's)."""
    if world_size() == 1:
        return None
    return {name: t.clone() for name, t in _batchnorm_statistics(module).items()}


@torch.no_grad()
def restore_batchnorm_statistics_(module: nn.Module, stats: dict[str, Tensor] | None) -> None:
    """Puts back what `own_batchnorm_statistics` copied."""
    live = _batchnorm_statistics(module)
    for name, value in (stats or {}).items():
        live[name].copy_(value)


@contextmanager
def averaged_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block every BatchNorm's running statistics are their mean over the ranks;
    afterwards each rank has its own again.

    During training each rank's BatchNorm layers track their own shard's statistics (nothing
    syncs them per step; training normalises with batch statistics anyway). Evaluation and
    checkpoints see the average: the mean of the per-rank means is the mean over all shards,
    and the mean of the variances misses only the variance of the shard means, which vanishes
    for i.i.d. shards. So all ranks hold the same student there, evaluation can be sharded,
    and the checkpoint's model is written once. Restoring each rank's own statistics after
    the block keeps a resumed run bit-identical to one that never stopped.
    """
    stats = list(_batchnorm_statistics(module).values()) if world_size() > 1 else []
    if not stats:
        yield
        return
    own = [s.clone() for s in stats]
    with torch.no_grad():
        flat = torch.cat([s.reshape(-1).float() for s in stats])
        dist.all_reduce(flat)
        flat /= world_size()
        for s, mean in zip(stats, flat.split([s.numel() for s in stats])):
            s.copy_(mean.view_as(s))
    try:
        yield
    finally:
        with torch.no_grad():
            for s, mine in zip(stats, own):
                s.copy_(mine)
