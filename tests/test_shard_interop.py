"""Shards from other tools: the `webdataset` library's writers (keys in sub-folders, names
past tar's 100 characters, which need pax headers) and GNU tar train and evaluate with the
very batches of the ImageFolder they came from; `cocord-fast convert`'s shards read back
through `webdataset.WebDataset` sample for sample; member names that are not UTF-8 are kept
as the archive holds them."""
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset

from cocord_fast.data.shard_writer import convert
from cocord_fast.data.sources import open_source

from data_trees import assert_same_batches, epoch, loaders, write_identity_tree
from markers import BACKENDS

# A key past tar's 100-character name field, in sub-folders.
DEEP = "/".join(["sub-folder"] * 10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_identity_tree(tmp_path_factory.mktemp("interop") / "folder")


def folder_samples(root: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, JPEG bytes, label) of a split, in the ImageFolder's order."""
    source = open_source("imagefolder", root, split == "train")
    return [(f"{DEEP}/{source.path(i).parent.name}/{source.path(i).stem}",
             source.read(i).tobytes(), int(source.targets[i])) for i in range(len(source))]


def write_with_webdataset(folder: Path, target: Path) -> Path:
    for split in ("train", "val"):
        (target / split).mkdir(parents=True)
        with webdataset.ShardWriter(str(target / split / "shard-%06d.tar"), maxcount=5,
                                    verbose=0) as sink:
            for key, data, label in folder_samples(folder, split):
                sink.write({"__key__": key, "jpg": data, "cls": label})
    return target


def write_with_gnu_tar(folder: Path, target: Path, tar_format: str) -> Path:
    """Each split's samples as files of a staging folder, archived by GNU tar 5 at a time in
    the folder's order."""
    for split in ("train", "val"):
        stage = target / "stage" / split
        members = []
        for key, data, label in folder_samples(folder, split):
            (stage / key).parent.mkdir(parents=True, exist_ok=True)
            (stage / f"{key}.jpg").write_bytes(data)
            (stage / f"{key}.cls").write_text(str(label))
            members += [f"{key}.jpg", f"{key}.cls"]
        (target / split).mkdir(parents=True)
        for number, start in enumerate(range(0, len(members), 10)):
            subprocess.run(["tar", "-cf", target / split / f"shard-{number:06d}.tar",
                            f"--format={tar_format}", "-C", stage, *members[start:start + 10]],
                           check=True)
    shutil.rmtree(target / "stage")
    return target


@pytest.mark.parametrize("writer", ["webdataset", "gnu tar (gnu)", "gnu tar (posix)"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_of_other_writers_give_the_folders_very_batches(folder, tmp_path, writer,
                                                              backend):
    target = tmp_path / "shards"
    if writer == "webdataset":
        write_with_webdataset(folder, target)
    else:
        write_with_gnu_tar(folder, target, writer.split("(")[1].rstrip(")"))
    sharded, unsharded = (loaders(kind, root, backend, rank=1, world_size=2)
                          for kind, root in (("shards", target), ("imagefolder", folder)))
    assert sharded.num_train == 12 and sharded.num_classes == unsharded.num_classes == 3
    assert np.array_equal(sharded.train_targets, unsharded.train_targets)
    for number in (0, 1):
        assert_same_batches(epoch(sharded, number), epoch(unsharded, number))
    assert_same_batches(list(sharded.val), list(unsharded.val))


def test_converted_shards_read_back_through_webdataset_sample_for_sample(folder, tmp_path):
    convert(folder, tmp_path / "shards", 5, threads=2, progress=False, say=lambda _: None)
    for split in ("train", "val"):
        shards = sorted(str(p) for p in (tmp_path / "shards" / split).glob("*.tar"))
        read = list(webdataset.WebDataset(shards, shardshuffle=False, empty_check=False))
        source = open_source("imagefolder", folder, split == "train")
        assert len(read) == len(source)
        for i, sample in enumerate(read):
            image = [extension for extension in sample if extension in ("jpg", "jpeg")]
            assert sample[image[0]] == source.read(i).tobytes()
            assert int(sample["cls"]) == source.targets[i]
            assert sample["__key__"] == f"{source.path(i).parent.name}/{source.path(i).stem}"


def test_member_names_that_are_not_utf8_are_kept_as_the_archive_holds_them(folder, tmp_path):
    """GNU tar stores a latin-1 file name as its bytes; so does tarfile's GNU format."""
    name = os.fsdecode(b"class_0/caf\xe9")
    data = open_source("imagefolder", folder, True).read(0).tobytes()
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    with tarfile.open(split / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for extension, content in (("jpg", data), ("cls", b"0")):
            info = tarfile.TarInfo(f"{name}.{extension}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    assert b"class_0/caf\xe9.jpg" in (split / "shard-000000.tar").read_bytes()
    source = open_source("shards", tmp_path / "data", train=True)
    assert source.where(0) == f"{split / 'shard-000000.tar'}:{name}.jpg"
    again = open_source("shards", tmp_path / "data", train=True)  # from its index
    assert again.where(0) == source.where(0) and again.read(0).tobytes() == data
    assert source.load(0)[0].size == (48, 36)
