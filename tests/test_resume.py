"""What a resumed run may change: settings that change what the weights mean or what a step is
are refused (each difference listed); the others are allowed, printed and recorded."""
from __future__ import annotations

import shutil

import pytest
import torch

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.cli import main
from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.models import build_model
from cocord_fast.training.metrics import read_log
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import Trainer, train

from data_trees import write_identity_tree
from test_cocord_reference import reference_state


@pytest.fixture
def stopped_run(tiny_overrides, tmp_path):
    train(load_config(overrides=tiny_overrides + ["train.max_steps=4"]))
    return tmp_path / "run"


def test_changes_to_what_the_weights_mean_are_refused_and_listed(stopped_run):
    with pytest.raises(UserError, match=r"model.student: 'resnet8' -> 'resnet20'; "
                                        r"data.batch_size: 16 -> 32\); start a new run"):
        Trainer(config_for_resume(stopped_run, ["model.student=resnet20", "data.batch_size=32"]))


def test_harmless_changes_are_allowed_printed_and_recorded(stopped_run, capsys):
    train(config_for_resume(stopped_run, ["train.max_steps=6", "train.log_every=2"]))
    assert ("resuming at step 4 with changed settings: train.max_steps 4 -> 6, "
            "train.log_every 1 -> 2") in capsys.readouterr().out
    (record,) = [r for r in read_log(stopped_run) if r["kind"] == "resume"]
    assert record.pop("wall_s") > 0
    assert record == {"kind": "resume", "step": 4, "changes": {
        "train.max_steps": {"saved": 4, "now": 6}, "train.log_every": {"saved": 1, "now": 2}}}


OPTIMIZER_CHANGES = {"momentum": 0.5, "weight_decay": 1e-3, "nesterov": True}


def test_optimizer_settings_changed_on_resume_are_the_ones_it_steps_with(stopped_run):
    """The saved optimizer state holds the old momentum, weight decay and Nesterov flag: the
    resumed run takes the new ones from its first step, as if set on the groups by hand."""
    changes = [f"optim.{key}={str(value).lower()}" for key, value in OPTIMIZER_CHANGES.items()]
    weights = {}
    for name in ("changed", "by_hand"):
        run = shutil.copytree(stopped_run, stopped_run.parent / name)
        trainer = Trainer(config_for_resume(run, [
            f"train.output_dir={run}", "train.max_steps=6", *(changes if name == "changed" else [])]))
        groups = trainer.engine.optimizer.param_groups
        if name == "changed":
            assert all({key: g[key] for key in OPTIMIZER_CHANGES} == OPTIMIZER_CHANGES
                       for g in groups)
        else:
            assert groups[0]["momentum"] == 0.9
            for group in groups:
                group.update(OPTIMIZER_CHANGES)
        trainer.fit()
        weights[name] = trainer.method.state_dict()
    saved = load_checkpoint(stopped_run / "last.pt")["method"]
    assert not all(torch.equal(saved[key], value) for key, value in weights["changed"].items())
    for key, value in weights["changed"].items():
        assert torch.equal(value, weights["by_hand"][key]), key


def test_a_resumed_run_keeps_its_teacher_and_needs_no_teacher_file(tiny_overrides, tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("resnet8", 10).state_dict(), teacher)
    distil = tiny_overrides + ["method.name=kd", "model.teacher=resnet8",
                               f"model.teacher_checkpoint={teacher}"]
    train(load_config(overrides=distil + ["train.max_steps=2"]))
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"model.teacher_checkpoint: .*teacher.pt' -> "
                                        r".*other.pt'\); start a new run"):
        Trainer(config_for_resume(run, [f"model.teacher_checkpoint={tmp_path / 'other.pt'}"]))
    saved = torch.load(teacher)
    teacher.unlink()  # moved, or the run copied to another machine
    resumed = Trainer(config_for_resume(run, ["train.max_steps=3"]))
    for key, value in resumed.method.teacher_encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_an_imported_run_takes_its_data_settings_but_not_another_class_count(tmp_path):
    path = tmp_path / "reference.pth"
    torch.save({"state_dict": reference_state()}, path)
    assert main(["import-reference", str(path), str(tmp_path / "imported"), "--student",
                 "resnet8", "--teacher", "resnet14", "--num-classes", "10"]) == 0
    three_classes = write_identity_tree(tmp_path / "tree", classes=3)
    with pytest.raises(UserError, match=r"last.pt predicts 10 classes, but .*tree has 3"):
        Trainer(config_for_resume(tmp_path / "imported", [
            "data.dataset=imagefolder", f"data.root={three_classes}", "data.image_size=32",
            "data.batch_size=4"]))


def test_the_readme_import_recipe_runs_end_to_end(tmp_path, capsys):
    """`import-reference REF OUT --student --teacher`, then `train --resume OUT data.root=...`
    on CIFAR-100-format data, as the README says."""
    from test_data import write_cifar

    from cocord_fast.methods.cocord import CoCoRDSettings as CoCoRDConfig
    from cocord_fast.methods.cocord import CoCoRD

    from test_cocord_reference import OURS

    heads = CoCoRDConfig(queue_size=32, embed_dim=16, proj_hidden_dim=16, pred_hidden_dim=8)
    ours = CoCoRD(build_model("resnet8", 100), build_model("resnet14", 100), heads).state_dict()
    theirs = {"queue": ours.pop("queue").T.contiguous(), "queue_ptr": ours.pop("queue_ptr")[None]}
    for key, value in ours.items():
        reference_prefix = next(r for r, o in OURS.items() if key.startswith(o))
        theirs[reference_prefix + key[len(OURS[reference_prefix]):]] = value
    torch.save({"epoch": 120, "state_dict": theirs}, tmp_path / "checkpoint.pth")
    write_cifar(tmp_path / "cifar", n_train=64, n_test=16)
    out = tmp_path / "imported"
    assert main(["import-reference", str(tmp_path / "checkpoint.pth"), str(out), "--student",
                 "resnet8", "--teacher", "resnet14"]) == 0
    assert main(["train", "--resume", str(out), f"data.root={tmp_path / 'cifar'}",
                 "data.batch_size=16", "data.num_workers=0", "train.max_steps=2",
                 "train.progress=false"]) == 0
    assert ("was imported: it holds weights but no optimizer state or data position, so the "
            "schedule starts at step 0 (epoch 0)") in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["step"] == 2


@pytest.mark.parametrize("damage, changes, message", [
    ("truncate", [], r"corrupt or truncated checkpoint .*bad\.pt: "),
    ("flip", [], r"corrupt or truncated checkpoint .*bad\.pt \(expected digest sha256:"),
    ("text", [], r"bad\.pt is not a checkpoint"),
    (None, ["model.student=resnet14"], r"bad\.pt cannot continue .*model.student: 'resnet8' -> "
                                       r"'resnet14'"),
    (None, ["method.name=kd"], r"bad\.pt cannot continue .*method.name: 'vanilla' -> 'kd'"),
])
def test_a_bad_checkpoint_to_resume_is_named_with_its_problem(stopped_run, tiny_overrides,
                                                              damage, changes, message):
    bad = stopped_run / "bad.pt"
    data = (stopped_run / "last.pt").read_bytes()
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]
    elif damage == "text":
        data = b"step: 4\n"
    bad.write_bytes(data)
    with pytest.raises(UserError, match=message):
        Trainer(load_config(overrides=tiny_overrides + [f"train.resume={bad}", *changes]))
