"""`cocord-fast bench`: the report's schema, the floor's networks, the timing loop, NVML's
absence and the CLI's checks (the scripts in bench/: test_bench_scripts.py)."""
import json
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from cocord_fast.cli import main
from cocord_fast.config import Config, merge
from cocord_fast.data import Batch
from cocord_fast.methods import build_method
from cocord_fast.models import build_model
from cocord_fast.plugins import METHODS
from cocord_fast.throughput import bench
from cocord_fast.throughput.clock import StepClock
from cocord_fast.throughput.floor import floor_networks, floor_step
from cocord_fast.throughput.report import report_stem
from cocord_fast.throughput.runner import Entry, build_entries, run_rounds, warm_up
from cocord_fast.throughput.settings import BenchSettings
from cocord_fast.training.telemetry import Telemetry, open_nvml

from markers import on_gpu

# resnet8 at 32 px, batch 8, tiny banks: seconds on 2 cores.
TINY = dict(teacher="resnet8", student="resnet8", image_size=32, batch_size=8, steps=2,
            warmup=1, rounds=2, precision="fp32", device="cpu", num_train=64,
            overrides=("crd.num_negatives=8", "cocord.queue_size=32", "cocord.embed_dim=16",
                       "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8"))
METHOD_KEYS = {"method", "floor", "img_per_s", "step_ms_median", "step_ms_p90",
               "round_img_per_s", "timed_steps", "warmup_steps", "warmup_s", "held_mb",
               "peak_memory_mb", "bank_bytes", "build_s", "mean_loss", "fraction_of_floor",
               "gpu"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = bench(BenchSettings(**TINY, out=out))
    return json.loads(path.read_text()), path


def test_report_has_every_field_with_positive_numbers_and_each_method_its_floor(tiny_report):
    report, path = tiny_report
    assert path.name == "bench_resnet8_resnet8_32px_b8_fp32_" + path.name.split("fp32_")[1]
    for key in ("device", "torch", "commit", "date", "settings", "timing", "telemetry",
                "methods", "floors"):
        assert key in report, key
    assert report["settings"]["num_train"] == 64 and report["settings"]["num_classes"] == 100
    assert report["settings"]["loader"] is None  # resident batches
    methods = {row["method"]: row for row in report["methods"]}
    assert list(methods) == METHODS.names()  # every method, unless --methods says otherwise
    floors = {row["floor"]: row for row in report["floors"]}
    # KD, DKD, DIST and CRD run the same networks on the same views: one floor serves them.
    assert sorted(map(tuple, (row["floor_of"] for row in floors.values()))) == [
        ("cocord",), ("kd", "dkd", "dist", "crd"), ("vanilla",)]
    for name, row in methods.items():
        assert METHOD_KEYS <= set(row), METHOD_KEYS - set(row)
        assert row["floor"] in floors and name in floors[row["floor"]]["floor_of"]
        floor = floors[row["floor"]]
        assert row["fraction_of_floor"] == pytest.approx(row["img_per_s"] / floor["img_per_s"])
        for entry in (row, floor):
            assert entry["img_per_s"] > 0 and entry["warmup_s"] > 0 and entry["held_mb"] > 0
            assert 0 < entry["step_ms_median"] <= entry["step_ms_p90"]
            assert entry["timed_steps"] == TINY["steps"] * TINY["rounds"]
            assert len(entry["round_img_per_s"]) == TINY["rounds"]
            assert entry["peak_memory_mb"] is None and entry["gpu"] is None  # CPU
        assert row["mean_loss"] > 0 and row["build_s"] > 0
    assert methods["vanilla"]["bank_bytes"] == methods["kd"]["bank_bytes"] == 0
    assert methods["crd"]["bank_bytes"] == 2 * 64 * 128 * 4  # two banks, one row per image
    assert methods["cocord"]["bank_bytes"] == 32 * 16 * 4  # queue_size x embed_dim, fp32


def test_without_nvml_the_report_says_why_and_writes_the_plot(tiny_report):
    report, path = tiny_report
    assert report["telemetry"]["available"] is False
    assert "cpu" in report["telemetry"]["reason"]
    assert path.with_suffix(".png").stat().st_size > 0


def tiny_method(name: str):
    cfg = Config()
    merge(cfg, {"cocord": {"queue_size": 16, "embed_dim": 8, "proj_hidden_dim": 8,
                           "pred_hidden_dim": 8}, "crd": {"num_negatives": 8}})
    torch.manual_seed(0)
    teacher = build_model("resnet14", 10) if name != "vanilla" else None
    return build_method(name, cfg, build_model("resnet8", 10), teacher, np.arange(32) % 4).train()


@pytest.mark.parametrize("name, calls", [
    ("vanilla", {"student": 1}),
    ("kd", {"student": 1, "teacher": 1}),
    ("crd", {"student": 1, "teacher": 1}),
    ("cocord", {"student": 2, "slow student": 2, "teacher": 1}),
])
def test_the_floor_runs_the_networks_it_claims_on_the_views_the_method_gives_them(name, calls):
    method = tiny_method(name)
    passes = type(method).encoder_passes
    networks = floor_networks(method, passes)
    assert set(networks) == set(calls)
    views = [torch.randn(4, 3, 32, 32) for _ in range(method.num_views)]
    seen: dict[str, list] = {role: [] for role in networks}
    for role, network in networks.items():
        network.register_forward_hook(
            lambda module, args, out, role=role:
                seen[role].append((args[0], torch.is_grad_enabled())))
    student_grads = []
    first = next(networks["student"].parameters())
    first.register_post_accumulate_grad_hook(lambda p: student_grads.append(p.grad.abs().sum()))

    floor_step(passes, networks, views, nullcontext)

    assert {role: len(inputs) for role, inputs in seen.items()} == calls
    assert all(grad for _, grad in seen["student"])  # forward with gradient, then backward
    assert all(not grad for role in ("slow student", "teacher") for _, grad in seen.get(role, []))
    assert len(student_grads) == 1 and student_grads[0] > 0
    assert all(p.grad is None for p in networks["student"].parameters())  # dropped after
    if name == "cocord":  # as CoCoRD: student x_s, x'_s; slow student x'_s, x_s; teacher x_t
        assert [x is v for (x, _), v in zip(seen["student"], views)] == [True, True]
        assert seen["slow student"][0][0] is views[1] and seen["slow student"][1][0] is views[0]
        assert seen["teacher"][0][0] is views[2]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_makes_the_encoder_passes_it_declares(name):
    """What `compare`'s passes column and the bench's floor take from the class is what a step
    runs: every pass through an encoder goes through its `forward_features`."""
    method = tiny_method(name)
    roles = {"student": "student_encoder", "slow_student": "slow_encoder",
             "teacher": "teacher_encoder"}
    made = {role: 0 for role in roles}
    for role, attribute in roles.items():
        if (network := getattr(method, attribute, None)) is not None:
            def counted(x, role=role, original=network.forward_features):
                made[role] += 1
                return original(x)
            network.forward_features = counted
    views = [torch.randn(4, 3, 32, 32) for _ in range(method.num_views)]
    batch = Batch(views=views, labels=torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
    method.begin_micro_batch(0)
    method(batch).loss.backward()
    passes = type(method).encoder_passes
    assert made == {"student": passes.student, "slow_student": passes.slow_student,
                    "teacher": passes.teacher}


def test_the_timed_loop_times_exactly_the_steps_it_reports_and_says_each_as_it_goes(capsys):
    calls = []
    entry = Entry("sleeper", lambda: (calls.append(1), time.sleep(0.01)), images_per_step=10)
    settings = BenchSettings(steps=3, rounds=2, warmup=2)
    telemetry = Telemetry(torch.device("cpu"))
    warm_up([entry], settings.warmup, torch.device("cpu"))
    assert len(calls) == 2 and entry.warmup_s >= 0.02
    run_rounds([entry], settings, torch.device("cpu"), telemetry)
    assert len(calls) == 2 + 3 * 2
    assert len(entry.step_s) == 6 and all(0.009 < s < 0.5 for s in entry.step_s)
    assert len(entry.round_img_per_s) == 2 and all(r < 1000 for r in entry.round_img_per_s)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("bench: warm-up of sleeper: 2 steps in ")
    for number, (line, rate) in enumerate(zip(lines[1:], entry.round_img_per_s), 1):
        assert line == f"bench: round {number}/2, sleeper: 3 steps, {rate:.1f} images/s"


def test_step_clock_gives_one_time_per_step():
    clock = StepClock(torch.device("cpu"))
    clock.mark()
    for pause in (0.01, 0.03):
        time.sleep(pause)
        clock.mark()
    first, second = clock.seconds()
    assert 0.01 <= first < second


def fake_pynvml(init_error: Exception | None = None) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.shutdowns = 0

    def init():
        if init_error is not None:
            raise init_error

    def shutdown():
        module.shutdowns += 1

    def not_supported(handle):
        raise RuntimeError("Not Supported")

    module.nvmlInit, module.nvmlShutdown = init, shutdown
    module.NVML_CLOCK_SM = 1
    module.nvmlDeviceGetHandleByUUID = lambda uuid: "by-uuid"
    module.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=87)
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 * 2 ** 30)
    module.nvmlDeviceGetPowerUsage = not_supported
    module.nvmlDeviceGetClockInfo = lambda handle, clock: 1980
    return module


