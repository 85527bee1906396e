"""The one module that knows about processes: rank, world size, collectives, start and end.

A process belongs to a group of `world_size` processes when a launcher started it (`torchrun`
or the `deepspeed` launcher set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT). In
a single process every helper here is a no-op (tensor gathers return their input), so methods
and the loop call them unconditionally. The DeepSpeed engine needs a process group even for one
process: `init` then makes a group of one on a free local port.

Collectives run on the backend that fits the device: NCCL for CUDA tensors, gloo on CPU. None
of them carries gradients. Gathered Python objects carry only host tensors, and what must be
equal on every rank but is not trained (a random projector, slow copies, a queue) is broadcast
from rank 0 rather than left to equal seeds.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import UserError
from .watchdog import Watchdog

T = TypeVar("T")


_timeout: timedelta | None = None  # of the joined group's collectives
# The process group's own timeout runs this much longer than engine.timeout_s, so that the
# watchdog (watchdog.py), which reports on every backend, speaks before NCCL's tears the
# process down without a word of ours.
BACKEND_GRACE_S = 60
_watchdog: Watchdog | None = None  # of a joined group of several processes


def launched_world_size() -> int:
    """The number of processes a launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_device(name: str, field: str = "train.device",
                   cuda_devices: int | None = None) -> torch.device:
    """`train.device` for this process, checked before any work: "auto" and "cuda" mean the
    GPU of this process (cuda:LOCAL_RANK); "cuda:N" is for a single process.

    The device and LOCAL_RANK always agree, as DeepSpeed and NCCL take the GPU from
    LOCAL_RANK: a process started without a launcher on cuda:N sets LOCAL_RANK=N, and cuda:N
    against a launcher's other LOCAL_RANK is refused. `cuda_devices`: the GPUs this
    process sees (default: torch's count); `field`: the setting errors name.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (
            device.type == "cpu" and device.index):
        raise UserError(f"{field}={name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if count == 0:
        raise UserError(f"{field}={name}, but CUDA is not available on this machine")
    # A launcher sets WORLD_SIZE with LOCAL_RANK; without one, LOCAL_RANK is ours to set.
    launcher_rank = os.environ.get("LOCAL_RANK") if "WORLD_SIZE" in os.environ else None
    index = device.index if device.index is not None else int(launcher_rank or 0)
    if device.index is not None and launched_world_size() > 1:
        raise UserError(f"{field}={name} would put every process on one GPU; use "
                        f"{field}=auto or cuda (each process drives cuda:LOCAL_RANK)")
    if device.index is not None and launcher_rank not in (None, str(index)):
        raise UserError(f"{field}={name}, but the launcher gave this process "
                        f"LOCAL_RANK={launcher_rank}, the GPU DeepSpeed and NCCL use: set "
                        f"{field}=cuda and choose the GPU with CUDA_VISIBLE_DEVICES")
    if index >= count:
        raise UserError(f"{field}={name} is cuda:{index}, but this process sees {count} "
                        f"GPU(s) (cuda:0 to cuda:{count - 1})")
    os.environ["LOCAL_RANK"] = str(index)
    return torch.device("cuda", index)


def heartbeat(where: str) -> None:
    """The loop made progress (a step, an evaluation batch, a save): see watchdog.py."""
    if _watchdog is not None:
        _watchdog.beat(where)


def stop_watchdog() -> None:
    """Before this process says why it stops, or leaves the group: the watchdog then speaks no
    more (unless it is ending the process already, with its own message)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


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


