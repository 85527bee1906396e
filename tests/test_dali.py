"""What only the DALI backend does: one pipeline per loader for every epoch, in the per-epoch
order on every rank, rebuilt only after a decode failure; resume from (epoch, skip) alone, the
random views included; the CIFAR recipe on python-format arrays, exact against the formulas;
random-resized crops against torchvision's distribution; the GPU output layout and decoder; and
a CoCoRD run fed by DALI end to end; the feed reading the next batch ahead."""
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.config import DataConfig, load_config
from cocord_fast.data import build_loaders
from cocord_fast.data.order import epoch_order
from cocord_fast.data.cifar100 import CIFAR_MEAN, CIFAR_STD
from cocord_fast.data.sources import IMAGENET_MEAN, IMAGENET_STD, open_source
from cocord_fast.data.transforms import Preprocessing
from cocord_fast.models import build_model
from cocord_fast.training.metrics import read_log
from cocord_fast.training.trainer import train

from data_trees import decode_identity, file_id, write_identity_tree
from markers import needs_dali, on_gpu

N_TRAIN, N_TEST = 48, 10
MEAN, STD = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
IMAGENET = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)



def cifar_arrays(n: int, first_value: int) -> dict:
    """Image i: red flat at first_value + i (its identity), green a ramp over columns, blue 0."""
    images = np.zeros((n, 3, 32, 32), np.uint8)
    images[:, 0] = (first_value + np.arange(n))[:, None, None]
    images[:, 1] = 50 + 4 * np.arange(32)[None, None, :]
    return {"data": images.reshape(n, 3072), "fine_labels": [i % 7 for i in range(n)],
            "coarse_labels": [0] * n}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    folder.mkdir()
    for name, entry in (("train", cifar_arrays(N_TRAIN, 100)), ("test", cifar_arrays(N_TEST, 200)),
                        ("meta", {"fine_label_names": [str(i) for i in range(100)]})):
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder.parent


def cifar_loaders(root, backend="dali", views=2):
    cfg = DataConfig(dataset="cifar100", root=str(root), batch_size=8, eval_batch_size=4,
                     num_workers=1, backend=backend)
    return build_loaders(cfg, num_views=views, seed=1)


def test_cifar_views_are_padded_crops_at_integer_offsets_with_flips(cifar_root):
    loaders = cifar_loaders(cifar_root)
    offsets, flips = [], []
    for number in range(4):
        loaders.train.start(number)
        for batch in loaders.train:
            assert torch.equal(batch.labels, batch.index % 7)
            for view in batch.views:
                assert view.shape == (8, 3, 32, 32) and view.dtype == torch.float32
                pixels = (view * STD[:, None, None] + MEAN[:, None, None]) * 255  # (B, 3, H, W)
                red = pixels[:, 0]
                real = red > 50  # padding is zero before normalisation
                for i, image_real, image_red, green in zip(batch.index, real, red, pixels[:, 1]):
                    assert (image_red[image_real] - (100 + int(i))).abs().max() < 1e-3
                    assert (image_red[~image_real].abs() < 1e-3).all()
                    rows, cols = image_real.any(1), image_real.any(0)
                    # Whole rows and columns are padding: the crop offset is an integer.
                    assert torch.equal(image_real, rows[:, None] & cols[None, :])
                    offsets.append(_offset(cols))
                    offsets.append(_offset(rows))
                    ramp = green[rows.nonzero()[0, 0], cols]
                    flips.append(bool(ramp[0] > ramp[-1]))
    counts = np.bincount(offsets, minlength=9)
    assert counts.sum() == 4 * 6 * 8 * 2 * 2 and (counts > 0).all() and len(counts) == 9
    assert 0.3 < np.mean(flips) < 0.7


def _offset(real: torch.Tensor) -> int:
    """The crop's offset in [0, 8] inside the 40-px padded line, from which pixels are real."""
    first = int(real.nonzero()[0])
    last = int(real.nonzero()[-1])
    return 4 - first if first > 0 else 4 + (31 - last)


def test_cifar_resume_from_epoch_and_skip_repeats_the_uninterrupted_views(cifar_root):
    """The crops and flips are drawn on the host per batch: (epoch, skip) alone continue."""
    loaders = cifar_loaders(cifar_root)
    loaders.train.start(2)
    full = list(loaders.train)
    resumed = cifar_loaders(cifar_root)
    resumed.train.start(2, skip=4)
    assert_same_batches(list(resumed.train), full[4:])
    assert len(full) == 6


