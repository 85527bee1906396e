"""The index of an ImageFolder split (data/folder_index.py): the same files, labels and order
as a scan, read without one, rebuilt when a folder changed, written where it can be, made by
one process of a launch while the others wait (that of tar shards too), and
`cocord-fast index`."""
import errno
import os
import re
import shutil
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocord_fast.cli import main
from cocord_fast.data import folder_index, index_files, shards
from cocord_fast.data.folder_index import INDEX_NAME, open_index, scan
from cocord_fast.data.shard_writer import convert
from cocord_fast.data.imagefolder import ImageFolder
from cocord_fast.errors import UserError

from data_trees import write_identity_tree
from launch import launch


def pathlib_listing(root: Path) -> tuple[list[Path], list[int]]:
    """What ImageFolder listed before the index: sorted rglob of image files per class."""
    files, labels = [], []
    for label, name in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in folder_index.IMAGE_EXTENSIONS and p.is_file())
        files += found
        labels += [label] * len(found)
    return files, labels


def awkward_tree(root: Path) -> Path:
    """Names whose pathlib order is not their string order ('a/...' before 'a.x/...'), nested
    folders, an upper-case extension, a link to a file, and files that are no images."""
    for relative in ["cat/a/1.jpg", "cat/a.x/0.jpg", "cat/b.JPEG", "cat/a-/2.png",
                     "dog/0.jpg", "dog/deep/er/3.webp", "dog/notes.txt", "dog/.hidden.jpg"]:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (root / "dog" / "link.jpg").symlink_to(root / "dog" / "0.jpg")
    (root / "dog" / "dir_link").symlink_to(root / "dog" / "deep", target_is_directory=True)
    return root


def listing(index) -> list[Path]:
    return [index.path(i) for i in range(len(index))]


def test_the_index_lists_what_pathlib_listed_in_the_same_order(tmp_path):
    root = awkward_tree(tmp_path / "train")
    files, labels = pathlib_listing(root)
    index = scan(root)
    assert listing(index) == files and index.targets.tolist() == labels
    assert index.classes == ["cat", "dog"] and (index.sizes == -1).all()


def test_a_second_open_reads_the_index_without_a_scan(tmp_path, monkeypatch):
    root = awkward_tree(tmp_path / "train")
    first = open_index(root)
    assert (root / INDEX_NAME).is_file()
    monkeypatch.setattr(folder_index, "scan", lambda root: pytest.fail("scanned again"))
    again = open_index(root)
    assert listing(again) == listing(first) and again.classes == first.classes
    assert np.array_equal(again.targets, first.targets)


def touch_later(folder: Path) -> None:
    """A folder's mtime moved on, whatever the file system's timestamp resolution."""
    stamp = os.stat(folder).st_mtime_ns + 10 ** 9
    os.utime(folder, ns=(stamp, stamp))


@pytest.mark.parametrize("change", ["add a file", "remove a file", "add a class",
                                    "add to a nested folder"])
def test_a_changed_folder_rebuilds_the_index_and_says_so(change, tmp_path, monkeypatch):
    root = awkward_tree(tmp_path / "train")
    open_index(root)
    if change == "add a file":
        (root / "cat" / "9.jpg").write_bytes(b"")
        touch_later(root / "cat")
    elif change == "remove a file":
        (root / "cat" / "b.JPEG").unlink()
        touch_later(root / "cat")
    elif change == "add a class":
        (root / "emu").mkdir()
        (root / "emu" / "0.jpg").write_bytes(b"")
    else:
        (root / "dog" / "deep" / "er" / "4.jpg").write_bytes(b"")
        touch_later(root / "dog" / "deep" / "er")
    said = []
    index = open_index(root, say=said.append)
    assert len(said) == 1 and "changed since" in said[0] and "listing" in said[0]
    assert listing(index) == pathlib_listing(root)[0]
    open_index(root, say=said.append)
    assert len(said) == 1  # current again: nothing more said


def test_where_the_data_folder_cannot_take_it_the_index_goes_to_the_cache(tmp_path,
                                                                          monkeypatch):
    root = awkward_tree(tmp_path / "train")
    replace = os.replace

    def read_only_data(source, target):  # as a read-only mount answers (even for root)
        if Path(target).parent == root:
            raise OSError(30, "Read-only file system")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", read_only_data)
    index = open_index(root)
    assert not (root / INDEX_NAME).exists() and not list(root.glob("*.partial"))
    cached = folder_index.index_locations(root)[1]
    assert cached.is_file() and str(cached).startswith(os.environ["COCORD_FAST_CACHE"])
    said = []
    assert listing(open_index(root, say=said.append)) == listing(index) and not said


