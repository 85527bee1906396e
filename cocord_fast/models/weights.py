"""Pretrained weights of timm and torchvision models, from the libraries' own hubs and caches
(`model.teacher_weights`, `model.student_weights`).

A value is `pretrained` (the library's default weights for that model), a torchvision weights
name (`IMAGENET1K_V1`, or `ResNet34_Weights.IMAGENET1K_V1`) or a timm pretrained tag
(`a1_in1k`: the weights `timm.create_model("resnet50.a1_in1k", pretrained=True)` loads), or a
weights file (for timm also a training checkpoint, read as timm's loader reads it). Each library
loads them as it does itself (torchvision's model builders, timm's `create_model`), so they
come in the library's own state-dict names, which an adapted model keeps (`library.py`).

A download goes where the library puts it (torch hub's `checkpoints/`, the Hugging Face cache)
and is read from there next time; with no network and no copy there, the error names the file
and where to put it.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from ..errors import UserError
from ..weights_only import SAFE_CLASSES, refused_by_weights_only_load
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
        # Through the model's builder, as torchvision loads them: it renames the keys of old
        # files (DenseNet's `norm.1`) and builds the architecture they are for (a SWAG ViT's
        # image size). Torch hub checks the SHA-256 prefix in the file's name on a download,
        # not on a file already in its cache.
        net = import_library("torchvision").models.get_model(model, weights=chosen,
                                                            progress=False)
    except OSError as err:  # urllib's errors, a read-only cache
        raise UserError(f"{field}={weights}: cannot fetch {chosen.url} ({err}); offline, copy "
                        f"that file to {target}") from None
    except (RuntimeError, pickle.UnpicklingError) as err:  # another file under that name
        why = " ".join(str(err).split())
        raise UserError(f"{field}={weights}: torchvision:{model} cannot take the file "
                        f"{os.path.basename(chosen.url)} ({why[:300]}{'...' * (len(why) > 300)}); "
                        f"if {target} is not {chosen.url}, delete it and fetch that "
                        f"again") from None
    return net.state_dict()


# What torchvision's builders set from the weights they load, beside the number of classes,
# by the module of the weights' enum: the input size a ViT's position embeddings and a
# MaxViT's attention grid are made for.
SIZED_BY_WEIGHTS = {"vision_transformer": lambda size: {"image_size": size[0]},
                    "maxvit": lambda size: {"input_size": tuple(size)}}


def library_architecture(name: str, weights: str, field: str) -> dict[str, Any]:
    """What model `name` must be built with, beside its number of classes, to take its
    library's weights `weights` (`model.*_weights`): {"image_size": 384} for a SWAG ViT's.
    Empty for a timm model (its name fixes its architecture), a weights file (which says
    nothing of it) or no weights."""
    split = split_name(name)
    if not weights or split is None or split[0] != "torchvision" or looks_like_a_file(weights):
        return {}
    chosen = _torchvision_choice(split[1], weights, field)
    sized = SIZED_BY_WEIGHTS.get(type(chosen).__module__.rpartition(".")[2])
    return sized(chosen.meta["min_size"]) if sized is not None else {}


def _timm_weights(model: str, weights: str, field: str) -> dict[str, torch.Tensor]:
    timm = import_library("timm")
    if looks_like_a_file(weights):
        # Through timm's loader, which also converts files in a model's original format, at
        # the file's number of classes.
        path = os.path.expanduser(weights)
        classifier = timm.models.get_pretrained_cfg(model).classifier
        state = timm.models.clean_state_dict(load_state_dict(path, field, TIMM_CHECKPOINT_KEYS))
        weight = state.get(f"{classifier}.weight")
        rows = {} if weight is None else {"num_classes": weight.shape[0]}
        return timm.create_model(model, pretrained=True, **rows, pretrained_cfg_overlay={
            "file": path, **rows}).state_dict()
    full = _timm_full_name(model, weights, field)
    try:
        return timm.create_model(full, pretrained=True).state_dict()
    except Exception as err:  # the hub's errors have no common base short of Exception
        first, *fallback = _timm_sources(timm.models.get_pretrained_cfg(full))
        alternative = "".join(f" (or, where the hub has no such file, {url})" for url in fallback)
        raise UserError(f"{field}={weights}: cannot fetch timm's {full} weights "
                        f"({type(err).__name__}); offline, download {first}{alternative} where "
                        f"there is a network and set {field}=<that file>") from None


# The keys timm's loader (`timm.models.load_state_dict`) takes a checkpoint's weights from, in
# its order: the EMA weights before the others.
TIMM_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# The safetensors copy timm asks the Hugging Face hub for before a pickled file.
HF_SAFE_COPIES = {"pytorch_model.bin": "model.safetensors",
                  "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def _timm_sources(cfg) -> list[str]:
    """The URLs timm fetches the weights of pretrained config `cfg` from, in the order it tries
    them (timm's `load_state_dict_from_hf`): from the Hugging Face repository `hf_hub_id`
    (`owner/name`, `@revision` optional), its file `hf_hub_filename` (pytorch_model.bin if
    unset), a .bin file's safetensors copy first; else from `url`."""
    if not cfg.hf_hub_id:
        return [cfg.url]
    from huggingface_hub import hf_hub_url

    repo, _, revision = cfg.hf_hub_id.partition("@")
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    names = [filename]
    if filename.endswith(".bin"):
        names.insert(0, HF_SAFE_COPIES.get(filename, filename[:-len(".bin")] + ".safetensors"))
    return [hf_hub_url(repo, name, revision=revision or None) for name in names]


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


def load_state_dict(path: str, field: str,
                    nested: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict in weights file `path`; in a checkpoint that holds it under one of the
    keys `nested`, under the first of them it holds."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):  # timm checkpoints' `args`
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise (refused_by_weights_only_load(err, f"{field}={path}")
               or UserError(f"{field}={path} cannot be read: {err}")) from None
    if isinstance(state, dict):
        state = next((state[key] for key in nested if state.get(key) is not None), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        under = f" (nor one under {', '.join(nested)})" if nested else ""
        raise UserError(f"{field}={path} holds no state dict{under}")
    return state


def library_preprocessing(name: str, weights: str) -> dict | None:
    """What model `name` was trained with under its library's weights `weights`: `mean`,
    `std` (lists on the [0, 1] scale), `interpolation`, `crop_pct`, `crop_mode` and
    `input_size` (pixels); None for a weights file, which says nothing about it."""
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
                "crop_mode": cfg.crop_mode or "center", "input_size": cfg.input_size[-1]}
    # torchvision's evaluation resizes the shorter side, then crops the centre.
    transforms = _torchvision_choice(model, weights, field).transforms()
    return {"mean": list(transforms.mean), "std": list(transforms.std),
            "interpolation": _filter(transforms.interpolation.value),
            "crop_pct": transforms.crop_size[0] / transforms.resize_size[0],
            "crop_mode": "center", "input_size": transforms.crop_size[0]}


def _filter(interpolation: str) -> str:
    """The recipes' filter nearest to a library's ("random" and the rest: bilinear)."""
    return "bicubic" if interpolation == "bicubic" else "bilinear"