@pytest.fixture(scope="module")
def identity_tree(tmp_path_factory):
    """3 classes x 4 training images (48x36 JPEGs whose pixels name the file)."""
    return write_identity_tree(tmp_path_factory.mktemp("identity") / "data")


def identity_loaders(root, rank=0, world_size=1, **fields):
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=16, batch_size=2,
                     eval_batch_size=4, num_workers=1, backend="dali", **fields)
    return build_loaders(cfg, num_views=2, seed=5, rank=rank, world_size=world_size)


@pytest.fixture
def pipeline_builds(monkeypatch) -> dict:
    """How many training and evaluation pipelines the loaders build from now on."""
    import cocord_fast.data.dali_loader as dali_loader

    builds = {"training": 0, "eval": 0}

    def counted(kind, make):
        def build(*args, **kwargs):
            builds[kind] += 1
            return make(*args, **kwargs)
        return build

    monkeypatch.setattr(dali_loader, "training_pipeline",
                        counted("training", dali_loader.training_pipeline))
    monkeypatch.setattr(dali_loader, "eval_pipeline", counted("eval", dali_loader.eval_pipeline))
    return builds


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a.index, b.index) and a.skipped == b.skipped
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))


def test_one_pipeline_serves_every_epoch_in_the_per_epoch_order_of_each_rank(identity_tree,
                                                                             pipeline_builds):
    source = open_source("imagefolder", identity_tree, train=True)
    for rank in range(2):
        loaders = identity_loaders(identity_tree, rank, world_size=2)
        for number in range(4):
            loaders.train.start(number)
            batches = list(loaders.train)
            # 12 images, 2 per batch on each of 2 ranks: 3 steps.
            expected = epoch_order(12, 2, seed=5, epoch=number, world_size=2)[rank].view(3, 2)
            assert [b.index.tolist() for b in batches] == expected.tolist()
            for batch in batches:  # the views are of the files the indices name
                ids, _ = decode_identity(torch.cat(batch.views), *IMAGENET)
                assert ids.tolist() == [file_id(source.path(i)) for i in batch.index] * 2
        for _ in range(2):
            assert sum(len(b) for b in loaders.val) == 3  # rank's half of the 6 images
    assert pipeline_builds == {"training": 2, "eval": 2}  # one of each per loader


def test_resume_mid_epoch_and_at_an_epoch_boundary_repeats_the_uninterrupted_views(
        identity_tree, pipeline_builds):
    """New loaders (a new process) given only (epoch, skip) see the tensors of an uninterrupted
    run whose one pipeline went through the earlier epochs; so does a loader whose last
    iteration was left unfinished."""
    uninterrupted = identity_loaders(identity_tree, rank=1, world_size=2)
    full = []
    for number in range(3):
        uninterrupted.train.start(number)
        full.append(list(uninterrupted.train))
    assert not torch.equal(full[1][0].views[0], full[2][0].views[0])  # new views every epoch
    for number, skip in ((1, 0), (2, 0), (1, 2), (2, 1)):
        resumed = identity_loaders(identity_tree, rank=1, world_size=2)
        resumed.train.start(number, skip)
        assert_same_batches(list(resumed.train), full[number][skip:])
    assert pipeline_builds["training"] == 5
    interrupted = identity_loaders(identity_tree, rank=1, world_size=2)
    interrupted.train.start(2)
    next(iter(interrupted.train))
    # Its prefetched batches are still queued in DALI: a new pipeline, then reuse again.
    for number, skip in ((2, 1), (0, 0), (1, 0)):
        interrupted.train.start(number, skip)
        assert_same_batches(list(interrupted.train), full[number][skip:])
    assert pipeline_builds["training"] == 7


def test_a_corrupt_file_rebuilds_the_pipeline_once_and_its_epoch_still_resumes_exactly(
        identity_tree, tmp_path, pipeline_builds):
    root = tmp_path / "data"
    shutil.copytree(identity_tree, root)
    source = open_source("imagefolder", root, train=True)
    bad = source.path(int(epoch_order(12, 2, seed=5, epoch=0)[0, 7]))  # in batch 3 of 6
    bad.write_bytes(bad.read_bytes()[:300])
    loaders = identity_loaders(root, skip_corrupt=True)
    full = []
    for number in range(3):
        loaders.train.start(number)
        full.append(list(loaders.train))
        assert [b.skipped for b in full[-1]].count((str(bad),)) == 1
    assert [b.skipped for b in full[0]][3] == (str(bad),)  # found there, rebuilt from there
    # The first pipeline, and one after the decode failure; later epochs repair up front.
    assert pipeline_builds["training"] == 2
    for skip in (2, 4):
        resumed = identity_loaders(root, skip_corrupt=True)
        resumed.train.start(0, skip)
        assert_same_batches(list(resumed.train), full[0][skip:])


