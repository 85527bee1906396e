"""`cocord-fast import-reference`: checkpoints written by the reference implementation of
CoCoRD (ShipengFu/CoCoRD), their module names and queue layout mapped onto `CoCoRD`'s, as a run
directory that `train --resume` continues."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from .checkpoints.files import fit_problems, load_file, save_atomic, training_checkpoint
from .config import Config, load_config, merge, parse_override, save_config
from .errors import UserError
from .methods.cocord import CoCoRD, CoCoRDSettings
from .models import build_model

# Reference module name -> ours; the heads share the inner layout (Sequential 0, 1, 3).
REFERENCE_PREFIXES = {
    "s_q_encoder.": "student_encoder.",
    "s_q_proj.": "student_projector.",
    "s_q_pred.": "predictor.",
    "s_k_encoder.": "slow_encoder.",
    "s_k_proj.": "slow_projector.",
    "t_k_encoder.": "teacher_encoder.",
    "t_k_proj.": "teacher_projector.",
}


def unwrap_reference_checkpoint(obj: Any,
                                source: str = "reference checkpoint") -> dict[str, Tensor]:
    """The model state dict inside a reference checkpoint.

    The reference's main.py saves `{'epoch', 's_model_dict', 'state_dict', 'best_acc1'}` with
    the whole CoCoRD module's state dict under 'state_dict'; 'model' and a bare state dict are
    accepted too, and a DataParallel 'module.' prefix is removed.
    """
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise UserError(f"{source} holds no state dict (expected {{'state_dict': ...}}, "
                        f"{{'model': ...}} or a state dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def _reference_shapes(state: dict[str, Tensor]) -> dict[str, int]:
    """The settings a reference state dict fixes by its shapes (queue is (E, N))."""
    found = {}
    if "queue" in state and state["queue"].ndim == 2:
        found["embed_dim"], found["queue_size"] = state["queue"].shape
    if "s_q_proj.0.weight" in state:
        found["proj_hidden_dim"] = state["s_q_proj.0.weight"].shape[0]
    if "s_q_pred.0.weight" in state:
        found["pred_hidden_dim"] = state["s_q_pred.0.weight"].shape[0]
    return {k: int(v) for k, v in found.items()}


def _to_reference_name(key: str) -> str:
    for theirs, ours in REFERENCE_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def from_reference(ref_state_dict: dict[str, Any], student: str, teacher: str, num_classes: int,
                   **config_overrides: Any) -> CoCoRD:
    """A CoCoRD whose weights, slow copies, teacher, teacher head, queue and pointer are those
    of a reference-implementation checkpoint.

    The cocord settings are the defaults, then what the reference tensors' shapes fix
    (queue_size, embed_dim, proj_hidden_dim, pred_hidden_dim), then `config_overrides` (cocord
    key names; the reference's T, momentum, b_momentum, loss_* are not in its checkpoint).
    """
    state = unwrap_reference_checkpoint(ref_state_dict)
    cfg = Config()
    merge(cfg, {"cocord": {**_reference_shapes(state), **config_overrides}}, "reference import")
    method = CoCoRD(build_model(student, num_classes), build_model(teacher, num_classes),
                    cfg.cocord)
    converted, origin = {}, {}  # our name -> tensor, and -> the reference's name
    for key, value in state.items():
        if key == "queue" and value.ndim == 2:
            ours, value = key, value.T.contiguous()  # reference (E, N) -> ours (N, E)
        elif key == "queue_ptr" and value.numel() == 1:
            ours, value = key, value.reshape(())  # reference (1,) -> ours ()
        elif prefix := next((p for p in REFERENCE_PREFIXES if key.startswith(p)), None):
            ours = REFERENCE_PREFIXES[prefix] + key[len(prefix):]
        else:
            ours = f"unmapped:{key}"  # no name of ours has a colon: reported as unexpected
        converted[ours], origin[ours] = value, key
    problems = fit_problems(method.state_dict(), converted,
                            shown_as=lambda key: origin.get(key) or _to_reference_name(key))
    if problems:
        raise UserError(f"reference checkpoint does not fit CoCoRD({student} <- {teacher}, "
                        f"{num_classes} classes, {_describe(method.config)}): "
                        + "; ".join(problems))
    pointer = int(converted["queue_ptr"])
    if not 0 <= pointer < method.config.queue_size:
        raise UserError(f"reference checkpoint: queue_ptr {pointer} is outside the queue "
                        f"(size {method.config.queue_size})")
    method.load_state_dict(converted, strict=True)
    return method


def _describe(config: CoCoRDSettings) -> str:
    return (f"queue_size={config.queue_size}, embed_dim={config.embed_dim}, "
            f"proj_hidden_dim={config.proj_hidden_dim}, pred_hidden_dim={config.pred_hidden_dim}")



def import_reference(ref_ckpt: Path, out_dir: Path, student: str, teacher: str,
                     num_classes: int, overrides: list[str]) -> str:
    """A reference checkpoint -> a run directory `train --resume` continues: config.yaml,
    last.pt (step 0, fresh optimizer and RNG) and teacher.pth; returns what to tell the user."""
    if (out_dir / "last.pt").exists():
        raise UserError(f"{out_dir / 'last.pt'} already exists; choose another OUT_DIR")
    # The reference trains on CIFAR-100 only; every override is checked before the file is read.
    cfg = load_config(None, ["data.dataset=cifar100", *overrides])
    cocord_overrides = {key: value for text in overrides
                        for section, values in parse_override(text).items()
                        if section == "cocord" for key, value in values.items()}
    raw = load_file(ref_ckpt)
    method = from_reference(unwrap_reference_checkpoint(raw, str(ref_ckpt)), student, teacher,
                            num_classes, **cocord_overrides)
    cfg.method.name = "cocord"
    cfg.model.student, cfg.model.teacher = student, teacher
    cfg.cocord = dataclasses.replace(method.config)  # with the settings the shapes fixed
    cfg.train.output_dir = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.model.teacher_checkpoint:
        # `train --resume` builds the teacher from model.teacher_checkpoint before restoring
        # the method state: give it the reference's teacher in RepDistiller's format.
        teacher_path = out_dir / "teacher.pth"
        save_atomic({"model": method.teacher_encoder.state_dict()}, teacher_path)
        cfg.model.teacher_checkpoint = str(teacher_path)
    save_config(cfg, out_dir / "config.yaml")
    save_atomic(training_checkpoint(cfg.to_dict(), method, num_classes, step=0,
                                    steps_per_epoch=1, engine=None, ranks=None, best_top1=0.0,
                                    last_top1=0.0), out_dir / "last.pt")
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    at_epoch = f" (reference epoch {epoch})" if isinstance(epoch, int) else ""
    return (f"imported {ref_ckpt}{at_epoch} into {out_dir} at step 0; continue with "
            f"cocord-fast train --resume {out_dir} data.root=...")
