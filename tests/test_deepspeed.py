"""engine.name=deepspeed: the generated DeepSpeed config, what is refused, and two processes
under the `deepspeed` launcher (CPU, gloo) with ZeRO-0, ZeRO-1 and ZeRO-2.

As under torchrun, a 2-rank run with frozen BatchNorm must equal one process with the global
batch; with bf16 autocast every momentum copy, the teacher head, the queue and the banks stay
fp32; and a run stopped mid-epoch and resumed through DeepSpeed's checkpoints logs the same
losses, bit for bit, as one that never stopped.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from test_acceleration import assert_same_curve

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.checkpoints.sealed import file_digest
from cocord_fast.config import load_config
from cocord_fast.engines import check_engine_config
from cocord_fast.engines.deepspeed_engine import deepspeed_config, import_deepspeed
from cocord_fast.errors import UserError
from cocord_fast.models import build_model
from cocord_fast.training.trainer import Trainer

from launch import (BIN, PIPELINE, STEPS, WORKER, assert_disjoint_shards,
                    assert_matches_one_process, launch, launch_and_kill, launch_runs,
                    launch_worker, rank_dumps, recipe, start, train_losses, write_teacher)
from test_checkpoint import flip_a_byte

SPLIT = 5  # the stopped runs stop here, mid-epoch (7 steps per epoch)


def test_generated_config_comes_from_ours_and_keeps_the_users_other_settings(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True},
                                "communication_data_type": "fp32"}))
    cfg = load_config(overrides=[
        "engine.name=deepspeed", "engine.zero_stage=2", f"engine.deepspeed_config={user}",
        "engine.deepspeed_overrides={zero_optimization: {reduce_bucket_size: 1000}}",
        "data.batch_size=32", "optim.grad_accum_steps=4", "optim.grad_clip=2.5"])
    config = deepspeed_config(cfg, world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 32 * 4 * 8
    assert config["gradient_clipping"] == 2.5
    assert config["zero_optimization"] == {"overlap_comm": True, "reduce_bucket_size": 1000,
                                           "stage": 2}
    assert config["communication_data_type"] == "fp32"
    assert "bf16" not in config and "fp16" not in config
    # DeepSpeed clips at 1.0 unless told otherwise: no clipping must say 0.
    assert deepspeed_config(load_config(overrides=["engine.name=deepspeed"]), 1)[
        "gradient_clipping"] == 0.0


@pytest.mark.parametrize("override,message", [
    ("engine.zero_stage=3", "engine.zero_stage=3 is not supported"),
    ("engine.deepspeed_overrides={bf16: {enabled: true}}",
     "engine.deepspeed_overrides sets bf16: it comes from train.precision"),
    ("engine.deepspeed_overrides={gradient_clipping: 1.0}",
     "sets gradient_clipping: it comes from optim.grad_clip"),
    ("engine.deepspeed_overrides={train_micro_batch_size_per_gpu: 4}",
     "it comes from data.batch_size"),
    ("engine.deepspeed_overrides={zero_optimization: {stage: 1}}",
     "sets zero_optimization.stage: set engine.zero_stage instead"),
    ("engine.deepspeed_overrides={steps_per_print: 10}",
     "sets steps_per_print: it comes from train.log_every"),
    ("engine.deepspeed_overrides={zero_allow_untested_optimizer: false}",
     "sets zero_allow_untested_optimizer: it comes from cocord_fast"),
    ("engine.deepspeed_overrides={zero_optimization: {overlap_com: true}}",
     "^engine.deepspeed_overrides: DeepSpeed refuses it: 1 validation error for "
     "DeepSpeedZeroConfig; overlap_com; Extra inputs are not permitted"),
    ("engine.deepspeed_overrides={communication_data_type: fp99}",
     "^engine.deepspeed_overrides: DeepSpeed refuses it: Invalid communication_data_type"),
    ("engine.deepspeed_overrides={zero_optimisation: {overlap_comm: true}}",
     "^engine.deepspeed_overrides: DeepSpeed does not read 'zero_optimisation' \\(misspelt\\?"),
])
def test_settings_that_cannot_work_are_refused_before_any_work(override, message, tmp_path):
    with pytest.raises(UserError, match=message):
        check_engine_config(load_config(overrides=["engine.name=deepspeed", override]))
    with pytest.raises(UserError, match=message):  # before the data is looked for
        Trainer(load_config(overrides=[
            "engine.name=deepspeed", override, "data.dataset=imagefolder",
            f"data.root={tmp_path / 'missing'}", f"train.output_dir={tmp_path / 'run'}"]))


def test_settings_deepspeed_reads_pass_and_a_misspelt_one_names_its_file(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"communication_data_type": "fp32", "wall_clock_breakdown": False,
                                "zero_optimization": {"overlap_comm": True}}))
    settings = ["engine.name=deepspeed", "engine.zero_stage=2", f"engine.deepspeed_config={user}",
                "engine.deepspeed_overrides={zero_optimization: {reduce_bucket_size: 1000}}"]
    check_engine_config(load_config(overrides=settings))
    user.write_text(json.dumps({"wall_clock_breakdwon": True}))
    with pytest.raises(UserError, match=rf"^engine.deepspeed_config \({user}\): DeepSpeed does "
                                        rf"not read 'wall_clock_breakdwon'"):
        check_engine_config(load_config(overrides=settings))


def test_deepspeeds_warnings_reach_the_user_but_not_its_info_lines_nor_known_noise():
    logger = import_deepspeed().utils.logger

    def shown(level: int, text: str) -> bool:
        record = logger.makeRecord(logger.name, level, __file__, 1, text, None, None)
        return logger.isEnabledFor(level) and all(f.filter(record) for f in logger.filters)

    assert shown(logging.WARNING, "overlap_comm is not supported with this setting")
    assert not shown(logging.WARNING, "**** You are using ZeRO with an untested optimizer, "
                                      "proceed with caution *****")
    assert not shown(logging.WARNING, "Setting accelerator to CPU. If you have GPU or other "
                                      "accelerator, we were unable to detect it.")
    assert not shown(logging.INFO, "DeepSpeed Flops Profiler Enabled: False")


def test_a_deepspeed_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{stage: 1")
    with pytest.raises(UserError, match=f"engine.deepspeed_config: {path} is not valid JSON"):
        check_engine_config(load_config(overrides=["engine.name=deepspeed",
                                                   f"engine.deepspeed_config={path}"]))


def test_a_missing_deepspeed_is_named_with_its_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else find_spec(name, *args))
    with pytest.raises(UserError, match=r"DeepSpeed is not installed \(pip install"):
        check_engine_config(load_config(overrides=["engine.name=deepspeed"]))


def test_deepspeed_overrides_must_be_a_mapping():
    with pytest.raises(UserError, match="engine.deepspeed_overrides: expected a mapping, got 5"):
        load_config(overrides=["engine.deepspeed_overrides=5"])


def test_deepspeed_settings_with_the_torch_engine_are_refused(tmp_path):
    with pytest.raises(UserError, match="engine.zero_stage set, but engine.name=torch"):
        Trainer(load_config(overrides=["engine.zero_stage=1", f"train.output_dir={tmp_path}"]))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("deepspeed"))


def runs(root, teacher) -> dict[str, dict]:
    def deepspeed(name, method, stage, *extra, batch=8):
        return recipe(root, teacher, name, method, batch) + [
            "engine.name=deepspeed", f"engine.zero_stage={stage}", *extra]

    specs = {
        "cocord_zero1": {"overrides": deepspeed("cocord_zero1", "cocord", 1), "bn_eval": True,
                         "trace_convolutions": True},
        "crd_zero2": {"overrides": deepspeed("crd_zero2", "crd", 2), "bn_eval": True},
        "kd_accum_zero0": {"overrides": deepspeed("kd_accum_zero0", "kd", 0,
                                                  "optim.grad_accum_steps=2", batch=5),
                           "bn_eval": True},
    }
    for name, method, stage in (("cocord_bf16_zero1", "cocord", 1), ("crd_bf16_zero2", "crd", 2)):
        overrides = deepspeed(name, method, stage, "train.precision=bf16", PIPELINE)
        specs[name] = {"overrides": overrides}
        specs[f"{name}_split"] = {"overrides": overrides + [
            f"train.output_dir={teacher.parent / (name + '_split')}", f"train.max_steps={SPLIT}"]}
    return specs


def shared_memory_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))


@pytest.fixture(scope="module")
def zero(tiny_demo_root, teacher):
    before = shared_memory_buffers()
    output = launch_runs("deepspeed", runs(tiny_demo_root, teacher), teacher.parent)
    return {"output": output, "work": teacher.parent, "root": tiny_demo_root,
            "teacher": teacher, "left_in_shm": shared_memory_buffers() - before}


@pytest.mark.slow
@pytest.mark.parametrize("name,global_batch", [("cocord_zero1", 16), ("crd_zero2", 16),
                                               ("kd_accum_zero0", 20)])
def test_two_ranks_equal_one_process_with_the_global_batch(zero, name, global_batch, tmp_path):
    dumps = rank_dumps(zero["work"] / name / "dump")
    for key, value in dumps[0]["method"].items():
        assert torch.equal(value, dumps[1]["method"][key]), key  # queue, banks, Z, copies
    assert_disjoint_shards(dumps, len(dumps[0]["index"]) // 2)  # 2 epochs
    spec = runs(zero["root"], zero["teacher"])[name]
    assert_matches_one_process(zero["work"] / name, spec["overrides"], global_batch, tmp_path)


@pytest.mark.slow
def test_compiled_encoders_take_the_eager_steps_under_deepspeed(tiny_demo_root, teacher):
    """train.compile with the DeepSpeed engine (one process under the launcher): the eager
    run's losses, step for step."""
    for mode in ("false", "true"):
        launch("deepspeed", [BIN / "cocord-fast", "train",
                             *recipe(tiny_demo_root, teacher, f"zero1_compile_{mode}", "cocord"),
                             "train.max_steps=3", "engine.name=deepspeed", "engine.zero_stage=1",
                             f"train.compile={mode}"], teacher.parent, nproc=1)
    compiled = list(train_losses(teacher.parent / "zero1_compile_true").values())
    assert len(compiled) == 3
    assert_same_curve(compiled, list(train_losses(teacher.parent / "zero1_compile_false").values()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cocord_bf16_zero1", "crd_bf16_zero2"])
def test_bf16_autocast_keeps_weights_copies_queue_and_banks_in_fp32(zero, name):
    state = rank_dumps(zero["work"] / name / "dump")[0]["method"]
    floating = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert set(floating.values()) == {torch.float32}
    checkpoint = load_checkpoint(zero["work"] / name / "last.pt")
    assert {v.dtype for v in checkpoint["method"].values() if v.is_floating_point()} == {
        torch.float32}


@pytest.mark.slow
def test_each_run_names_its_engine_once(zero):
    names = runs(zero["root"], zero["teacher"])
    for stage in (0, 1, 2):
        count = sum(f"engine.zero_stage={stage}" in spec["overrides"] for spec in names.values())
        assert zero["output"].count(f"x 2 processes (DeepSpeed ZeRO-{stage})") == count


@pytest.mark.slow
def test_finished_ranks_leave_nothing_in_dev_shm(zero):
    """Each rank saw its own buffer when its first engine removed the name (DeepSpeed makes
    it once per process: its name ends with the launch's port and the rank), and none of the
    launch's buffers is left."""
    names = list(runs(zero["root"], zero["teacher"]))
    first = rank_dumps(zero["work"] / names[0] / "dump")
    port = first[0]["master_port"]
    for rank, dump in enumerate(first):
        (listing,) = dump["shared_memory"]
        assert len([b for b in listing if b.endswith(f"_{port}_{rank}")]) == 1, listing
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert zero["left_in_shm"] == set()


@pytest.mark.slow
def test_only_the_checkpoints_deepspeed_files_are_kept(zero):
    run = zero["work"] / "cocord_bf16_zero1"
    tags = {load_checkpoint(run / name)["engine"]["tag"] for name in ("last.pt", "best.pt")}
    kept = {f"deepspeed/{d.name}" for d in (run / "deepspeed").iterdir() if d.is_dir()}
    assert kept == tags
    assert (run / "deepspeed" / f"step_{STEPS:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
            ).exists()  # ZeRO-1: each rank's optimizer partition


@pytest.mark.slow
def test_a_checkpoint_records_the_digest_of_every_deepspeed_file_it_needs(zero):
    run = zero["work"] / "crd_zero2"
    engine = load_checkpoint(run / "last.pt")["engine"]
    written = sorted((run / engine["tag"]).iterdir())
    assert sorted(engine["files"]) == [str(path.relative_to(run)) for path in written]
    assert any("zero_pp_rank_1_" in name for name in engine["files"])  # rank 1's, by rank 1
    assert all(file_digest(run / name) == digest for name, digest in engine["files"].items())


@pytest.mark.slow
def test_a_damaged_partition_falls_back_to_the_newest_intact_checkpoint(zero):
    """A run saving every 3 steps stops at step 9; then rank 1's optimizer partition of step 9
    is damaged. The resume names that file, continues from step_6 and logs the losses of the
    run that was never interrupted."""
    work, name = zero["work"], "cocord_bf16_zero1"
    run = work / "damaged_partition"
    overrides = runs(zero["root"], zero["teacher"])[name]["overrides"] + [
        f"train.output_dir={run}", "train.ckpt_every=3", "train.max_steps=9"]
    launch("deepspeed", [BIN / "cocord-fast", "train", *overrides], work)
    partition = run / "deepspeed" / "step_00000009" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_a_byte(partition)
    output = launch("deepspeed", [BIN / "cocord-fast", "train", "--resume", run,
                                  f"train.max_steps={STEPS}"], work)
    assert (f"warning: {partition}, which {run / 'last.pt'} needs, is damaged (expected digest "
            f"sha256:") in output
    assert f"resuming from {run / 'step_00000006.pt'} (step 6)" in output
    assert train_losses(run) == train_losses(work / name)


@pytest.mark.slow
def test_deepspeed_files_missing_on_one_rank_stop_every_rank_with_one_message(zero):
    """As on a node whose disk lacks the run's DeepSpeed directory: rank 1 cannot resume from
    last.pt, rank 0 could. Both stop at once with the same message, none waits for the other."""
    work, run = zero["work"], zero["work"] / "cocord_zero1"
    (work / "hidden.json").write_text(json.dumps({"runs": [{
        "resume": str(run), "overrides": ["train.max_steps=0"],
        "hide": [1, str(run / "deepspeed")]}]}))
    started = time.monotonic()
    job = start("deepspeed", [WORKER, work / "hidden.json"], work, work / "hidden.log")
    assert job.wait(timeout=300) != 0
    output = (work / "hidden.log").read_text()
    message = (f"cocord-fast: error: rank 1: {run / 'last.pt'} needs "
               f"{run / 'deepspeed' / f'step_{STEPS:08d}' / 'mp_rank_00_model_states.pt'}, "
               f"which is missing")
    assert output.count(message) == 2, output[-3000:]
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_every_convolution_of_a_deepspeed_step_runs_channels_last(zero):
    """The student's weights keep DeepSpeed's default layout, the teacher's are channels-last,
    and the activations of every convolution, forward and backward, are channels-last (the
    kernels take that layout from the input or the weight)."""
    for dump in rank_dumps(zero["work"] / "cocord_zero1" / "dump"):
        calls = dump["convolutions"]
        assert all(call["activations_channels_last"] for call in calls)
        teacher = [call for call in calls if call["teacher"]]
        student = [call for call in calls if not call["teacher"]]
        convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in build_model("resnet8", 10).modules())
        assert len(teacher) == convolutions  # one teacher forward a step
        assert all(call["weight_channels_last"] for call in teacher)
        assert any(call["backward"] for call in student)
        assert all(call["weight_contiguous"] for call in student)


@pytest.mark.slow
def test_resume_through_deepspeed_checkpoints_is_bit_exact(zero):
    """Both runs stopped at step 5 resume from DeepSpeed's files (each rank its optimizer
    partition) and our checkpoint (each rank its DALI state): the CoCoRD run through the CLI
    as users launch it, the CRD run through the worker."""
    work = zero["work"]
    launch("deepspeed", [BIN / "cocord-fast", "train", "--resume",
                         work / "cocord_bf16_zero1_split", "train.max_steps=0"], work)
    launch_worker("deepspeed", [{"resume": str(work / "crd_bf16_zero2_split"),
                                 "overrides": ["train.max_steps=0"]}], work)
    for name in ("cocord_bf16_zero1", "crd_bf16_zero2"):
        full, split = work / name, work / f"{name}_split"
        losses = train_losses(split)
        assert len(losses) == STEPS and losses == train_losses(full), name
        a, b = (load_checkpoint(run / "last.pt")["method"] for run in (full, split))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_a_resume_steps_with_the_optimizer_settings_it_changes(zero):
    """DeepSpeed's files restore the saved momentum and weight decay; the changed ones are set
    again on the groups its partitions step with."""
    work = zero["work"]
    changes = {"momentum": 0.5, "weight_decay": 1e-3, "nesterov": True}
    launch_worker("deepspeed", [{
        "resume": str(work / "crd_bf16_zero2_split"), "setup_only": True,
        "overrides": [f"optim.{key}={str(value).lower()}" for key, value in changes.items()],
        "dump": str(work / "changed_optimizer" / "dump")}], work)
    for dump in rank_dumps(work / "changed_optimizer" / "dump"):
        for group in dump["optimizer_groups"]:
            assert {key: group[key] for key in changes} == changes


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_exactly(zero):
    """SIGKILL to every process once a checkpoint exists (the run goes on saving every 3
    steps, and may be killed mid-save), then `--resume`: the losses of all 14 steps equal
    those of the run that was never interrupted."""
    work, name = zero["work"], "cocord_bf16_zero1"
    run = work / "killed"
    overrides = runs(zero["root"], zero["teacher"])[name]["overrides"] + [
        f"train.output_dir={run}", "train.ckpt_every=3", "train.epochs=200"]
    launch_and_kill("deepspeed", [BIN / "cocord-fast", "train", *overrides], work,
                    when=run / "step_00000006.pt")
    stopped_at = load_checkpoint(run / "last.pt")["step"]
    assert 6 <= stopped_at < STEPS
    launch("deepspeed", [BIN / "cocord-fast", "train", "--resume", run,
                         f"train.max_steps={STEPS}"], work)
    assert train_losses(run) == train_losses(work / name)
