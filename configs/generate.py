"""Writes the CIFAR-100 and ImageNet recipes from one table: `python -m cocord_fast.configs.generate`.

Every recipe names what it reproduces. The committed YAML files are this script's output (a
test checks they agree), so a change to a shared setting is made here, once.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent

# METHOD.md section 5: (teacher, student) -> published top-1 of vanilla student, KD, CRD,
# CoCoRD, CoCoRD+KD.
CIFAR_PAIRS = {
    ("wrn_40_2", "wrn_16_2"): (73.26, 74.92, 75.48, 75.48, 75.90),
    ("wrn_40_2", "wrn_40_1"): (71.98, 73.54, 74.14, 75.17, 75.25),
    ("resnet56", "resnet20"): (69.06, 70.66, 71.16, 71.74, 72.09),
    ("resnet110", "resnet20"): (69.06, 70.67, 71.46, 72.11, 72.18),
    ("resnet110", "resnet32"): (71.14, 73.08, 73.48, 74.10, 74.37),
    ("resnet32x4", "resnet8x4"): (72.50, 73.33, 75.51, 75.29, 75.42),
    ("vgg13", "vgg8"): (70.36, 72.98, 73.94, 73.99, 74.26),
    ("vgg13", "MobileNetV2"): (64.60, 67.37, 69.73, 69.86, 69.90),
    ("ResNet50", "MobileNetV2"): (64.60, 67.35, 69.11, 70.22, 70.30),
    ("ResNet50", "vgg8"): (70.36, 73.81, 74.30, 74.52, 74.62),
    ("resnet32x4", "ShuffleV1"): (70.50, 74.07, 75.11, 75.99, 76.48),
    ("resnet32x4", "ShuffleV2"): (71.82, 74.45, 75.65, 77.28, 77.39),
    ("wrn_40_2", "ShuffleV1"): (70.50, 74.83, 76.05, 76.42, 76.56),
}
# As in CRD: the light students train at lr 0.01, the others at 0.05.
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
IMAGENET_PAIRS = [("resnet34", "resnet18"), ("resnet101", "resnet50")]

METHOD_SETTINGS = {
    "kd": {"method": {"name": "kd"}, "kd": {"temperature": 4.0, "loss_cls": 0.1, "loss_kd": 0.9}},
    "crd": {"method": {"name": "crd"}, "crd": {"loss_cls": 1.0, "loss_crd": 0.8, "loss_kd": 0.0}},
    "cocord": {"method": {"name": "cocord"}, "cocord": {"loss_cls": 1.0, "loss_ctr": 1.0,
                                                        "loss_pred": 4.0, "loss_kd": 0.0}},
    "cocord_kd": {"method": {"name": "cocord"}, "cocord": {"loss_cls": 1.0, "loss_ctr": 1.0,
                                                           "loss_pred": 4.0, "loss_kd": 1.0}},
}
METHOD_TITLES = {"vanilla": "cross-entropy only", "kd": "KD (Hinton)", "crd": "CRD",
                 "cocord": "CoCoRD", "cocord_kd": "CoCoRD+KD"}


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


def recipe(method: str, student: str, teacher: str | None, common: dict, dataset: str) -> dict:
    model = {"student": student}
    if teacher is not None:
        model.update(teacher=teacher,
                     teacher_checkpoint=f"runs/{dataset}/vanilla_{teacher}/last.pt")
    settings = METHOD_SETTINGS.get(method, {"method": {"name": "vanilla"}})
    result = {"model": model, "data": common["data"], **settings}
    if method.startswith("cocord") and dataset == "imagenet":
        result["cocord"] = {"queue_size": 16384, **result["cocord"]}
    engine = {"engine": common["engine"]} if "engine" in common else {}
    return {**result, "optim": common["optim"], "train": common["train"], **engine}


def render(header: str, values: dict) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def cifar_recipes() -> dict[str, str]:
    files = {}
    published = {}
    for (teacher, student), top1 in CIFAR_PAIRS.items():
        published.setdefault(student, top1[0])
        for method, value in zip(("kd", "crd", "cocord", "cocord_kd"), top1[1:]):
            name = f"{method}_{teacher}_{student}"
            header = (f"{METHOD_TITLES[method]}: {teacher} -> {student} on CIFAR-100.\n"
                      f"Reproduces the published top-1 {value:.2f} (METHOD.md section 5). The "
                      f"teacher comes from\nconfigs/cifar100/vanilla_{teacher}.yaml, or point "
                      f"model.teacher_checkpoint at CRD's public\nckpt_epoch_240.pth for it.")
            files[f"cifar100/{name}.yaml"] = render(
                header, recipe(method, student, teacher, cifar_common(student, name), "cifar100"))
    teachers = {teacher for teacher, _ in CIFAR_PAIRS}
    for model in sorted(teachers | set(published)):
        role = (f"the student baseline, published top-1 {published[model]:.2f}"
                if model in published else "a teacher of the published pairs")
        header = (f"{model} trained with cross-entropy on CIFAR-100: {role}\n(METHOD.md section "
                  f"5). RepDistiller's recipe: SGD, batch 64, 240 epochs, lr x0.1 at 150/180/210.")
        files[f"cifar100/vanilla_{model}.yaml"] = render(
            header, recipe("vanilla", model, None, cifar_common(model, f"vanilla_{model}"),
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
        for method in ("kd", "crd", "cocord", "cocord_kd"):
            name = f"{method}_{teacher}_{student}"
            header = (f"{METHOD_TITLES[method]}: {teacher} -> {student} on ImageNet (an "
                      f"ImageFolder tree).\nThe paper's ImageNet recipe is not public: batch "
                      f"256, lr 0.1, 100 epochs (METHOD.md).\nCRD reports 71.38 top-1 for "
                      f"resnet34 -> resnet18 with CRD+KD; CoCoRD reports resnet101 ->\nresnet50 "
                      f"0.2 points above its teacher. A torchvision state dict works as teacher.\n"
                      f"{imagenet_launch(name)}")
            files[f"imagenet/{name}.yaml"] = render(
                header, recipe(method, student, teacher, imagenet_common(name), "imagenet"))
    for model in sorted({m for pair in IMAGENET_PAIRS for m in pair}):
        header = (f"{model} trained with cross-entropy on ImageNet: a teacher or the student "
                  f"baseline\nof the ImageNet pairs.\n{imagenet_launch(f'vanilla_{model}')}")
        files[f"imagenet/vanilla_{model}.yaml"] = render(
            header, recipe("vanilla", model, None, imagenet_common(f"vanilla_{model}"),
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
        values = recipe("cocord", "resnet18", None, imagenet_common(name), "imagenet")
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
