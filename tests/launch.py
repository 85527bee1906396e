"""Starting 2-process runs with the real launchers, and the 1-process references they must
equal, for the multi-process tests (CPU, gloo)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.data import Batch, build_loaders
from cocord_fast.distributed import free_port
from cocord_fast.methods.crd_negatives import NegativeSampler
from cocord_fast.models import build_model
from cocord_fast.training.metrics import read_log
from cocord_fast.training.trainer import Trainer

BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT = 900  # seconds: a hung collective fails the test instead of CI
PER_RANK_BATCH = 8
STEPS = 14  # 2 epochs of the tiny demo set's 120 images / (2 ranks x 8)
# The data pipeline of the runs that use the trainer's own: DALI's where it is installed (its
# sharding under the launchers), torchvision's otherwise.
PIPELINE = "data.backend=auto"


def write_teacher(folder: Path, model: str = "resnet8") -> Path:
    """A `model` for the 10 demo classes, as a plain state dict (the runs' frozen teacher)."""
    torch.manual_seed(1)
    path = folder / ("teacher.pt" if model == "resnet8" else f"teacher_{model}.pt")
    torch.save(build_model(model, 10).state_dict(), path)
    return path


def recipe(root: Path, teacher: Path, name: str, method: str,
           batch: int = PER_RANK_BATCH) -> list[str]:
    """Overrides for a seconds-long run of `method` on the tiny demo set, into
    `teacher.parent / name`."""
    return [f"data.root={root}", "data.dataset=demo", f"data.batch_size={batch}", "train.device=cpu",
            "data.eval_batch_size=16", "data.num_workers=0", "data.backend=torch",
            "model.student=resnet8", "model.teacher=resnet8", f"model.teacher_checkpoint={teacher}",
            f"method.name={method}", "train.epochs=2", "train.log_every=1",
            "train.progress=false", f"train.output_dir={teacher.parent / name}",
            "cocord.queue_size=64", "cocord.embed_dim=16", "cocord.proj_hidden_dim=32",
            "cocord.pred_hidden_dim=16", "crd.num_negatives=16", "crd.embed_dim=16"]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if r["kind"] == "train"}


def _environment() -> dict[str, str]:
    # One thread per process on the 2-core machine; the launchers find python and each other;
    # the runs are on the CPU, also where there is a GPU (DeepSpeed's launcher would count it).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
            "DS_ACCELERATOR": "cpu"}


