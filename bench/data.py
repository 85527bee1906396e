"""Data-pipeline throughput (images/s): DALI against torchvision's DataLoader, 1 and 3 views,
on an ImageFolder tree and on tar shards of the same JPEGs.

Both backends run through `build_loaders`, the path training takes, over a generated
ImageFolder tree of ImageNet-like JPEGs (500x375 by default) cropped to 224, at equal CPU
parallelism (`--threads`: DALI threads, DataLoader worker processes), and over the same tree
written as tar shards by `cocord-fast convert` (`--data`; `convert_s` is that one-off cost).
On a CUDA machine a third backend, `dali-gpu`, decodes with nvJPEG (`mixed`) and augments on
the GPU; the CPU backends' batches are then copied to that GPU too, as training would.

Start-up and steady state apart, so that short runs cannot rank the backends by their start-up
cost (each the median of `--repeats` interleaved runs, the machine's load recorded):
- `startup_s`: from `build_loaders` to the first batch of epoch 0 (DALI builds its pipeline
  and fills its prefetch queue there, the DataLoader starts its workers);
- `img_per_s`: the steady rate over `--epochs` whole epochs after epoch 0, each epoch's start
  (a reset, or whatever else a backend does at a boundary) inside the timing;
- and, to see that boundary alone, `epoch_start_s`: the mean wait from `start(epoch)` to the
  epoch's first batch (a pipeline reset or build, and a batch decoded with nothing to overlap).
- `training_wait` (DALI's CPU feed, 1 view): the training thread's mean wait per batch when a
  step of `--step-ms` runs between batches, with `data.read_ahead` on and off (off: each batch's
  files are read while the training thread waits).

    python bench/data.py --threads 2
    python bench/data.py --write-tree DIR --images 2048   # only write the JPEG tree, to DIR

Without DALI installed only the torchvision backend runs, and the report says why.

Writes `bench/results/data_<device>.json` and a PNG chart beside it; rows from one invocation
share a machine and are comparable as ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from cocord_fast.config import DataConfig
from cocord_fast.data import build_loaders
from cocord_fast.data.build import dali_installed
from cocord_fast.data.shard_writer import convert
from cocord_fast.throughput.provenance import device_name, provenance, slug
from cocord_fast.throughput.settings import RESULTS


def write_jpeg_tree(root: Path, images: int, classes: int, size: tuple[int, int]) -> float:
    """root/{train,val}/class_<c>/*.jpg of smooth random scenes (photo-like JPEG sizes);
    returns the mean training file size in kB."""
    rng = np.random.default_rng(0)
    width, height = size
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            scene = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
            texture = rng.normal(0, 12, (height, width, 3))
            pixels = np.clip(np.asarray(scene.filter(ImageFilter.GaussianBlur(2))) + texture, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    files = list((root / "train").rglob("*.jpg"))
    return sum(f.stat().st_size for f in files) / len(files) / 1e3


def measure(root: Path, dataset: str, backend: str, views: int,
            args: argparse.Namespace) -> dict:
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The loaders' device: DALI's GPU pipeline, or pinned host memory for the torch path; the
    # CPU-only DALI pipeline is asked for with the CPU.
    device = torch.device("cpu") if backend == "dali" else target
    cfg = DataConfig(dataset=dataset, root=str(root), image_size=args.image_size,
                     batch_size=args.batch_size, num_workers=args.threads,
                     backend="dali" if backend.startswith("dali") else "torch")

    def arrived(batch) -> None:
        """On the training device, as training would have it; a GPU's copy waited for."""
        batch.to(target, non_blocking=True)
        if target.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    loaders = build_loaders(cfg, num_views=views, seed=0, device=device)
    loaders.train.start(0)
    for number, batch in enumerate(loaders.train):
        arrived(batch)
        if number == 0:
            startup = time.perf_counter() - started
    assert len(batch.views) == views and batch.views[0].shape[-1] == args.image_size
    epoch_starts = []
    started = time.perf_counter()
    for epoch in range(1, 1 + args.epochs):
        epoch_started = time.perf_counter()
        loaders.train.start(epoch)
        for number, batch in enumerate(loaders.train):
            arrived(batch)
            if number == 0:
                epoch_starts.append(time.perf_counter() - epoch_started)
    seconds = time.perf_counter() - started
    images = args.epochs * len(loaders.train) * args.batch_size
    return {"data": dataset, "backend": backend, "views": views, "startup_s": startup,
            "img_per_s": images / max(seconds, 1e-9),
            "epoch_start_s": float(np.mean(epoch_starts)) if epoch_starts else None,
            "epochs": args.epochs, "batches_per_epoch": len(loaders.train)}


def training_wait(root: Path, read_ahead: bool, args: argparse.Namespace) -> dict:
    """The DALI CPU feed with a step between batches (`--step-ms` of sleep, which releases the
    GIL as a GPU step's kernel launches mostly do): the training thread's mean wait in the
    loader per batch, with the feed's read-ahead on or off."""
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=args.image_size,
                     batch_size=args.batch_size, num_workers=args.threads, backend="dali",
                     read_ahead=read_ahead)
    loaders = build_loaders(cfg, num_views=1, seed=0, device=torch.device("cpu"))
    loaders.train.start(0)
    for _ in loaders.train:  # epoch 0: the pipeline's build and first fill, not timed
        pass
    waits = []
    for epoch in range(1, 1 + args.epochs):
        loaders.train.start(epoch)
        batches = iter(loaders.train)
        for _ in range(len(loaders.train)):
            started = time.perf_counter()
            next(batches)
            waits.append(time.perf_counter() - started)
            time.sleep(args.step_ms / 1e3)
        next(batches, None)  # the epoch's end
    return {"backend": "dali", "read_ahead": read_ahead, "step_ms": args.step_ms,
            "wait_ms_per_batch": 1e3 * float(np.mean(waits)), "batches": len(waits)}


def median_row(runs: list[dict]) -> dict:
    """The median of each timing over repeated runs of one row; every run's rate kept."""
    timings = ("startup_s", "img_per_s", "epoch_start_s")
    return {**runs[0], **{key: float(np.median([r[key] for r in runs])) for key in timings},
            "img_per_s_runs": [r["img_per_s"] for r in runs]}


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys((r["backend"], r["data"]) for r in rows))
    views = sorted({r["views"] for r in rows})
    width = 0.8 / len(backends)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    panels = ((axes[0], "img_per_s", "steady images/s (source images)", "{:.0f}"),
              (axes[1], "startup_s", "start-up: loaders to first batch (s)", "{:.2f}"))
    for ax, key, label, unit in panels:
        for b, backend in enumerate(backends):
            for v, count in enumerate(views):
                value = next(r[key] for r in rows
                             if (r["backend"], r["data"], r["views"]) == (*backend, count))
                x = v + (b - (len(backends) - 1) / 2) * width
                ax.bar(x, value, width, color=f"C{b}", label=" ".join(backend) if v == 0 else None)
                ax.text(x, value, unit.format(value), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(views)), [f"{v} view{'s' * (v > 1)}" for v in views])
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="training images generated")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--source-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--epochs", type=int, default=5,
                        help="timed epochs, after an untimed epoch 0 that holds the start-up")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--data", nargs="+", default=["imagefolder", "shards"],
                        choices=["imagefolder", "shards"],
                        help="the tree as it is, and written as tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (median)")
    parser.add_argument("--step-ms", type=float, default=100.0,
                        help="the step simulated between batches for the training-thread wait "
                             "of the DALI CPU feed, with its read-ahead on and off")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--write-tree", type=Path, metavar="DIR",
                        help="write the generated ImageFolder tree to DIR and stop (a data set "
                             "for `cocord-fast bench --data pipeline`)")
    args = parser.parse_args()
    if args.write_tree:
        kilobytes = write_jpeg_tree(args.write_tree, args.images, args.classes,
                                    tuple(args.source_size))
        print(f"wrote {args.images} training JPEGs ({kilobytes:.0f} kB each) under "
              f"{args.write_tree}")
        return

    skipped = {}
    if not dali_installed():
        skipped = {"dali": "DALI is not installed", "dali-gpu": "DALI is not installed"}
        print("DALI is not installed: timing torchvision only", flush=True)
    backends = [name for name in ["dali", "torch"] + ["dali-gpu"] * torch.cuda.is_available()
                if name not in skipped]
    # Other work on the machine slows the backends unevenly: the load says how quiet it was,
    # and each row is the median of `--repeats` interleaved measurements.
    load = os.getloadavg()[0]
    samples: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        kilobytes = write_jpeg_tree(root, args.images, args.classes, tuple(args.source_size))
        started = time.perf_counter()
        convert(root, Path(tmp) / "shards", args.samples_per_shard, max(1, args.threads),
                progress=False, say=lambda _: None)
        convert_s = time.perf_counter() - started
        roots = {"imagefolder": root, "shards": Path(tmp) / "shards"}
        # The process's first DALI pipeline loads DALI's libraries, and the first DataLoader
        # imports what its workers need: one untimed epoch per backend keeps that out of the
        # loaders' start-up.
        for backend in backends:
            measure(root, "imagefolder", backend, 1,
                    argparse.Namespace(**{**vars(args), "epochs": 0}))
        waits: dict[bool, list[dict]] = {}
        for _ in range(args.repeats):
            for views in args.views:
                for backend in backends:
                    for dataset in args.data:
                        samples.setdefault((dataset, backend, views), []).append(
                            measure(roots[dataset], dataset, backend, views, args))
            if "dali" in backends:
                for read_ahead in (True, False):
                    waits.setdefault(read_ahead, []).append(training_wait(root, read_ahead, args))
    rows = [median_row(runs) for runs in samples.values()]
    wait_rows = [{**runs[0], "wait_ms_per_batch": float(np.median(
        [r["wait_ms_per_batch"] for r in runs]))} for runs in waits.values()]
    for row in rows:
        print(f"{row['backend']:8s} {row['data']:11s} {row['views']} view(s) "
              f"{row['img_per_s']:8.1f} img/s "
              f"steady, start-up {row['startup_s']:.2f} s, epoch start "
              f"{row['epoch_start_s']:.3f} s (medians of {args.repeats})", flush=True)
    print(f"convert: {args.images + args.classes} JPEGs into shards of "
          f"{args.samples_per_shard} in {convert_s:.2f} s (once)", flush=True)
    for row in wait_rows:
        print(f"dali read-ahead {'on ' if row['read_ahead'] else 'off'}: the training thread "
              f"waits {row['wait_ms_per_batch']:.1f} ms a batch beside a "
              f"{args.step_ms:.0f} ms step (median of {args.repeats})", flush=True)

    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    report = {**provenance(device), "source_size": args.source_size,
              "mean_jpeg_kb": round(kilobytes, 1), "image_size": args.image_size,
              "batch_size": args.batch_size, "threads": args.threads, "images": args.images,
              "samples_per_shard": args.samples_per_shard, "convert_s": convert_s,
              "repeats": args.repeats, "load_average_1min": load, "skipped": skipped,
              "rows": rows, "training_wait": wait_rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"data_{slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    w, h = args.source_size
    plot(rows, f"{w}x{h} JPEG -> {args.image_size}, batch {args.batch_size}, {args.threads} "
               f"threads, {device}", stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
