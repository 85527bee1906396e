import pytest
import torch

from cocord_fast.checkpoints import files as ckpt
from cocord_fast.errors import UserError
from cocord_fast.models import build_model


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
    (a_pickled_module, r"ckpt\.pt holds Python objects besides tensors .* state_dict\(\)"),
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
