import argparse
import os
import re
import tarfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from cocord_fast.checkpoints import files as ckpt
from cocord_fast.errors import UserError
from cocord_fast.models import build_model
from cocord_fast.models.weights import load_state_dict


def test_save_is_atomic_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"garbage bytes", "is not a checkpoint"),
    (b"", "is empty"),
])
def test_unreadable_files_raise_user_errors(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        ckpt.load_model_weights(path)


def test_a_state_dict_is_not_a_training_checkpoint(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="not a cocord_fast training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "w.pt")


def test_model_weights_from_each_format(tmp_path):
    model = build_model("resnet8", 10)
    state = model.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": state, "epoch": 240}, tmp_path / "repdistiller.pth")
    torch.save({"format": ckpt.FORMAT, "student_prefix": "student_encoder.",
                "method": {f"student_encoder.{k}": v for k, v in state.items()} | {
                    "head.weight": torch.zeros(1)}}, tmp_path / "ours.pt")
    for name in ("plain.pth", "repdistiller.pth", "ours.pt"):
        loaded = ckpt.load_model_weights(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"model": 3}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="holds no model state dict"):
        ckpt.load_model_weights(tmp_path / "bad.pth")


def test_load_strict_names_the_problem_keys():
    model = build_model("resnet8", 10)
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    state["fc.weight"] = torch.zeros(3, 64)
    with pytest.raises(UserError) as err:
        ckpt.load_strict(model, state, "t.pth")
    text = str(err.value)
    assert "t.pth" in text and "missing keys: fc.bias" in text
    assert "unexpected keys: extra.weight" in text and "shape mismatch: fc.weight" in text


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np

    cpu = torch.device("cpu")
    state = ckpt.rng_state(cpu)
    ckpt.save_atomic(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), cpu)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def flip_a_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def not_a_checkpoint(path):
    path.write_text("model:\n  student: resnet8\n")


def a_pickled_module(path):
    torch.save(torch.nn.Linear(2, 2), path)


@pytest.mark.parametrize("damage, message", [
    (flip_a_byte, r"corrupt or truncated checkpoint .*ckpt\.pt \(expected digest sha256:"),
    (truncate, r"corrupt or truncated checkpoint .*ckpt\.pt: "),
    (not_a_checkpoint, r"ckpt\.pt is not a checkpoint \(not a file written by torch.save\)"),
    (a_pickled_module, r"ckpt\.pt holds Python objects other than tensors .* state_dict\(\)"),
])
def test_damaged_and_foreign_files_are_named_with_the_problem(tmp_path, damage, message):
    path = tmp_path / "ckpt.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "weights": torch.randn(4096)}, path)
    assert ckpt.load_file(path)["weights"].shape == (4096,)  # sealed files load as before
    damage(path)
    with pytest.raises(UserError, match=message):
        ckpt.load_checkpoint(path)


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path):
    ckpt.save_atomic({"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION + 1},
                     tmp_path / "new.pt")
    with pytest.raises(UserError, match=f"newer cocord_fast .*format {ckpt.FORMAT_VERSION + 1}"):
        ckpt.load_checkpoint(tmp_path / "new.pt")


class RunsACommand:
    """Unpickled without restriction, runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def weights(**extra) -> dict:
    return {"weight": torch.zeros(2), **extra}


def legacy_save(obj, path):
    """torch.save's format before torch 1.6 (a pickle stream, not a zip archive)."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def legacy_tar(path):
    """torch's oldest format: a tar archive (torch.load refuses it with weights_only)."""
    torch.save(weights(), path.with_suffix(".pickle"))
    with tarfile.open(path, "w") as tar:
        tar.add(path.with_suffix(".pickle"), arcname="pickle")


# Every kind of file torch.load(weights_only=True) refuses for what it holds, as torch 2.14
# words each refusal ("Unsupported global", a blocked module, "Unsupported operand", ...).
REFUSED = {
    "a pickled model": (lambda path: torch.save(torch.nn.Linear(2, 2), path),
                        r"holds Python objects other than tensors "
                        r"\(torch\.nn\.modules\.linear\.Linear\) and was refused: loading them "
                        r"could run code"),
    "a command run when unpickled": (
        lambda path: torch.save(weights(x=RunsACommand(path.with_name("ran"))), path),
        r"holds Python objects other than tensors \(posix\.system\) and was refused"),
    "the same, in the format before torch 1.6": (
        lambda path: legacy_save(weights(x=RunsACommand(path.with_name("ran"))), path),
        r"holds Python objects other than tensors \(posix\.system\) and was refused"),
    "a NumPy array": (lambda path: torch.save(weights(mean=np.zeros(3)), path),
                      r"holds Python objects other than tensors "
                      r"\(numpy\._?core\.multiarray\._reconstruct\)"),
    "a NumPy scalar, before torch 1.6": (
        lambda path: legacy_save({"model": weights(), "best_acc": np.float64(73.1)}, path),
        r"holds Python objects other than tensors \(numpy\._?core\.multiarray\.scalar\)"),
    "weights pickled with protocol 4": (
        lambda path: torch.save(weights(), path, pickle_protocol=4),
        r"cannot be checked by torch's weights-only reader \(Unsupported operand 149: pickled "
        r"with protocol 3 or later, damaged, or holding objects other than tensors\) and was "
        r"refused: loading it unchecked could run code"),
    "a TorchScript archive": (
        lambda path: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path),
        r"is a TorchScript archive \(a model with its code\), not weights, and was refused: "
        r"loading it runs that code"),
    "a legacy tar archive": (legacy_tar, r"is in torch's legacy tar format, which torch reads "
                                         r"only without its weights-only check, and was refused"),
}


@pytest.mark.parametrize("kind", REFUSED)
@pytest.mark.parametrize("load, named", [
    (ckpt.load_model_weights, "{path}"),
    (lambda path: load_state_dict(str(path), "model.teacher_weights"),
     "model.teacher_weights={path}")])
def test_a_file_holding_more_than_weights_is_refused_for_it_not_called_corrupt(
        tmp_path, kind, load, named):
    """Named as holding objects (or as what torch cannot check) and refused because loading
    it could run code; never called corrupt, and torch's advice to load it without the
    weights-only restriction is not passed on."""
    write, message = REFUSED[kind]
    path = tmp_path / "teacher.pth"
    write(path)
    with pytest.raises(UserError) as refused:
        load(path)
    text = str(refused.value)
    assert text.startswith(named.format(path=path) + " ")
    assert re.search(message, text), text
    assert text.endswith("cocord_fast reads weights only: save the model's state_dict() "
                         "with torch.save")
    assert "weights_only" not in text and "corrupt" not in text
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("save", [torch.save, legacy_save])
def test_repdistillers_final_checkpoints_with_their_argparse_namespace_load(tmp_path, save):
    """RepDistiller's `*_last.pth` keeps its options as an argparse.Namespace beside the
    weights (torch 1.x wrote it in the format before 1.6)."""
    state = OrderedDict(build_model("resnet8", 10).state_dict())
    opt = argparse.Namespace(model="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180])
    save({"opt": opt, "model": state, "optimizer": {"state": {}, "param_groups": []}},
         tmp_path / "resnet8_last.pth")
    loaded = ckpt.load_model_weights(tmp_path / "resnet8_last.pth")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert ckpt.load_file(tmp_path / "resnet8_last.pth")["opt"] == opt
