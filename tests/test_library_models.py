"""timm and torchvision models by name (models/library.py): an adapted model is the library's
own, split at its classifier (features are what the classifier reads, logits are the
library's, in float64); state dicts keep the library's names, so a library weights file is a
teacher and an exported student loads strict into the library's model; every distilling method
steps with such pairs on both engines; names that cannot work are refused with the reason."""
import importlib

import pytest
import torch

from cocord_fast.checkpoints.files import student_state_dict
from cocord_fast.cli import main
from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.models import build_model, check_model_name, library
from cocord_fast.training.evaluate_checkpoint import load_student
from cocord_fast.training.trainer import Trainer, train

from data_trees import write_identity_tree
from launch import PIPELINE, launch_runs, train_losses

timm = pytest.importorskip("timm", reason="needs timm (pip install 'cocord_fast[timm]')")
torchvision = importlib.import_module("torchvision")


def library_model(name: str, num_classes: int) -> torch.nn.Module:
    """The library's own model for a prefixed name."""
    kind, model = name.split(":")
    if kind == "timm":
        return timm.create_model(model, num_classes=num_classes)
    return torchvision.models.get_model(model, num_classes=num_classes)


# Families with different heads: a plain `fc`, a token (ViT), a norm before the last layer
# (ConvNeXt), a conv head and an MLP (MobileNetV3), a `classifier` Linear (DenseNet),
# `heads.head` (torchvision's ViT), a `ClassifierHead` whose `fc` reads the pooled vector
# (Sequencer).
ADAPTED = [("timm:resnet18", 32), ("timm:vit_tiny_patch16_224", 224), ("timm:convnext_atto", 32),
           ("timm:mobilenetv3_small_050", 32), ("timm:sequencer2d_s", 32),
           ("torchvision:resnet18", 32),
           ("torchvision:mobilenet_v3_small", 32), ("torchvision:convnext_tiny", 32),
           ("torchvision:densenet121", 32), ("torchvision:efficientnet_b0", 32),
           ("torchvision:regnet_y_400mf", 32), ("torchvision:vit_b_32", 224),
           ("torchvision:mnasnet0_5", 32)]


@pytest.mark.parametrize("name, size", ADAPTED)
def test_an_adapted_model_is_the_library_model_split_at_its_classifier(name, size):
    torch.manual_seed(0)
    ours = build_model(name, 7).double().eval()
    theirs = library_model(name, 7).double().eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the library's names
    theirs.load_state_dict(ours.state_dict(), strict=True)
    classifier = theirs.get_classifier() if name.startswith("timm:") else library.last_linear(
        theirs, 7)[1]
    classifier = getattr(classifier, "fc", classifier)  # a ClassifierHead pools, then fc
    read = []
    classifier.register_forward_pre_hook(lambda module, args: read.append(args[0]))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        features, logits = ours.forward_features(x), ours(x)
        expected = theirs(x)
    assert features.shape == (2, ours.num_features) == read[0].shape
    assert torch.equal(features, read[0]) and torch.equal(logits, expected)
    again = build_model(name, 7).double()
    again.load_state_dict(theirs.state_dict(), strict=True)  # and the way back
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 theirs.state_dict().values()))


@pytest.mark.parametrize("name, message", [
    ("torchvision:googlenet", r"torchvision:googlenet cannot be distilled here: in training mode "
                              r"it returns auxiliary logits"),
    ("torchvision:squeezenet1_1", r"its classifier is a convolution before the pooling"),
    ("torchvision:resnet19", r"unknown model 'torchvision:resnet19' \(`cocord-fast models "
                             r"--torchvision`"),
    ("timm:resnet19", r"unknown model 'timm:resnet19' \(`cocord-fast models --timm PATTERN`"),
    ("timm:deit_tiny_distilled_patch16_224", r"its classifier is a tuple, not one linear layer"),
    ("timm:volo_d1_224", r"its logits add an auxiliary head's over the patch tokens"),
    ("resnet9", r"unknown model 'resnet9'; known models: resnet8, .*, or timm:<name> and "
                r"torchvision:<name>"),
])
def test_names_that_cannot_work_are_refused_with_the_reason(name, message):
    """Before any data is read where the name alone tells (the registries, the list of
    torchvision's refusals); timm's heads are seen when the model is built."""
    if not name.startswith("timm:") or "resnet19" in name:
        with pytest.raises(UserError, match=message):
            check_model_name(name)
    with pytest.raises(UserError, match=message):
        build_model(name, 10)


