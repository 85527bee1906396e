"""`cocord-fast convert` that cannot finish (a full disk, a stop) leaves nothing a run would
take for the whole data set: a split appears whole, under its name, or not at all."""
import errno
import re
from pathlib import Path

import pytest

from cocord_fast.cli import main
from cocord_fast.data import shard_writer
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError

from data_trees import write_identity_tree


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_identity_tree(tmp_path_factory.mktemp("convert") / "folder")


def test_a_disk_full_mid_conversion_keeps_no_part_of_the_split(folder, tmp_path, monkeypatch):
    write_shard, written = shard_writer._write_shard, []

    def disk_full_at_the_second_shard(path, samples):
        if written:
            with open(path, "wb") as f:
                f.write(b"\0" * 700)  # what a full disk lets through
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        write_shard(path, samples)

    monkeypatch.setattr(shard_writer, "_write_shard", disk_full_at_the_second_shard)
    target = tmp_path / "shards"
    with pytest.raises(UserError) as err:
        shard_writer.convert(folder, target, 5, threads=1, progress=False, say=lambda _: None)
    assert re.fullmatch(rf"cannot write {re.escape(str(target))}/\.train\.partial-\w+/"
                        rf"shard-000001\.tar: No space left on device, \d+ MB free there; "
                        rf"nothing of {re.escape(str(target / 'train'))} was kept",
                        str(err.value))
    assert sorted(p.name for p in target.iterdir()) == ["classes.txt"]
    with pytest.raises(UserError, match="has no 'train' folder"):
        open_source("shards", target, train=True)
    monkeypatch.undo()
    shard_writer.convert(folder, target, 5, threads=1, progress=False, say=lambda _: None)
    assert len(open_source("shards", target, train=True)) == 12


def test_what_a_stopped_conversion_left_is_removed_by_the_next(folder, tmp_path, capsys):
    target = tmp_path / "shards"
    left = target / ".train.partial-x1y2"
    left.mkdir(parents=True)
    (left / "shard-000000.tar").write_bytes(b"half a shard")
    assert main(["convert", str(folder), str(target), "--threads", "1"]) == 0
    assert f"removing {left}, left by a conversion that did not finish" in capsys.readouterr().out
    assert sorted(p.name for p in target.iterdir()) == ["classes.txt", "train", "val"]


def test_a_split_folder_holding_other_files_is_refused(folder, tmp_path):
    (tmp_path / "shards" / "val").mkdir(parents=True)
    (tmp_path / "shards" / "val" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"shards/val is not empty: convert into another folder"):
        shard_writer.convert(folder, tmp_path / "shards", 5, threads=1, progress=False,
                             say=lambda _: None)
