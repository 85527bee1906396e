"""What `cocord-fast eval` and `cocord-fast export` do with a saved checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed
from ..checkpoints.files import load_checkpoint, load_strict, save_atomic, student_state_dict
from ..config import load_config
from ..data import build_loaders
from ..errors import UserError
from .evaluate import evaluate
from .networks import build_network


def load_student(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's online student with its weights, and the checkpoint itself."""
    checkpoint = load_checkpoint(path)
    cfg = load_config(base=checkpoint["config"])
    # Built as the run built it: a student from a SWAG ViT's weights has their image size.
    student = build_network(cfg, "student", checkpoint["num_classes"])
    load_strict(student, student_state_dict(checkpoint), str(path))
    return student, checkpoint


def evaluate_checkpoint(path: str | Path, data_overrides: list[str], device: str = "auto") -> dict:
    student, checkpoint = load_student(path)
    cfg = load_config(base=checkpoint["config"], overrides=data_overrides)
    target = distributed.process_device(device, field="--device")
    loaders = build_loaders(cfg.data, num_views=1, seed=cfg.train.seed, device=target)
    if loaders.num_classes != checkpoint["num_classes"]:
        raise UserError(f"{cfg.data.root or cfg.data.dataset} has {loaders.num_classes} classes, "
                        f"the checkpoint's student predicts {checkpoint['num_classes']}")
    return evaluate(student.to(target), loaders.val, target)


def export_student(path: str | Path, out: str | Path, key: str | None = None) -> list[str]:
    """Writes the student's state dict (its native parameter names) to `out`."""
    student, _ = load_student(path)
    state = student.state_dict()
    save_atomic({key: state} if key else state, out)
    return list(state)