def test_cli_models_lists_the_libraries_with_widths_and_refusals(capsys):
    assert main(["models", "--torchvision", "squeezenet1_*", "--timm", "vit_tiny_patch16_2*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "timm:vit_tiny_patch16_224", "torchvision:squeezenet1_0", "torchvision:squeezenet1_1"]
    assert "features   192" in lines[0]
    assert lines[1].endswith("refused: its classifier is a convolution before the pooling, not "
                             "a linear layer over pooled features")
    assert main(["models", "--timm", "no_such_model*"]) == 2


def test_a_missing_timm_is_named_with_its_install_command(monkeypatch):
    real = importlib.import_module

    def without_timm(name, *args):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real(name, *args)

    monkeypatch.setattr(library.importlib, "import_module", without_timm)
    with pytest.raises(UserError, match=r"timm: models need timm, which is not installed \(pip "
                                        r"install 'cocord_fast\[timm\]'\)"):
        build_model("timm:resnet18", 10)


PAIRS = {"vit": ("timm:vit_tiny_patch16_224", "resnet18"),
         "convnext": ("torchvision:convnext_tiny", "timm:resnet18")}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 3-class identity tree, and each pair's teacher as the library's own weights file."""
    root = tmp_path_factory.mktemp("library")
    tree = write_identity_tree(root / "data", classes=3, per_class=4, val_per_class=1)
    teachers = {}
    for key, (teacher, _) in PAIRS.items():
        torch.manual_seed(1)
        teachers[key] = root / f"{key}_teacher.pt"
        torch.save(library_model(teacher, 3).state_dict(), teachers[key])
    return root, tree, teachers


def overrides(work, pair: str, method: str, name: str) -> list[str]:
    root, tree, teachers = work
    teacher, student = PAIRS[pair]
    return ["data.dataset=imagefolder", f"data.root={tree}", "data.image_size=224",
            "data.batch_size=4", "data.eval_batch_size=3", "data.num_workers=0", PIPELINE,
            f"model.student={student}", f"model.teacher={teacher}",
            f"model.teacher_checkpoint={teachers[pair]}", f"method.name={method}",
            "train.device=cpu", "train.max_steps=1", "train.log_every=1", "train.progress=false",
            f"train.output_dir={root / name}", "cocord.queue_size=8", "cocord.embed_dim=16",
            "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8", "crd.num_negatives=4",
            "crd.embed_dim=16"]


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method", ["kd", "crd", "cocord"])
def test_every_method_steps_with_library_pairs_on_the_torch_engine(work, pair, method):
    cfg = load_config(overrides=overrides(work, pair, method, f"torch_{pair}_{method}"))
    trainer = Trainer(cfg)
    # The teacher is the library's weights file, loaded strict under the library's names.
    teacher = library_model(PAIRS[pair][0], 3).eval()
    teacher.load_state_dict(torch.load(work[2][pair]))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(trainer.method.teacher_encoder(x), teacher(x), atol=1e-5)
    trainer.fit()
    losses = train_losses(cfg.train.output_dir)
    assert list(losses) == [1] and torch.isfinite(torch.tensor(losses[1]))


@pytest.mark.slow
def test_every_method_steps_with_library_pairs_under_deepspeed(work):
    runs = {f"deepspeed_{pair}_{method}": {"overrides": overrides(
        work, pair, method, f"deepspeed_{pair}_{method}") + [
        "engine.name=deepspeed", "engine.zero_stage=1", "data.batch_size=2"]}
        for pair in PAIRS for method in ("kd", "crd", "cocord")}
    output = launch_runs("deepspeed", runs, work[0])
    assert output.count("x 2 processes (DeepSpeed ZeRO-1)") == len(runs)
    for name in runs:
        losses = train_losses(work[0] / name)
        assert list(losses) == [1] and torch.isfinite(torch.tensor(losses[1])), name


@pytest.mark.parametrize("student", ["timm:resnet18", "torchvision:mobilenet_v3_small"])
def test_an_exported_student_loads_strict_into_the_librarys_model(work, student, tmp_path):
    root, tree, _ = work
    run = tmp_path / "run"
    train(load_config(overrides=[
        "data.dataset=imagefolder", f"data.root={tree}", "data.image_size=32",
        "data.batch_size=4", "data.num_workers=0", f"model.student={student}",
        "train.device=cpu", "train.max_steps=2", "train.progress=false",
        f"train.output_dir={run}"]))
    assert main(["export", str(run / "last.pt"), str(tmp_path / "student.pth")]) == 0
    theirs = library_model(student, 3).eval()
    theirs.load_state_dict(torch.load(tmp_path / "student.pth"), strict=True)
    ours = load_student(run / "last.pt")[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = ours(x)
        assert torch.isfinite(logits).all() and torch.equal(logits, theirs(x))


def test_module_versions_survive_a_method_state_and_the_student_taken_out_of_it():
    """MNASNet's loader reads its version from the state dict's metadata (and converts an old
    layout by it): a student nested in a method's state dict loads back through the adapter's
    own names, and taken out of it (export, eval) loads strict into torchvision's model."""
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.student_encoder = build_model("torchvision:mnasnet0_5", 3).eval()
    state = holder.state_dict()
    again = torch.nn.Module()
    again.student_encoder = build_model("torchvision:mnasnet0_5", 3).eval()
    again.load_state_dict(state, strict=True)
    theirs = library_model("torchvision:mnasnet0_5", 3).eval()
    theirs.load_state_dict(student_state_dict({"student_prefix": "student_encoder.",
                                               "method": state}), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        assert torch.equal(holder.student_encoder(x), expected)
        assert torch.equal(again.student_encoder(x), expected)

