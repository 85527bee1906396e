"""Start-up of an ImageFolder split: listing every file against reading its index.

Generates a tree of `--files` empty JPEG-named files in `--classes` class folders (a listing
never opens them) and times, in interleaved repeats (the median of each):
- `pathlib_listing_s`: the listing ImageFolder did before the index (sorted `rglob` and an
  `is_file` per file), what every process of a launch paid at every start;
- `scan_s`: today's listing (`folder_index.scan`: `os.scandir`, no stat for regular files),
  paid once, when the index is missing or stale;
- `index_read_s`: opening the split with its index current (one file read, a stat per
  directory), what every later start pays.
Each also as seconds per million files. The page cache is warm for all three: on a network
file system the listing's metadata calls cost far more, the index read about the same.

    python bench/index.py --files 200000 --classes 1000

Writes `bench/results/index_<device>.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from cocord_fast.data import folder_index
from cocord_fast.data.folder_index import INDEX_NAME, open_index, scan
from cocord_fast.throughput.provenance import device_name, provenance, slug
from cocord_fast.throughput.settings import RESULTS


def write_empty_tree(root: Path, files: int, classes: int) -> None:
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            (folder / f"n{c:08d}_{i}.JPEG").touch()


def pathlib_listing(root: Path) -> int:
    count = 0
    for name in sorted(p.name for p in root.iterdir() if p.is_dir()):
        count += len(sorted(p for p in (root / name).rglob("*")
                            if p.suffix.lower() in folder_index.IMAGE_EXTENSIONS
                            and p.is_file()))
    return count


def timed(what) -> float:
    started = time.perf_counter()
    what()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"pathlib_listing_s": [], "scan_s": [],
                                       "index_read_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        write_empty_tree(root, args.files, args.classes)
        open_index(root)  # writes the index; warms the page cache for every row alike
        for _ in range(args.repeats):
            samples["pathlib_listing_s"].append(timed(lambda: pathlib_listing(root)))
            samples["scan_s"].append(timed(lambda: scan(root)))
            samples["index_read_s"].append(timed(lambda: open_index(root)))
        index_bytes = (root / INDEX_NAME).stat().st_size
    rows = {key: statistics.median(values) for key, values in samples.items()}
    per_million = {f"{key}_per_million": value * 1e6 / args.files
                   for key, value in rows.items()}
    for key, value in rows.items():
        print(f"{key:20s} {value:8.3f} s  ({value * 1e6 / args.files:7.2f} s per million files)")
    print(f"index: {index_bytes / args.files:.0f} bytes per file; the listing is "
          f"{rows['pathlib_listing_s'] / rows['index_read_s']:.0f}x the index read")
    device = device_name("cpu")
    report = {**provenance(device), "files": args.files, "classes": args.classes,
              "repeats": args.repeats, "load_average_1min": os.getloadavg()[0],
              "index_bytes_per_file": index_bytes / args.files, **rows, **per_million}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"index_{slug(device)}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
