"""The torch path's whole-batch augmentation of fixed-size sources against torchvision's
transforms applied image by image, its draws against the uniform distribution, and its
batches against the contract every loader keeps (workers, resume, bad files)."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as F

from cocord_fast.config import DataConfig
from cocord_fast.data import build_loaders
from cocord_fast.data.fixed_size_batches import (FixedSizeTrainBatches, as_made, crop_and_flip,
                                                 crop_draws, normalised)
from cocord_fast.data.order import epoch_order
from cocord_fast.data.sources import open_source
from cocord_fast.data.torch_loader import EpochBatchSampler
from cocord_fast.data.transforms import Preprocessing
from cocord_fast.errors import UserError

PREPROCESSING = Preprocessing((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


def test_a_batch_equals_torchvisions_pad_crop_flip_and_normalize_of_each_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    draws = np.stack([rng.integers(0, 9, 40), rng.integers(0, 9, 40), rng.integers(0, 2, 40)], 1)
    batch = normalised(crop_and_flip(images, draws), PREPROCESSING)
    assert batch.shape == (40, 3, 32, 32) and batch.is_contiguous(memory_format=torch.channels_last)
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(PREPROCESSING.mean, PREPROCESSING.std)])
    for image, (top, left, flip), ours in zip(images, draws, batch):
        theirs = F.crop(F.pad(Image.fromarray(image), 4, fill=0), top, left, 32, 32)
        theirs = to_tensor(F.hflip(theirs) if flip else theirs)
        assert torch.equal(ours, theirs)  # the same operations: bit for bit


def test_draws_are_uniform_and_a_function_of_seed_epoch_and_index_alone():
    indices = np.arange(20000)
    draws = crop_draws(3, 1, indices, num_views=2)
    assert draws.shape == (2, 20000, 3)
    cells = np.bincount((draws[..., 0] * 18 + draws[..., 1] * 2 + draws[..., 2]).ravel(),
                        minlength=162)
    expected = 40000 / 162  # 9 x 9 offsets x 2 flips
    assert cells.shape == (162,) and ((cells - expected) ** 2 / expected).sum() < 230  # chi2 p~1e-3
    assert not np.array_equal(draws[0], draws[1])  # the views are independent draws
    shuffled = np.random.default_rng(0).permutation(100)
    assert np.array_equal(crop_draws(3, 1, shuffled, 2), draws[:, shuffled])  # not the batch
    assert not np.array_equal(crop_draws(3, 2, indices[:100], 2), draws[:, :100])  # the epoch
    assert not np.array_equal(crop_draws(4, 1, indices[:100], 2), draws[:, :100])  # the seed


def test_batches_are_the_same_with_workers_and_after_a_resume(tiny_demo_root):
    source = open_source("demo", tiny_demo_root, train=True)
    dataset = FixedSizeTrainBatches(source, PREPROCESSING, num_views=2, seed=0)
    sampler = EpochBatchSampler(len(source), 8, seed=0)
    batches = {w: list(DataLoader(dataset, batch_sampler=sampler, num_workers=w,
                                  collate_fn=as_made)) for w in (0, 2)}
    sampler.start(0, skip=5)
    resumed = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=as_made))
    assert len(batches[0]) == 15
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    for a, b in zip(batches[0][5:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    first = batches[0][0]
    assert torch.equal(first.labels, torch.as_tensor(source.targets)[first.index])
    assert not torch.equal(first.views[0], first.views[1]) and not first.replaced.any()
    # Decoded once: the kept images are the files' pixels.
    kept = dataset.images.kept
    assert len(kept) == 120 and all(np.array_equal(kept[i], np.asarray(source.load(i)[0]))
                                    for i in (0, 57, 119))


def test_an_unreadable_file_is_replaced_in_training_every_epoch_and_dropped_in_evaluation(
        tiny_demo_root, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, root)
    bad_index = int(epoch_order(120, 16, seed=0, epoch=0)[0][3])
    bad = open_source("demo", root, train=True).path(bad_index)
    bad.write_bytes(bad.read_bytes()[:200])
    val_bad = open_source("demo", root, train=False).path(7)
    val_bad.write_bytes(b"garbage")
    loaders = build_loaders(DataConfig(dataset="demo", root=str(root), batch_size=16,
                                       num_workers=0, backend="torch", skip_corrupt=True),
                            num_views=1, seed=0)
    for number in (0, 1):
        loaders.train.start(number)
        batches = list(loaders.train)
        rows = [(i, r) for b in batches for i, r in zip(b.index.tolist(), b.replaced.tolist())]
        assert [path for b in batches for path in b.skipped] == [str(bad)]
        assert [i for i, r in rows if r] == [bad_index]
        replaced = next(b for b in batches if b.replaced.any())
        row = int(replaced.replaced.nonzero())
        assert replaced.labels[row] == loaders.train_targets[(bad_index + 1) % 120]
    val = list(loaders.val)
    assert sum(len(b) for b in val) == 39 and [p for b in val for p in b.skipped] == [str(val_bad)]
    assert 7 not in torch.cat([b.index for b in val]).tolist()


def test_an_image_of_another_size_is_named(tiny_demo_root, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, root)
    wrong = open_source("demo", root, train=True).path(0)
    Image.new("RGB", (40, 30)).save(wrong)
    loaders = build_loaders(DataConfig(dataset="demo", root=str(root), batch_size=120,
                                       num_workers=0, backend="torch"), num_views=1, seed=0)
    loaders.train.start(0)
    with pytest.raises(UserError, match=f"{wrong} is 40x30 pixels; every image of "
                                        f"data.dataset=demo is 32x32"):
        next(iter(loaders.train))
