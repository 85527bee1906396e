"""`cocord-fast`: train, eval, export, import reference checkpoints, and look up configs
and models."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

from .errors import StageExited, UserError

TRAIN_EPILOG = """\
examples:
  cocord-fast train                                  # the offline demo (cocord-fast demo)
  cocord-fast train configs/demo/teacher.yaml        # one stage of it
  cocord-fast train configs/cifar100/vanilla_resnet56.yaml data.root=~/data optim.lr=0.1
  cocord-fast train --resume runs/demo/cocord               # continue a stopped run

overrides are section.key=value (the value is read as YAML); `cocord-fast config` lists every key.
"""


DEMO_EPILOG = """\
examples:
  cocord-fast demo                                   # the same as `cocord-fast train`
  cocord-fast demo --seeds 0,1,2                     # three times over, then mean ± std
  cocord-fast demo --seeds 0,1,2 data.backend=torch  # the torchvision data path throughout
"""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def seed_list(text: str) -> tuple[int, ...]:
    """--seeds 0,1,2: distinct non-negative integers."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def _split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading CONFIG.yaml and the section.key=value overrides."""
    config = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if config is not None else args
    for text in overrides:
        if "=" not in text:
            raise UserError(f"unexpected argument {text!r}: expected section.key=value "
                            f"(only one CONFIG.yaml, first)")
    return config, overrides


def cmd_train(ns: argparse.Namespace) -> int:
    from .default_job import train_command

    config_path, overrides = _split_train_args(ns.args)
    if ns.resume and config_path:
        raise UserError("--resume continues a run with its saved config; give overrides only")
    train_command(config_path, overrides, ns.resume)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .default_job import run_default_job

    config_path, overrides = _split_train_args(ns.overrides)
    if config_path is not None:
        raise UserError(f"unexpected argument {config_path!r}: the demo takes its recipes from "
                        f"configs/demo/ and only section.key=value overrides")
    run_default_job(ns.seeds, Path(ns.out), tuple(overrides))
    return 0


