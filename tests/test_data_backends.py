"""Both data backends (DALI's CPU-only pipeline and torchvision) against the same contract:
every batch is a `Batch` whose views, labels and dataset indices agree with the files they came
from; epochs, shards and resume points select the same samples; bad files are named or skipped.
"""
import re
import shutil

import pytest
import torch

from cocord_fast.cli import _user_message
from cocord_fast.config import DataConfig
from cocord_fast.data import build_loaders
from cocord_fast.data.build import resolve_backend
from cocord_fast.data.order import epoch_order
from cocord_fast.data.sources import IMAGENET_MEAN, IMAGENET_STD, CorruptImage, open_source
from cocord_fast.errors import UserError
from cocord_fast.methods.crd_negatives import NegativeSampler

from data_trees import decode_identity, file_id, write_identity_tree
from markers import BACKENDS, needs_dali

MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 4 training images (48x36), 2 validation images per class."""
    return write_identity_tree(tmp_path_factory.mktemp("identity") / "data")


def loaders_for(root, backend, num_views=3, **overrides):
    fields = dict(dataset="imagefolder", root=str(root), image_size=16, batch_size=4,
                  eval_batch_size=4, num_workers=1, backend=backend)
    return build_loaders(DataConfig(**{**fields, **overrides}), num_views=num_views, seed=5)


def epoch(loaders, number=0, skip=0):
    loaders.train.start(number, skip)
    return list(loaders.train)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_labels_and_indices_agree_with_the_files(tree, backend):
    loaders = loaders_for(tree, backend)
    source = open_source("imagefolder", tree, train=True)
    batches = epoch(loaders)
    assert loaders.backend == backend and len(batches) == loaders.steps_per_epoch == 3
    for batch in batches:
        assert len(batch.views) == 3 and batch.index.dtype == batch.labels.dtype == torch.int64
        assert batch.replaced.tolist() == [False] * 4
        expected_ids = [file_id(source.path(i)) for i in batch.index]
        assert torch.equal(batch.labels, torch.as_tensor(loaders.train_targets)[batch.index])
        for view in batch.views:
            assert view.shape == (4, 3, 16, 16) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)  # IMAGE_LAYOUT
            ids, labels = decode_identity(view, MEAN, STD)
            assert ids.tolist() == expected_ids and labels.tolist() == batch.labels.tolist()
        # Independent crops and flips of the same image: the green ramp differs between views.
        assert not torch.allclose(batch.views[0], batch.views[1], atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_sees_every_file_once_in_order(tree, backend):
    loaders = loaders_for(tree, backend)
    source = open_source("imagefolder", tree, train=False)
    batches = list(loaders.val)
    assert [len(b) for b in batches] == [4, 2]  # the last batch is partial, not dropped
    index = torch.cat([b.index for b in batches])
    assert index.tolist() == list(range(6))
    ids, labels = decode_identity(torch.cat([b.views[0] for b in batches]), MEAN, STD)
    assert ids.tolist() == [file_id(source.path(i)) for i in range(len(source))]
    assert labels.tolist() == source.targets.tolist()


@needs_dali
def test_both_backends_take_the_same_samples_in_the_same_order(tree):
    runs = {backend: loaders_for(tree, backend) for backend in ("dali", "torch")}
    for number in (0, 1):
        index = {b: [batch.index.tolist() for batch in epoch(runs[b], number)] for b in runs}
        assert index["dali"] == index["torch"]
        expected = epoch_order(12, 4, seed=5, epoch=number)[0].view(3, 4).tolist()
        assert index["dali"] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_skips_the_consumed_batches_of_the_same_order(tree, backend):
    loaders = loaders_for(tree, backend)
    full = [b.index.tolist() for b in epoch(loaders, 1)]
    assert [b.index.tolist() for b in epoch(loaders, 1, skip=2)] == full[2:]
    assert [b.index.tolist() for b in epoch(loaders, 0)] != full  # a new order every epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_epoch_and_skip_repeats_the_uninterrupted_views(tree, backend):
    """A new process (new loaders) resuming from (epoch, skip) sees the very tensors an
    uninterrupted epoch would have given."""
    full = epoch(loaders_for(tree, backend), 1)
    resumed = loaders_for(tree, backend)
    resumed.train.start(1, skip=2)
    rest = list(resumed.train)
    assert len(rest) == 1
    assert torch.equal(rest[0].index, full[2].index)
    assert all(torch.equal(a, b) for a, b in zip(rest[0].views, full[2].views))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_take_disjoint_shards_that_cover_the_epoch(tree, backend):
    fields = dict(dataset="imagefolder", root=str(tree), image_size=16, batch_size=2,
                  num_workers=1, backend=backend)
    shards = []
    for rank in range(2):
        loaders = build_loaders(DataConfig(**fields), num_views=1, seed=5, rank=rank, world_size=2)
        assert loaders.steps_per_epoch == 3  # 12 samples / (2 per batch x 2 ranks)
        shards.append([i for b in epoch(loaders) for i in b.index.tolist()])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(12))
    assert shards == epoch_order(12, 2, seed=5, epoch=0, world_size=2).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_crd_contrast_indices_from_loader_indices_never_hit_the_anchor_class(tree, backend):
    loaders = loaders_for(tree, backend)
    sampler = NegativeSampler(loaders.train_targets, num_negatives=6, seed=0)
    targets = torch.as_tensor(loaders.train_targets)
    for step, batch in enumerate(epoch(loaders)):
        contrast = sampler.sample(batch.index, step)  # (B, 7)
        assert torch.equal(contrast[:, 0], batch.index)
        assert (targets[contrast[:, 1:]] != batch.labels[:, None]).all()


def corrupt_copy(tree, tmp_path, damage, index=5):
    """A copy of `tree` whose training file `index` (dataset order) is damaged."""
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    bad = open_source("imagefolder", root, train=True).path(index)
    data = bad.read_bytes()
    bad.write_bytes(data[:300] if damage == "truncated" else b"this is not an image")
    return root, bad


# Where the bad file sits in epoch 0: in the first batch (which DALI's iterator decodes while it
# is built), in a later one, and behind DALI's prefetch queue (batch 10 of 12).
@pytest.mark.parametrize("damage, batch_size, position", [
    ("truncated", 4, 1), ("not_an_image", 4, 6), ("truncated", 1, 9)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_file_is_named(tree, tmp_path, backend, damage, batch_size, position):
    order = epoch_order(12, batch_size, seed=5, epoch=0)[0]
    root, bad = corrupt_copy(tree, tmp_path, damage, index=int(order[position]))
    loaders = loaders_for(root, backend, batch_size=batch_size,
                          num_workers=0 if backend == "torch" else 1)
    loaders.train.start(0)
    batches = iter(loaders.train)
    for _ in range(position // batch_size):  # every batch before the bad file's arrives
        next(batches)
    with pytest.raises(UserError) as err:
        next(batches)
    assert re.fullmatch(f"cannot decode image {bad}: .*data.skip_corrupt=true to skip "
                        f"unreadable files\\)", _user_message(err.value))


def test_a_corrupt_file_from_a_dataloader_worker_is_still_named_in_one_line(tmp_path):
    """torch re-raises a worker's error as its type built from the worker's whole text."""
    from torch._utils import ExceptionWrapper

    bad = tmp_path / "5.jpg"
    try:
        raise CorruptImage(bad, "image file is truncated")
    except CorruptImage:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as err:
        wrapped.reraise()
    assert _user_message(err.value) == (f"cannot decode image {bad}: image file is truncated "
                                        f"(set data.skip_corrupt=true to skip unreadable files)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_corrupt_replaces_training_files_and_drops_evaluation_files(tree, tmp_path, backend):
    root, bad = corrupt_copy(tree, tmp_path, "truncated")
    val_bad = root / "val" / "class_2" / "17.jpg"
    val_bad.write_bytes(b"garbage")
    loaders = loaders_for(root, backend, skip_corrupt=True)
    source = open_source("imagefolder", root, train=True)
    bad_index = next(i for i in range(len(source)) if source.path(i) == bad)
    for number in (0, 1):  # found again (DALI: remembered) in a later epoch
        batches = epoch(loaders, number)
        assert [len(b) for b in batches] == [4, 4, 4]
        skipped = [path for b in batches for path in b.skipped]
        assert skipped == [str(bad)]
        # The row keeps the bad file's place in the epoch: its dataset index, marked replaced;
        # its image and label are the next readable file's.
        index = torch.cat([b.index for b in batches]).tolist()
        replaced = torch.cat([b.replaced for b in batches]).tolist()
        assert sorted(index) == list(range(12))
        assert [i for i, r in zip(index, replaced) if r] == [bad_index]
        image_index = [bad_index + 1 if r else i for i, r in zip(index, replaced)]
        ids, labels = decode_identity(torch.cat([b.views[0] for b in batches]), MEAN, STD)
        assert ids.tolist() == [file_id(source.path(i)) for i in image_index]
        assert torch.cat([b.labels for b in batches]).tolist() == [
            loaders.train_targets[i] for i in image_index] == labels.tolist()
    val = list(loaders.val)
    assert sum(len(b) for b in val) == 5 and [p for b in val for p in b.skipped] == [str(val_bad)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_directories_fail_before_any_batch(tmp_path, backend):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="class folder .*train/a has no images"):
        loaders_for(tmp_path / "data", backend)


@needs_dali
def test_backend_choice(monkeypatch):
    import cocord_fast.data.build as build

    assert resolve_backend("auto") == "dali" and resolve_backend("torch") == "torch"
    monkeypatch.setattr(build, "dali_installed", lambda: False)
    assert resolve_backend("auto") == "torch"
    with pytest.raises(UserError, match="data.backend=dali, but NVIDIA DALI is not installed"):
        resolve_backend("dali")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_larger_than_the_data_is_an_error(tree, backend):
    with pytest.raises(UserError, match="data.batch_size=13 is larger than the 12 training"):
        loaders_for(tree, backend, batch_size=13)
