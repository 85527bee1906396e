"""Library weights (models/weights.py, training/networks.py): a pretrained teacher from the
library's cache or a weights file, a student warm-started from one with a new head for other
classes, and every way it cannot work named: a missing download with the file and where it
goes, a tag or weights name the library lacks, a teacher for other classes, two sources; one
download for the processes of a launch. torchvision's weights as its builders load them (old
DenseNet keys, a SWAG ViT's image size), timm's as its loader reads a checkpoint, and the hub
files timm asks for. The preprocessing that comes with the weights is in
test_teacher_preprocessing.py."""
import argparse
import os
import re
import textwrap
import urllib.error

import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.training.networks import build_teacher, take_teacher_preprocessing
from cocord_fast.training.trainer import Trainer

from data_trees import write_identity_tree
from launch import launch
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


def three_class_weights(monkeypatch, model: str):
    """torchvision's default weights of `model` made weights for 3 classes (its builder builds
    the model for as many classes as the weights' categories), for a run on a 3-class tree."""
    weights = torchvision.models.get_model_weights(model).DEFAULT
    monkeypatch.setitem(weights.meta, "categories", ["a", "b", "c"])
    return weights


def test_pretrained_teacher_weights_come_from_torch_hubs_cache(tree, tmp_path, empty_torch_hub,
                                                               monkeypatch):
    """torchvision's default weights of a model, as its loader finds them in the cache."""
    url = three_class_weights(monkeypatch, "mobilenet_v3_small").url
    empty_torch_hub.mkdir(parents=True)
    torch.manual_seed(3)
    teacher = saved(library_model("torchvision:mobilenet_v3_small", 3),
                    empty_torch_hub / os.path.basename(url))
    run = trainer(tree, tmp_path, "kd", "model.teacher=torchvision:mobilenet_v3_small",
                  "model.teacher_weights=pretrained")
    assert holds(run.method.teacher_encoder, teacher)


def test_another_file_under_the_weights_name_is_named(tree, tmp_path, empty_torch_hub):
    """A file in torch hub's cache that is not torchvision's (here: for 3 classes, where
    torchvision's are for ImageNet's 1,000)."""
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    empty_torch_hub.mkdir(parents=True)
    saved(library_model("torchvision:mobilenet_v3_small", 3),
          empty_torch_hub / os.path.basename(url))
    with pytest.raises(UserError, match=(
            rf"model.teacher_weights=pretrained: torchvision:mobilenet_v3_small cannot take the "
            rf"file {os.path.basename(url)} \(Error\(s\) in loading state_dict for MobileNetV3: "
            rf"size mismatch for classifier.3.weight: .*\); if {empty_torch_hub}/"
            rf"{os.path.basename(url)} is not {url}, delete it and fetch that again")):
        trainer(tree, tmp_path, "kd", "model.teacher=torchvision:mobilenet_v3_small",
                "model.teacher_weights=pretrained")


