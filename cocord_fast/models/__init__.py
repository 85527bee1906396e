"""Model zoo: RepDistiller's CIFAR architectures and torchvision's ImageNet ResNets, and any
timm or torchvision classifier by a prefixed name (`timm:convnext_tiny`, `library.py`).

``MODELS`` maps a model name (RepDistiller's ``model_dict`` spelling for the CIFAR models) to
a builder taking only ``num_classes``. Every model has ``forward``, ``forward_features``
(pooled, flattened features), ``forward_head`` (final linear layer) and ``num_features``.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from cocord_fast.errors import UserError
from cocord_fast.models import (library, mobilenetv2, resnet50_cifar, resnet_cifar,
                                resnet_imagenet, shufflenetv1, shufflenetv2, vgg, wrn)

MODELS: dict[str, Callable[[int], nn.Module]] = {
    # CIFAR (32x32), state dicts compatible with RepDistiller checkpoints
    "resnet8": resnet_cifar.resnet8,
    "resnet14": resnet_cifar.resnet14,
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet44": resnet_cifar.resnet44,
    "resnet56": resnet_cifar.resnet56,
    "resnet110": resnet_cifar.resnet110,
    "resnet8x4": resnet_cifar.resnet8x4,
    "resnet32x4": resnet_cifar.resnet32x4,
    "ResNet50": resnet50_cifar.resnet50_cifar,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "MobileNetV2": mobilenetv2.mobilenetv2_half,
    "ShuffleV1": shufflenetv1.shufflenet_v1,
    "ShuffleV2": shufflenetv2.shufflenet_v2,
    # ImageNet, state dicts compatible with torchvision checkpoints
    "resnet18": resnet_imagenet.resnet18,
    "resnet34": resnet_imagenet.resnet34,
    "resnet50": resnet_imagenet.resnet50,
    "resnet101": resnet_imagenet.resnet101,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build the model registered as ``name`` (or a library's, ``timm:``/``torchvision:``) with
    a ``num_classes``-way classifier."""
    if library.split_name(name) is not None:
        return library.build_library_model(name, num_classes)
    check_model_name(name)
    return MODELS[name](num_classes)


def check_model_name(name: str) -> None:
    """Fails on a name no builder knows, without building anything (a library's name is looked
    up in its registry)."""
    if (split := library.split_name(name)) is None:
        if name not in MODELS:
            raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}, or "
                            f"timm:<name> and torchvision:<name>")
        return
    library.check_library_name(*split)


def describe_models(timm_pattern: str | None, torchvision_pattern: str | None,
                    num_classes: int) -> Iterator[str]:
    """The zoo, or the library models matching a pattern, a line each with its feature width
    and parameter count (built on the meta device where it can be), for `cocord-fast models`."""
    names = [] if timm_pattern or torchvision_pattern else list(MODELS)
    for prefix, pattern in (("timm", timm_pattern), ("torchvision", torchvision_pattern)):
        if pattern:
            names += [f"{prefix}:{name}" for name in library.library_names(prefix, pattern)]
    if not names:
        raise UserError(f"no model matches {timm_pattern or torchvision_pattern!r}")
    for name in names:
        try:
            model = _shapes_only(build_model, name, num_classes)
        except UserError as err:
            yield f"{name:34s} refused: {str(err).split(': ', 1)[-1]}"
            continue
        params = sum(p.numel() for p in model.parameters())
        yield f"{name:34s} features {model.num_features:5d}  parameters {params / 1e6:7.2f}M"


def _shapes_only(build: Callable, *args):
    """`build(*args)` on the meta device (shapes, no memory or initialisation), or on the CPU
    where a model's constructor needs real values."""
    try:
        with torch.device("meta"):
            return build(*args)
    except (NotImplementedError, RuntimeError):
        return build(*args)