def crop_geometry(root, backend):
    """(width fraction, height fraction, flipped) of every training view of a ramp image, read
    back from the ramps: green rises left to right, red top to bottom."""
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=24, batch_size=8,
                     num_workers=1, backend=backend)
    loaders = build_loaders(cfg, num_views=3, seed=3)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    geometry = []
    for number in range(40):  # 8 images: one batch per epoch
        loaders.train.start(number)
        for batch in loaders.train:
            for view in batch.views:
                for image in view * std + mean:  # (3, 24, 24) in [0, 1]
                    green = image[1, :, -1].mean() - image[1, :, 0].mean()
                    red = image[0, -1, :].mean() - image[0, 0, :].mean()
                    geometry.append((abs(float(green)), float(red), float(green) < 0))
    return np.array(geometry)


def test_random_resized_crops_have_torchvisions_distribution(tmp_path):
    """Area, aspect ratio and flips of DALI's crops against torchvision's, over 960 views."""
    height, width = 160, 200
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, height)[:, None]
    pixels[..., 1] = np.linspace(0, 255, width)[None, :]
    for split in ("train", "val"):
        for i in range(8 if split == "train" else 1):
            (tmp_path / split / "ramp").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / split / "ramp" / f"{i}.png")
    dali, torch_path = crop_geometry(tmp_path, "dali"), crop_geometry(tmp_path, "torch")
    for sample in (dali, torch_path):
        assert len(sample) == 960 and (sample[:, :2] > 0.05).all() and (sample[:, :2] < 1.01).all()
    area = dali[:, 0] * dali[:, 1], torch_path[:, 0] * torch_path[:, 1]
    aspect = [np.log(s[:, 0] * width / (s[:, 1] * height)) for s in (dali, torch_path)]
    # The differences of the means have standard errors of about 0.01 (area) and 0.0075 (log
    # aspect): the bounds are 4-5 of them. (Seeded: the test is deterministic all the same.)
    assert abs(area[0].mean() - area[1].mean()) < 0.05
    assert abs(area[0].std() - area[1].std()) < 0.04
    assert abs(aspect[0].mean() - aspect[1].mean()) < 0.03
    assert abs(aspect[0].std() - aspect[1].std()) < 0.03
    assert 0.42 < dali[:, 2].mean() < 0.58 and 0.42 < torch_path[:, 2].mean() < 0.58


def test_cifar_evaluation_equals_the_torch_path(cifar_root):
    dali, torch_path = (list(cifar_loaders(cifar_root, backend).val) for backend in ("dali", "torch"))
    assert [len(b) for b in dali] == [4, 4, 2]
    for a, b in zip(dali, torch_path, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels)
        assert torch.allclose(a.views[0], b.views[0], atol=1e-5)


def test_demo_evaluation_equals_the_torch_path(tiny_demo_root):
    def val(backend):
        cfg = DataConfig(dataset="demo", root=str(tiny_demo_root), eval_batch_size=16,
                         num_workers=1, backend=backend)
        return list(build_loaders(cfg, num_views=1, seed=0).val)

    dali, torch_path = val("dali"), val("torch")
    assert sum(len(b) for b in dali) == 40
    for a, b in zip(dali, torch_path, strict=True):
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.views[0], b.views[0], atol=1e-5)


def test_cocord_trains_end_to_end_on_dali_and_counts_skipped_files(tiny_overrides, tiny_demo_root,
                                                                    tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, root)
    broken = root / "train" / "bar_solid" / "00003.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("resnet8", 10).state_dict(), teacher)
    cfg = load_config(overrides=tiny_overrides + [
        f"data.root={root}", "data.backend=dali", "data.skip_corrupt=true", "method.name=cocord",
        "model.teacher=resnet8", f"model.teacher_checkpoint={teacher}", "cocord.queue_size=64",
        "cocord.embed_dim=16", "cocord.proj_hidden_dim=32", "cocord.pred_hidden_dim=16"])
    result = train(cfg)
    assert result.step == 14
    records = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert all(math.isfinite(r["loss_ctr"]) and math.isfinite(r["loss_pred"]) for r in records)
    assert records[-1]["skipped_files"] == 2  # once per epoch
    assert load_checkpoint(tmp_path / "run" / "last.pt")["ranks"][0]["skipped_files"] == 2


