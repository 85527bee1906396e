"""Models from timm and torchvision by name: `timm:<name>` (any `timm.list_models()` entry) and
`torchvision:<name>` (any classifier of `torchvision.models.list_models`), given the zoo's
contract: `forward_features` (the pooled vector the final linear layer reads), `forward_head`
(that layer) and `num_features` (its input width).

- timm models split themselves: `forward_head(forward_features(x), pre_logits=True)` is that
  vector (pooling, and the norm or MLP some heads hold before their last layer), and
  `get_classifier()` the last layer (the `fc` of a `ClassifierHead`).
- A torchvision classifier's last linear layer (`fc`, `classifier[-1]`, `heads.head`, ...) is
  taken out of the network and held beside it; the network then returns that layer's input.

Either way the state dict keeps the library's own names (`conv1.weight`, `fc.bias`), at every
level a model is saved from: a weights file of the library loads into the adapter strict, and a
student exported by `cocord-fast export` loads strict into the library's own model.
"""
from __future__ import annotations

import fnmatch
import importlib
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .base import Classifier

LIBRARIES = ("timm", "torchvision")
# torchvision classifiers that cannot take the contract, and why.
TORCHVISION_REFUSED = {
    "googlenet": "in training mode it returns auxiliary logits beside its output",
    "inception_v3": "in training mode it returns auxiliary logits beside its output",
    "squeezenet1_0": "its classifier is a convolution before the pooling, not a linear layer "
                     "over pooled features",
    "squeezenet1_1": "its classifier is a convolution before the pooling, not a linear layer "
                     "over pooled features",
}


def split_name(name: str) -> tuple[str, str] | None:
    """('timm', 'resnet50') for 'timm:resnet50'; None for a zoo name."""
    library, sep, model = name.partition(":")
    return (library, model) if sep and library in LIBRARIES else None


def import_library(library: str):
    try:
        return importlib.import_module(library)
    except ImportError:
        extra = ("pip install 'cocord_fast[timm]'" if library == "timm"
                 else "pip install torchvision")
        raise UserError(f"{library}: models need {library}, which is not installed "
                        f"({extra})") from None


class LibraryModel(Classifier):
    """A library's network (`net`) behind the zoo's contract. `renames` pairs each prefix of
    the adapter's own state-dict names with the library's, e.g. ("net.", "");
    `classifier_name` is the last layer's name among the library's."""

    renames: tuple[tuple[str, str], ...]
    classifier_name: str

    def __init__(self, library: str, name: str):
        super().__init__()
        self.library, self.name = library, name
        self.register_state_dict_post_hook(_to_library_names)
        self.register_load_state_dict_pre_hook(_to_own_names)

    def extra_repr(self) -> str:
        return f"{self.library}:{self.name}"


def _renamed(path: str, prefix: str, pairs: list[tuple[str, str]]) -> str | None:
    """`path` (a dotted key, or a module path ending in '.') under `prefix` with the first of
    `pairs` (the longest source first) that it starts with renamed; None if none applies."""
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix):]
    for source, target in sorted(pairs, key=lambda pair: -len(pair[0])):
        if rest.startswith(source):
            return prefix + target + rest[len(source):]
    return None


def _rename(state: dict, prefix: str, pairs: list[tuple[str, str]]) -> None:
    """Renames, in place and in order, the keys under `prefix`; and adds each module's entry
    of the state dict's metadata (its version, which `_load_from_state_dict` reads: MNASNet
    converts its old layout by it) under the new name beside the old. Both stay: a state dict
    saved from a model that holds an adapter is loaded back through the adapter's own names,
    where only the root of a load can reach the metadata to rename it."""
    for key in [key for key in state if key.startswith(prefix)]:
        value = state.pop(key)
        state[_renamed(key, prefix, pairs) or key] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return
    for module in sorted(metadata, key=len):  # a module's entry before its children's
        path = f"{module}." if module else ""
        if (renamed := _renamed(path, prefix, pairs)) is not None and renamed != path:
            metadata[renamed[:-1] if renamed else ""] = metadata[module]


def _to_library_names(module: LibraryModel, state: dict, prefix: str, metadata) -> None:
    _rename(state, prefix, list(module.renames))


