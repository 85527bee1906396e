"""Tar shards (data/shards.py, data/shard_writer.py): `cocord-fast convert` keeps an
ImageFolder's samples and order, so both backends give the very batches they give on the
folder, a run resumes on shards exactly, a damaged member is named or skipped like a damaged
file, the shards' index is read instead of their headers and rebuilt when a shard changed, and
every malformed shard is named before training starts."""
import collections
import gzip
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.cli import _user_message, main
from cocord_fast.config import load_config
from cocord_fast.data import shard_headers, shards
from cocord_fast.data.open_files import OPEN_FILES
from cocord_fast.data.order import epoch_order
from cocord_fast.data.shard_writer import convert, sample_key
from cocord_fast.data.sources import IMAGENET_MEAN, IMAGENET_STD, open_source
from cocord_fast.errors import UserError
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import train

from data_trees import (assert_same_batches, decode_identity, epoch, file_id, loaders,
                        write_identity_tree)
from launch import train_losses
from markers import BACKENDS

MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def quiet_convert(source: Path, target: Path, samples_per_shard: int = 5) -> Path:
    convert(source, target, samples_per_shard, threads=2, progress=False, say=lambda _: None)
    return target


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    """An identity tree (12 training and 6 validation images of 3 classes) and its shards:
    5 samples a shard, so training's are 5 + 5 + 2 and validation's 5 + 1."""
    root = tmp_path_factory.mktemp("shards")
    folder = write_identity_tree(root / "folder")
    return folder, quiet_convert(folder, root / "shards")


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_tar(path: Path, contents: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in contents:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def later(path: Path) -> None:
    """A rewritten file's mtime moved on, whatever the file system's timestamp resolution."""
    stamp = os.stat(path).st_mtime_ns + 10 ** 9
    os.utime(path, ns=(stamp, stamp))


def test_shards_hold_the_image_folders_samples_in_its_order_with_their_sizes(trees):
    folder_root, shard_root = trees
    assert (shard_root / "classes.txt").read_text() == "class_0\nclass_1\nclass_2\n"
    for train_split in (True, False):
        folder = open_source("imagefolder", folder_root, train_split)
        sharded = open_source("shards", shard_root, train_split)
        assert sharded.index.shards == (["shard-000000.tar", "shard-000001.tar",
                                         "shard-000002.tar"] if train_split
                                        else ["shard-000000.tar", "shard-000001.tar"])
        assert len(sharded) == len(folder) and sharded.classes == folder.classes
        assert sharded.num_classes == 3 and np.array_equal(sharded.targets, folder.targets)
        for i in range(len(folder)):
            assert np.array_equal(sharded.read(i), folder.read(i))
            assert sharded.where(i) == (f"{shard_root / ('train' if train_split else 'val')}/"
                                       f"shard-{i // 5:06d}.tar:{folder.path(i).parent.name}/"
                                       f"{folder.path(i).name}")
            image, label = sharded.load(i)
            assert label == folder.targets[i] and np.array_equal(np.asarray(image),
                                                                 np.asarray(folder.load(i)[0]))
            # `convert` measured every size: DALI's crops read no header.
            assert sharded.sizes[i].tolist() == [image.height, image.width]


def test_a_sample_key_is_its_path_up_to_the_extension_with_no_other_dot():
    assert sample_key("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert sample_key("cat/a.b.c.jpg") == "cat/a_b_c"
    assert sample_key("deep/er/0.png") == "deep/er/0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_give_the_folders_very_batches_on_its_shards(trees, backend):
    """Every rank of two, two epochs: the same samples in the same order, the same crops and
    flips (tensors equal), the same labels and CRD indices, and the same evaluation."""
    for rank in (0, 1):
        folder, sharded = (loaders(kind, root, backend, rank, world_size=2)
                           for kind, root in zip(("imagefolder", "shards"), trees))
        assert np.array_equal(sharded.train_targets, folder.train_targets)
        assert sharded.num_classes == folder.num_classes and sharded.num_train == 12
        for number in (0, 1):
            batches = epoch(sharded, number)
            assert_same_batches(batches, epoch(folder, number))
            assert [i for b in batches for i in b.index.tolist()] == epoch_order(
                12, 2, seed=5, epoch=number, world_size=2)[rank].tolist()
        assert_same_batches(list(sharded.val), list(folder.val))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_process_resumes_mid_epoch_on_shards_with_the_uninterrupted_views(trees,
                                                                                 backend):
    full = epoch(loaders("shards", trees[1], backend), 1)
    assert_same_batches(epoch(loaders("shards", trees[1], backend), 1, skip=4), full[4:])


@pytest.fixture(scope="module")
def demo_shards(tiny_demo_root, tmp_path_factory) -> Path:
    return quiet_convert(tiny_demo_root, tmp_path_factory.mktemp("demo") / "shards", 50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_on_shards_stopped_and_resumed_logs_the_losses_of_one_on_the_folder(
        tiny_overrides, tiny_demo_root, demo_shards, tmp_path, backend):
    """Stopped at step 5 (mid-epoch) and resumed to step 14, on shards: the losses, bit for
    bit, and the weights of an uninterrupted run on the ImageFolder they came from."""
    common = tiny_overrides + [f"data.backend={backend}", "data.image_size=32"]
    train(load_config(overrides=common + ["data.dataset=imagefolder",
                                          f"data.root={tiny_demo_root}",
                                          f"train.output_dir={tmp_path / 'folder'}"]))
    run = tmp_path / "shards"
    train(load_config(overrides=common + ["data.dataset=shards", f"data.root={demo_shards}",
                                          f"train.output_dir={run}", "train.max_steps=5"]))
    torch.manual_seed(999)  # a resumed process starts with other RNG state
    train(config_for_resume(run, ["train.max_steps=0"]))
    losses = train_losses(run)
    assert losses == train_losses(tmp_path / "folder") and len(losses) == 14
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["method"]
            for name in ("folder", "shards"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def damaged_copy(shard_root: Path, tmp_path: Path, index: int, damage) -> tuple[Path, str]:
    """A copy of the shards whose training sample `index` has its image bytes damaged by
    `damage`; the damaged member's name as messages give it."""
    root = tmp_path / "shards"
    shutil.copytree(shard_root, root)
    source = open_source("shards", root, train=True)
    shard = root / "train" / source.index.shards[source.index.shard_of[index]]
    member = source.where(index).split(":", 1)[1]
    write_tar(shard, [(name, damage(data) if name == member else data)
                      for name, data in members(shard)])
    later(shard)
    return root, f"{shard}:{member}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_member_is_named_with_its_shard(trees, tmp_path, backend):
    order = epoch_order(12, 2, seed=5, epoch=0)[0]
    root, bad = damaged_copy(trees[1], tmp_path, int(order[5]), lambda data: data[:300])
    loader = loaders("shards", root, backend, num_workers=0 if backend == "torch" else 1)
    loader.train.start(0)
    batches = iter(loader.train)
    next(batches), next(batches)  # the batches before the damaged sample's arrive
    with pytest.raises(UserError) as err:
        next(batches)
    assert re.fullmatch(f"cannot decode image {re.escape(bad)}: .*data.skip_corrupt=true to "
                        f"skip unreadable files\\)", _user_message(err.value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_corrupt_replaces_a_damaged_member_by_the_next_sample(trees, tmp_path, backend):
    root, bad = damaged_copy(trees[1], tmp_path, 5, lambda data: b"not an image")
    loader = loaders("shards", root, backend, skip_corrupt=True)
    batches = epoch(loader, 0)
    assert [path for b in batches for path in b.skipped] == [bad]
    index = torch.cat([b.index for b in batches]).tolist()
    replaced = torch.cat([b.replaced for b in batches]).tolist()
    assert sorted(index) == list(range(12)) and [i for i, r in zip(index, replaced) if r] == [5]
    folder = open_source("imagefolder", trees[0], train=True)
    ids, _ = decode_identity(torch.cat([b.views[0] for b in batches]), MEAN, STD)
    assert ids.tolist() == [file_id(folder.path(6 if i == 5 else i)) for i in index]


def test_the_index_is_read_instead_of_the_headers_and_rebuilt_when_a_shard_changes(
        trees, tmp_path, monkeypatch):
    root = shutil.copytree(trees[1], tmp_path / "shards") / "train"
    first = open_source("shards", root.parent, train=True)
    monkeypatch.setattr(shard_headers, "read_samples",
                        lambda path: pytest.fail("headers read again"))
    again = open_source("shards", root.parent, train=True)
    assert again.index.shards == first.index.shards and np.array_equal(again.index.starts,
                                                                       first.index.starts)
    monkeypatch.undo()
    said = []
    shutil.copy(root / "shard-000002.tar", root / "shard-000003.tar")  # a shard added
    assert len(shards.open_index(root, say=said.append)) == 14
    (root / "shard-000001.tar").unlink()  # one removed
    assert len(shards.open_index(root, say=said.append)) == 9
    write_tar(root / "shard-000000.tar", members(root / "shard-000000.tar")[:4])
    later(root / "shard-000000.tar")  # one rewritten
    index = shards.open_index(root, say=said.append)
    assert len(index) == 6 and len(said) == 3
    assert all(re.fullmatch(r".* changed since .*\.cocord_fast-shards\.npz was written: reading "
                            r"the headers of the new and changed shards of .*", line)
               for line in said)
    shards.open_index(root, say=said.append)
    assert len(said) == 3  # current again: nothing more said
    (root / shards.SHARD_INDEX_NAME).write_bytes(b"not an index")
    assert len(shards.open_index(root)) == 6


def test_a_rebuilt_index_reads_the_changed_shards_alone_and_keeps_the_others_sizes(
        trees, tmp_path, monkeypatch):
    root = shutil.copytree(trees[1], tmp_path / "shards") / "train"
    first = shards.open_index(root)
    assert (first.sizes > 0).all()  # measured by convert
    shutil.copy(root / "shard-000002.tar", root / "shard-000003.tar")  # a shard added
    write_tar(root / "shard-000000.tar", members(root / "shard-000000.tar")[:4])
    later(root / "shard-000000.tar")  # one rewritten
    read, samples = [], shard_headers.read_samples
    monkeypatch.setattr(shard_headers, "read_samples",
                        lambda path: read.append(path.name) or samples(path))
    index = shards.open_index(root, say=lambda _: None)
    assert sorted(read) == ["shard-000000.tar", "shard-000003.tar"]
    fresh = shards.scan(root)
    assert index.shards == fresh.shards and index.name(7) == fresh.name(7)
    for field in ("shard_stamps", "names", "offsets", "shard_of", "starts", "lengths", "targets"):
        assert np.array_equal(getattr(index, field), getattr(fresh, field)), field
    unchanged = np.isin(index.shard_of, [1, 2])  # 5 + 2 samples, where they were
    assert np.array_equal(index.sizes[unchanged], first.sizes[5:12])
    assert (index.sizes[~unchanged] == -1).all()


JPEG = b"\xff\xd8\xff" + bytes(20)


@pytest.mark.parametrize("contents, message", [
    ([("a.jpg", JPEG)], r"sample a\.jpg has no \.cls member"),
    ([("x/a.b.jpg", JPEG), ("x/a.cls", b"1")], r"member x/a\.b\.jpg has more than one dot in "
                                                r"its file name: WebDataset's key ends at the "
                                                r"first dot, so it belongs to sample 'x/a' as "
                                                r"its 'b\.jpg' member"),
    ([("a.jpg", JPEG), ("a.cls", b"cat")], r"a\.cls holds 'cat', not a class number"),
    ([("a.jpg", JPEG), ("a.png", JPEG), ("a.cls", b"1")], r"sample 'a' has 2 image members"),
    ([("a.json", b"{}"), ("a.cls", b"1")], r"sample 'a' has no image members"),
    ([("a.jpg", JPEG), ("a.cls", b"1"), ("a.cls", b"2")], r"sample 'a' has two 'cls' members"),
    ([("notes.txt", b"")], r"shard-000000\.tar holds no samples"),
])
def test_a_malformed_shard_is_named_with_what_is_wrong(tmp_path, contents, message):
    write_tar(tmp_path / "data" / "train" / "shard-000000.tar", contents)
    with pytest.raises(UserError, match=message):
        open_source("shards", tmp_path / "data", train=True)


def test_compressed_cut_short_and_missing_shards_are_named(tmp_path):
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    with pytest.raises(UserError, match=r"shard directory .*train has no \.tar files"):
        open_source("shards", tmp_path / "data", train=True)
    data = bytes(range(256)) * 40
    write_tar(split / "shard-000000.tar", [("a.jpg", data), ("a.cls", b"0")])
    whole = (split / "shard-000000.tar").read_bytes()
    (split / "shard-000000.tar").write_bytes(gzip.compress(whole))
    with pytest.raises(UserError, match=r"shard-000000\.tar is a gzip-compressed file: shards "
                                        r"are read by offset"):
        open_source("shards", tmp_path / "data", train=True)
    (split / "shard-000000.tar").write_bytes(whole[:512 + 4000])  # inside a.jpg's data
    with pytest.raises(UserError, match=r"shard-000000\.tar is cut short inside a\.jpg"):
        open_source("shards", tmp_path / "data", train=True)
    with pytest.raises(UserError, match=r"data.root=.*data has no 'val' folder \(expected "
                                        r".*/train/<shard>\.tar and .*/val/<shard>\.tar\)"):
        open_source("shards", tmp_path / "data", train=False)


def test_without_classes_txt_the_classes_are_numbered_and_labels_past_it_are_refused(
        trees, tmp_path):
    root = shutil.copytree(trees[1], tmp_path / "shards")
    (root / "classes.txt").unlink()
    source = open_source("shards", root, train=True)
    assert source.classes is None and source.num_classes == 3
    (root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(UserError, match=r"shard-00000[12]\.tar:class_2/.*\.jpg has class 2, but "
                                        r".*classes\.txt names 2 classes"):
        open_source("shards", root, train=True)


def test_reads_go_through_one_open_file_per_shard(trees, monkeypatch):
    source = open_source("shards", trees[1], train=True)
    monkeypatch.setattr(OPEN_FILES, "files", collections.OrderedDict())  # none open yet
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *args: opened.append(path) or real_open(
        path, *args))
    for _ in range(2):
        for i in range(len(source)):
            source.read(i)
    assert sorted(Path(p).name for p in opened) == source.index.shards


def test_past_the_open_file_budget_a_shard_is_opened_for_each_read(trees, monkeypatch):
    source = open_source("shards", trees[1], train=True)
    monkeypatch.setattr(OPEN_FILES, "files", collections.OrderedDict())
    monkeypatch.setattr(OPEN_FILES, "budget", 0)
    data = [source.read(i) for i in range(len(source))]
    folder = open_source("imagefolder", trees[0], train=True)
    assert all(np.array_equal(d, folder.read(i)) for i, d in enumerate(data))
    assert not OPEN_FILES.files


def test_cli_convert_refuses_to_write_over_shards_and_index_measures_shards(trees, tmp_path,
                                                                             capsys):
    folder, _ = trees
    target = tmp_path / "shards"
    assert main(["convert", str(folder), str(target), "--samples-per-shard", "4",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 12 images in 3 shards" in out and "val: 6 images in 2 shards" in out
    assert main(["convert", str(folder), str(target)]) == 2
    assert "already holds shards: remove them first" in capsys.readouterr().err
    index = target / "train" / shards.SHARD_INDEX_NAME
    index.unlink()
    assert main(["index", str(target)]) == 0
    assert "train: 12 images in 3 classes, every size read" in capsys.readouterr().out
    source = open_source("shards", target, train=True)
    assert source.sizes.tolist() == [[36, 48]] * 12
    with pytest.raises(SystemExit):
        main(["convert", str(folder), str(tmp_path / "x"), "--samples-per-shard", "0"])
    assert "--samples-per-shard: expected a whole number of at least 1, got '0'" in \
        capsys.readouterr().err


def test_convert_refuses_two_neighbouring_files_that_would_share_a_key(tmp_path):
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        (folder / split / "cat").mkdir(parents=True)
        for name in ("a.b.jpg", "a_b.jpg"):
            Image.new("RGB", (8, 8)).save(folder / split / "cat" / name)
    with pytest.raises(UserError, match=r"cat/a\.b\.jpg and .*cat/a_b\.jpg would both be "
                                        r"sample 'cat/a_b'"):
        quiet_convert(folder, tmp_path / "shards")