def cmd_index(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.build import index_data_root

    for line in index_data_root(Path(ns.root).expanduser(), ns.threads):
        print(line, flush=True)
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.shard_writer import convert

    convert(Path(ns.source).expanduser(), Path(ns.target).expanduser(), ns.samples_per_shard,
            ns.threads)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .training.evaluate import describe_samples
    from .training.evaluate_checkpoint import evaluate_checkpoint

    overrides = [f"data.{k}={v}" for k, v in (("root", ns.data), ("dataset", ns.dataset),
                                              ("eval_batch_size", ns.batch_size),
                                              ("num_workers", ns.workers)) if v is not None]
    result = evaluate_checkpoint(ns.checkpoint, overrides, ns.device)
    print(f"{ns.checkpoint}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
          f"({describe_samples(result)})")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .compare import compare

    out = Path(ns.out) if ns.out else Path(ns.runs[0]).parent / "compare"
    print(compare([Path(run) for run in ns.runs], out))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .training.evaluate_checkpoint import export_student

    names = export_student(ns.checkpoint, ns.out, ns.key)
    print(f"wrote {len(names)} tensors of the student to {ns.out}")
    return 0


def cmd_methods(ns: argparse.Namespace) -> int:
    from .methods import describe_methods

    print(describe_methods())
    return 0


def cmd_sources(ns: argparse.Namespace) -> int:
    from .data.sources import describe_sources

    print(describe_sources())
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    import yaml

    from .config import describe_fields, load_config

    if not ns.args:
        print(describe_fields())
        return 0
    config_path, overrides = _split_train_args(ns.args)
    print(yaml.safe_dump(load_config(config_path, overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from .models import describe_models

    for line in describe_models(ns.timm, ns.torchvision, ns.num_classes):
        print(line, flush=True)
    return 0


BENCH_EPILOG = """\
examples:
  cocord-fast bench --cpu-quick        # resnet32x4 -> resnet8x4, 32 px: minutes on 2 cores
  cocord-fast bench                    # GPU: resnet34 -> resnet18, 224 px, batch 256, bf16
                                       # (without a GPU: --cpu-quick, unless --device is given)
  cocord-fast bench --compile default --methods cocord --steps 50
  cocord-fast bench --cpu-quick --data pipeline --override data.num_workers=2

per method: images/s, median and p90 step time, peak memory, bank memory, warm-up, and the share
of its model-only floor (its networks' forward/backward alone); JSON and PNG go to --out.
"""


def cmd_bench(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .throughput import bench
    from .throughput.settings import BenchSettings

    given = {key: getattr(ns, key) for key in (
        "teacher", "student", "image_size", "batch_size", "steps", "warmup", "rounds",
        "precision", "compile", "device", "data", "num_train") if getattr(ns, key) is not None}
    if ns.methods is not None:
        given["methods"] = tuple(ns.methods)
    if ns.out is not None:
        given["out"] = Path(ns.out)
    bench(BenchSettings.from_options(given, ns.cpu_quick, tuple(ns.override or ())))
    return 0


IMPORT_EPILOG = """\
example:
  cocord-fast import-reference checkpoint.pth runs/cocord_r56_r20 --student resnet20 \\
      --teacher resnet56 data.dataset=cifar100 data.root=~/data
  cocord-fast train --resume runs/cocord_r56_r20 data.root=~/data

the reference settings its checkpoint does not hold (T, momentum, b_momentum, loss weights) are
given as cocord.temperature, cocord.teacher_head_momentum, cocord.student_momentum,
cocord.loss_ctr, cocord.loss_cls, cocord.loss_pred; their defaults are the reference's.
"""


def cmd_import_reference(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from .reference_import import import_reference

    print(import_reference(Path(ns.ref_ckpt), Path(ns.out_dir), ns.student, ns.teacher,
                           ns.num_classes, ns.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocord-fast", description="Contrastive knowledge distillation (CoCoRD, CRD, KD).")
    # The deepspeed launcher puts --local_rank=N before every worker's arguments; the rank
    # is read from the environment (LOCAL_RANK), which both launchers set.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (no arguments: the offline demo)",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR (or from a checkpoint file)")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser(
        "demo", help="the offline default job: a teacher, then the student alone and with KD, "
                     "CRD and CoCoRD, compared", epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--seeds", type=seed_list, default=(0,), metavar="S[,S...]",
                      help="run the whole job once per seed and end with the mean and standard "
                           "deviation over them (default: 0, which `cocord-fast train` runs)")
    demo.add_argument("--out", default="runs/demo",
                      help="where the runs go: seed 0 in OUT/<stage>, seed S in OUT/seedS/<stage>")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="applied to every stage (e.g. data.backend=torch)")
    demo.set_defaults(func=cmd_demo)

    index = sub.add_parser(
        "index", help="index a data root ahead of a job (files or shards, labels, sizes)",
        description="Lists ROOT/train and ROOT/val anew (class folders of images, or tar "
                    "shards) and reads every image's size from its header; runs then read the "
                    "index instead of listing every file or reading every shard. It is written "
                    "beside the data, or under the cache directory where that folder is not "
                    "writable, and rebuilt by a run when a folder or shard changed.")
    index.add_argument("root", metavar="ROOT", help="the data root (data.root)")
    index.add_argument("--threads", type=positive_int, default=16,
                       help="header reads in flight (default 16: file systems over a network "
                            "want many)")
    index.set_defaults(func=cmd_index)

    convert = sub.add_parser(
        "convert", help="write an ImageFolder data root as tar shards (WebDataset layout)",
        description="Writes SOURCE/train and SOURCE/val (class folders of images) as "
                    "TARGET/train/shard-NNNNNN.tar and TARGET/val/shard-NNNNNN.tar, each sample "
                    "an image member and a .cls member holding its class number, in the "
                    "ImageFolder's order; the class names go to TARGET/classes.txt. Train on "
                    "them with data.dataset=shards data.root=TARGET.")
    convert.add_argument("source", metavar="SOURCE", help="the ImageFolder data root")
    convert.add_argument("target", metavar="TARGET", help="where the shards go")
    convert.add_argument("--samples-per-shard", type=positive_int, default=1000,
                         help="images per shard (default 1000: ~110 MB of ImageNet JPEGs)")
    convert.add_argument("--threads", type=positive_int, default=16,
                         help="image reads in flight (default 16)")
    convert.set_defaults(func=cmd_convert)

    evaluate = sub.add_parser("eval", help="top-1/top-5 of a checkpoint's student")
    evaluate.add_argument("checkpoint", help="a cocord_fast checkpoint (.pt)")
    evaluate.add_argument("--data", help="data root (default: the one the run trained on)")
    evaluate.add_argument("--dataset", help="the data source (default: the run's; see "
                                            "`cocord-fast sources`)")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--workers", type=int)
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.set_defaults(func=cmd_eval)

    comparison = sub.add_parser(
        "compare", help="runs side by side: accuracy, speed, memory, with plots",
        description="One table per student and data set; the first run given is the baseline.")
    comparison.add_argument("runs", nargs="+", metavar="RUN_DIR")
    comparison.add_argument("--out", help="where the JSON and plots go (default: "
                                          "RUN_DIR/../compare of the first run)")
    comparison.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="write the student alone, in its native parameter names")
    export.add_argument("checkpoint", help="a cocord_fast checkpoint (.pt)")
    export.add_argument("out", help="output file (.pth): a plain state dict")
    export.add_argument("--key", help="nest the state dict under this key (RepDistiller: 'model')")
    export.set_defaults(func=cmd_export)

    config = sub.add_parser("config", help="list every config key, or print a resolved config")
    config.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    config.set_defaults(func=cmd_config)

    methods = sub.add_parser("methods", help="list the training methods with their settings and "
                                             "defaults (method.name and its section)")
    methods.set_defaults(func=cmd_methods)

    sources = sub.add_parser("sources", help="list the data sources (data.dataset)")
    sources.set_defaults(func=cmd_sources)

    imp = sub.add_parser("import-reference",
                         help="turn a reference CoCoRD checkpoint into a run to resume",
                         epilog=IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("ref_ckpt", metavar="REF_CKPT",
                     help="checkpoint of ShipengFu/CoCoRD (checkpoint.pth or best.pth)")
    imp.add_argument("out_dir", metavar="OUT_DIR", help="new run directory")
    imp.add_argument("--student", required=True, help="student architecture of that run")
    imp.add_argument("--teacher", required=True, help="teacher architecture of that run")
    imp.add_argument("--num-classes", type=int, default=100)
    # Overrides may also follow the options; main() adds those (see there).
    imp.add_argument("overrides", nargs="*", metavar="section.key=value")
    imp.set_defaults(func=cmd_import_reference)

    add_bench_parser(sub)

    models = sub.add_parser(
        "models", help="list the model zoo, or timm's and torchvision's models by pattern",
        description="Each model's feature width (what the distillation heads read) and size. "
                    "Without options the zoo; --timm and --torchvision list the libraries' "
                    "classifiers whose names match a glob pattern, as model.student and "
                    "model.teacher take them (timm:<name>, torchvision:<name>).")
    models.add_argument("--num-classes", type=int, default=100)
    models.add_argument("--timm", nargs="?", const="*", metavar="PATTERN",
                        help="timm's models matching PATTERN (e.g. 'convnext*'; all without)")
    models.add_argument("--torchvision", nargs="?", const="*", metavar="PATTERN",
                        help="torchvision's classifiers matching PATTERN (all without)")
    models.set_defaults(func=cmd_models)
    return parser


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from .throughput.settings import COMPILE_MODES, CPU_QUICK, DATA_MODES, BenchSettings

    default = BenchSettings()
    bench = sub.add_parser(
        "bench", help="training-step speed of each method against its networks alone",
        description="Times Trainer.train_step (autocast, forward, backward, optimizer step, "
                    "momentum updates) of each method, interleaved with its model-only floor.",
        epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Unset options take --cpu-quick's values with it (or without a GPU and --device), and the
    # GPU defaults otherwise.
    bench.add_argument("--teacher", help=f"teacher architecture (default {default.teacher})")
    bench.add_argument("--student", help=f"student architecture (default {default.student})")
    bench.add_argument("--image-size", type=int,
                       help=f"image side in pixels (default {default.image_size})")
    bench.add_argument("--batch-size", type=int,
                       help=f"images per step (default {default.batch_size})")
    bench.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="methods to time (default: every method `cocord-fast methods` "
                            "lists)")
    bench.add_argument("--steps", type=int,
                       help=f"timed steps per method and round (default {default.steps})")
    bench.add_argument("--warmup", type=int, help=f"steps per method before timing, reported "
                                                  f"apart (default {default.warmup})")
    bench.add_argument("--rounds", type=int,
                       help=f"interleaved rounds (default {default.rounds})")
    bench.add_argument("--precision", choices=["fp32", "bf16"],
                       help=f"default {default.precision}")
    bench.add_argument("--compile", choices=COMPILE_MODES,
                       help=f"train.compile of the trainers, whose networks the floors share "
                            f"(default {default.compile})")
    bench.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    bench.add_argument("--data", choices=DATA_MODES,
                       help="resident: one synthetic batch kept on the device (default); "
                            "pipeline: batches from the trainer's loader")
    bench.add_argument("--num-train", type=int,
                       help=f"images in the synthetic training set; CRD's banks hold one row "
                            f"per image (default {default.num_train}, CIFAR-100's size)")
    bench.add_argument("--out", help=f"folder for the JSON and PNG (default {default.out})")
    bench.add_argument("--override", action="append", metavar="section.key=value",
                       help="a config override for every trainer (repeatable); "
                            "data.root=DIR trains on that data set instead of a synthetic one")
    bench.add_argument("--cpu-quick", action="store_true",
                       help="the default without a GPU (unless --device is given); unset "
                            "options from: " + ", ".join(
                           f"{key.replace('_', '-')} {value}" for key, value in CPU_QUICK.items()))
    bench.set_defaults(func=cmd_bench)


def _user_message(err: UserError) -> str:
    """A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback:
    keep only the original message."""
    text = str(err).strip()
    if "Traceback" not in text:
        return text
    return re.sub(r"^cocord_fast\.[\w.]+: ", "", text.splitlines()[-1])  # "module.Class: "


def main(argv: list[str] | None = None) -> int:
    _print_any_file_name()
    parser = build_parser()
    # argparse gives a '*' positional only the words before the first option: overrides after
    # `--student NAME` come back unrecognised, and are import-reference's.
    ns, extra = parser.parse_known_args(argv)
    if extra:
        if ns.command != "import-reference":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.overrides = [*ns.overrides, *extra]
    from . import distributed

    return distributed.finish(run_command(lambda: ns.func(ns)))


def _print_any_file_name() -> None:
    """File names that are not in the file system's encoding reach Python as surrogates
    (`os.fsdecode`); printed, they are escaped rather than ending the process."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run_command(command: Callable[[], int]) -> int:
    """`command()`'s exit code, or the one of what went wrong, said in one line.

    Under several processes, a process that fails leaves its reason in the group's store
    first; the others stop naming that process and reason instead of a connection error, from
    here when their next collective fails (gloo) or from the watchdog (watchdog.py)
    when it never returns (NCCL). The watchdog also names a wait longer than
    `engine.timeout_s`.
    """
    from . import distributed
    from .training.preemption import EXIT_PREEMPTED, Preempted

    try:
        return command()
    except StageExited as stage:
        print(f"cocord-fast: {stage}", file=sys.stderr)
        return stage.code
    except UserError as err:
        distributed.stop_watchdog()  # this process says why it stops, once
        distributed.report_failure(_user_message(err))
        print(f"cocord-fast: error: {_user_message(err)}", file=sys.stderr)
        return 2
    except Preempted as stop:
        if distributed.is_main():
            print(f"cocord-fast: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("cocord-fast: interrupted; continue with --resume RUN_DIR from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as err:
        distributed.stop_watchdog()
        peer = distributed.peer_failure()
        if peer is not None:
            print(f"cocord-fast: error: stopped because {peer}", file=sys.stderr)
            return 1
        distributed.report_failure(f"{type(err).__name__}: {err}")
        raise

if __name__ == "__main__":
    sys.exit(main())
