"""Pretrained weights of timm and torchvision models, from the libraries' own hubs and caches
(`model.teacher_weights`, `model.student_weights`).

A value is `pretrained` (the library's default weights for that model), a torchvision weights
name (`IMAGENET1K_V1`, or `ResNet34_Weights.IMAGENET1K_V1`) or a timm pretrained tag
(`a1_in1k`: the weights `timm.create_model("resnet50.a1_in1k", pretrained=True)` loads). They
come in the library's own state-dict names, which an adapted model keeps (`library.py`).

A download goes where the library puts it (torch hub's `checkpoints/`, the Hugging Face cache)
and is read from there next time; with no network and no copy there, the error names the file
and where to put it.
"""
from __future__ import annotations

import os
import pickle

import torch

from ..errors import UserError
from .library import import_library, split_name


def library_weights(name: str, weights: str, field: str) -> dict[str, torch.Tensor]:
    """The state dict of model `name` (`timm:...`, `torchvision:...`) with its library's
    weights `weights`, at the number of classes they were trained for."""
    split = split_name(name)
    if split is None:
        hint = " (give a weights file in model.teacher_checkpoint)" if "teacher" in field else ""
        raise UserError(f"{field}={weights}: library weights are for timm:<name> and "
                        f"torchvision:<name> models, not the zoo's {name!r}{hint}")
    library, model = split
    if looks_like_a_file(weights) and not os.path.isfile(os.path.expanduser(weights)):
        raise UserError(f"{field}={weights}: no such file")
    return (_timm_weights if library == "timm" else _torchvision_weights)(model, weights, field)


FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def looks_like_a_file(weights: str) -> bool:
    return os.sep in weights or weights.endswith(FILE_SUFFIXES)


def _torchvision_weights(model: str, weights: str, field: str) -> dict[str, torch.Tensor]:
    if looks_like_a_file(weights):
        return load_state_dict(os.path.expanduser(weights), field)
    chosen = _torchvision_choice(model, weights, field)
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(chosen.url))
    try:
        return chosen.get_state_dict(progress=False)
    except OSError as err:  # urllib's errors, a read-only cache
        raise UserError(f"{field}={weights}: cannot fetch {chosen.url} ({err}); offline, copy "
                        f"that file to {target}") from None


def _timm_weights(model: str, weights: str, field: str) -> dict[str, torch.Tensor]:
    timm = import_library("timm")
    if looks_like_a_file(weights):
        # Through timm's loader, which also converts files in a model's original format, at
        # the file's number of classes.
        path = os.path.expanduser(weights)
        classifier = timm.models.get_pretrained_cfg(model).classifier
        weight = load_state_dict(path, field).get(f"{classifier}.weight")
        rows = {} if weight is None else {"num_classes": weight.shape[0]}
        return timm.create_model(model, pretrained=True, **rows, pretrained_cfg_overlay={
            "file": path, **rows}).state_dict()
    full = _timm_full_name(model, weights, field)
    try:
        return timm.create_model(full, pretrained=True).state_dict()
    except Exception as err:  # the hub's errors have no common base short of Exception
        cfg = timm.models.get_pretrained_cfg(full)
        source = (f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
                  if cfg.hf_hub_id else cfg.url)
        raise UserError(f"{field}={weights}: cannot fetch timm's {full} weights "
                        f"({type(err).__name__}); offline, download {source} where there is a "
                        f"network and set {field}=<that file>") from None


def _torchvision_choice(model: str, weights: str, field: str):
    """The member of the model's weights enum that `weights` names."""
    choices = import_library("torchvision").models.get_model_weights(model)
    wanted = "DEFAULT" if weights == "pretrained" else weights.rpartition(".")[2]
    if wanted not in choices.__members__:
        raise UserError(f"{field}={weights}: torchvision:{model} has the weights "
                        f"{', '.join(choices.__members__)} (or pretrained, its default)")
    return choices[wanted]


def _timm_full_name(model: str, weights: str, field: str) -> str:
    """`model.tag` for the weights `weights` names, checked against timm's registry."""
    timm = import_library("timm")
    full = model if weights == "pretrained" else f"{model}.{weights}"
    if not timm.list_pretrained(full):
        tags = [tag.split(".", 1)[1] for tag in timm.list_pretrained(f"{model}.*")]
        raise UserError(f"{field}={weights}: timm has no such weights for {model}; its tags: "
                        f"{', '.join(tags) or 'none (no pretrained weights)'}")
    return full


def load_state_dict(path: str, field: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise UserError(f"{field}={path} cannot be read: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{field}={path} holds no state dict")
    return state


def library_preprocessing(name: str, weights: str) -> dict | None:
    """What model `name` was trained with under its library's weights `weights`: `mean`,
    `std` (lists on the [0, 1] scale), `interpolation`, `crop_pct` and `input_size` (pixels);
    None for a weights file, which says nothing about it."""
    split = split_name(name)
    if split is None or looks_like_a_file(weights):
        return None
    library, model = split
    field = "model.teacher_weights"
    if library == "timm":
        cfg = import_library("timm").models.get_pretrained_cfg(
            _timm_full_name(model, weights, field))
        return {"mean": list(cfg.mean), "std": list(cfg.std),
                "interpolation": _filter(cfg.interpolation), "crop_pct": cfg.crop_pct,
                "input_size": cfg.input_size[-1]}
    transforms = _torchvision_choice(model, weights, field).transforms()
    return {"mean": list(transforms.mean), "std": list(transforms.std),
            "interpolation": _filter(transforms.interpolation.value),
            "crop_pct": transforms.crop_size[0] / transforms.resize_size[0],
            "input_size": transforms.crop_size[0]}


def _filter(interpolation: str) -> str:
    """The recipes' filter nearest to a library's ("random" and the rest: bilinear)."""
    return "bicubic" if interpolation == "bicubic" else "bilinear"

