"""`cocord-fast convert`: an ImageFolder data set as tar shards in the WebDataset layout.

Samples keep the ImageFolder's order, so dataset index i names the same image in both, and
runs on either see the same batches. A sample's key is the image's path under its split
without the extension, dots turned into underscores (WebDataset splits a key from its
extensions at the first dot of the file name): `n01440764/n01440764_10026.JPEG` becomes the
members `n01440764/n01440764_10026.jpeg` and `n01440764/n01440764_10026.cls`. Members are
written with fixed owner, mode and time, so the same tree makes the same bytes.

Each shard is written under a temporary name and renamed when complete: an interrupted
conversion leaves no shard that looks whole. Every image's size is read while it is copied and
stored in the shards' index, which is written last: a run starts on them without a scan.
"""
from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from . import shards
from .sources import ImageFolder, TarShards, header_size

SPLITS = ("train", "val")


def sample_key(relative: str) -> str:
    """The WebDataset key of the image at `relative` (a path under its split)."""
    folder, _, file_name = relative.rpartition("/")
    stem = file_name.rsplit(".", 1)[0].replace(".", "_")
    return f"{folder}/{stem}" if folder else stem


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    return info, io.BytesIO(data)


def _write_shard(path: Path, samples: list[tuple[str, str, bytes, int]]) -> None:
    """`samples`: (key, image extension, image bytes, label), written in this order."""
    partial = path.with_name(f"{path.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, extension, data, label in samples:
            tar.addfile(*_member(f"{key}.{extension}", data))
            tar.addfile(*_member(f"{key}.cls", str(label).encode()))
    os.replace(partial, path)


def convert_split(source: ImageFolder, target: Path, samples_per_shard: int, threads: int,
                  progress: bool) -> TarShards:
    """Writes `source` as shards into the folder `target`; returns them, indexed."""
    target.mkdir(parents=True, exist_ok=True)
    root = source.index.root
    sizes = np.empty((len(source), 2), np.int64)
    previous = None  # (key, path): one key for two neighbouring files would merge them
    bar = tqdm(total=len(source), desc=f"shards of {root}", unit="image", disable=not progress)
    with ThreadPoolExecutor(threads) as pool:
        for number, start in enumerate(range(0, len(source), samples_per_shard)):
            indices = range(start, min(start + samples_per_shard, len(source)))
            images = list(pool.map(source.read, indices))  # reads overlap on network storage
            samples = []
            for index, data in zip(indices, images):
                relative = source.path(index).relative_to(root).as_posix()
                key = sample_key(relative)
                if previous is not None and previous[0] == key:
                    raise UserError(f"{root / previous[1]} and {root / relative} would both be "
                                    f"sample {key!r}: rename one (keys end at the first '.')")
                previous = key, relative
                encoded = data.tobytes()
                sizes[index] = header_size(encoded)
                samples.append((key, relative.rsplit(".", 1)[1].lower(), encoded,
                                int(source.targets[index])))
            _write_shard(target / f"shard-{number:06d}{shards.SHARD_SUFFIX}", samples)
            bar.update(len(indices))
    bar.close()
    converted = TarShards(target, rescan=True)
    converted.index.sizes[:] = sizes
    converted.index.write()
    return converted


def convert(source_root: Path, target_root: Path, samples_per_shard: int = 1000,
            threads: int = 16, progress: bool = True,
            say: Callable[[str], None] = print) -> None:
    """Writes every split of the ImageFolder at `source_root` (train/ and val/) as shards
    under `target_root`, and the class names, one a line, into `classes.txt` there."""
    splits = [split for split in SPLITS if (source_root / split).is_dir()]
    if not splits:
        raise UserError(f"{source_root} has no train/ or val/ folder (expected "
                        f"{source_root}/train/<class>/... and {source_root}/val/<class>/...)")
    sources = {split: ImageFolder(source_root / split, say) for split in splits}
    classes = sources[splits[0]].classes
    if any(source.classes != classes for source in sources.values()):
        raise UserError(f"the class folders of {source_root}/train and {source_root}/val differ")
    for split in splits:
        if any((target_root / split).glob(f"*{shards.SHARD_SUFFIX}")):
            raise UserError(f"{target_root / split} already holds shards: remove them first, or "
                            f"convert into another folder")
    target_root.mkdir(parents=True, exist_ok=True)
    (target_root / TarShards.CLASSES_FILE).write_text("".join(f"{name}\n" for name in classes))
    for split, source in sources.items():
        converted = convert_split(source, target_root / split, samples_per_shard, threads,
                                  progress)
        say(f"{split}: {len(converted)} images in {len(converted.index.shards)} shards under "
            f"{target_root / split}")