def legacy_densenet_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DenseNet's keys as torchvision's weights files still hold them, from before module names
    could not contain dots (`denselayer1.norm1.weight` was `denselayer1.norm.1.weight`) and
    before BatchNorm counted its batches (`num_batches_tracked`)."""
    legacy = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    return {legacy.sub(r"\1.\2.", key): value for key, value in state.items()
            if not key.endswith("num_batches_tracked")}


def test_densenet_weights_in_their_legacy_names_are_loaded_as_torchvision_loads_them(
        empty_torch_hub):
    """The file in torch hub's cache under the weights' own name. Its contents are not the
    download's, so their SHA-256 does not start with the name's `a639ec97`: torch hub checks
    that prefix on a download only, and takes a file already in its cache as it is."""
    url = torchvision.models.get_model_weights("densenet121")["IMAGENET1K_V1"].url
    empty_torch_hub.mkdir(parents=True)
    torch.manual_seed(6)
    expected = library_model("torchvision:densenet121", 1000).state_dict()
    legacy = legacy_densenet_names(expected)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy  # the old layout
    torch.save(legacy, empty_torch_hub / os.path.basename(url))
    cfg = load_config(overrides=["method.name=kd", "model.teacher=torchvision:densenet121",
                                 "model.teacher_weights=IMAGENET1K_V1"])
    assert holds(build_teacher(cfg, 1000, resuming=False), expected)


def test_swag_vit_weights_build_the_teacher_for_their_image_size(empty_torch_hub):
    """SWAG's end-to-end ViT-B/16 weights are for 384 px images: torchvision builds the model
    for them (its position embeddings), and the data takes their size."""
    weights = torchvision.models.get_model_weights("vit_b_16")["IMAGENET1K_SWAG_E2E_V1"]
    empty_torch_hub.mkdir(parents=True)
    torch.manual_seed(7)
    expected = torchvision.models.vit_b_16(image_size=384).state_dict()
    torch.save(expected, empty_torch_hub / os.path.basename(weights.url))
    cfg = load_config(overrides=["data.dataset=imagefolder", "method.name=kd",
                                 "model.teacher=torchvision:vit_b_16",
                                 "model.teacher_weights=IMAGENET1K_SWAG_E2E_V1"])
    take_teacher_preprocessing(cfg, needs_teacher=True)
    assert (cfg.data.image_size, cfg.data.crop_pct, cfg.data.interpolation) == (
        384, 1.0, "bicubic")  # weights.transforms(): resize 384, crop 384, bicubic
    teacher = build_teacher(cfg, 1000, resuming=False)
    assert holds(teacher, expected)
    with torch.no_grad():
        assert teacher(torch.zeros(1, 3, 384, 384)).shape == (1, 1000)
    cfg.data.image_size = 224
    with pytest.raises(UserError, match=(
            r"model.teacher_weights=IMAGENET1K_SWAG_E2E_V1: torchvision:vit_b_16 takes 384 px "
            r"images with them \(the size of its position embeddings\); data.image_size is 224")):
        build_teacher(cfg, 1000, resuming=False)


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
    hub = "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main"
    with pytest.raises(UserError, match=(
            rf"model.teacher_weights=a1_in1k: cannot fetch timm's resnet18.a1_in1k weights "
            rf"\(.*\); offline, download {hub}/model.safetensors \(or, where the hub has no "
            rf"such file, {hub}/pytorch_model.bin\) where there is a network and set "
            rf"model.teacher_weights=<that file>")):
        trainer(tree, tmp_path, "kd", "model.teacher=timm:resnet18",
                "model.teacher_weights=a1_in1k")


@pytest.mark.parametrize("hub_id, filename", [
    (None, None),  # timm's own: timm/resnet18.a1_in1k, its default file names
    ("someone/resnet18-in1k@v2", None),  # another owner's repository, at a revision
    ("someone/resnet18-in1k", "open_clip_pytorch_model.bin"),
    ("someone/resnet18-in1k", "weights.bin"),
    ("someone/resnet18-in1k", "weights.safetensors"),
])
def test_a_missing_timm_download_names_the_files_timm_asks_the_hub_for(
        tree, tmp_path, monkeypatch, hub_id, filename):
    """The hub's answers are faked (no such file, whatever is asked): the message names what
    timm asked for, in its order."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    registered = timm.models._registry._model_pretrained_cfgs["resnet18.a1_in1k"]
    if hub_id is not None:
        monkeypatch.setattr(registered, "hf_hub_id", hub_id)
    monkeypatch.setattr(registered, "hf_hub_filename", filename)
    asked = []

    def hub(repo_id, filename, revision=None, **kwargs):
        asked.append(huggingface_hub.hf_hub_url(repo_id, filename, revision=revision))
        raise EntryNotFoundError(f"{filename} is not in {repo_id}")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub)
    with pytest.raises(UserError) as refused:
        trainer(tree, tmp_path, "kd", "model.teacher=timm:resnet18",
                "model.teacher_weights=a1_in1k")
    first, *rest = asked
    fallback = f" (or, where the hub has no such file, {rest[0]})" if rest else ""
    assert len(rest) <= 1 and str(refused.value) == (
        f"model.teacher_weights=a1_in1k: cannot fetch timm's resnet18.a1_in1k weights "
        f"(EntryNotFoundError); offline, download {first}{fallback} where there is a network "
        f"and set model.teacher_weights=<that file>")


@pytest.mark.parametrize("nesting", ["model", "state_dict", "state_dict_ema", "module."])
def test_a_timm_checkpoint_file_is_read_as_timms_loader_reads_it(tmp_path, nesting):
    """A training checkpoint with the weights under a key (and its EMA weights before the
    others; its options as a Namespace), or saved from a DistributedDataParallel's `module.`:
    the teacher holds what timm's own loader takes from it."""
    torch.manual_seed(8)
    weights = library_model("timm:resnet18", 3).state_dict()
    older = {key: value + 1 if value.is_floating_point() else value
             for key, value in weights.items()}
    checkpoint = {
        "model": {"model": weights, "epoch": 3},
        # timm's train.py keeps its options as an argparse.Namespace
        "state_dict": {"state_dict": weights, "optimizer": {"lr": 0.1}, "epoch": 3,
                       "args": argparse.Namespace(lr=0.1, model="resnet18")},
        "state_dict_ema": {"state_dict": older, "state_dict_ema": weights},
        "module.": {"state_dict": {f"module.{key}": value for key, value in weights.items()}},
    }[nesting]
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    expected = timm.models.load_state_dict(str(path))
    assert holds(library_model("timm:resnet18", 3), expected) is False  # not the fresh model's
    cfg = load_config(overrides=["method.name=kd", "model.teacher=timm:resnet18",
                                 f"model.teacher_weights={path}"])
    assert holds(build_teacher(cfg, 3, resuming=False), expected)
    assert all(torch.equal(expected[key], weights[key]) for key in weights)


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
    from cocord_fast.config import DataConfig, load_config
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
    models = {"teacher": build_teacher(cfg, 1000, resuming=False),
              "student": build_student(cfg, 1000, resuming=False)}
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
        expected[role] = saved(library_model(f"torchvision:{name}", 1000),
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