def free_port() -> int:
    """A TCP port on this host that no one listens on (for a group's rendezvous)."""
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
    timeout = _timeout = timedelta(seconds=timeout_s + BACKEND_GRACE_S)
    if "WORLD_SIZE" in os.environ:  # a launcher described the group
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        if world_size() > 1:
            global _watchdog
            _watchdog = Watchdog(timeout_s, peer_failure, report_failure)
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it (process_device sets cuda:N's)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timeout)


def finish(exit_code: int) -> int:
    """Leaves the process group. A worker of a multi-process launch then ends at once: after
    a finished DeepSpeed run, interpreter shutdown aborted about 1 in 12 times ("terminate
    called without an active exception"). A failed worker skips the barrier (its peers may
    be blocked elsewhere); the launcher stops them when it sees the failure. Where the group
    spans nodes, the worker whose failure stops it first waits for the others to stop too
    (`_until_the_others_stop`)."""
    if not is_initialized():
        return exit_code
    stop_watchdog()
    launched = launched_world_size() > 1
    if exit_code == 0:
        dist.barrier()
    elif _reported_first and not _on_one_node():
        _until_the_others_stop()
    dist.destroy_process_group()
    if launched:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


_FAILURE, _FAILURES = "cocord_fast/failure", "cocord_fast/failures"
_STOPPED = "cocord_fast/stopped"  # processes that stopped for a failure, the first one's aside
# How long the first process to fail waits for the others to read why: they look every 2 s
# (the watchdog) or more often (a wait for another's turn, `turns.py`).
FAILURE_GRACE_S = 5.0
_reported_first = False  # this process's reason is the group's
_counted_stopped = False  # this process is counted in _STOPPED


def report_failure(message: str) -> None:
    """Leaves why this process stops in the group's store, for the others to name when their
    next collective fails (the first failure wins). Best effort: the store may be gone."""
    if world_size() == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(_FAILURES, 1) == 1:
            store.set(_FAILURE, f"rank {rank()}: {message}")
            global _reported_first
            _reported_first = True
        else:
            _count_stopped(store)
    except (RuntimeError, ValueError):
        pass


def peer_failure() -> str | None:
    """What another process reported before it stopped, if one did (this process then counts
    as stopped: it is about to)."""
    if world_size() == 1:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        if not store.check([_FAILURE]):
            return None
        found = store.get(_FAILURE).decode()
        if found.startswith(f"rank {rank()}:"):
            return None
        _count_stopped(store)
    except (RuntimeError, ValueError):
        return None
    return found


def _count_stopped(store: dist.Store) -> None:
    global _counted_stopped
    if not _counted_stopped:
        _counted_stopped = True
        store.add(_STOPPED, 1)


def _on_one_node() -> bool:
    """Whether the launcher started every process of the group on this node (torchrun says
    so in LOCAL_WORLD_SIZE, the deepspeed launcher in LOCAL_SIZE); its agent then stops them
    all when one fails."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return local is not None and int(local) == world_size()


def _until_the_others_stop() -> None:
    """Waits until every other process has stopped or read this one's reason, or for
    `FAILURE_GRACE_S`: the store that holds the reason may end with this process (where it
    hosts it: a launch without an agent of its own, such as srun's) or with its node's agent,
    before another node's processes have read it."""
    deadline = time.monotonic() + FAILURE_GRACE_S
    try:
        store = dist.distributed_c10d._get_default_store()
        while store.add(_STOPPED, 0) < world_size() - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    except (RuntimeError, ValueError):
        pass


def barrier() -> None:
    if is_initialized():
        dist.barrier()


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


def on_host(obj: Any) -> Any:
    """`obj` with every tensor in it (in dicts, lists and tuples) replaced by a CPU copy."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: on_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_host(value) for value in obj)
    return obj


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, with its tensors as CPU copies.

    Tensors travel as host data whatever the caller passes: a pickled CUDA tensor unpickles
    onto the sender's GPU index, so every process would open a CUDA context on every GPU of
    its node (hundreds of MB each; an error where GPUs are exclusive to one process).
    """
    obj = on_host(obj)
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def decide_together(decide: Callable[[], T], describe: Callable[[T], str], why: str) -> T:
    """`decide()` run on every rank, made one decision for the group: when any rank raised a
    UserError, every rank raises the lowest such rank's message; when ranks decided
    differently (`describe` tells), every rank raises one message listing each rank's view
    and `why` that matters. So no rank goes on while another stops, to be left waiting in a
    collective until the timeout."""
    try:
        result, view = decide(), None
    except UserError as err:
        if world_size() == 1:
            raise
        result, view = None, err
    views = all_gather_objects(("error", str(view)) if view is not None
                               else ("ok", describe(result)))
    for r, (kind, text) in enumerate(views):
        if kind == "error":
            raise UserError(f"rank {r}: {text}")
    if len({text for _, text in views}) > 1:
        raise UserError(f"the processes disagree ({why}): " + "; ".join(
            f"rank {r}: {text}" for r, (_, text) in enumerate(views)))
    return result


@torch.no_grad()
def broadcast_module_(module: nn.Module, bucket_bytes: int = 64 << 20) -> None:
    """Every parameter and buffer of `module` takes rank 0's values, in buckets of at most
    `bucket_bytes` (a larger tensor goes alone): whatever each rank's RNG drew while building
    it, the ranks start from one state. DDP and DeepSpeed broadcast only what they wrap."""
    if world_size() == 1:
        return
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    bucket: list[Tensor] = []
    for tensor in [*unique.values(), None]:
        if bucket and (tensor is None or tensor.dtype != bucket[0].dtype
                       or tensor.device != bucket[0].device
                       or sum(t.numel() * t.element_size() for t in bucket) + tensor.numel()
                       * tensor.element_size() > bucket_bytes):
            _broadcast_bucket_(bucket)
            bucket = []
        if tensor is not None:
            bucket.append(tensor)


def _broadcast_bucket_(tensors: list[Tensor]) -> None:
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.broadcast(tensors[0], src=0)
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


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
    """A CPU copy of this rank's BatchNorm running statistics, for its checkpoint entry; None
    in a single process (where the model's own are the run's)."""
    if world_size() == 1:
        return None
    return on_host(_batchnorm_statistics(module))


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