def test_nvml_absence_is_a_reason_not_an_error(monkeypatch):
    assert "cpu" in open_nvml(torch.device("cpu"))[2]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert open_nvml(torch.device("cuda", 0)) == (
        None, None, "pynvml is not installed (pip install nvidia-ml-py)")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(RuntimeError("Driver Not Loaded")))
    _, handle, reason = open_nvml(torch.device("cuda", 0))
    assert handle is None and reason == "NVML did not start: Driver Not Loaded"
    telemetry = Telemetry(torch.device("cuda", 0))
    with telemetry:
        telemetry.label = "kd"
    assert telemetry.summary("kd") is None
    assert telemetry.describe()["available"] is False


def test_telemetry_files_samples_under_the_running_entry(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    monkeypatch.setattr(torch.cuda, "get_device_properties",  # a GPU without CUDA
                        lambda index: types.SimpleNamespace(uuid="1234"))
    telemetry = Telemetry(torch.device("cuda", 0), interval_s=0.005)
    assert telemetry.handle == "by-uuid"
    with telemetry:
        telemetry.label = "cocord"
        time.sleep(0.1)
        telemetry.label = None
    summary = telemetry.summary("cocord")
    assert summary["samples"] > 0 and nvml.shutdowns == 1
    assert summary["gpu_util_percent"] == 87 and summary["memory_used_mb"] == 3 * 1024
    assert summary["sm_clock_mhz"] == 1980 and summary["power_w"] is None  # not supported
    assert telemetry.summary("kd")["samples"] == 0


@pytest.mark.parametrize("args, message", [
    (["--methods", "vanilla", "moco"], "--methods: unknown method 'moco'"),
    (["--methods", "kd", "kd"], "--methods: kd kd names a method twice"),
    (["--steps", "0"], "--steps: 0 is below the minimum 1"),
    (["--warmup", "-1"], "--warmup: -1 is below the minimum 0"),
    (["--teacher", "resnet9000"], "--teacher: unknown model 'resnet9000'"),
    (["--override", "method.name=kd"], "the bench sets method.name itself; use --methods"),
    (["--override", "train.compile=default"], "use --compile"),
    (["--override", "train.nonsense=1"], "unknown key 'train.nonsense'"),
    (["--override", "optim.lr"], "expected section.key=value"),
    (["--data", "pipeline", "--image-size", "64"], "--data pipeline --image-size 64"),
    (["--num-train", "4"], "--num-train 4 is less than one batch"),
])
def test_bench_refuses_bad_input_naming_the_option_before_any_work(args, message, tmp_path,
                                                                    capsys):
    assert main(["bench", "--cpu-quick", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_refuses_cuda_where_there_is_none(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--cpu-quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_bench_rejects_unknown_choices_through_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--precision", "fp16"])
    assert exit_info.value.code == 2
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_cpu_quick_fills_what_was_not_given(monkeypatch):
    import cocord_fast.throughput

    taken = []
    monkeypatch.setattr(cocord_fast.throughput, "bench", taken.append)
    assert main(["bench", "--cpu-quick", "--steps", "7", "--methods", "kd", "cocord",
                 "--compile", "default", "--override", "data.num_workers=1"]) == 0
    (settings,) = taken
    assert (settings.teacher, settings.student, settings.image_size, settings.batch_size,
            settings.device, settings.steps) == ("resnet32x4", "resnet8x4", 32, 64, "cpu", 7)
    assert settings.methods == ("kd", "cocord") and settings.compile == "default"
    assert settings.overrides == ("data.num_workers=1",)
    # The trainer gets the compile mode as train.compile, and the user's overrides last.
    overrides = settings.trainer_overrides("kd", None, Path("t.pth"), Path("out"))
    assert "train.compile=default" in overrides and overrides[-1] == "data.num_workers=1"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench"]) == 0
    assert (taken[1].teacher, taken[1].image_size, taken[1].precision) == ("resnet34", 224, "bf16")


def test_without_a_gpu_the_bench_runs_the_cpu_recipe_unless_a_device_is_given(
        monkeypatch, capsys):
    import cocord_fast.throughput

    taken = []
    monkeypatch.setattr(cocord_fast.throughput, "bench", taken.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--steps", "7"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(
        "no GPU here: running the CPU recipe (--cpu-quick)")
    assert (taken[0].teacher, taken[0].image_size, taken[0].device, taken[0].steps) == (
        "resnet32x4", 32, "cpu", 7)
    assert main(["bench", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == ""
    assert (taken[1].teacher, taken[1].image_size, taken[1].device) == ("resnet34", 224, "cpu")


def test_report_names_differ_by_compile_mode_and_data_mode():
    names = {report_stem(BenchSettings(compile=mode, data=data), "NVIDIA H100 80GB HBM3")
             for mode in ("off", "default") for data in ("resident", "pipeline")}
    assert len(names) == 4
    assert report_stem(BenchSettings(), "NVIDIA H100 80GB HBM3") == \
        "bench_resnet34_resnet18_224px_b256_bf16_nvidia-h100-80gb-hbm3"


def test_pipeline_mode_iterates_the_trainers_loader(tmp_path, monkeypatch):
    from cocord_fast.throughput import runner

    served, original = [], runner.loader_batches

    def counted(trainer):
        for batch in original(trainer):
            served.append(len(batch))
            yield batch

    monkeypatch.setattr(runner, "loader_batches", counted)
    settings = BenchSettings(**{**TINY, "methods": ("vanilla", "crd"), "rounds": 1,
                                "data": "pipeline"}, out=tmp_path)
    report = json.loads(bench(settings).read_text())
    assert report["settings"]["data"] == "pipeline"
    assert report["settings"]["loader"] in ("dali", "torch")  # data.backend=auto on CPU
    assert [row["method"] for row in report["methods"]] == ["vanilla", "crd"]
    assert all(row["img_per_s"] > 0 for row in report["methods"])
    # Each method's warm-up and timed steps, one loader batch each (CRD's carry its indices).
    assert served == [8] * 2 * (TINY["warmup"] + TINY["steps"])


@on_gpu
def test_on_cuda_the_timed_steps_never_wait_for_the_gpu_and_memory_is_measured(tmp_path):
    settings = BenchSettings(**{**TINY, "device": "cuda", "precision": "bf16"}, out=tmp_path)
    device = settings.resolved_device()
    entries = build_entries(settings, device, tmp_path)
    warm_up(entries, 1, device)
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside a step raises
    try:
        for entry in entries:
            entry.run_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    report = json.loads(bench(settings).read_text())
    assert report["timing"].startswith("CUDA events")
    for row in [*report["methods"], *report["floors"]]:
        assert row["peak_memory_mb"] > row["held_mb"] > 0
    telemetry = report["telemetry"]
    if telemetry["available"]:
        assert all({"samples", "gpu_util_percent", "memory_used_mb", "power_w",
                    "sm_clock_mhz"} <= set(row["gpu"]) for row in report["methods"])
    else:
        assert telemetry["reason"]
