"""Training images/s of one step under each engine: the same method, models and batch under
`engine.name=torch` and under DeepSpeed ZeRO stages, on one device, each eager or with its
encoders compiled (`+compile`: `train.compile=default`).

Each engine gets its own `Trainer` from the same seed, and its steps run through
`Trainer.train_step` (autocast, forward, backward, optimizer step, momentum updates), in
interleaved rounds so that the machine's drift hits every engine alike. The untimed warm-up
steps before the rounds hold the one-off costs (allocator, cuDNN autotuning, DeepSpeed's
buffers, compiling) and are reported apart, as is building the trainer. The batch is made once
on the device, laid out as the DALI pipeline hands it over (channels-last on CUDA): the numbers
are the engines', not the data pipeline's. Under DeepSpeed the student's weights keep the flat
buffers' default layout while its activations are channels-last (see
`cocord_fast/training/acceleration.py`); this bench measures what that costs. DeepSpeed engines
are skipped, with the reason in the report, where DeepSpeed is not installed.

    python bench/engines.py                                   # CPU: small images
    python bench/engines.py --engines torch deepspeed:1 torch+compile deepspeed:1+compile
                                                              # one GPU: 224 px, bf16

Writes `bench/results/engines_<method>_<teacher>_<student>_<device>.json` and a PNG beside it.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cocord_fast.config import load_config
from cocord_fast.data import Batch
from cocord_fast.models import build_model
from cocord_fast.throughput.clock import synchronize
from cocord_fast.throughput.provenance import device_name, provenance, slug
from cocord_fast.throughput.runner import method_step
from cocord_fast.throughput.settings import RESULTS
from cocord_fast.throughput.synthetic import resident_batch, write_synthetic_cifar
from cocord_fast.training.trainer import Trainer

CUDA = torch.cuda.is_available()


def engine_settings(engine: str) -> list[str]:
    """The overrides an engine named `torch` or `deepspeed:STAGE`, with an optional `+compile`,
    stands for."""
    base, _, variant = engine.partition("+")
    name, _, stage = base.partition(":")
    if name not in ("torch", "deepspeed") or variant not in ("", "compile") or (
            stage and name == "torch"):
        raise SystemExit(f"--engines: {engine!r} is not torch or deepspeed:STAGE, with an "
                         f"optional +compile")
    return [f"engine.name={name}", *([f"engine.zero_stage={stage}"] if stage else []),
            f"train.compile={'default' if variant else 'false'}"]


def why_skipped(engine: str) -> str | None:
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install 'cocord_fast[deepspeed]')"
    return None


def build(engine: str, args: argparse.Namespace, data: Path, teacher: Path, work: Path) -> Trainer:
    overrides = [
        f"method.name={args.method}", f"model.student={args.student}",
        f"model.teacher={args.teacher}", f"model.teacher_checkpoint={teacher}",
        "data.dataset=cifar100", f"data.root={data}", f"data.batch_size={args.batch_size}",
        "data.num_workers=0", "data.backend=torch", f"train.precision={args.precision}",
        f"train.output_dir={work / slug(engine)}", *engine_settings(engine), *args.override]
    return Trainer(load_config(overrides=overrides))


def synthetic_batch(trainer: Trainer, args: argparse.Namespace) -> Batch:
    return resident_batch(trainer.method.num_views, args.batch_size, args.image_size,
                          trainer.loaders.num_classes, trainer.loaders.num_train, trainer.device)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["engine"] for r in rows], [r["img_per_s"] for r in rows], color="#4477aa")
    for i, r in enumerate(rows):
        ax.text(i, r["img_per_s"], f"{r['img_per_s']:.0f}", ha="center", va="bottom")
    ax.set_ylabel("training images/s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_steps(trainer: Trainer, batch: Batch, steps: int) -> float:
    """Seconds for `steps` optimizer steps, from a synchronised start to a synchronised end."""
    batches = itertools.repeat(batch)
    synchronize(trainer.device)
    started = time.perf_counter()
    for _ in range(steps):
        method_step(trainer, batches)
    synchronize(trainer.device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="cocord")
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--engines", nargs="+", default=["torch", "deepspeed:0", "deepspeed:1"],
                        help="torch or deepspeed:STAGE, each with an optional +compile")
    parser.add_argument("--image-size", type=int, default=224 if CUDA else 64)
    parser.add_argument("--batch-size", type=int, default=128 if CUDA else 16)
    parser.add_argument("--precision", default="bf16" if CUDA else "fp32",
                        choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per engine first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per engine")
    parser.add_argument("--override", nargs="*", default=[], help="extra section.key=value")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from `deepspeed`
    args = parser.parse_args()
    for engine in args.engines:
        engine_settings(engine)  # a misspelt engine stops the bench before any work
    skipped = {engine: why for engine in args.engines if (why := why_skipped(engine))}
    for engine, why in skipped.items():
        print(f"{engine:20s} skipped: {why}", flush=True)
    engines = [engine for engine in args.engines if engine not in skipped]
    if not engines:
        raise SystemExit("no engine left to time")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_cifar(tmp / "data", num_train=50_000)  # the size CRD's banks get
        teacher = tmp / "teacher.pth"
        torch.manual_seed(0)
        torch.save(build_model(args.teacher, 100).state_dict(), teacher)
        trainers, rows = {}, {}
        for engine in engines:
            started = time.perf_counter()
            trainers[engine] = build(engine, args, tmp / "data", teacher, tmp)
            built = time.perf_counter() - started
            batch = synthetic_batch(trainers[engine], args)
            warmup = run_steps(trainers[engine], batch, args.warmup)
            rows[engine] = {"engine": engine, "build_s": built, "warmup_s": warmup,
                            "batch": batch, "rounds": []}
        for _ in range(args.rounds):
            for engine, trainer in trainers.items():
                seconds = run_steps(trainer, rows[engine]["batch"], args.steps)
                rows[engine]["rounds"].append(args.steps * args.batch_size / seconds)
        for engine, trainer in trainers.items():
            row = rows[engine]
            del row["batch"]
            row["img_per_s"] = statistics.median(row["rounds"])
            row["loss"] = trainer.metrics.pop()["loss"]  # over all steps: equal for equal work
            print(f"{engine:20s} {row['img_per_s']:9.1f} img/s  (build {row['build_s']:.1f} s, "
                  f"warm-up {row['warmup_s']:.1f} s, mean loss {row['loss']:.4f})", flush=True)

    device = device_name(str(next(iter(trainers.values())).device))
    report = {**provenance(device), "method": args.method, "teacher": args.teacher,
              "student": args.student, "image_size": args.image_size,
              "batch_size": args.batch_size, "precision": args.precision,
              "steps": args.steps, "rounds": args.rounds, "rows": list(rows.values()),
              "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"engines_{args.method}_{args.teacher}_{args.student}_{slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(list(rows.values()),
         f"{args.method} {args.teacher} -> {args.student}, {args.image_size}px, batch "
         f"{args.batch_size}, {args.precision}, {device}", stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
