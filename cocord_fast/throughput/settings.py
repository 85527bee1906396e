"""What `cocord-fast bench` measures, and the checks that refuse a bad setting before any work.

Defaults are the GPU case (ImageNet's resnet34 -> resnet18 at 224 px, batch 256, bf16);
`CPU_QUICK` is a run of a few minutes on a 2-core machine (the CIFAR pair at 32 px).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

RESULTS = Path("bench/results")  # from the repository root: where results are committed

# torch, the config and the zoo are imported where they are used: the CLI reads this module's
# choices to build its parser, and `cocord-fast --help` should not wait for torch.

# The trainer's `train.compile` takes these; "off" reads as false there (YAML).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
DATA_MODES = ("resident", "pipeline")
CIFAR_SIZE = 32  # the synthetic data set is CIFAR-100's format, so its pipeline yields 32 px

# Config keys the bench sets from its own options: an override of one would mislabel the rows.
OWNED_KEYS = {"method.name": "--methods", "model.student": "--student",
              "model.teacher": "--teacher", "data.batch_size": "--batch-size",
              "data.image_size": "--image-size", "train.precision": "--precision",
              "train.compile": "--compile", "train.device": "--device",
              "train.output_dir": "nothing (the bench uses a temporary folder)"}

CPU_QUICK = {"teacher": "resnet32x4", "student": "resnet8x4", "image_size": 32,
             "batch_size": 64, "steps": 3, "warmup": 1, "rounds": 2, "precision": "fp32",
             "device": "cpu"}


@dataclass
class BenchSettings:
    teacher: str = "resnet34"
    student: str = "resnet18"
    image_size: int = 224
    batch_size: int = 256
    methods: tuple[str, ...] = ()  # empty: every registered method (`check` fills it in)
    steps: int = 20  # timed steps per entry and round
    warmup: int = 5  # untimed steps per entry before the rounds (compilation happens here)
    rounds: int = 3
    precision: str = "bf16"
    compile: str = "off"
    device: str = "auto"
    data: str = "resident"
    num_train: int = 50_000  # synthetic training set: CIFAR-100's size, so CRD's banks are too
    overrides: tuple[str, ...] = ()
    out: Path = RESULTS

    @classmethod
    def from_options(cls, given: dict, cpu_quick: bool,
                     overrides: tuple[str, ...]) -> BenchSettings:
        """The settings `cocord-fast bench` options give: the GPU recipe, or `CPU_QUICK`'s
        where asked or where there is no GPU and no --device, then the options given."""
        import torch

        if not cpu_quick and "device" not in given and not torch.cuda.is_available():
            # The GPU recipe takes hours on a few cores; on the CPU only when asked for.
            print("no GPU here: running the CPU recipe (--cpu-quick); --device cpu runs the GPU "
                  "recipe on the CPU", flush=True)
            cpu_quick = True
        return cls(**{**(CPU_QUICK if cpu_quick else {}), **given}, overrides=overrides)

    def resolved_device(self) -> torch.device:
        import torch

        name = "cuda" if self.device == "auto" and torch.cuda.is_available() else self.device
        name = "cpu" if name == "auto" else name
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N") \
                from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: CUDA is not available on this machine")
        if device.type not in ("cpu", "cuda"):
            raise UserError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        return device

    def user_data(self) -> bool:
        """Whether the overrides point the trainer at a data set of the user's."""
        return any(text.startswith("data.root=") for text in self.overrides)

    def check(self) -> None:
        """Every setting a user can get wrong, named by its option, before anything is built."""
        from ..config import load_config
        from ..plugins import METHODS
        from ..models import MODELS

        for option, name in (("--teacher", self.teacher), ("--student", self.student)):
            if name not in MODELS:
                raise UserError(f"{option}: unknown model {name!r}; known models: "
                                f"{', '.join(MODELS)}")
        self.methods = self.methods or tuple(METHODS.names())
        for name in self.methods:
            METHODS.get(name, "--methods")
        if len(set(self.methods)) < len(self.methods):
            raise UserError(f"--methods: {' '.join(self.methods)} names a method twice")
        for option, value, least in (("--steps", self.steps, 1), ("--rounds", self.rounds, 1),
                                     ("--warmup", self.warmup, 0),
                                     ("--batch-size", self.batch_size, 1),
                                     ("--image-size", self.image_size, 8),
                                     ("--num-train", self.num_train, 1)):
            if value < least:
                raise UserError(f"{option}: {value} is below the minimum {least}")
        if self.num_train < self.batch_size and not self.user_data():
            raise UserError(f"--num-train {self.num_train} is less than one batch "
                            f"(--batch-size {self.batch_size})")
        if self.compile not in COMPILE_MODES:
            raise UserError(f"--compile: {self.compile!r} is not one of "
                            f"{', '.join(COMPILE_MODES)}")
        if self.data not in DATA_MODES:
            raise UserError(f"--data: {self.data!r} is not one of {', '.join(DATA_MODES)}")
        if self.data == "pipeline" and self.image_size != CIFAR_SIZE and not self.user_data():
            raise UserError(f"--data pipeline --image-size {self.image_size}: the synthetic data "
                            f"set is CIFAR-100's format (32 px); give a data set of that size "
                            f"with --override data.dataset=imagefolder --override data.root=DIR")
        for text in self.overrides:
            key = text.partition("=")[0]
            if key in OWNED_KEYS:
                raise UserError(f"--override {text}: the bench sets {key} itself; use "
                                f"{OWNED_KEYS[key]}")
        self.resolved_device()
        # Unknown keys, wrong types and ranges, all named by the config's own checks.
        load_config(overrides=list(self.overrides))

    def trainer_overrides(self, method: str, data_root: Path | None, teacher_checkpoint: Path,
                          output_dir: Path) -> list[str]:
        """The overrides of one method's `Trainer`: the bench's settings, then the user's."""
        # The synthetic set's images are 32 px, never resized: the image size only sizes
        # resident batches, which the bench makes itself. A user's data set takes it.
        data = ([f"data.image_size={self.image_size}"] if data_root is None
                else ["data.dataset=cifar100", f"data.root={data_root}"])
        # The loader is never iterated on resident batches: no worker processes are started.
        workers = ["data.num_workers=0"] if self.data == "resident" else []
        return [f"method.name={method}", f"model.student={self.student}",
                f"model.teacher={self.teacher}", f"model.teacher_checkpoint={teacher_checkpoint}",
                *data, *workers, f"data.batch_size={self.batch_size}",
                f"train.precision={self.precision}",
                f"train.compile={self.compile}", f"train.device={self.resolved_device()}",
                f"train.output_dir={output_dir}", "train.progress=false", *self.overrides]

    def describe(self) -> dict:
        """The settings as the report records them."""
        return {"teacher": self.teacher, "student": self.student, "image_size": self.image_size,
                "batch_size": self.batch_size, "methods": list(self.methods),
                "steps": self.steps, "warmup": self.warmup, "rounds": self.rounds,
                "precision": self.precision, "compile": self.compile, "data": self.data,
                "overrides": list(self.overrides)}
