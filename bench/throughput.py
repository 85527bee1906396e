"""Training throughput (images/s) of each method on the real training path.

Each method trains through `Trainer.fit` (data loader, autocast, forward, backward, optimizer
step, momentum updates, logging) on synthetic data in the CIFAR-100 python format, so the
number is what a run would see, minus disk speed. The first `--warmup` steps are excluded.

    python bench/throughput.py --teacher resnet32x4 --student resnet8x4 --batch-size 64

Writes `bench/results/throughput_<device>.json` and a PNG bar chart beside it; rows from one
invocation share a machine and are comparable as ratios.
"""
from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cocord_fast.config import load_config
from cocord_fast.engine.metrics import read_log
from cocord_fast.engine.trainer import Trainer
from cocord_fast.models import build_model
from provenance import RESULTS, device_name, provenance, slug

def write_synthetic_cifar(root: Path, num_train: int, num_test: int = 64) -> None:
    """Random images and labels in the `cifar-100-python` format (as CIFAR100 reads it)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", num_train), ("test", num_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": list(map(str, range(100)))}))


def measure(method: str, args: argparse.Namespace, data: Path, teacher: Path, work: Path) -> dict:
    steps = args.warmup + args.steps
    overrides = [
        f"method.name={method}", f"model.student={args.student}", f"model.teacher={args.teacher}",
        f"model.teacher_checkpoint={teacher}", "data.dataset=cifar100", f"data.root={data}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"train.max_steps={steps}", f"train.log_every={args.warmup}", "train.progress=false",
        f"train.output_dir={work / method}", f"train.device={args.device}",
        f"train.precision={args.precision}", f"data.backend={args.backend}", *args.override]
    started = time.perf_counter()
    Trainer(load_config(overrides=overrides)).fit()
    records = [r for r in read_log(work / method) if r["kind"] == "train"]
    timed = records[-1]  # steps warmup+1 .. warmup+steps (the window restarts at each log)
    return {"method": method, "img_per_s": timed["img_per_s"], "steps": args.steps,
            "loss": timed["loss"], "wall_s": time.perf_counter() - started}


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["method"] for r in rows], [r["img_per_s"] for r in rows], color="#4477aa")
    for i, r in enumerate(rows):
        ax.text(i, r["img_per_s"], f"{r['img_per_s']:.0f}", ha="center", va="bottom")
    ax.set_ylabel("training images/s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "kd", "crd", "cocord"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"],
                        help="data.backend")
    parser.add_argument("--override", nargs="*", default=[], help="extra section.key=value")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # CIFAR-100's size, so CRD's memory banks and negative sampling cost what they would.
        write_synthetic_cifar(tmp / "data", num_train=50_000)
        teacher = tmp / "teacher.pth"
        torch.save(build_model(args.teacher, 100).state_dict(), teacher)
        rows = []
        for method in args.methods:
            rows.append(measure(method, args, tmp / "data", teacher, tmp))
            print(f"{method:8s} {rows[-1]['img_per_s']:8.1f} img/s", flush=True)

    device = device_name(args.device)
    report = {**provenance(device), "teacher": args.teacher, "student": args.student,
              "batch_size": args.batch_size, "precision": args.precision, "workers": args.workers,
              "backend": args.backend,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput_{args.teacher}_{args.student}_{slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.precision}, "
               f"{device}", stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
