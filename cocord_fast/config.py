"""Typed run configuration: defaults in code <- YAML file <- `section.key=value` overrides.

Every field is declared once here, with its type, its allowed values or range, and a one-line
help text. Unknown keys, wrong types and out-of-range values are `UserError`s naming the field,
raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError
from .plugins import METHODS, SOURCES, Registry


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            pattern: str | None = None, pattern_help: str = "",
            registry: Registry | None = None) -> Any:
    """A config field: its default, help text and checks (a range, a pattern, or the name of a
    plugin in `registry`). Method settings (a method's section) are declared with it too."""
    metadata = {"help": help, "min": min, "max": max, "pattern": pattern,
                "pattern_help": pattern_help, "registry": registry}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    student: str = setting("resnet8", "student architecture: a zoo name, timm:<name> or "
                                     "torchvision:<name> (see `cocord-fast models`)")
    teacher: str = setting("", "teacher architecture, named as the student; empty for methods "
                              "without a teacher")
    teacher_checkpoint: str = setting(
        "", "teacher weights: a cocord_fast checkpoint, a RepDistiller checkpoint ({'model': "
        "state_dict}) or a plain state dict")
    teacher_weights: str = setting(
        "", "instead of teacher_checkpoint, for a timm:/torchvision: teacher: pretrained (the "
        "library's default), a torchvision weights name (IMAGENET1K_V1), a timm tag (a1_in1k) "
        "or a weights file of the library")
    student_weights: str = setting(
        "", "the student's starting weights, in the forms of teacher_weights (a classifier for "
        "other classes starts anew); empty: random")


@dataclass
class DataConfig:
    dataset: str = setting(
        "demo", "the data source: demo (made offline), cifar100 (cifar-100-python folder), "
        "imagefolder (train/<class>/ and val/<class>/), shards (train/*.tar and val/*.tar, "
        "WebDataset), or one a package adds (see `cocord-fast sources`)", registry=SOURCES)
    root: str = setting("", "data directory; for demo, empty means the cache directory")
    download: bool = setting(False, "cifar100 only: download into root if it is missing")
    image_size: int = setting(0, "imagefolder and shards: training crop and evaluation size; 0: "
                             "a pretrained teacher's input size, else 224", min=0)
    batch_size: int = setting(64, "training batch size (per process)", min=1)
    eval_batch_size: int = setting(256, "evaluation batch size", min=1)
    num_workers: int = setting(
        2, "data-loading worker processes (torch) or threads (DALI, at least 1)", min=0)
    backend: Literal["auto", "dali", "torch"] = setting(
        "auto", "data pipeline: dali (GPU decode on CUDA, CPU-only pipeline otherwise), torch "
        "(torchvision + DataLoader), auto (dali where installed)")
    read_ahead: bool = setting(True, "dali only: read the next batch's files while this one "
                              "trains (off: the training thread waits for each batch's reads)")
    skip_corrupt: bool = setting(False, "replace an unreadable image by the next readable one "
                                "(evaluation: drop it) and count it, instead of stopping")
    mean: list[float] = setting([], "per-channel mean (red, green, blue) on the [0, 1] scale; "
                               "empty: a pretrained teacher's (model.teacher_weights), else the "
                               "data set's")
    std: list[float] = setting([], "per-channel std, as data.mean", min=0.0)
    interpolation: Literal["", "bilinear", "bicubic"] = setting(
        "", "imagefolder and shards: resize filter of crops and evaluation; empty: a pretrained "
        "teacher's, else bilinear")
    crop_pct: float = setting(0.0, "imagefolder and shards: evaluation keeps this share of its "
                             "resize in the centre crop (0.875: resize 256, crop 224); 0: a "
                             "pretrained teacher's, else 0.875", min=0.0, max=1.0)
    crop_mode: Literal["", "center", "squash", "border"] = setting(
        "", "imagefolder and shards: how evaluation fits an image to its crop: center (resize "
        "the shorter side, crop the centre), squash (resize both sides, crop), border (resize "
        "the longer side, pad with the mean colour); empty: a pretrained teacher's, else center")


@dataclass
class MethodConfig:
    name: str = setting("vanilla", "training method; its settings are in the section of the same "
                        "name (see `cocord-fast methods`)", registry=METHODS)


@dataclass
class OptimConfig:
    lr: float = setting(0.05, "base learning rate", min=0.0)
    momentum: float = setting(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = setting(False, "Nesterov momentum")
    weight_decay: float = setting(5e-4, "L2 weight decay", min=0.0)
    schedule: Literal["step", "cosine"] = setting("step", "learning-rate schedule after warm-up")
    milestones: list[int] = setting([150, 180, 210], "step schedule: epochs at which lr *= gamma")
    gamma: float = setting(0.1, "step schedule: decay factor", min=0.0)
    warmup_epochs: float = setting(0.0, "linear warm-up from 0 over this many epochs", min=0.0)
    grad_clip: float = setting(0.0, "clip the global gradient norm to this value; 0: no clipping",
                              min=0.0)
    grad_accum_steps: int = setting(1, "micro-batches of data.batch_size per optimizer step", min=1)


@dataclass
class TrainConfig:
    epochs: int = setting(240, "length of the schedule in epochs", min=1)
    max_steps: int = setting(0, "stop after this many optimizer steps; 0 runs the whole "
                                "schedule", min=0)
    log_every: int = setting(50, "log metrics every this many steps", min=1)
    eval_every: int = setting(1, "evaluate every this many epochs", min=1)
    ckpt_every: int = setting(0, "also keep a checkpoint every this many steps; 0: only last "
                                 "and best", min=0)
    keep_last: int = setting(0, "keep only the newest this many step_N.pt checkpoints; 0: keep all",
                            min=0)
    output_dir: str = setting("runs/default", "run directory: config, checkpoints, metrics")
    seed: int = setting(0, "seed for weights, data order and augmentation", min=0)
    resume: str = setting("", "'auto' continues the run in output_dir if there is one; or a run "
                             "directory or checkpoint file to continue")
    resume_on_changed_data: bool = setting(
        False, "continue a run whose data changed since its checkpoint (other samples, names, "
               "labels or classes: its data position then names other images); never for CRD "
               "with another number of training samples")
    device: str = setting("auto", "auto (cuda if available), cpu, cuda or cuda:N",
                         pattern=r"auto|cpu|cuda(:[0-9]+)?",
                         pattern_help="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = setting("fp32", "bf16 runs forward passes under autocast")
    kernels: Literal["auto", "triton", "torch"] = setting(
        "auto", "fused ops (CoCoRD's queue InfoNCE and momentum update, CRD's bank scores): "
        "auto = Triton on CUDA, torch otherwise")
    compile: Literal[False, True, "default", "reduce-overhead", "max-autotune"] = setting(
        False, "torch.compile the encoders (student, teacher, slow student) in this mode; true "
        "is default; reduce-overhead also replays them as CUDA graphs")
    progress: bool = setting(True, "show a progress bar")
    stop_signals: list[str] = setting(
        ["SIGTERM", "SIGUSR1"], "signals that end the run after the current step with last.pt "
        "saved (exit code 75); a scheduler's pre-emption")


@dataclass
class EngineConfig:
    """What wraps the trainable part of the method (README, "Multi-GPU and multi-node")."""

    name: Literal["torch", "deepspeed"] = setting(
        "torch", "torch (one process, or DistributedDataParallel under torchrun or the deepspeed "
        "launcher) or deepspeed (a DeepSpeed engine, ZeRO stage engine.zero_stage)")
    zero_stage: int = setting(0, "deepspeed only: ZeRO stage 0, 1 (partitioned optimizer state) or "
                                "2 (and gradients)", min=0, max=3)
    deepspeed_config: str = setting("", "deepspeed only: a DeepSpeed JSON file for the settings "
                                       "cocord_fast does not set itself (e.g. communication)")
    deepspeed_overrides: dict = setting(
        {}, "deepspeed only: DeepSpeed settings applied last, as a mapping, e.g. "
            "{zero_optimization: {overlap_comm: true}}")
    timeout_s: float = setting(
        600.0, "seconds a process waits for the others in a collective before it stops the run "
        "(a stuck or dead process); long enough for rank 0 to write a checkpoint", min=1.0)


def method_settings() -> dict[str, Any]:
    """Every registered method's settings at their defaults, by section (the method's name)."""
    return {name: method.settings() for name, method in METHODS.all().items()
            if method.settings is not None}


@dataclass
class Config:
    """The run's settings. Besides the sections below, each registered method with settings
    has a section of its name (`cfg.cocord`, `cfg.dkd`), held in `method_settings`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    method_settings: dict[str, Any] = field(default_factory=method_settings, repr=False)

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes
        settings = self.__dict__.get("method_settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"the config has no section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("method_settings", {}):
            self.method_settings[name] = value
        else:
            super().__setattr__(name, value)

    def sections(self) -> dict[str, Any]:
        """Section name -> settings, in the order a config file lists them: the method's
        sections follow `method`."""
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "method_settings"}
        head = ("model", "data", "method")
        return {**{name: fixed[name] for name in head}, **self.method_settings,
                **{name: section for name, section in fixed.items() if name not in head}}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The run's settings: every section but the other methods' (what a run saves, so
        that its config reads wherever its own method is installed)."""
        others = set(self.method_settings) - {self.method.name}
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()
                if name not in others}


def _check_value(name: str, annotation: Any, value: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Returns `value` converted to `annotation`'s type, or raises a UserError naming `name`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        # By type as well as value: `0 == False`, and `1 == True`, must not pass as booleans.
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            names = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            raise UserError(f"{name}: {value!r} is not one of {names}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise UserError(f"{name}: expected a list of {item_type.__name__}, got {value!r}")
        return [_check_value(f"{name}[{i}]", item_type, v, meta) for i, v in enumerate(value)]
    if annotation is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if meta.get("registry") is not None and isinstance(value, str):
            meta["registry"].get(value, name)  # raises, naming the known ones
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML read it as a number (`1e-3`, `010`), so its text is already lost.
            raise UserError(f"{name}: expected a string, got the number {value!r}; quote it, "
                            f"e.g. {name}='\"TEXT\"'")
        if not isinstance(value, str):
            raise UserError(f"{name}: expected a string, got {value!r}")
        if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
            raise UserError(f"{name}: {value!r} is not {meta['pattern_help']}")
        return value
    if annotation is float and isinstance(value, str):
        # PyYAML reads exponent literals without a dot (`5e-4`) as strings.
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{name}: expected float, got {value!r}") from None
    if annotation in (int, float):
        numeric = (int, float) if annotation is float else (int,)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise UserError(f"{name}: expected {annotation.__name__}, got {value!r}")
        value = annotation(value)
        if meta.get("min") is not None and value < meta["min"]:
            raise UserError(f"{name}: {value} is below the minimum {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            raise UserError(f"{name}: {value} is above the maximum {meta['max']}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {name}")


def _merge_section(section: Any, section_name: str, values: Any) -> None:
    if not isinstance(values, dict):
        raise UserError(f"{section_name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(type(section))
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"unknown key '{section_name}.{key}'; valid keys in '{section_name}': "
                            f"{', '.join(fields)}")
        checked = _check_value(f"{section_name}.{key}", hints[key], value, fields[key].metadata)
        setattr(section, key, checked)


def merge(config: Config, values: dict[str, Any], source: str = "",
          skip_unknown: bool = False) -> Config:
    """Applies a nested `{section: {key: value}}` mapping onto `config` in place. With
    `skip_unknown`, sections no registered method has are passed over (a saved config's
    sections of a plugin that is gone)."""
    if not isinstance(values, dict):
        raise UserError(f"{source or 'config'}: expected a mapping of sections, got {values!r}")
    sections = config.sections()
    for section_name, section_values in values.items():
        if section_name not in sections and skip_unknown:
            continue
        if section_name not in sections:
            where = f" in {source}" if source else ""
            raise UserError(f"unknown config section '{section_name}'{where}; valid sections: "
                            f"{', '.join(sections)}")
        _merge_section(getattr(config, section_name), section_name, section_values)
    return config


def parse_override(text: str) -> dict[str, dict[str, Any]]:
    """`'optim.lr=0.1'` -> `{'optim': {'lr': 0.1}}`; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not section or not name:
        raise UserError(f"override {text!r}: expected section.key=value, e.g. optim.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"override {text!r}: value is not valid YAML ({err})") from None
    return {section: {name: value}}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    return values or {}


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Defaults <- `base` (e.g. a resumed run's saved config) <- YAML file <- overrides."""
    config = Config()
    if base is not None:
        merge(config, base, "saved config", skip_unknown=True)
    if path is not None:
        merge(config, read_yaml(path), str(path))
    for text in overrides:
        merge(config, parse_override(text), f"override {text!r}")
    return config


def save_config(config: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe_fields() -> str:
    """Every config key with its default and help text, for `cocord-fast config`."""
    lines = []
    for name, section in Config().sections().items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(section):
            default = yaml.safe_dump(getattr(section, f.name), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f.name}: {default or repr('')}    # {f.metadata['help']}")
    return "\n".join(lines)
