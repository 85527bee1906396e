"""Writes the CIFAR-100 and ImageNet recipes from one table: `python -m cocord_fast.configs.generate`.

Every recipe names what it reproduces. The committed YAML files are this script's output (a
test checks they agree), so a change to a shared setting is made here, once.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from cocord_fast.methods import Recipe
from cocord_fast.plugins import METHODS

ROOT = Path(__file__).resolve().parent

# METHOD.md section 5: the published teacher -> student pairs and the student's top-1 alone.
# Each method's rows (its settings and published results) are its `Method.recipes`.
CIFAR_PAIRS = {
    ("wrn_40_2", "wrn_16_2"): 73.26, ("wrn_40_2", "wrn_40_1"): 71.98,
    ("resnet56", "resnet20"): 69.06, ("resnet110", "resnet20"): 69.06,
    ("resnet110", "resnet32"): 71.14, ("resnet32x4", "resnet8x4"): 72.50,
    ("vgg13", "vgg8"): 70.36, ("vgg13", "MobileNetV2"): 64.60,
    ("ResNet50", "MobileNetV2"): 64.60, ("ResNet50", "vgg8"): 70.36,
    ("resnet32x4", "ShuffleV1"): 70.50, ("resnet32x4", "ShuffleV2"): 71.82,
    ("wrn_40_2", "ShuffleV1"): 70.50,
}
# As in CRD: the light students train at lr 0.01, the others at 0.05.
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
IMAGENET_PAIRS = [("resnet34", "resnet18"), ("resnet101", "resnet50")]



def method_recipes() -> list[Recipe]:
    """Every registered method's rows, in the registry's order."""
    return [recipe for method in METHODS.all().values() for recipe in method.recipes]


def cifar_common(student: str, output: str) -> dict:
    return {
        "data": {"dataset": "cifar100", "root": "data/cifar100", "batch_size": 64, "num_workers": 4},
        "optim": {"lr": 0.01 if student in LOW_LR_STUDENTS else 0.05, "momentum": 0.9,
                  "weight_decay": 5.0e-4, "schedule": "step", "milestones": [150, 180, 210],
                  "gamma": 0.1},
        "train": {"epochs": 240, "log_every": 100, "output_dir": f"runs/cifar100/{output}"},
    }


# ImageNet runs on one node of 8 GPUs: 32 images per GPU make METHOD.md's global batch of 256
# at lr 0.1 (lr = 0.1 x global batch / 256).
IMAGENET_GPUS, IMAGENET_GLOBAL_BATCH = 8, 256


def imagenet_common(output: str) -> dict:
    return {
        "data": {"dataset": "imagefolder", "root": "data/imagenet", "image_size": 224,
                 "batch_size": IMAGENET_GLOBAL_BATCH // IMAGENET_GPUS, "num_workers": 8},
        "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1.0e-4, "schedule": "step",
                  "milestones": [30, 60, 90], "gamma": 0.1},
        "train": {"epochs": 100, "log_every": 100, "precision": "bf16",
                  "output_dir": f"runs/imagenet/{output}"},
        "engine": {"name": "deepspeed", "zero_stage": 1},
    }


def recipe(settings: dict, student: str, teacher: str | None, common: dict,
           dataset: str) -> dict:
    """A recipe file's values: the model, then `common` with the method's `settings` (its
    sections, and any of `common`'s keys it sets) in the sections' usual order."""
    model = {"student": student}
    if teacher is not None:
        model.update(teacher=teacher,
                     teacher_checkpoint=f"runs/{dataset}/vanilla_{teacher}/last.pt")
    sections = {"data": common["data"], **{name: values for name, values in settings.items()
                                          if name not in common},
                "optim": common["optim"], "train": common["train"]}
    if "engine" in common:
        sections["engine"] = common["engine"]
    for name, values in settings.items():
        if name in common:
            sections[name] = {**common[name], **values}
    return {"model": model, **sections}


VANILLA = {"method": {"name": "vanilla"}}


def settings_for(row: Recipe, pair: tuple[str, str], dataset: str) -> dict:
    """The row's sections for `pair` on `dataset`: CIFAR-100's, or ImageNet's where it has
    its own, then the pair's own values."""
    settings = {**row.settings}
    if dataset == "imagenet" and row.imagenet_settings:
        settings.update({"method": row.settings["method"], **row.imagenet_settings})
    for name, values in row.pair_settings.get(pair, {}).items():
        settings[name] = {**settings.get(name, {}), **values}
    return settings


def render(header: str, values: dict) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def prose(text: str) -> str:
    """`text` wrapped to the width of the recipes' comments."""
    return textwrap.fill(text, width=96, break_on_hyphens=False)


def reproduces(row: Recipe, pair: tuple[str, str]) -> str:
    if pair in row.cifar100_top1:
        return f"Reproduces the published top-1 {row.cifar100_top1[pair]:.2f} ({row.published_in})."
    return (f"{row.label} has no published result for this pair: the settings of its published "
            f"pairs ({row.published_in}).")


def cifar_recipes() -> dict[str, str]:
    files = {}
    published = {}
    for (teacher, student), top1 in CIFAR_PAIRS.items():
        published.setdefault(student, top1)
        for row in method_recipes():
            name = f"{row.prefix}_{teacher}_{student}"
            header = prose(f"{row.title}: {teacher} -> {student} on CIFAR-100. "
                           f"{reproduces(row, (teacher, student))} The teacher comes from "
                           f"configs/cifar100/vanilla_{teacher}.yaml, or point "
                           f"model.teacher_checkpoint at CRD's public ckpt_epoch_240.pth for it.")
            files[f"cifar100/{name}.yaml"] = render(header, recipe(
                settings_for(row, (teacher, student), "cifar100"), student, teacher,
                cifar_common(student, name), "cifar100"))
    teachers = {teacher for teacher, _ in CIFAR_PAIRS}
    for model in sorted(teachers | set(published)):
        role = (f"the student baseline, published top-1 {published[model]:.2f}"
                if model in published else "a teacher of the published pairs")
        header = (f"{model} trained with cross-entropy on CIFAR-100: {role}\n(METHOD.md section "
                  f"5). RepDistiller's recipe: SGD, batch 64, 240 epochs, lr x0.1 at 150/180/210.")
        files[f"cifar100/vanilla_{model}.yaml"] = render(
            header, recipe(VANILLA, model, None, cifar_common(model, f"vanilla_{model}"),
                           "cifar100"))
    return files


def imagenet_launch(name: str) -> str:
    return (f"One node of {IMAGENET_GPUS} GPUs: deepspeed --num_gpus {IMAGENET_GPUS} $(which "
            f"cocord-fast) train configs/imagenet/{name}.yaml\ndata.batch_size is per GPU: "
            f"G GPUs make a global batch of {IMAGENET_GLOBAL_BATCH // IMAGENET_GPUS} x G; scale "
            f"optim.lr with it\n(lr = 0.1 x global batch / {IMAGENET_GLOBAL_BATCH}) or set "
            f"data.batch_size = {IMAGENET_GLOBAL_BATCH} / G.")


def imagenet_recipes() -> dict[str, str]:
    files = {}
    for teacher, student in IMAGENET_PAIRS:
        for row in method_recipes():
            name = f"{row.prefix}_{teacher}_{student}"
            result = row.imagenet_results.get((teacher, student))
            target = (f"Reproduces {result}." if result else
                      f"{row.label} has no published result for this pair: the settings of its "
                      f"published ImageNet pair.")
            header = (prose(f"{row.title}: {teacher} -> {student} on ImageNet (an ImageFolder "
                            f"tree), batch 256, lr 0.1, 100 epochs (METHOD.md). {target} A "
                            f"torchvision state dict works as teacher.")
                      + f"\n{imagenet_launch(name)}")
            files[f"imagenet/{name}.yaml"] = render(header, recipe(
                settings_for(row, (teacher, student), "imagenet"), student, teacher,
                imagenet_common(name), "imagenet"))
    for model in sorted({m for pair in IMAGENET_PAIRS for m in pair}):
        header = (f"{model} trained with cross-entropy on ImageNet: a teacher or the student "
                  f"baseline\nof the ImageNet pairs.\n{imagenet_launch(f'vanilla_{model}')}")
        files[f"imagenet/vanilla_{model}.yaml"] = render(
            header, recipe(VANILLA, model, None, imagenet_common(f"vanilla_{model}"),
                           "imagenet"))
    return files


# Pretrained teachers from the libraries for resnet18 (model.teacher_weights): torchvision's
# official ResNet-34 (the paper's ImageNet pair), and a timm teacher of another family, with
# the preprocessing each was trained with (the run takes it from the library).
PRETRAINED_TEACHERS = {
    "torchvision-resnet34": ("torchvision:resnet34", "IMAGENET1K_V1", "73.31",
                             "bilinear, resize 256, crop 224"),
    "timm-convnext_tiny": ("timm:convnext_tiny", "fb_in1k", "82.07",
                           "bicubic, resize 256, crop 224"),
}


def pretrained_teacher_recipes() -> dict[str, str]:
    files = {}
    for label, (teacher, weights, top1, preprocessing) in PRETRAINED_TEACHERS.items():
        name = f"cocord_{label}_resnet18"
        header = (f"CoCoRD: {teacher} -> resnet18 on ImageNet, the teacher with its library's "
                  f"pretrained\nweights {weights} (top-1 {top1} as published), fetched on the "
                  f"first start; the data takes\nthe teacher's preprocessing ({preprocessing}) "
                  f"(README: Any teacher).\n{imagenet_launch(name)}")
        cocord = next(row for row in method_recipes() if row.prefix == "cocord")
        values = recipe(settings_for(cocord, ("", ""), "imagenet"), "resnet18", None,
                        imagenet_common(name), "imagenet")
        values["model"].update(teacher=teacher, teacher_weights=weights)
        files[f"imagenet/{name}.yaml"] = render(header, values)
    return files


def all_recipes() -> dict[str, str]:
    return {**cifar_recipes(), **imagenet_recipes(), **pretrained_teacher_recipes()}


if __name__ == "__main__":
    for relative, text in all_recipes().items():
        path = ROOT / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(all_recipes())} recipes under {ROOT}")
