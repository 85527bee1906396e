"""Data-pipeline throughput (images/s): DALI against torchvision's DataLoader, 1 and 3 views.

Both backends run through `build_loaders`, the path training takes, over a generated
ImageFolder tree of ImageNet-like JPEGs (500x375 by default) cropped to 224, at equal CPU
parallelism (`--threads`: DALI threads, DataLoader worker processes). Epochs are short, so the
per-epoch pipeline build of the DALI path is inside the timing. On a CUDA machine a third
backend, `dali-gpu`, decodes with nvJPEG (`mixed`) and augments on the GPU; the CPU backends'
batches are then copied to that GPU too, as training would.

    python bench/data.py --threads 2

Writes `bench/results/data_<device>.json` and a PNG chart beside it; rows from one invocation
share a machine and are comparable as ratios.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from cocord_fast.config import DataConfig
from cocord_fast.data import build_loaders
from provenance import RESULTS, device_name, provenance, slug


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


def measure(root: Path, backend: str, views: int, args: argparse.Namespace) -> dict:
    target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The loaders' device: DALI's GPU pipeline, or pinned host memory for the torch path; the
    # CPU-only DALI pipeline is asked for with the CPU.
    device = torch.device("cpu") if backend == "dali" else target
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=args.image_size,
                     batch_size=args.batch_size, num_workers=args.threads,
                     backend="dali" if backend.startswith("dali") else "torch")
    loaders = build_loaders(cfg, num_views=views, seed=0, device=device)

    def batches():
        epoch = 0
        while True:
            loaders.train.start(epoch)
            for batch in loaders.train:
                yield batch.to(target, non_blocking=True)
            epoch += 1

    stream = batches()
    for _ in range(args.warmup):
        next(stream)
    if target.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.batches):
        batch = next(stream)
    if target.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    assert len(batch.views) == views and batch.views[0].shape[-1] == args.image_size
    stream.close()
    return {"backend": backend, "views": views, "img_per_s": args.batches * args.batch_size / seconds,
            "batches": args.batches}


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    views = sorted({r["views"] for r in rows})
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for b, backend in enumerate(backends):
        for v, count in enumerate(views):
            rate = next(r["img_per_s"] for r in rows if (r["backend"], r["views"]) == (backend, count))
            x = v + (b - (len(backends) - 1) / 2) * width
            ax.bar(x, rate, width, color=f"C{b}", label=backend if v == 0 else None)
            ax.text(x, rate, f"{rate:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(views)), [f"{v} view{'s' * (v > 1)}" for v in views])
    ax.set_ylabel("images/s (source images)")
    ax.set_title(title, fontsize=9)
    ax.legend()
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
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    backends = ["dali", "torch"] + ["dali-gpu"] * torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        kilobytes = write_jpeg_tree(root, args.images, args.classes, tuple(args.source_size))
        for views in args.views:
            for backend in backends:
                rows.append(measure(root, backend, views, args))
                print(f"{backend:8s} {views} view(s) {rows[-1]['img_per_s']:8.1f} img/s", flush=True)

    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    report = {**provenance(device), "source_size": args.source_size,
              "mean_jpeg_kb": round(kilobytes, 1), "image_size": args.image_size,
              "batch_size": args.batch_size, "threads": args.threads, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"data_{slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    w, h = args.source_size
    plot(rows, f"{w}x{h} JPEG -> {args.image_size}, batch {args.batch_size}, {args.threads} "
               f"threads, {device}", stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
