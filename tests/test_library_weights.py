"""Library weights (models/weights.py, training/networks.py): a pretrained teacher from the
library's cache or a weights file, a student warm-started from one with a new head for other
classes, and every way it cannot work named: a missing download with the file and where it
goes, a tag or weights name the library lacks, a teacher for other classes, two sources."""
import os
import urllib.error

import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.training.trainer import Trainer

from data_trees import write_identity_tree
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
