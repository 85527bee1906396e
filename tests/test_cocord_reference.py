"""The import of reference CoCoRD checkpoints (reference_import.py): every tensor in its
place, errors that name the key, and `cocord-fast import-reference` writing a resumable run."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from cocord_fast.checkpoints.files import load_checkpoint, load_model_weights, student_state_dict
from cocord_fast.cli import main
from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.methods import build_method
from cocord_fast.reference_import import from_reference
from cocord_fast.models import build_model

from test_cocord import NUM_CLASSES, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_state(student="resnet8", teacher="resnet14", ptr=3) -> dict[str, torch.Tensor]:
    """A state dict in the reference's layout (module names, Sequential heads, queue (E, N),
    queue_ptr (1,)), every tensor filled with distinct random values."""
    def mlp(i, h, o):
        return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))

    E, H, P, N = 8, 16, 8, 10
    d_s, d_t = build_model(student, 10).num_features, build_model(teacher, 10).num_features
    parts = {"s_q_encoder": build_model(student, NUM_CLASSES),
             "s_k_encoder": build_model(student, NUM_CLASSES),
             "t_k_encoder": build_model(teacher, NUM_CLASSES),
             "s_q_proj": mlp(d_s, H, E), "s_k_proj": mlp(d_s, H, E), "t_k_proj": mlp(d_t, H, E),
             "s_q_pred": mlp(E, P, E)}
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, module in parts.items():
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = (torch.rand(value.shape, generator=g) + 0.1
                                      if value.is_floating_point()
                                      else torch.randint(1, 99, value.shape, generator=g))
    state["queue"] = torch.randn(E, N, generator=g)
    state["queue_ptr"] = torch.tensor([ptr])
    return state


OURS = {"s_q_encoder.": "student_encoder.", "s_k_encoder.": "slow_encoder.",
        "t_k_encoder.": "teacher_encoder.", "s_q_proj.": "student_projector.",
        "s_k_proj.": "slow_projector.", "t_k_proj.": "teacher_projector.",
        "s_q_pred.": "predictor."}


def assert_matches_reference(method, reference):
    ours = method.state_dict()
    assert len(ours) == len(reference)
    assert torch.equal(ours["queue"], reference["queue"].T) and ours["queue"].shape == (10, 8)
    assert ours["queue_ptr"].item() == reference["queue_ptr"].item()
    for key, value in reference.items():
        if key.startswith("queue"):
            continue
        prefix = next(p for p in OURS if key.startswith(p))
        assert torch.equal(ours[OURS[prefix] + key[len(prefix):]], value), key


def test_reference_state_dict_imports_with_every_tensor_in_place():
    reference = reference_state()
    method = from_reference(reference, "resnet8", "resnet14", NUM_CLASSES, temperature=0.2,
                            loss_pred=2.0)
    assert_matches_reference(method, reference)
    assert (method.config.temperature, method.config.loss_pred) == (0.2, 2.0)
    assert (method.config.queue_size, method.config.embed_dim) == (10, 8)  # read off the shapes
    wrapped = {"epoch": 240, "s_model_dict": {}, "best_acc1": torch.tensor(71.0),
               "state_dict": {f"module.{k}": v for k, v in reference.items()}}
    assert_matches_reference(from_reference(wrapped, "resnet8", "resnet14", NUM_CLASSES),
                             reference)
    out = method(make_batch(dtype=torch.float32))  # the imported method steps
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("drop, add, overrides, message", [
    ("", "", {"bogus": 1}, "unknown key 'cocord.bogus'"),
    ("s_q_pred.3.bias", "", {}, r"missing keys: s_q_pred\.3\.bias"),
    ("", "extra.weight", {}, r"unexpected keys: extra\.weight"),
    ("", "", {"embed_dim": 16}, r"s_q_proj\.3\.weight \(8, 16\)"),
])
def test_reference_import_errors_name_the_key(drop, add, overrides, message):
    state = {k: v for k, v in reference_state().items() if k != drop}
    if add:
        state[add] = torch.zeros(1)
    with pytest.raises(UserError, match=message):
        from_reference(state, "resnet8", "resnet14", NUM_CLASSES, **overrides)


def test_cli_import_reference_writes_a_resumable_run(tmp_path, capsys):
    reference = reference_state(ptr=9)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 120, "s_model_dict": {}, "state_dict": reference,
                "best_acc1": torch.tensor(70.5)}, path)
    out_dir = tmp_path / "imported"
    argv = ["import-reference", str(path), str(out_dir), "--student", "resnet8", "--teacher",
            "resnet14", "--num-classes", str(NUM_CLASSES), "cocord.temperature=0.2",
            "data.batch_size=32"]
    assert main(argv) == 0
    assert "reference epoch 120" in capsys.readouterr().out

    checkpoint = load_checkpoint(out_dir / "last.pt")
    assert checkpoint["step"] == 0 and checkpoint["engine"] is None and checkpoint["ranks"] is None
    assert checkpoint["num_classes"] == NUM_CLASSES
    cfg = load_config(base=checkpoint["config"])
    assert load_config(out_dir / "config.yaml").to_dict() == cfg.to_dict()
    assert (cfg.method.name, cfg.model.student, cfg.model.teacher) == ("cocord", "resnet8",
                                                                        "resnet14")
    assert (cfg.cocord.temperature, cfg.cocord.queue_size, cfg.data.batch_size) == (0.2, 10, 32)
    assert cfg.train.output_dir == str(out_dir)

    fresh = build_method("cocord", cfg, build_model("resnet8", NUM_CLASSES),
                         build_model("resnet14", NUM_CLASSES), np.zeros(0))
    fresh.load_state_dict(checkpoint["method"], strict=True)
    assert_matches_reference(fresh, reference)
    student = build_model("resnet8", NUM_CLASSES)
    student.load_state_dict(student_state_dict(checkpoint), strict=True)
    teacher = build_model("resnet14", NUM_CLASSES)  # what `train --resume` builds it from
    teacher.load_state_dict(load_model_weights(cfg.model.teacher_checkpoint), strict=True)
    assert torch.equal(teacher.fc.weight, reference["t_k_encoder.fc.weight"])

    assert main(argv) == 2  # never overwrites a run
    assert "already exists" in capsys.readouterr().err
    del reference["queue"]
    torch.save({"state_dict": reference}, path)
    assert main([*argv[:2], str(tmp_path / "other"), *argv[3:]]) == 2
    assert "missing keys: queue" in capsys.readouterr().err
    assert math.isfinite(fresh(make_batch(dtype=torch.float32)).loss.item())