def assert_decoders_agree(gpu_view: torch.Tensor, cpu_view: torch.Tensor) -> None:
    """nvJPEG (GPU) and libjpeg-turbo (CPU) round their IDCTs and upsample chroma differently:
    most values agree within a level or two of 255, a few at sharp colour edges by far more (one
    demo evaluation value by 105 levels, 1.61 normalised, on an H100). A maximum cannot tell
    that from a wrong image; a mean and a high percentile can. Bounds, in levels of 255:
    - mean <= 1: rounding differences of 1-2 levels at some pixels, plus bf16's rounding (at
      most half a level at these magnitudes), stay well below it; a wrong image, channel order,
      crop or flip moves the mean of the values it touches by tens of levels;
    - every image's own mean <= 2, so one wrong image among many still fails;
    - 99.9th percentile <= 8: on the H100 a single value of the 122,880 of the demo evaluation
      set differed by more than 6.5 levels (0.1 normalised)."""
    levels = (gpu_view.float().cpu() - cpu_view).abs() * STD[:, None, None] * 255  # (B, 3, H, W)
    assert levels.mean() <= 1
    assert levels.mean(dim=(1, 2, 3)).max() <= 2
    assert torch.quantile(levels.flatten(), 0.999) <= 8


@needs_dali
@on_gpu
def test_gpu_pipeline_decodes_on_the_device_into_channels_last_bf16(tiny_demo_root, cifar_root):
    device = torch.device("cuda", 0)
    for cfg in (DataConfig(dataset="demo", root=str(tiny_demo_root), batch_size=16, backend="dali"),
                DataConfig(dataset="cifar100", root=str(cifar_root), batch_size=8, backend="dali")):
        loaders = build_loaders(cfg, num_views=3, seed=0, device=device, dtype=torch.bfloat16)
        cpu = build_loaders(cfg, num_views=3, seed=0)
        loaders.train.start(0)
        cpu.train.start(0)
        batch, cpu_batch = next(iter(loaders.train)), next(iter(cpu.train))
        for view in batch.views:
            assert view.device == device and view.dtype == torch.bfloat16
            assert view.shape == (cfg.batch_size, 3, 32, 32)
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert batch.labels.device == batch.index.device == device
        # Crops and flips are drawn on the host: the GPU's views are the CPU's, but for decoding.
        assert torch.equal(batch.index.cpu(), cpu_batch.index)
        for view, cpu_view in zip(batch.views, cpu_batch.views, strict=True):
            assert_decoders_agree(view, cpu_view)
        for gpu_batch, cpu_batch in zip(loaders.val, cpu.val, strict=True):
            assert torch.equal(gpu_batch.index.cpu(), cpu_batch.index)
            assert_decoders_agree(gpu_batch.views[0], cpu_batch.views[0])


@needs_dali
def test_the_feed_reads_the_next_batch_before_it_is_asked_for(identity_tree, monkeypatch):
    from cocord_fast.data.dali_loader import DaliFeed
    from cocord_fast.data.dali_pipeline import DaliRecipe

    source = open_source("imagefolder", identity_tree, train=True)
    recipe = DaliRecipe(0, 32, Preprocessing(IMAGENET_MEAN, IMAGENET_STD))
    feed = DaliFeed(source, recipe, 2, torch.device("cpu"), torch.float32)
    read, reads = source.read, []
    monkeypatch.setattr(source, "read", lambda index: reads.append(index) or read(index))
    first = feed.images([0, 1, 2], next_indices=[3, 4, 5])
    assert all(r.result() is not None for r in feed.ahead[1])  # started before it was asked
    assert sorted(reads) == [0, 1, 2, 3, 4, 5]
    second = feed.images([3, 4, 5])
    assert sorted(reads) == [0, 1, 2, 3, 4, 5]  # taken from the read-ahead, not read again
    assert feed.ahead is None
    feed.images([9, 8])  # not the batch expected: read now
    assert sorted(reads[6:]) == [8, 9]
    for index, data in zip([0, 1, 2, 3, 4, 5], first + second):
        assert np.array_equal(data, np.fromfile(source.path(index), np.uint8))
