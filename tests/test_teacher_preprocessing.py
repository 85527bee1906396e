"""The preprocessing a pretrained teacher was trained with (mean, std, filter, crop share,
crop mode, input size: training/networks.py `take_teacher_preprocessing`), taken by both data
backends unless set, recorded by the run, and checked against timm's own evaluation
transform."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cocord_fast.config import DataConfig, load_config
from cocord_fast.data import build_loaders
from cocord_fast.data.build import check_data_config
from cocord_fast.data.sources import IMAGENET_MEAN, IMAGENET_STD, open_source
from cocord_fast.data.transforms import CROP_MODES, Preprocessing, build_recipe
from cocord_fast.errors import UserError
from cocord_fast.training.metrics import read_log
from cocord_fast.training.networks import take_teacher_preprocessing
from cocord_fast.training.resume import check_resumable

from data_trees import decode_identity, file_id, write_identity_tree
from markers import BACKENDS, needs_dali
from test_library_models import library_model
from test_library_weights import (empty_torch_hub, saved,  # noqa: F401 (a fixture)
                                  three_class_weights, trainer)

timm = pytest.importorskip("timm", reason="needs timm (pip install 'cocord_fast[timm]')")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_identity_tree(tmp_path_factory.mktemp("preprocessing") / "data", classes=3)


class FakePretrainedCfg:
    """A timm pretrained_cfg with statistics no data set has."""
    mean, std, interpolation, crop_pct, input_size = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3),
                                                      "bicubic", 0.8, (3, 288, 288))
    crop_mode = "center"


def teacher_config(tree, *overrides):
    return load_config(overrides=[
        "data.dataset=imagefolder", f"data.root={tree}", "data.image_size=16",
        "data.batch_size=4", "data.eval_batch_size=6", "data.num_workers=0", "method.name=kd",
        "model.teacher=timm:resnet18", "model.teacher_weights=a1_in1k", *overrides])


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_take_a_pretrained_teachers_preprocessing(tree, backend, monkeypatch):
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: FakePretrainedCfg)
    cfg = teacher_config(tree, f"data.backend={backend}")
    notes = take_teacher_preprocessing(cfg, needs_teacher=True)
    assert (cfg.data.mean, cfg.data.std, cfg.data.interpolation, cfg.data.crop_pct) == (
        [0.3, 0.4, 0.5], [0.2, 0.25, 0.3], "bicubic", 0.8)
    assert notes == ["data preprocessing from the teacher timm:resnet18 (a1_in1k): "
                     "data.mean=[0.3, 0.4, 0.5], data.std=[0.2, 0.25, 0.3], "
                     "data.interpolation=bicubic, data.crop_pct=0.8, data.crop_mode=center",
                     "the teacher timm:resnet18 (a1_in1k) was trained at 288 px; "
                     "data.image_size is 16"]
    loaders = build_loaders(cfg.data, num_views=1, seed=0)
    (batch,) = list(loaders.val)
    mean, std = torch.tensor(FakePretrainedCfg.mean), torch.tensor(FakePretrainedCfg.std)
    ids, labels = decode_identity(batch.views[0], mean, std)  # normalised with the teacher's
    source = open_source("imagefolder", tree, train=False)
    assert ids.tolist() == [file_id(source.path(i)) for i in range(6)]
    assert labels.tolist() == source.targets.tolist()
    if backend == "torch":  # resize 20 (16 / 0.8) with bicubic, then crop 16, exactly
        expected = T.Compose([T.Resize(20, interpolation=T.InterpolationMode.BICUBIC),
                              T.CenterCrop(16), T.ToTensor(), T.Normalize(mean, std)])
        assert torch.allclose(batch.views[0], torch.stack([expected(source.load(i)[0])
                                                           for i in range(6)]), atol=1e-6)
    else:
        from nvidia.dali import types

        recipe = loaders.val.runner.feed.recipe
        assert recipe.preprocessing.eval_resize(16) == 20
        assert recipe.interp_type == types.INTERP_CUBIC


def test_what_the_user_sets_wins_and_torchvision_weights_give_theirs(tree):
    cfg = teacher_config(tree, "data.interpolation=bilinear", "data.crop_pct=0.9")
    take_teacher_preprocessing(cfg, needs_teacher=True)
    assert (cfg.data.interpolation, cfg.data.crop_pct, cfg.data.mean) == (
        "bilinear", 0.9, list(timm.models.get_pretrained_cfg("resnet18.a1_in1k").mean))
    cfg = teacher_config(tree, "model.teacher=torchvision:resnet34",
                         "model.teacher_weights=IMAGENET1K_V1", "data.image_size=224")
    assert take_teacher_preprocessing(cfg, needs_teacher=True) == [
        "data preprocessing from the teacher torchvision:resnet34 (IMAGENET1K_V1): "
        "data.mean=[0.485, 0.456, 0.406], data.std=[0.229, 0.224, 0.225], "
        "data.interpolation=bilinear, data.crop_pct=0.875, data.crop_mode=center"]
    plain = teacher_config(tree, "model.teacher_weights=", "model.teacher_checkpoint=t.pt",
                           "data.image_size=0")
    assert take_teacher_preprocessing(plain, needs_teacher=True) == []
    assert plain.data.mean == [] and plain.data.interpolation == ""
    assert plain.data.image_size == 224  # the default where no teacher gives one


def test_an_unset_image_size_is_the_pretrained_teachers_input_size(tree, monkeypatch):
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: FakePretrainedCfg)
    cfg = teacher_config(tree, "data.image_size=0")
    notes = take_teacher_preprocessing(cfg, needs_teacher=True)
    assert cfg.data.image_size == 288 and notes[0].endswith("data.image_size=288")
    assert len(notes) == 1  # nothing to say about the size: it is the teacher's


def test_a_run_records_the_preprocessing_it_used(tree, tmp_path, empty_torch_hub, capsys,
                                                monkeypatch):
    url = three_class_weights(monkeypatch, "mobilenet_v3_small").url
    empty_torch_hub.mkdir(parents=True)
    saved(library_model("torchvision:mobilenet_v3_small", 3),
          empty_torch_hub / os.path.basename(url))
    run = trainer(tree, tmp_path, "kd", "model.teacher=torchvision:mobilenet_v3_small",
                  "model.teacher_weights=pretrained", "train.max_steps=1")
    run.fit()
    (record,) = [r for r in read_log(tmp_path / "run") if r["kind"] == "preprocessing"]
    assert (record["mean"], record["interpolation"], record["crop_pct"]) == (
        [0.485, 0.456, 0.406], "bilinear", 0.875)
    assert "data preprocessing from the teacher torchvision:mobilenet_v3_small" in \
        capsys.readouterr().out
    assert load_config(tmp_path / "run" / "config.yaml").data.std == [0.229, 0.224, 0.225]


@pytest.mark.parametrize("teacher, mode", [
    ("resnet18.a1_in1k", "center"),  # crop_pct 0.95: 224 px from a resize to 235, not 236
    ("dm_nfnet_f0.dm_in1k", "squash"),
    ("deepseek_vit_412m.deepseek_v4_1_flash", "border"),
])
def test_a_timm_teachers_data_is_evaluated_by_timms_own_transform(tree, teacher, mode):
    """Its pretrained config (size, crop, crop mode, filter, statistics) taken for the data,
    then the torch path's evaluation against timm's, on images wider, taller and smaller than
    the crop."""
    model, tag = teacher.split(".", 1)
    cfg = teacher_config(tree, f"model.teacher=timm:{model}", f"model.teacher_weights={tag}",
                         "data.image_size=0")
    take_teacher_preprocessing(cfg, needs_teacher=True)
    assert cfg.data.crop_mode == mode
    ours = build_recipe(cfg.data.image_size, Preprocessing.of(cfg.data)).eval
    theirs = timm.data.create_transform(**timm.data.resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg(teacher).to_dict()), is_training=False)
    pixels = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    for width, height in [(600, 350), (300, 520), (97, 61)]:
        image = Image.fromarray(pixels[:height, :width])
        assert torch.allclose(ours(image), theirs(image), atol=1e-6)


def ramps_tree(root) -> str:
    """One class of smooth images, wider, taller, smaller than the crop and square."""
    for split in ("train", "val"):
        (root / split / "ramps").mkdir(parents=True)
        for number, (width, height) in enumerate([(90, 50), (40, 70), (21, 13), (64, 64)]):
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([255 * x / (width - 1), 255 * y / (height - 1),
                               128 + 100 * np.sin(x / 5) * np.cos(y / 7)], axis=-1)
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / "ramps" / f"{number}.png")
    return str(root)


@needs_dali
def test_dali_evaluates_in_each_crop_mode_as_the_torch_path_does(tmp_path):
    """The two backends' filters differ by a pixel value or so; the crop modes by tens."""
    root = ramps_tree(tmp_path)
    views = {}
    for mode in CROP_MODES:
        for backend in ("dali", "torch"):
            cfg = DataConfig(dataset="imagefolder", root=root, image_size=32, crop_pct=0.8,
                             crop_mode=mode, batch_size=4, eval_batch_size=4, num_workers=1,
                             backend=backend)
            (batch,) = list(build_loaders(cfg, num_views=1, seed=0).val)
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            views[mode, backend] = 255 * (batch.views[0].float() * std[:, None, None]
                                          + mean[:, None, None])
    for mode in CROP_MODES:
        for other in CROP_MODES:
            difference = (views[mode, "dali"] - views[other, "torch"]).abs()
            mean_difference = difference.mean(dim=(1, 2, 3))
            if other == mode:
                assert mean_difference.max() < 1.5 and difference.max() < 8
            else:  # the square image is fitted alike in every mode
                assert mean_difference[:3].min() > 10


def test_the_crop_mode_is_checked_refused_for_32px_images_and_fixed_on_resume(tree):
    with pytest.raises(UserError, match=r"data.crop_mode: 'letterbox' is not one of"):
        load_config(overrides=["data.crop_mode=letterbox"])
    with pytest.raises(UserError, match=r"^data.crop_mode=squash: data.dataset=cifar100 has "
                                        r"32x32 images, which are never resized"):
        check_data_config(DataConfig(dataset="cifar100", backend="torch", crop_mode="squash"))
    saved_cfg = teacher_config(tree, "data.crop_mode=squash")
    resumed = teacher_config(tree, "data.crop_mode=border")
    checkpoint = {"config": saved_cfg.to_dict(), "ranks": [{}], "engine": None, "world_size": 1}
    with pytest.raises(UserError, match=r"data.crop_mode: 'squash' -> 'border'"):
        check_resumable(checkpoint, "last.pt", resumed, world_size=1)