def test_a_damaged_index_is_listed_again(tmp_path):
    root = awkward_tree(tmp_path / "train")
    open_index(root)
    (root / INDEX_NAME).write_bytes(b"not an index")
    assert listing(open_index(root)) == pathlib_listing(root)[0]
    assert folder_index.read_index(root / INDEX_NAME, root) is not None  # rewritten


def test_image_folder_reads_images_through_the_index(tmp_path):
    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    source = ImageFolder(root / "train")
    assert len(source) == 12 and source.classes == sorted(source.classes)
    image, label = source.load(5)
    assert label == source.targets[5] and image.mode == "RGB"
    assert source.path(5) == pathlib_listing(root / "train")[0][5]


def test_cli_index_measures_every_image_size(tmp_path, capsys):
    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    assert main(["index", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 12 images" in out and "val:" in out
    for split in ("train", "val"):
        index = open_index(root / split)
        assert (index.sizes > 0).all()
        assert index.sizes.tolist() == [list(reversed(ImageFolder(root / split).load(i)[0].size))
                                        for i in range(len(index))]


def test_a_rebuilt_index_keeps_the_sizes_measured_for_the_files_it_still_lists(tmp_path):
    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    assert main(["index", str(root)]) == 0
    measured = open_index(root / "train")
    class_folder = root / "train" / measured.classes[0]
    shutil.copy(next(class_folder.iterdir()), class_folder / "zz_new.png")
    touch_later(class_folder)
    said = []
    index = open_index(root / "train", say=said.append)
    assert len(said) == 1 and len(index) == len(measured) + 1
    new = [i for i in range(len(index)) if index.path(i).name == "zz_new.png"]
    assert (index.sizes[new] == -1).all()
    sizes = {index.path(i): size for i, size in enumerate(index.sizes.tolist()) if i not in new}
    assert sizes == {measured.path(i): size for i, size in enumerate(measured.sizes.tolist())}
    assert all(size[0] > 0 for size in sizes.values())


def test_cli_index_lists_anew_what_a_copy_keeping_folder_times_hides(tmp_path):
    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    train = root / "train"
    open_index(train)
    folder = next(p for p in sorted(train.iterdir()) if p.is_dir())
    stamp = os.stat(folder).st_mtime_ns
    (folder / "copied.jpg").write_bytes(next(folder.glob("*.jpg")).read_bytes())
    os.utime(folder, ns=(stamp, stamp))  # as `cp -a` or `rsync -a` leave it
    assert len(open_index(train)) == 12  # the folder's time says nothing changed
    assert main(["index", str(root)]) == 0
    assert len(open_index(train)) == 13


def test_the_dali_feed_takes_the_sizes_the_index_measured(tmp_path):
    pytest.importorskip("nvidia.dali")
    from cocord_fast.data.dali_loader import DaliFeed
    from cocord_fast.data.dali_pipeline import DaliRecipe
    from cocord_fast.data.sources import IMAGENET_MEAN, IMAGENET_STD
    from cocord_fast.data.transforms import Preprocessing

    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    assert main(["index", str(root)]) == 0
    source = ImageFolder(root / "train")
    recipe = DaliRecipe(0, 32, Preprocessing(IMAGENET_MEAN, IMAGENET_STD))
    feed = DaliFeed(source, recipe, 1, torch.device("cpu"), torch.float32)
    assert (feed.sizes > 0).all() and np.array_equal(feed.sizes, source.sizes)
    assert feed.file(3) == str(source.path(3))


def test_a_file_created_while_its_folder_is_listed_is_listed_at_the_next_start(tmp_path,
                                                                              monkeypatch):
    root = awkward_tree(tmp_path / "train")
    scandir = os.scandir

    def listing_then_a_new_file(directory):
        entries = list(scandir(directory))
        if Path(directory) == root / "cat" and not (root / "cat" / "late.jpg").exists():
            (root / "cat" / "late.jpg").write_bytes(b"")
            touch_later(root / "cat")  # whatever the timestamp resolution
        return iter(entries)

    monkeypatch.setattr(os, "scandir", listing_then_a_new_file)
    first = open_index(root)
    monkeypatch.undo()
    assert root / "cat" / "late.jpg" not in listing(first)
    said = []
    assert listing(open_index(root, say=said.append)) == pathlib_listing(root)[0]
    assert len(said) == 1 and f"{root / 'cat'} changed since" in said[0]


def test_a_file_replaced_under_its_name_is_measured_again(tmp_path):
    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    assert main(["index", str(root)]) == 0
    measured = open_index(root / "train")
    replaced = measured.path(3)
    Image.new("RGB", (20, 10)).save(tmp_path / "new.jpg")
    os.replace(tmp_path / "new.jpg", replaced)  # another image, the same name
    touch_later(replaced.parent)
    index = open_index(root / "train", say=lambda _: None)
    assert index.path(3) == replaced and index.sizes[3].tolist() == [-1, -1]
    kept = [i for i in range(len(index)) if i != 3]
    assert np.array_equal(index.sizes[kept], measured.sizes[kept]) and (index.sizes[kept] > 0).all()
    assert ImageFolder(root / "train").load(3)[0].size == (20, 10)


def test_an_unreadable_folder_is_an_error_naming_it(tmp_path, monkeypatch):
    root = awkward_tree(tmp_path / "train")
    scandir = os.scandir

    def denied(directory):
        if Path(directory) == root / "dog" / "deep":
            raise PermissionError(13, "Permission denied", str(directory))
        return scandir(directory)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(UserError, match=f"cannot list {re.escape(str(root / 'dog' / 'deep'))}: "
                                        f"Permission denied \\(its images would be left out"):
        open_index(root)


def test_names_that_are_not_utf8_are_kept_as_the_os_gives_them(tmp_path, capsys):
    root = tmp_path / b"caf\xe9".decode(errors="surrogateescape")
    write_identity_tree(root, classes=2, per_class=2, val_per_class=1)
    folder = root / "train" / "class_0"
    latin1 = os.fsdecode(b"\xe9t\xe9.jpg")
    os.rename(next(folder.glob("*.jpg")), folder / latin1)
    source = ImageFolder(root / "train")
    assert latin1 in [source.path(i).name for i in range(len(source))]
    assert sorted(os.fsencode(source.path(i).name) for i in range(len(source))
                  if source.targets[i] == 0) == sorted(os.listdir(os.fsencode(folder)))
    again = ImageFolder(root / "train", say=pytest.fail)  # read back from its index
    assert [again.path(i) for i in range(len(again))] == [source.path(i)
                                                         for i in range(len(source))]
    assert all(again.load(i)[0].size == (48, 36) for i in range(len(again)))
    assert main(["index", str(root)]) == 0  # prints the index's path
    assert "caf\\udce9/train" in capsys.readouterr().out  # escaped, not a crash


def two_hosts_one_cache(tmp_path, monkeypatch, file_system: str | None) -> tuple[Path, Path]:
    """A data root whose index cannot be written beside it, and where each of two hosts keeps
    it in the cache they share: `file_system` is the type the root is on."""
    root = awkward_tree(tmp_path / "train")
    replace = os.replace

    def read_only_data(source, target):
        if Path(target).parent == root:
            raise OSError(30, "Read-only file system")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", read_only_data)
    monkeypatch.setattr(index_files, "file_system_type", lambda path: file_system,
                        raising=False)  # (so that the test runs on code without it)
    cached = []
    for host in ("node-a", "node-b"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        cached.append(folder_index.index_locations(root)[1])
    return root, cached


def test_local_copies_at_one_path_keep_an_index_each_in_a_shared_cache(tmp_path, monkeypatch):
    root, (node_a, node_b) = two_hosts_one_cache(tmp_path, monkeypatch, "ext4")
    assert node_a != node_b
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    assert listing(open_index(root)) == pathlib_listing(root)[0] and node_a.is_file()
    # node-b's copy lacks a file; its folder times match node-a's (copies made with rsync -a)
    stamp = os.stat(root / "cat").st_mtime_ns
    (root / "cat" / "b.JPEG").unlink()
    os.utime(root / "cat", ns=(stamp, stamp))
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    assert listing(open_index(root)) == pathlib_listing(root)[0]


def test_on_a_network_file_system_the_hosts_share_one_cached_index(tmp_path, monkeypatch):
    _, (node_a, node_b) = two_hosts_one_cache(tmp_path, monkeypatch, "nfs4")
    assert node_a == node_b


def test_the_file_system_of_a_path_is_that_of_its_deepest_mount(tmp_path):
    assert index_files.file_system_type(Path("/proc/self")) == "proc"
    assert index_files.file_system_type(tmp_path) is not None


def test_a_temporary_index_file_is_unique_to_its_writer(tmp_path, monkeypatch):
    """Process ids repeat across containers: another writer's file must not be taken over."""
    root = awkward_tree(tmp_path / "train")
    monkeypatch.setattr(os, "getpid", lambda: 7)
    others = root / f"{INDEX_NAME}.partial-7"
    others.write_bytes(b"another container's index, half written")
    open_index(root)
    assert others.read_bytes() == b"another container's index, half written"
    assert [p.name for p in root.glob("*.partial*")] == [others.name]


def test_where_no_index_can_be_written_it_is_kept_in_memory_with_a_warning(tmp_path,
                                                                           monkeypatch):
    root = awkward_tree(tmp_path / "train")
    unwritable = [Path("/proc/cocord-fast/index.npz"), Path("/proc/cocord-fast-cache/x.npz")]
    monkeypatch.setattr(folder_index, "index_locations", lambda root: unwritable)
    monkeypatch.setattr(index_files, "index_locations", lambda root, name: unwritable)
    said = []
    index = open_index(root, say=said.append)
    assert listing(index) == pathlib_listing(root)[0]
    assert len(said) == 1 and said[0].startswith(f"warning: cannot write the index of {root} (")
    assert "kept in memory for this run" in said[0]


def test_a_disk_full_while_an_index_is_written_leaves_the_old_one_whole(tmp_path, monkeypatch):
    root = awkward_tree(tmp_path / "train")
    open_index(root)
    before = (root / INDEX_NAME).read_bytes()
    (root / "cat" / "9.jpg").write_bytes(b"")
    touch_later(root / "cat")
    savez = np.savez

    def disk_full(f, **arrays):
        savez(f, **arrays)
        f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    said = []
    index = open_index(root, say=said.append)
    assert len(index) == len(pathlib_listing(root)[0])
    assert (root / INDEX_NAME).read_bytes() == before and not list(root.glob(".*.partial"))
    assert re.search(f"{re.escape(str(root / INDEX_NAME))}: No space left on device, \\d+ MB "
                     f"free there", said[-1])
    monkeypatch.undo()
    assert folder_index.read_index(root / INDEX_NAME, root).changed() == str(root / "cat")


def test_cli_index_names_a_missing_root(tmp_path, capsys):
    assert main(["index", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


WORKER = textwrap.dedent("""
    import importlib, os, sys, torch
    from cocord_fast import distributed
    from cocord_fast.config import load_config
    from cocord_fast.data.build import prepare_sources

    dataset, module = sys.argv[2], importlib.import_module(sys.argv[3])
    scan = module.scan
    def counted(root, stale):
        open(f"scanned_{os.environ['RANK']}_{root.name}", "w").close()
        return scan(root, stale)
    module.scan = counted
    distributed.init(torch.device("cpu"), 60)
    cfg = load_config(overrides=[f"data.dataset={dataset}", f"data.root={sys.argv[1]}"])
    prepare_sources(cfg.data)
    distributed.finish(0)
""")


@pytest.mark.parametrize("dataset", ["imagefolder", "shards"])
def test_one_process_of_a_launch_indexes_the_data_and_the_others_read_its_index(tmp_path,
                                                                                dataset):
    """An ImageFolder's folders are listed, or the shards' headers read, once."""
    root = write_identity_tree(tmp_path / "data", classes=3, per_class=4)
    module, name = folder_index, INDEX_NAME
    if dataset == "shards":
        convert(root, tmp_path / "shards", progress=False, say=lambda _: None)
        root = tmp_path / "shards"
        for split in ("train", "val"):
            (root / split / shards.SHARD_INDEX_NAME).unlink()  # the one `convert` wrote
        module, name = shards, shards.SHARD_INDEX_NAME
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch("torchrun", [script, root, dataset, module.__name__], cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("scanned_*")) == ["scanned_0_train",
                                                                  "scanned_0_val"]
    assert (root / "train" / name).is_file() and (root / "val" / name).is_file()
