"""The run's student and teacher: their names checked before any data is read, and their
starting weights: a teacher's from a file (`model.teacher_checkpoint`) or its library's
(`model.teacher_weights`), a student's from its library's if asked (`model.student_weights`);
and the preprocessing a pretrained teacher was trained with, taken for the data.

Library weights are fetched in turns (`turns.in_turns`): one download for a cache all
nodes share, one per node otherwise, instead of one per process (64 processes asking a hub for
the same file at once). A resumed run takes the weights from its own checkpoint instead, so
neither a file nor a download is needed then.
"""
from __future__ import annotations

import torch

from ..checkpoints.files import load_model_weights, load_strict
from ..config import Config
from ..data.sources import source_kind
from ..data.transforms import image_size_of
from ..errors import UserError
from ..models import build_model, check_model_name
from ..models.library import build_library_model
from ..models.weights import library_architecture, library_preprocessing, library_weights
from ..turns import in_turns

PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def check_model_names(cfg: Config, needs_teacher: bool) -> None:
    """Fails on a misspelt architecture, or a teacher without weights, before any data is
    read or made."""
    fields = [("model.student", cfg.model.student)]
    if needs_teacher:
        if not cfg.model.teacher or not (cfg.model.teacher_checkpoint
                                         or cfg.model.teacher_weights):
            raise UserError(f"method.name={cfg.method.name} needs model.teacher and "
                            f"model.teacher_checkpoint (or model.teacher_weights)")
        if cfg.model.teacher_checkpoint and cfg.model.teacher_weights:
            raise UserError("model.teacher_checkpoint and model.teacher_weights are both set: "
                            "give the teacher's weights once")
        fields.append(("model.teacher", cfg.model.teacher))
    for field_name, name in fields:
        try:
            check_model_name(name)
        except UserError as err:
            raise UserError(f"{field_name}: {err}") from None


def build_teacher(cfg: Config, num_classes: int, resuming: bool) -> torch.nn.Module:
    """The frozen teacher with its weights. Library weights must predict the data's classes:
    every method may read the teacher's logits (KD, and the +KD variants)."""
    teacher = build_network(cfg, "teacher", num_classes)
    if not resuming:
        load_strict(teacher, *teacher_weights(cfg, teacher, num_classes))
    teacher.requires_grad_(False)
    return teacher.eval()


def build_network(cfg: Config, role: str, num_classes: int) -> torch.nn.Module:
    """The run's `role` ("teacher", "student") built for its library weights
    (`model.{role}_weights`: a SWAG ViT's image size), even on resume, which takes the weights
    from the checkpoint; refused where those fix an image size the data does not have."""
    name, weights = getattr(cfg.model, role), getattr(cfg.model, f"{role}_weights")
    field = f"model.{role}_weights"
    architecture = library_architecture(name, weights, field)
    if not architecture:
        return build_model(name, num_classes)
    size = architecture.get("image_size")
    data_size = source_kind(cfg.data.dataset).image_size or image_size_of(cfg.data)
    if size is not None and size != data_size:
        raise UserError(f"{field}={weights}: {name} takes {size} px images with them (the size "
                        f"of its position embeddings); data.image_size is {data_size}")
    return build_library_model(name, num_classes, **architecture)


def teacher_weights(cfg: Config, teacher: torch.nn.Module,
                    num_classes: int) -> tuple[dict[str, torch.Tensor], str]:
    """The teacher's state dict, and where it came from."""
    if not cfg.model.teacher_weights:
        return load_model_weights(cfg.model.teacher_checkpoint), cfg.model.teacher_checkpoint
    source = f"model.teacher_weights={cfg.model.teacher_weights}"
    with in_turns(f"fetching {source}"):
        state = library_weights(cfg.model.teacher, cfg.model.teacher_weights,
                                "model.teacher_weights")
    if (rows := classifier_rows(teacher, state)) != num_classes:
        raise UserError(f"{source}: {cfg.model.teacher} predicts {rows} classes with them, the "
                        f"data has {num_classes}: fine-tune it on this data first "
                        f"(method.name=vanilla model.student={cfg.model.teacher} "
                        f"model.student_weights={cfg.model.teacher_weights}) and give that "
                        f"run's last.pt as model.teacher_checkpoint")
    return state, source


def build_student(cfg: Config, num_classes: int, resuming: bool,
                  say=print) -> torch.nn.Module:
    """The student, from its library's weights with `model.student_weights`; a classifier
    for another number of classes is left as built (a new head), and `say` tells so."""
    student = build_network(cfg, "student", num_classes)
    if resuming or not cfg.model.student_weights:
        return student
    field, weights = "model.student_weights", cfg.model.student_weights
    with in_turns(f"fetching {field}={weights}"):
        state = library_weights(cfg.model.student, weights, field)
    if (rows := classifier_rows(student, state)) != num_classes:
        head = f"{student.classifier_name}."
        state = {key: value for key, value in state.items() if not key.startswith(head)}
        state.update({key: value for key, value in student.state_dict().items()
                      if key.startswith(head)})
        say(f"{field}={weights}: the backbone of {cfg.model.student} starts from them; their "
            f"{rows}-class classifier is replaced by a new {num_classes}-class one")
    load_strict(student, state, f"{field}={weights}")
    return student


def classifier_rows(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """How many classes `state` predicts for an adapted library `model` (its classifier's
    weight rows)."""
    weight = state.get(f"{model.classifier_name}.weight")
    return None if weight is None else weight.shape[0]


def take_teacher_preprocessing(cfg: Config, needs_teacher: bool) -> list[str]:
    """Fills the `data.image_size`, `data.mean`, `data.std`, `data.interpolation`,
    `data.crop_pct` and `data.crop_mode` left unset with what a pretrained teacher
    (`model.teacher_weights`) was trained with, so that it sees its own input statistics; an
    image size still unset becomes 224. Returns what to tell the user (nothing when nothing
    was taken)."""
    found = None
    if needs_teacher and cfg.model.teacher and cfg.model.teacher_weights:
        found = library_preprocessing(cfg.model.teacher, cfg.model.teacher_weights)
    # Fixed-size images (32 px) are never resized: of a teacher's preprocessing only its
    # normalisation applies to them.
    small = source_kind(cfg.data.dataset).image_size > 0
    keys = ("mean", "std") if small else PREPROCESSING_KEYS
    taken = {} if found is None else {key: found[key] for key in keys
                                      if not getattr(cfg.data, key)}
    if found is not None and not cfg.data.image_size and not small:
        taken["image_size"] = found["input_size"]
    for key, value in taken.items():
        setattr(cfg.data, key, value)
    cfg.data.image_size = image_size_of(cfg.data)
    notes = []
    if taken:
        notes.append(f"data preprocessing from the teacher {cfg.model.teacher} "
                     f"({cfg.model.teacher_weights}): " + ", ".join(
                         f"data.{key}={value}" for key, value in taken.items()))
    if found is not None and found["input_size"] != cfg.data.image_size and not small:
        notes.append(f"the teacher {cfg.model.teacher} ({cfg.model.teacher_weights}) was "
                     f"trained at {found['input_size']} px; data.image_size is "
                     f"{cfg.data.image_size}")
    return notes
