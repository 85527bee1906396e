import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cocord_fast.config import DataConfig
from cocord_fast.data import Batch, build_loaders
from cocord_fast.data.build import check_data_config
from cocord_fast.data.order import derived_seed
from cocord_fast.data.cifar100 import CIFAR_MEAN, CIFAR_STD, CIFAR100
from cocord_fast.data.sources import open_source
from cocord_fast.data.torch_loader import EpochBatchSampler, MultiViewDataset, collate
from cocord_fast.data.transforms import Preprocessing, build_recipe
from cocord_fast.errors import UserError


def write_cifar(root, n_train=20, n_test=10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "fine_labels": list(rng.integers(0, 100, size=n)), "coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    return folder


def test_cifar_reads_python_format_as_hwc_images(tmp_path):
    folder = write_cifar(tmp_path)
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f)
    for root in (tmp_path, folder):  # the parent or the folder itself
        source = CIFAR100(root, train=True)
        image, label = source.load(3)
        expected = raw["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW planes -> HWC
        assert np.array_equal(np.asarray(image), expected)
        assert label == raw["fine_labels"][3] and len(source) == 20
    assert len(CIFAR100(tmp_path, train=False)) == 10


def test_cifar_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="no CIFAR-100 data under data.root=.*data.download=true"):
        CIFAR100(tmp_path, train=True)
    folder = write_cifar(tmp_path)
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="test is not a CIFAR-100 python-format file"):
        CIFAR100(tmp_path, train=False)
    with open(folder / "train", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(UserError, match=r"expected 'data' of shape \(N, 3072\)"):
        CIFAR100(tmp_path, train=True)


def make_tree(root, classes=("a", "b"), per_class=3, size=(40, 30)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (i * 40, 0, 0)).save(root / c / f"{i}.jpg")


def test_image_folder_labels_follow_sorted_class_folders(tmp_path):
    make_tree(tmp_path / "train", classes=("zebra", "ant"))
    make_tree(tmp_path / "val", classes=("zebra", "ant"))
    source = open_source("imagefolder", tmp_path, train=True)
    assert source.classes == ["ant", "zebra"]
    labels = {source.path(i).parent.name: source.load(i)[1] for i in range(len(source))}
    assert labels == {"ant": 0, "zebra": 1}


@pytest.mark.parametrize("layout, message", [
    ("missing", "data.root=.* does not exist"),
    ("no_split", "has no 'train' folder"),
    ("no_classes", "has no class folders"),
    ("empty_class", "class folder .*b has no images"),
])
def test_image_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_classes":
        (root / "train").mkdir()
    if layout == "empty_class":
        make_tree(root / "train", classes=("a",))
        (root / "train" / "b").mkdir()
    with pytest.raises(UserError, match=message):
        open_source("imagefolder", root, train=True)


def test_corrupt_image_names_its_file(tmp_path):
    make_tree(tmp_path / "train")
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(b"garbage")
    source = open_source("imagefolder", tmp_path, train=True)
    with pytest.raises(UserError, match=r"cannot decode image .*a/1\.jpg"):
        source.load(1)


def test_derived_seeds_differ_for_every_key_tuple():
    keys = [(1, 2), (1, 2, 0), (1, 2, 0, 0), (1,), (0, 1, 2), (2, 1), ()]
    assert len({derived_seed(*k) for k in keys}) == len(keys)
    assert derived_seed(1, 2) == derived_seed(1, 2)


def test_sampler_epochs_are_permutations_and_resume_skips_consumed_batches():
    sampler = EpochBatchSampler(num_samples=23, batch_size=5, seed=3)
    assert len(sampler) == 4  # the incomplete last batch is dropped
    sampler.start(epoch=0)
    epoch0 = list(sampler)
    flat = [i for batch in epoch0 for i, _ in batch]
    assert len(flat) == 20 and len(set(flat)) == 20 and all(e == 0 for b in epoch0 for _, e in b)
    sampler.start(epoch=1)
    assert [i for i, _ in list(sampler)[0]] != [i for i, _ in epoch0[0]]
    sampler.start(epoch=0, skip=3)
    assert list(sampler) == epoch0[3:]
    assert list(EpochBatchSampler(23, 5, seed=3)) == epoch0  # the order is a function of the seed


def test_sampler_shards_are_disjoint():
    shards = [EpochBatchSampler(40, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [{i for batch in s for i, _ in batch} for s in shards]
    assert len(shards[0]) == 5 and not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_sampler_rejects_batch_larger_than_data():
    with pytest.raises(UserError, match="data.batch_size=8 is larger than the 5 training samples"):
        EpochBatchSampler(5, 8, seed=0)


def test_views_differ_but_are_reproducible_and_worker_independent(tiny_demo_root):
    source = open_source("imagefolder", tiny_demo_root, train=True)  # random-resized crops
    recipe = build_recipe(32, Preprocessing.of(DataConfig(dataset="imagefolder")))
    dataset = MultiViewDataset(source, recipe.train, num_views=3, seed=0)
    views, label, index, skipped, replaced = dataset[(5, 0)]
    assert len(views) == 3 and label == source.load(5)[1] and index == 5 and skipped == []
    assert not replaced
    assert all(v.shape == (3, 32, 32) for v in views)
    assert not torch.equal(views[0], views[1]) or not torch.equal(views[1], views[2])
    assert all(torch.equal(a, b) for a, b in zip(views, dataset[(5, 0)][0]))
    assert not all(torch.equal(a, b) for a, b in zip(views, dataset[(5, 1)][0]))  # next epoch

    torch.manual_seed(123)
    before = torch.get_rng_state()
    dataset[(7, 0)]
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is untouched

    sampler = EpochBatchSampler(len(source), 8, seed=0)
    batches = {w: list(DataLoader(dataset, batch_sampler=sampler, num_workers=w, collate_fn=collate))
               for w in (0, 2)}
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_loaders_yield_batches_with_normalised_views(tiny_demo_root):
    cfg = DataConfig(dataset="demo", root=str(tiny_demo_root), batch_size=16, num_workers=0,
                     backend="torch")
    loaders = build_loaders(cfg, num_views=2, seed=0)
    assert loaders.num_classes == 10 and loaders.num_train == 120 and loaders.steps_per_epoch == 7
    batch = next(iter(loaders.train))
    assert isinstance(batch, Batch) and len(batch) == 16 and len(batch.views) == 2
    assert batch.views[0].dtype == torch.float32 and batch.views[0].shape == (16, 3, 32, 32)
    assert batch.labels.dtype == torch.int64 and torch.equal(
        batch.labels, torch.tensor([loaders.train_targets[i] for i in batch.index]))
    val = next(iter(loaders.val))
    assert len(val.views) == 1 and len(val) == 40
    # Evaluation views are ToTensor + Normalize: undoing it gives the decoded image back.
    image, _ = loaders.val.dataset.images.source.load(0)
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    restored = val.views[0][0] * std + mean
    assert torch.allclose(restored, torch.tensor(np.asarray(image)).permute(2, 0, 1) / 255, atol=1e-5)


def test_batch_moves_every_tensor():
    batch = Batch([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long), torch.arange(2),
                  replaced=torch.tensor([False, True]))
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.index, batch.index) and torch.equal(moved.replaced, batch.replaced)
    assert len(moved) == 2


def test_an_io_error_is_named_as_such_and_never_skipped_as_a_damaged_image(tiny_demo_root,
                                                                           monkeypatch):
    import errno

    from cocord_fast.data import sources

    source = sources.open_source("demo", tiny_demo_root, train=True)

    def failing_disk(path, dtype):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(sources.np, "fromfile", failing_disk)
    for read in (lambda: source.load(0), lambda: source.decode_error(0)):
        with pytest.raises(UserError, match=r"cannot read .*: Input/output error \(an I/O "
                                            r"error, not a damaged image") as caught:
            read()
        assert not isinstance(caught.value, sources.CorruptImage)


def test_read_ahead_off_is_refused_where_the_torch_loader_reads(tmp_path):
    cfg = DataConfig(dataset="demo", root=str(tmp_path / "demo"), backend="torch",
                     read_ahead=False)
    with pytest.raises(UserError, match="data.read_ahead=false is for data.backend=dali"):
        build_loaders(cfg, num_views=1, seed=0)


@pytest.mark.parametrize("settings, named", [
    ({"image_size": 64}, "data.image_size=64"),
    ({"interpolation": "bicubic", "crop_pct": 0.9},
     "data.interpolation=bicubic, data.crop_pct=0.9"),
])
@pytest.mark.parametrize("dataset", ["cifar100", "demo"])
def test_resize_settings_a_32px_data_set_would_ignore_are_refused(dataset, settings, named):
    with pytest.raises(UserError, match=rf"^{named}: data.dataset={dataset} has 32x32 images, "
                                        r"which are never resized"):
        check_data_config(DataConfig(dataset=dataset, backend="torch", **settings))
    for size in (0, 32, 224):  # unset, the images' own, a run's resolved default
        check_data_config(DataConfig(dataset=dataset, backend="torch", image_size=size))
    check_data_config(DataConfig(dataset="imagefolder", backend="torch", **settings))


@pytest.mark.parametrize("dataset", ["demo", "imagefolder", "shards"])
def test_a_download_of_a_data_set_that_has_none_is_refused(dataset):
    with pytest.raises(UserError, match=rf"data.download=true: data.dataset={dataset} is not "
                                        rf"downloaded \(these are: cifar100\)"):
        check_data_config(DataConfig(dataset=dataset, backend="torch", download=True))
