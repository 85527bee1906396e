import numpy as np
import pytest

from cocord_fast.data import demo, index_files
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError


def test_demo_tree_has_every_class_in_both_splits(tiny_demo_root):
    train = open_source("demo", tiny_demo_root, train=True)
    val = open_source("demo", tiny_demo_root, train=False)
    assert train.classes == val.classes == sorted(demo.CLASSES)
    assert np.bincount(train.targets).tolist() == [12] * 10
    assert np.bincount(val.targets).tolist() == [4] * 10
    image, _ = train.load(0)
    assert image.size == (32, 32) and train.path(0).suffix == ".jpg"


def test_generation_is_deterministic_and_classes_differ():
    first = [np.asarray(demo.make_image(label, np.random.default_rng(1)), np.float32)
             for label in range(10)]
    again = np.asarray(demo.make_image(3, np.random.default_rng(1)), np.float32)
    assert np.array_equal(first[3], again)
    assert all(not np.array_equal(first[0], other) for other in first[1:])


def test_ensure_reuses_a_complete_tree_and_refuses_a_foreign_one(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SPLITS", {"train": 1, "val": 1})
    root = demo.ensure_demo_dataset(tmp_path / "data")
    stamp = (root / "train" / demo.CLASSES[0] / "00000.jpg").stat().st_mtime_ns
    assert demo.ensure_demo_dataset(tmp_path / "data") == root
    assert (root / "train" / demo.CLASSES[0] / "00000.jpg").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.partial-*"))

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "file.txt").write_text("x")
    with pytest.raises(UserError, match="does not hold a complete demo data set"):
        demo.ensure_demo_dataset(foreign)
    with pytest.raises(UserError, match="is a file, not a directory"):
        demo.ensure_demo_dataset(foreign / "file.txt")


def test_default_location_is_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COCORD_FAST_CACHE", str(tmp_path))
    assert index_files.default_cache_dir() == tmp_path / "demo"
