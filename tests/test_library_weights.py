"""Library weights (models/weights.py, training/networks.py): a pretrained teacher from the
library's cache or a weights file, a student warm-started from one with a new head for other
classes, and every way it cannot work named: a missing download with the file and where it
goes, a tag or weights name the library lacks, a teacher for other classes, two sources; one
download for the processes of a launch. And the teacher's preprocessing (mean, std, filter,
crop) taken by both data backends."""
import os
import textwrap
import urllib.error

import pytest
import torch
from torchvision import transforms as T

from cocord_fast.config import load_config
from cocord_fast.data import build_loaders
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError
from cocord_fast.training.metrics import read_log
from cocord_fast.training.networks import take_teacher_preprocessing
from cocord_fast.training.trainer import Trainer

from data_trees import decode_identity, file_id, write_identity_tree
from launch import launch
from markers import BACKENDS
from test_library_models import library_model

timm = pytest.importorskip("timm", reason="needs timm (pip install 'cocord_fast[timm]')")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_identity_tree(tmp_path_factory.mktemp("weights") / "data", classes=3)


def trainer(tree, tmp_path, method, *overrides) -> Trainer:
    return Trainer(load_config(overrides=[
        "data.dataset=imagefolder", f"data.root={tree}", "data.image_size=32",
        "data.batch_size=4", "data.num_workers=0", "data.backend=torch", "train.device=cpu",
        f"method.name={method}", "train.progress=false", f"train.output_dir={tmp_path / 'run'}",
        *overrides]))


def saved(model: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    torch.save(model.state_dict(), path)
    return model.state_dict()


def holds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `model`'s state dict is `state`, key for key (the library's names)."""
    own = model.state_dict()
    return list(own) == list(state) and all(torch.equal(own[k], state[k]) for k in state)


@pytest.fixture
def empty_torch_hub(tmp_path, monkeypatch):
    """torch hub's cache in an empty folder, and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_pretrained_teacher_weights_come_from_torch_hubs_cache(tree, tmp_path, empty_torch_hub):
    """torchvision's default weights of a model, as its loader finds them in the cache."""
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    empty_torch_hub.mkdir(parents=True)
    torch.manual_seed(3)
    teacher = saved(library_model("torchvision:mobilenet_v3_small", 3),
                    empty_torch_hub / os.path.basename(url))
    run = trainer(tree, tmp_path, "kd", "model.teacher=torchvision:mobilenet_v3_small",
                  "model.teacher_weights=pretrained")
    assert holds(run.method.teacher_encoder, teacher)


def test_a_missing_download_names_the_file_and_where_it_goes(tree, tmp_path, empty_torch_hub):
    url = torchvision.models.get_model_weights("resnet18")["IMAGENET1K_V1"].url
    with pytest.raises(UserError, match=(
            rf"model.teacher_weights=IMAGENET1K_V1: cannot fetch {url} \(.*Name or service not "
            rf"known.*\); offline, copy that file to {empty_torch_hub}/"
            rf"{os.path.basename(url)}")):
        trainer(tree, tmp_path, "kd", "model.teacher=torchvision:resnet18",
                "model.teacher_weights=IMAGENET1K_V1")


def test_a_missing_timm_download_names_the_file_to_fetch(tree, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=(
            r"model.teacher_weights=a1_in1k: cannot fetch timm's resnet18.a1_in1k weights "
            r"\(.*\); offline, download https://huggingface.co/timm/resnet18.a1_in1k/resolve/"
            r"main/model.safetensors where there is a network and set "
            r"model.teacher_weights=<that file>")):
        trainer(tree, tmp_path, "kd", "model.teacher=timm:resnet18",
                "model.teacher_weights=a1_in1k")


def test_a_library_weights_file_is_a_teacher_and_one_for_other_classes_is_refused(
        tree, tmp_path):
    torch.manual_seed(4)
    teacher = saved(library_model("timm:resnet18", 3), tmp_path / "three.pth")
    run = trainer(tree, tmp_path, "kd", "model.teacher=timm:resnet18",
                  f"model.teacher_weights={tmp_path / 'three.pth'}")
    assert holds(run.method.teacher_encoder, teacher)
    saved(library_model("timm:resnet18", 1000), tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match=(
            r"model.teacher_weights=.*imagenet.pth: timm:resnet18 predicts 1000 classes with "
            r"them, the data has 3: fine-tune it on this data first \(method.name=vanilla "
            r"model.student=timm:resnet18 model.student_weights=.*imagenet.pth\)")):
        trainer(tree, tmp_path, "kd", "model.teacher=timm:resnet18",
                f"model.teacher_weights={tmp_path / 'imagenet.pth'}")