def _check(name: str, done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{output[-6000:]}"
    return output


def _command(launcher: str, args: list, nproc: int) -> list[str]:
    port = str(free_port())  # its own port: launches never meet
    if launcher == "torchrun":
        command = [BIN / "torchrun", "--nproc_per_node", str(nproc), "--master_port", port]
    else:
        command = [BIN / "deepspeed", "--num_gpus", str(nproc), "--master_port", port]
    return [*map(str, command), *map(str, args)]


def launch(launcher: str, args: list, cwd: Path, nproc: int = 2) -> str:
    """Runs `args` under `torchrun` or `deepspeed` with `nproc` processes on its own port;
    returns stdout + stderr, and fails with them if the launch failed."""
    done = subprocess.run(_command(launcher, args, nproc), cwd=cwd, env=_environment(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return _check(launcher, done)


def start(launcher: str, args: list, cwd: Path, output: Path, nproc: int = 2) -> subprocess.Popen:
    """A launch in the background, in a session of its own, writing to `output`."""
    with open(output, "w") as log:
        return subprocess.Popen(_command(launcher, args, nproc), cwd=cwd, env=_environment(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(job: subprocess.Popen, ready, what: str) -> None:
    """Polls `ready()` until it holds; fails if the job ends first or it takes too long."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not ready():
        assert job.poll() is None, f"the launch ended ({job.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {LAUNCH_TIMEOUT} s"
        time.sleep(0.02)


def launch_and_kill(launcher: str, args: list, cwd: Path, when: Path, nproc: int = 2) -> None:
    """Starts a launch and SIGKILLs the launcher and every worker as soon as `when` exists,
    as a scheduler ending a job without warning would."""
    job = start(launcher, args, cwd, cwd / "killed.log", nproc)
    wait_for(job, when.exists, str(when))
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def run_nodes(args: list, cwd: Path, nodes: int = 2,
              per_node: int = 1) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes N` once per node, all on this machine (`per_node` processes each):
    node n's processes have LOCAL_RANK 0 to per_node - 1, as on a real cluster, and each node
    has an agent of its own. Returns each node's outcome."""
    port = str(free_port())
    agents = [subprocess.Popen(
        [str(BIN / "torchrun"), "--nnodes", str(nodes), "--nproc_per_node", str(per_node),
         "--node_rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", port, *map(str, args)],
        cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in range(nodes)]
    done = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=LAUNCH_TIMEOUT)
        done.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return done


def launch_nodes(args: list, cwd: Path, nodes: int = 2, per_node: int = 1) -> list[str]:
    """`run_nodes`, which must succeed; returns each node's output."""
    return [_check(f"torchrun node {node}", done)
            for node, done in enumerate(run_nodes(args, cwd, nodes, per_node))]


def launch_worker(launcher: str, runs: list[dict], cwd: Path) -> str:
    spec = cwd / f"spec_{launcher}.json"
    spec.write_text(json.dumps({"runs": runs}))
    return launch(launcher, [WORKER, spec], cwd)


def launch_runs(launcher: str, runs: dict[str, dict], work: Path) -> str:
    """Launches the worker over `runs` (specs by name); run NAME dumps into work/NAME/dump."""
    for name, spec in runs.items():
        spec["dump"] = str(work / name / "dump")
    return launch_worker(launcher, list(runs.values()), work)


def rank_dumps(path: Path, world_size: int = 2) -> list[dict]:
    return [torch.load(f"{path}.rank{r}.pt", weights_only=True) for r in range(world_size)]


class ConcatenatedRanks:
    """A training loader whose batch of each step is the global batch of a 2-rank run: rank
    0's samples, then rank 1's (the order in which the queue and the banks receive them)."""

    def __init__(self, loaders):
        self.loaders = loaders

    def start(self, epoch: int, skip: int = 0) -> None:
        for loader in self.loaders:
            loader.start(epoch, skip)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for parts in zip(*self.loaders, strict=True):
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
    if hasattr(trainer.method, "negatives"):  # CRD: each rank's half drawn as that rank would
        trainer.method.negatives = ConcatenatedSamplers([
            NegativeSampler(trainer.loaders.train_targets, cfg.crd.num_negatives,
                            cfg.train.seed, trainer.device, rank=r) for r in range(world_size)])
    return trainer


def assert_disjoint_shards(dumps: list[dict], micro_batches_per_epoch: int) -> None:
    """In every epoch each rank trained on samples no other rank saw, each once."""
    epochs = len(dumps[0]["index"]) // micro_batches_per_epoch
    for epoch in range(epochs):
        part = slice(epoch * micro_batches_per_epoch, (epoch + 1) * micro_batches_per_epoch)
        shards = [set(torch.cat(d["index"][part]).tolist()) for d in dumps]
        assert sum(map(len, shards)) == len(set.union(*shards))
        assert all(len(s) == len(torch.cat(d["index"][part])) for s, d in zip(shards, dumps))


def assert_matches_one_process(run_dir: Path, overrides: list[str], global_batch: int,
                               tmp_path: Path) -> None:
    """The 2-rank run in `run_dir` (BatchNorm frozen, made with `overrides`) logged the losses
    and ended with the method state of one process that trains on its global batches."""
    from distributed_worker import freeze_batchnorm

    # The reference: one process, torch engine, no accumulation, the global batch.
    kept = [o for o in overrides if not o.startswith(
        ("train.output_dir", "optim.grad_accum_steps", "engine.", "train.precision"))]
    cfg = load_config(overrides=kept + [f"data.batch_size={global_batch}",
                                        f"train.output_dir={tmp_path / 'one'}"])
    reference = one_process_reference(cfg, global_batch // 2)
    freeze_batchnorm(reference.method)
    reference.fit()
    two_ranks, one = train_losses(run_dir), train_losses(tmp_path / "one")
    assert two_ranks.keys() == one.keys() and len(one) >= 12
    for step in one:
        assert two_ranks[step] == pytest.approx(one[step], rel=1e-5), step
    state = torch.load(f"{run_dir}/dump.rank0.pt", weights_only=True)["method"]
    for key, value in reference.method.state_dict().items():
        # Within 5e-4 of each tensor's largest entry: the float32 drift of 14 steps whose
        # gradients were summed in another order (two batches of 8 against one of 16; oneDNN's
        # order also depends on the CPU) reached 9e-5 of it for a conv weight on one CPU, and
        # is the same for an entry near zero as for its neighbours. A step that missed a rank
        # (its gradient, its keys) is off by orders of magnitude more.
        scale = value.abs().max().item() if value.is_floating_point() else 0
        torch.testing.assert_close(state[key], value, rtol=0, atol=5e-4 * scale, msg=key)
