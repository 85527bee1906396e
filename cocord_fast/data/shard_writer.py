"""`cocord-fast convert`: an ImageFolder data set as tar shards in the WebDataset layout.

Samples keep the ImageFolder's order, so dataset index i names the same image in both, and
runs on either see the same batches. A sample's key is the image's path under its split
without the extension, dots turned into underscores (WebDataset splits a key from its
extensions at the first dot of the file name): `n01440764/n01440764_10026.JPEG` becomes the
members `n01440764/n01440764_10026.jpeg` and `n01440764/n01440764_10026.cls`. Members are
written with fixed owner, mode and time, so the same tree makes the same bytes.

A split is written into a hidden folder beside its target (`.train.partial-*`), which is renamed
to `train` once every shard and the index are complete: a conversion that fails (a full disk)
or is stopped leaves no folder a run would take for the whole data set, and no shard that looks
whole. Every image's size is read while it is copied and stored in the shards' index: a run
starts on them without a scan.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from . import shards
from .index_files import free_space, write_atomic
from .imagefolder import ImageFolder
from .sources import header_size
from .tar_shards import TarShards

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
    try:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, extension, data, label in samples:
                tar.addfile(*_member(f"{key}.{extension}", data))
                tar.addfile(*_member(f"{key}.cls", str(label).encode()))
    except OSError as err:  # a failed write() names no file
        raise OSError(err.errno, err.strerror, str(path)) from None


def convert_split(source: ImageFolder, target: Path, samples_per_shard: int, threads: int,
                  progress: bool) -> TarShards:
    """Writes `source` as shards into the folder `target` (missing or empty), through a
    hidden folder beside it; returns them, indexed."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        _write_shards(source, staging, samples_per_shard, threads, progress)
        if target.is_dir():
            target.rmdir()  # empty (`convert` checked): the rename takes its place
        os.rename(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        where = Path(err.filename) if err.filename else staging
        raise UserError(f"cannot write {where}: {err.strerror or err}{free_space(where)}; "
                        f"nothing of {target} was kept") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TarShards(target)


def _write_shards(source: ImageFolder, target: Path, samples_per_shard: int, threads: int,
                  progress: bool) -> None:
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
    converted = shards.scan(target)
    converted.sizes[:] = sizes
    converted.write(cache=False)  # beside the shards: the cache's entry would name `target`


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
        if (target_root / split).is_dir() and any((target_root / split).iterdir()):
            raise UserError(f"{target_root / split} is not empty: convert into another folder")
        for left in target_root.glob(f".{split}.partial-*"):
            say(f"removing {left}, left by a conversion that did not finish")
            shutil.rmtree(left)
    target_root.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(target_root / TarShards.CLASSES_FILE,
                       "".join(f"{name}\n" for name in classes))
    for split, source in sources.items():
        converted = convert_split(source, target_root / split, samples_per_shard, threads,
                                  progress)
        say(f"{split}: {len(converted)} images in {len(converted.index.shards)} shards under "
            f"{target_root / split}")


def _write_text_atomic(path: Path, text: str) -> None:
    try:
        write_atomic(path, lambda f: f.write(text.encode()))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}{free_space(path)}") \
            from None