@pytest.mark.parametrize("student", ["timm:resnet18", "torchvision:mobilenet_v3_small"])
def test_a_student_starts_from_library_weights_with_a_new_head_for_other_classes(
        tree, tmp_path, student, capsys):
    torch.manual_seed(5)
    pretrained = saved(library_model(student, 1000), tmp_path / "imagenet.pth")
    run = trainer(tree, tmp_path, "vanilla", f"model.student={student}",
                  f"model.student_weights={tmp_path / 'imagenet.pth'}", "train.max_steps=1")
    head = run.method.student().classifier_name
    ours = run.method.student().state_dict()
    backbone = [key for key in pretrained if not key.startswith(f"{head}.")]
    assert backbone and all(torch.equal(ours[key], pretrained[key]) for key in backbone)
    assert ours[f"{head}.weight"].shape[0] == 3
    run.fit()
    assert (f"the backbone of {student} starts from them; their 1000-class classifier is "
            f"replaced by a new 3-class one") in capsys.readouterr().out


DOWNLOADING_WORKER = textwrap.dedent("""
    import os, shutil, sys, time, torch
    from pathlib import Path
    from cocord_fast import distributed
    from cocord_fast.config import load_config
    from cocord_fast.training.networks import build_student, build_teacher

    def download(url, dst, *args, **kwargs):  # what a hub would send: the file of that name
        name = os.path.basename(url)
        open(f"downloaded_{os.environ['RANK']}_{name}", "w").close()
        time.sleep(0.5)  # a download takes a while: a process that did not wait starts its own
        shutil.copyfile(Path(sys.argv[1]) / name, dst)

    torch.hub.download_url_to_file = download
    distributed.init(torch.device("cpu"), 60)
    cfg = load_config(overrides=[
        "method.name=kd", "model.teacher=torchvision:mobilenet_v3_small",
        "model.teacher_weights=pretrained", "model.student=torchvision:shufflenet_v2_x0_5",
        "model.student_weights=pretrained"])
    models = {"teacher": build_teacher(cfg, 3, resuming=False),
              "student": build_student(cfg, 3, resuming=False)}
    torch.save({k: m.state_dict() for k, m in models.items()}, f"models_{os.environ['RANK']}.pt")
    distributed.finish(0)
""")


def test_the_processes_of_a_launch_download_library_weights_once(tmp_path, monkeypatch):
    """Two processes of one node, an empty torch hub cache: the first fetches the teacher's
    and the student's weights, the second finds them in the cache."""
    hub = tmp_path / "hub"
    hub.mkdir()
    models, expected = {"teacher": "mobilenet_v3_small", "student": "shufflenet_v2_x0_5"}, {}
    for role, name in models.items():
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        torch.manual_seed(len(expected))
        expected[role] = saved(library_model(f"torchvision:{name}", 3),
                               hub / os.path.basename(url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    script = tmp_path / "worker.py"
    script.write_text(DOWNLOADING_WORKER)
    launch("torchrun", [script, hub], cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("downloaded_*")) == sorted(
        f"downloaded_0_{p.name}" for p in hub.iterdir())
    for rank in (0, 1):
        built = torch.load(tmp_path / f"models_{rank}.pt")
        for role in models:
            assert built[role].keys() == expected[role].keys()
            assert all(torch.equal(built[role][k], expected[role][k]) for k in expected[role])


@pytest.mark.parametrize("overrides, message", [
    (["model.teacher=timm:resnet18", "model.teacher_weights=no_such_tag"],
     r"timm has no such weights for resnet18; its tags: .*a1_in1k"),
    (["model.teacher=torchvision:resnet18", "model.teacher_weights=IMAGENET9K"],
     r"torchvision:resnet18 has the weights IMAGENET1K_V1, DEFAULT \(or pretrained"),
    (["model.teacher=resnet8", "model.teacher_weights=pretrained"],
     r"library weights are for timm:<name> and torchvision:<name> models, not the zoo's"),
    (["model.teacher=timm:resnet18", "model.teacher_weights=/nowhere/weights.pth"],
     r"model.teacher_weights=/nowhere/weights.pth: no such file"),
    (["model.teacher=timm:resnet18", "model.teacher_weights=pretrained",
      "model.teacher_checkpoint=teacher.pt"],
     r"model.teacher_checkpoint and model.teacher_weights are both set"),
])
def test_weights_that_cannot_be_had_are_named(tree, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        trainer(tree, tmp_path, "kd", *overrides)


class FakePretrainedCfg:
    """A timm pretrained_cfg with statistics no data set has."""
    mean, std, interpolation, crop_pct, input_size = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3),
                                                      "bicubic", 0.8, (3, 288, 288))


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
                     "data.interpolation=bicubic, data.crop_pct=0.8",
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
        "data.interpolation=bilinear, data.crop_pct=0.875"]
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


def test_a_run_records_the_preprocessing_it_used(tree, tmp_path, empty_torch_hub, capsys):
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
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