def _to_own_names(module: LibraryModel, state: dict, prefix: str, *args) -> None:
    _rename(state, prefix, [(target, source) for source, target in module.renames])


def library_names(library: str, pattern: str) -> list[str]:
    """The library's classifiers whose names match the glob `pattern`."""
    module = import_library(library)
    if library == "timm":
        return module.list_models(pattern)
    return fnmatch.filter(module.models.list_models(module=module.models), pattern)


def check_library_name(library: str, name: str) -> None:
    """Fails on a model the library does not have, or that cannot take the contract."""
    module = import_library(library)
    if library == "timm":
        if not module.is_model(name):
            raise UserError(f"unknown model 'timm:{name}' (`cocord-fast models --timm "
                            f"PATTERN` lists timm's)")
        return
    if name in TORCHVISION_REFUSED:
        raise UserError(f"torchvision:{name} cannot be distilled here: "
                        f"{TORCHVISION_REFUSED[name]}")
    if name not in module.models.list_models(module=module.models):
        raise UserError(f"unknown model 'torchvision:{name}' (`cocord-fast models "
                        f"--torchvision` lists torchvision's classifiers)")


class TimmModel(LibraryModel):
    def __init__(self, name: str, num_classes: int):
        super().__init__("timm", name)
        check_library_name("timm", name)
        self.net = import_library("timm").create_model(name, pretrained=False,
                                                       num_classes=num_classes)
        classifier = last_timm_linear(self.net.get_classifier())
        if not isinstance(classifier, nn.Linear):
            raise UserError(f"timm:{name}: its classifier is a {type(classifier).__name__}, "
                            f"not one linear layer over pooled features")
        if getattr(self.net, "aux_head", None) is not None:  # VOLO's token-labelling head
            raise UserError(f"timm:{name}: its logits add an auxiliary head's over the patch "
                            f"tokens to the classifier's")
        self.num_features = classifier.in_features
        self.classifier_name = next(name for name, module in self.net.named_modules()
                                    if module is classifier)
        self.renames = (("net.", ""),)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.get_submodule(self.classifier_name)(features)


def last_timm_linear(classifier):
    """The linear layer that reads `forward_head(..., pre_logits=True)`: the classifier
    itself, or the `fc` of timm's `ClassifierHead` (pooling, dropout, then `fc`: its
    pre-logits output is the pooled vector). Anything else is returned as it is, to be
    refused."""
    head_class = import_library("timm").layers.ClassifierHead
    if isinstance(classifier, head_class) and isinstance(classifier.fc, nn.Linear):
        return classifier.fc
    return classifier


class TorchvisionModel(LibraryModel):
    """`architecture`: what the builder is given beside the number of classes (a ViT's
    `image_size` for weights made at another size: `weights.library_architecture`)."""

    def __init__(self, name: str, num_classes: int, **architecture: Any):
        super().__init__("torchvision", name)
        check_library_name("torchvision", name)
        net = import_library("torchvision").models.get_model(name, weights=None,
                                                            num_classes=num_classes,
                                                            **architecture)
        path, head = last_linear(net, num_classes)
        parent, _, attribute = path.rpartition(".")
        setattr(net.get_submodule(parent), attribute, nn.Identity())
        self.net, self.head = net, head
        self.num_features = head.in_features
        self.classifier_name = path
        self.renames = (("head.", f"{path}."), ("net.", ""))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def last_linear(net: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The name and module of the linear layer that makes `net`'s logits: the last one
    registered (torchvision registers the classifier last)."""
    found = [(name, module) for name, module in net.named_modules()
             if isinstance(module, nn.Linear) and module.out_features == num_classes]
    if not found:
        raise UserError(f"{type(net).__name__} has no linear layer with {num_classes} outputs "
                        f"to take as its classifier")
    return found[-1]


def build_library_model(name: str, num_classes: int, **architecture: Any) -> LibraryModel:
    """`architecture`: a torchvision builder's settings (`TorchvisionModel`); timm's take
    none."""
    library, model = split_name(name)
    if library == "timm":
        return TimmModel(model, num_classes)
    return TorchvisionModel(model, num_classes, **architecture)
