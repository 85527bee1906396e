"""CoCoRD's training step here against the reference implementation's (ShipengFu/CoCoRD), on
the same pair, batch and device.

    git clone https://github.com/ShipengFu/CoCoRD /tmp/CoCoRD
    python bench/versus_reference.py --reference /tmp/CoCoRD          # CPU: 2 threads
    python bench/versus_reference.py --reference /tmp/CoCoRD --device cuda

Each side runs in processes of its own, alternating (ours, reference, ours, ...), so neither
inherits the other's allocator or thread state and the machine's drift hits both alike. Ours is
`Trainer.train_step` on a batch resident on the device (autocast, forward, backward, optimizer
step, momentum updates, metric accumulation); the reference's is its `helper/loop.py` step
(forward, the three losses, `loss.item()`, both accuracies, zero_grad, backward, step). Both
start from random weights, and the first `--warmup` steps of each process are not timed.

Writes `bench/results/versus_reference_<teacher>_<student>_<device>.json` and a PNG beside it.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cocord_fast.throughput.provenance import device_name, provenance, slug
from cocord_fast.throughput.settings import RESULTS

# The reference's options/train_student.yml, which our cocord defaults equal.
REFERENCE_OPTIONS = {"T": 0.1, "key_size": 2048, "momentum": 0.999, "b_momentum": 0.9,
                     "pred_dim": 512, "hidden_dim": 2048, "embedding_dim": 2048}


def batch_tensors(args: argparse.Namespace):
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch_size, 3, 32, 32, generator=generator) for _ in range(3)]
    labels = torch.randint(0, 100, (args.batch_size,), generator=generator)
    return views, labels


def reference_step(args: argparse.Namespace):
    """The reference's training step as a closure, built from its own modules."""
    sys.path.insert(0, str(args.reference))
    import cocord.builder as builder
    import helper.util as util
    from models import model_dict

    device = torch.device(args.device)
    if device.type == "cpu":  # its forward moves the contrastive labels with .cuda()
        torch.Tensor.cuda = lambda self, *a, **k: self
    # Its teacher loader reads a checkpoint onto cuda:gpu; a random teacher costs the same.
    builder.util.load_t_model = lambda path, n_cls, opt: model_dict[opt["teacher_model"]](
        num_classes=n_cls).requires_grad_(False)
    opt = {"student_model": args.student, "teacher_model": args.teacher, "n_cls": 100,
           "path": {"teacher": ""}, "cocord": REFERENCE_OPTIONS}
    model = builder.CoCoRD(opt).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                                momentum=0.9, weight_decay=5e-4)
    ce, mse = torch.nn.CrossEntropyLoss(), util.DistillMSE()
    views, labels = batch_tensors(args)
    views, labels = [v.to(device) for v in views], labels.to(device)

    def step() -> None:
        model.train()
        model.t_k_encoder.eval()
        logits, ctr_labels, pred, pred_2, target, target_2, output = model(*views)
        loss = (ce(logits, ctr_labels) + ce(output, labels)
                + 4.0 * (mse(pred, target) + mse(pred_2, target_2)).mean())
        loss.item()
        util.accuracy(output, labels, topk=(1, 5))
        util.accuracy(logits, ctr_labels, topk=(1, 5))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def our_step(args: argparse.Namespace, work: Path):
    from cocord_fast.throughput.runner import method_step
    from cocord_fast.throughput.synthetic import write_random_teacher, write_synthetic_cifar
    from cocord_fast.config import load_config
    from cocord_fast.data import IMAGE_LAYOUT, Batch
    from cocord_fast.training.trainer import Trainer

    write_synthetic_cifar(work / "data", num_train=4 * args.batch_size)
    teacher = work / "teacher.pth"
    write_random_teacher(args.teacher, 100, teacher)
    trainer = Trainer(load_config(overrides=[
        "method.name=cocord", f"model.student={args.student}", f"model.teacher={args.teacher}",
        f"model.teacher_checkpoint={teacher}", "data.dataset=cifar100",
        f"data.root={work / 'data'}",
        f"data.batch_size={args.batch_size}", "data.num_workers=0", "data.backend=torch",
        f"train.device={args.device}", f"train.output_dir={work / 'run'}", *args.override]))
    views, labels = batch_tensors(args)
    # Laid out as both data backends hand batches over.
    batch = Batch([v.to(trainer.device, memory_format=IMAGE_LAYOUT) for v in views],
                  labels.to(trainer.device))

    return functools.partial(method_step, trainer, itertools.repeat(batch))


def time_side(args: argparse.Namespace) -> dict:
    """In a child process: build one side, warm it up, time `--steps` steps."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        step = (reference_step(args) if args.side == "reference"
                else our_step(args, Path(work)))
        built = time.perf_counter() - started
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        for _ in range(args.warmup):
            step()
        sync()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = time.perf_counter() - started
    return {"build_s": built, "img_per_s": args.steps * args.batch_size / seconds}


def plot(rows: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(rows)
    ax.bar(names, [rows[n]["img_per_s"] for n in names], color=["#4477aa", "#bbbbbb"])
    for i, name in enumerate(names):
        ax.text(i, rows[name]["img_per_s"], f"{rows[name]['img_per_s']:.1f}", ha="center",
                va="bottom")
    ax.set_ylabel("CoCoRD training images/s")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="a checkout of github.com/ShipengFu/CoCoRD")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side, alternating")
    parser.add_argument("--override", nargs="*", default=[], help="our side: section.key=value")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one side, one line of JSON
        print(json.dumps(time_side(args)))
        return
    if not (args.reference / "cocord" / "builder.py").exists():
        parser.error(f"--reference {args.reference}: no cocord/builder.py there (a checkout "
                     f"of github.com/ShipengFu/CoCoRD)")

    rounds: dict[str, list[dict]] = {"ours": [], "reference": []}
    for _ in range(args.rounds):
        for side in rounds:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side],
                                   capture_output=True, text=True, check=True)
            rounds[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{side:9s} {rounds[side][-1]['img_per_s']:8.1f} img/s", flush=True)
    rows = {side: {"img_per_s": statistics.median(r["img_per_s"] for r in runs),
                   "rounds": runs} for side, runs in rounds.items()}
    ratio = rows["ours"]["img_per_s"] / rows["reference"]["img_per_s"]
    print(f"ours / reference: {ratio:.2f}x (medians of {args.rounds} processes each)")

    torch.set_num_threads(args.threads)
    device = device_name(args.device)
    report = {**provenance(device), "teacher": args.teacher, "student": args.student,
              "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
              "override": args.override, "ours_over_reference": ratio, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"versus_reference_{args.teacher}_{args.student}_{slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, f"CoCoRD {args.teacher} -> {args.student}, batch {args.batch_size}, {device}: "
               f"{ratio:.2f}x", stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
