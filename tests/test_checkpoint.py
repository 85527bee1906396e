import pytest
import torch

from cocord_fast.engine import checkpoint as ckpt
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
    (b"garbage bytes", "cannot read checkpoint"),
    (b"", "cannot read checkpoint"),
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

    state = ckpt.rng_state()
    ckpt.save_atomic(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
