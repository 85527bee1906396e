"""What only the DALI backend does: the CIFAR recipe on python-format arrays, exact against the
formulas, and its resume through the external source; random-resized crops against
torchvision's distribution; the GPU output layout; and a CoCoRD run fed by DALI end to end."""
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cocord_fast.config import DataConfig, load_config
from cocord_fast.data import build_loaders
from cocord_fast.data.transforms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from cocord_fast.engine.checkpoint import load_checkpoint
from cocord_fast.engine.metrics import read_log
from cocord_fast.engine.trainer import train
from cocord_fast.models import build_model

from markers import on_gpu

N_TRAIN, N_TEST = 48, 10
MEAN, STD = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)


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


def test_cifar_resume_from_state_repeats_the_uninterrupted_views(cifar_root):
    """The external source is not in DALI's checkpoint: the loader restarts it itself."""
    loaders = cifar_loaders(cifar_root)
    loaders.train.start(2)
    full = list(loaders.train)
    loaders.train.start(2)
    batches = iter(loaders.train)
    for _ in range(4):
        next(batches)
    state = loaders.train.state()
    resumed = cifar_loaders(cifar_root)
    resumed.train.start(2, skip=4, state=state)
    rest = list(resumed.train)
    assert len(rest) == len(full) - 4 == 2
    for a, b in zip(rest, full[4:], strict=True):
        assert torch.equal(a.index, b.index)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


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


@on_gpu
def test_gpu_pipeline_decodes_on_the_device_into_channels_last_bf16(tiny_demo_root, cifar_root):
    device = torch.device("cuda", 0)
    for cfg in (DataConfig(dataset="demo", root=str(tiny_demo_root), batch_size=16, backend="dali"),
                DataConfig(dataset="cifar100", root=str(cifar_root), batch_size=8, backend="dali")):
        loaders = build_loaders(cfg, num_views=3, seed=0, device=device, dtype=torch.bfloat16)
        loaders.train.start(0)
        batch = next(iter(loaders.train))
        for view in batch.views:
            assert view.device == device and view.dtype == torch.bfloat16
            assert view.shape == (cfg.batch_size, 3, 32, 32)
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert batch.labels.device == batch.index.device == device
        cpu = build_loaders(cfg, num_views=1, seed=0)
        for gpu_batch, cpu_batch in zip(loaders.val, cpu.val, strict=True):
            assert torch.equal(gpu_batch.index.cpu(), cpu_batch.index)
            # nvJPEG and libjpeg-turbo may round an IDCT differently: a level or two of 255.
            assert (gpu_batch.views[0].float().cpu() - cpu_batch.views[0]).abs().max() < 0.1
