"""Two processes under `torchrun` (engine.name=torch: DistributedDataParallel), CPU and gloo.

One launch of `tests/distributed_worker.py` trains several small runs; the tests read what
each rank saw and saved. A 2-rank run with per-rank batch B must equal a 1-process run with
batch 2B step for step (with BatchNorm frozen, the one layer whose output depends on the
batch): that proves the gradients are averaged and the queue and banks receive every rank's
keys in rank order. The CLI is launched as users launch it (`torchrun -m cocord_fast`) to stop
a run mid-epoch and resume it.
"""
from __future__ import annotations

import json
import shutil
import signal
import time

import psutil
import pytest
import torch

from cocord_fast import distributed
from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.data.order import epoch_order
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError
from cocord_fast.training.metrics import read_log
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import Trainer

from launch import (PER_RANK_BATCH, PIPELINE, STEPS, WORKER, assert_disjoint_shards,
                    assert_matches_one_process, launch, launch_nodes, launch_runs, rank_dumps,
                    recipe, start, train_losses, wait_for, write_teacher)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    write_teacher(folder, "resnet8x4")
    return write_teacher(folder)


def runs(root, teacher) -> dict[str, dict]:
    """The runs of the torchrun launch, by name."""
    # A teacher 4x as wide as the student: CoCoRD's teacher head is then random and frozen.
    wide = [f"model.teacher_checkpoint={teacher.with_name('teacher_resnet8x4.pt')}",
            "model.teacher=resnet8x4"]
    return {
        # Rank 1's RNG runs ahead before the models are built; the state after setup.
        **{f"skewed_{method}": {"overrides": recipe(root, teacher, f"skewed_{method}", method)
                                + wide, "skew_rng": 1, "setup_only": True}
           for method in ("cocord", "crd")},
        "cocord": {"overrides": recipe(root, teacher, "cocord", "cocord"), "bn_eval": True},
        "crd": {"overrides": recipe(root, teacher, "crd", "crd"), "bn_eval": True},
        # 5 per rank, 2 micro-batches per step: the global batch of 20 of the reference.
        "kd_accum": {"overrides": recipe(root, teacher, "kd_accum", "kd", batch=5)
                     + ["optim.grad_accum_steps=2"], "bn_eval": True},
        # Real BatchNorm and the DALI pipeline (where installed): the uninterrupted run the
        # resume test matches.
        "cocord_dali": {"overrides": recipe(root, teacher, "cocord_dali", "cocord")
                        + [PIPELINE], "inspect_gathers": True},
    }


@pytest.fixture(scope="module")
def ddp(tiny_demo_root, teacher):
    output = launch_runs("torchrun", runs(tiny_demo_root, teacher), teacher.parent)
    return {"output": output, "work": teacher.parent, "root": tiny_demo_root,
            "teacher": teacher}


def assert_same_on_every_rank(dumps: list[dict]) -> None:
    first = dumps[0]["method"]
    for other in dumps[1:]:
        assert first.keys() == other["method"].keys()
        different = [k for k in first if not torch.equal(first[k], other["method"][k])]
        assert not different, f"differ across ranks: {different[:5]}"


def test_cocord_queue_and_copies_stay_identical_and_hold_both_ranks_keys(ddp):
    dumps = rank_dumps(ddp["work"] / "cocord" / "dump")
    assert_same_on_every_rank(dumps)  # trainable weights, slow copies, teacher head, queue
    state = dumps[0]["method"]
    queue, size, global_batch = state["queue"], 64, 2 * PER_RANK_BATCH
    assert int(state["queue_ptr"]) == STEPS * global_batch % size
    # The queue's newest rows are the last steps' keys: rank 0's, then rank 1's, each step.
    for step in range(STEPS - size // global_batch, STEPS):
        slot = step * global_batch % size
        for rank, dump in enumerate(dumps):
            rows = queue[slot + rank * PER_RANK_BATCH: slot + (rank + 1) * PER_RANK_BATCH]
            assert torch.equal(rows, dump["keys"][step])


@pytest.mark.parametrize("method", ["cocord", "crd"])
def test_every_rank_starts_from_rank_zeros_method_state_whatever_its_rng_drew(ddp, method):
    """Rank 1 drew other random numbers before the models were built: its student, heads,
    slow copies, random teacher head, queue and memory banks still equal rank 0's."""
    dumps = rank_dumps(ddp["work"] / f"skewed_{method}" / "dump")
    assert_same_on_every_rank(dumps)
    state = dumps[0]["method"]
    drawn = ["queue", "teacher_projector.0.weight", "slow_encoder.conv1.weight"] if (
        method == "cocord") else ["crd.student_memory", "crd.teacher_embed.linear.weight"]
    assert all(key in state for key in drawn)


def test_saves_gather_host_tensors_only(ddp):
    """What the ranks gather into a checkpoint (RNG states, BatchNorm statistics) is on the
    CPU: a CUDA tensor would unpickle onto its sender's GPU in every receiving process."""
    for dump in rank_dumps(ddp["work"] / "cocord_dali" / "dump"):
        devices = dump["gathered_devices"]
        assert len(devices) > 20 and set(devices) == {"cpu"}  # BatchNorm statistics included


def test_each_rank_trains_on_its_own_shard(ddp):
    assert_disjoint_shards(rank_dumps(ddp["work"] / "cocord" / "dump"), STEPS // 2)


def test_crd_banks_and_normalizers_stay_identical_and_negatives_differ_by_rank(ddp):
    dumps = rank_dumps(ddp["work"] / "crd" / "dump")
    assert_same_on_every_rank(dumps)  # both memory banks, both Z
    state = dumps[0]["method"]
    assert state["crd.student_normalizer"] > 0 and state["crd.teacher_normalizer"] > 0
    first = [d["contrast_index"][0][:, 1:] for d in dumps]  # negatives of step 1
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("name,global_batch", [("cocord", 16), ("crd", 16), ("kd_accum", 20)])
def test_two_ranks_equal_one_process_with_the_global_batch(ddp, name, global_batch, tmp_path):
    spec = runs(ddp["root"], ddp["teacher"])[name]
    assert_matches_one_process(ddp["work"] / name, spec["overrides"], global_batch, tmp_path)


def test_batchnorm_statistics_are_averaged_for_evaluation_and_checkpoints(ddp):
    run = ddp["work"] / "cocord_dali"
    dumps = rank_dumps(run / "dump")
    # Each rank keeps its own running statistics while it trains ...
    own = [d["method"]["student_encoder.bn1.running_mean"] for d in dumps]
    assert not torch.equal(own[0], own[1])
    # ... and the checkpoint's model holds their average, with every rank's own beside it.
    checkpoint = load_checkpoint(run / "last.pt")
    torch.testing.assert_close(checkpoint["method"]["student_encoder.bn1.running_mean"],
                               (own[0] + own[1]) / 2)
    for rank, dump in enumerate(dumps):
        saved = checkpoint["ranks"][rank]["batchnorm"]["student_encoder.bn1.running_mean"]
        assert torch.equal(saved, dump["method"]["student_encoder.bn1.running_mean"])
    # Everything else is the same on every rank.
    for key, value in dumps[0]["method"].items():
        if "running_" not in key:
            assert torch.equal(value, dumps[1]["method"][key]), key
    evals = [r for r in read_log(run) if r["kind"] == "eval"]
    assert [r["num_samples"] for r in evals] == [40, 40]  # the val set once, over both ranks


def test_rank_zero_logs_every_ranks_rate_and_names_the_slowest(ddp):
    records = [r for r in read_log(ddp["work"] / "cocord_dali") if r["kind"] == "train"]
    assert records
    for r in records:  # gathered at log steps: the run's rate is the ranks' together
        assert r["slowest_rank"] in (0, 1)
        assert 0 <= r["data_wait_share"] <= r["data_wait_share_max"] <= 1
        assert 0 < r["slowest_rank_img_per_s"] <= r["rank_img_per_s"] < r["img_per_s"]
        if r["slowest_rank"] == 1:  # rank 0's rate is the other one
            assert r["img_per_s"] == pytest.approx(r["rank_img_per_s"]
                                                   + r["slowest_rank_img_per_s"])


def test_only_rank_zero_reports(ddp):
    specs = runs(ddp["root"], ddp["teacher"]).values()
    launched = sum(not spec.get("setup_only") for spec in specs)
    assert ddp["output"].count("x 2 processes (torch DDP)") == launched
    assert ddp["output"].count(f"step {STEPS} epoch 2.00: top1") == 3  # cocord, crd, dali runs


@pytest.mark.slow
def test_torchrun_cli_resumes_mid_epoch_exactly(ddp):
    """`torchrun -m cocord_fast train` stopped at step 5 (mid-epoch, DALI), then resumed:
    every loss and the final state equal the uninterrupted run's."""
    work, full = ddp["work"], ddp["work"] / "cocord_dali"
    overrides = recipe(ddp["root"], ddp["teacher"], "split", "cocord") + [PIPELINE]
    launch("torchrun", ["-m", "cocord_fast", "train", *overrides, "train.max_steps=5"], work)
    checkpoint = load_checkpoint(work / "split" / "last.pt")
    assert checkpoint["world_size"] == 2
    output = launch("torchrun", ["-m", "cocord_fast", "train", "--resume", work / "split",
                                 "train.max_steps=0"], work)
    assert output.count(f"step {STEPS}, top-1") == 1  # the CLI's last line, from rank 0 only
    assert train_losses(work / "split") == train_losses(full)
    a, b = (load_checkpoint(run / "last.pt") for run in (full, work / "split"))
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert all(torch.equal(x, y) for r in range(2) for x, y in
               zip(a["ranks"][r]["batchnorm"].values(), b["ranks"][r]["batchnorm"].values()))


@pytest.mark.slow
def test_two_nodes_train_like_two_processes_on_one_node(ddp):
    """Two torchrun agents, one process each (RANK 0 and 1, both LOCAL_RANK 0), train exactly
    as the single-node launch did."""
    overrides = recipe(ddp["root"], ddp["teacher"], "nodes", "cocord") + [PIPELINE]
    outputs = launch_nodes(["-m", "cocord_fast", "train", *overrides], ddp["work"])
    assert "x 2 processes (torch DDP)" in outputs[0]
    assert "processes" not in outputs[1]  # the second node's rank prints nothing
    assert train_losses(ddp["work"] / "nodes") == train_losses(ddp["work"] / "cocord_dali")


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(ddp):
    """SIGTERM reaches rank 1 only (mid-run, 200-epoch schedule): both ranks save the same
    step and exit 75; the resumed run logs the uninterrupted run's losses."""
    work, run = ddp["work"], ddp["work"] / "signalled"
    overrides = recipe(ddp["root"], ddp["teacher"], "signalled", "cocord") + [
        PIPELINE, "train.epochs=200"]  # the first 14 steps are those of 2 epochs
    job = start("torchrun", ["-m", "cocord_fast", "train", *overrides], work, work / "term.log")
    wait_for(job, lambda: any(r["kind"] == "train" for r in read_log(run)), "logged step")
    workers = psutil.Process(job.pid).children(recursive=True)
    (rank1,) = [p for p in workers if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) != 0
    output = (work / "term.log").read_text()
    assert output.count("exitcode  : 75") == 2, output[-3000:]  # torchrun's report, both ranks
    stopped_at = load_checkpoint(run / "last.pt")["step"]
    assert f"stopped by a stop signal to another process after step {stopped_at}" in output
    assert stopped_at < STEPS
    launch("torchrun", ["-m", "cocord_fast", "train", "--resume", run,
                        f"train.max_steps={STEPS}"], work)
    assert train_losses(run) == train_losses(work / "cocord_dali")


@pytest.mark.slow
def test_a_file_one_rank_cannot_read_stops_every_rank_after_the_last_step_all_can_take(ddp):
    """Rank 1's image of step 3 (a file of its shard only) is unreadable: rank 1 reads it two
    steps ahead, both ranks save step 2 and stop with one message naming rank 1 and the file;
    with the file restored, the resumed run logs the losses of a run that never stopped."""
    work = ddp["work"]
    data = work / "damaged_data"
    shutil.copytree(ddp["root"], data)
    rank1_step3 = epoch_order(120, PER_RANK_BATCH, 0, 0, world_size=2)[1][2 * PER_RANK_BATCH]
    damaged = open_source("demo", data, train=True).path(int(rank1_step3))
    intact = damaged.read_bytes()
    damaged.write_bytes(b"not a jpeg")
    run = work / "failing"
    started = time.monotonic()
    job = start("torchrun", ["-m", "cocord_fast", "train",
                             *recipe(data, ddp["teacher"], "failing", "cocord")],
                work, work / "fail.log")
    assert job.wait(timeout=300) != 0
    output = (work / "fail.log").read_text()
    assert output.count("exitcode  : 2") == 2, output[-3000:]  # torchrun's report, both ranks
    assert output.count(f"cocord-fast: error: rank 1: cannot decode image {damaged}") == 2
    assert f"{run}/last.pt holds step 2, the last whose data every process could read" in output
    assert load_checkpoint(run / "last.pt")["step"] == 2
    assert time.monotonic() - started < 120

    damaged.write_bytes(intact)
    launch("torchrun", ["-m", "cocord_fast", "train", "--resume", run], work)
    launch("torchrun", ["-m", "cocord_fast", "train",
                        *recipe(data, ddp["teacher"], "unbroken", "cocord")], work)
    assert train_losses(run) == train_losses(work / "unbroken")


def launch_faulty(ddp, name: str, spec: dict) -> tuple[str, float]:
    """Launches the worker on one faulty run; its output and how long it took to end."""
    work = ddp["work"]
    (work / f"{name}.json").write_text(json.dumps({"runs": [spec]}))
    started = time.monotonic()
    job = start("torchrun", [WORKER, work / f"{name}.json"], work, work / f"{name}.log")
    assert job.wait(timeout=300) != 0
    return (work / f"{name}.log").read_text(), time.monotonic() - started


@pytest.mark.slow
def test_a_stuck_rank_times_out_the_others(ddp):
    """Rank 1 goes silent in step 3: rank 0 gives up after engine.timeout_s and says why."""
    output, seconds = launch_faulty(ddp, "stuck", {
        "overrides": recipe(ddp["root"], ddp["teacher"], "stuck", "cocord")
        + ["engine.timeout_s=5"], "hang": [1, 3]})
    assert "no answer from the other processes within engine.timeout_s=5s" in output, output[-3000:]
    assert seconds < 120


@pytest.mark.slow
def test_a_failure_is_named_to_ranks_that_no_collective_will_wake(ddp):
    """As under NCCL, where a collective waits on the GPU and raises nothing when a peer is
    gone: rank 0 is blocked for good in step 3 when rank 1 fails there. Rank 0's watchdog
    still names rank 1 and its reason, in seconds, not at engine.timeout_s (600 s)."""
    output, seconds = launch_faulty(ddp, "blocked", {
        "overrides": recipe(ddp["root"], ddp["teacher"], "blocked", "cocord"),
        "hang": [0, 3], "fail": [1, 3]})
    assert "cocord-fast: error: injected failure in step 3" in output, output[-3000:]
    assert "stopped because rank 1: injected failure in step 3" in output, output[-3000:]
    assert seconds < 120


def test_resuming_on_another_number_of_processes_is_refused(ddp):
    with pytest.raises(UserError, match="written by 2 process.*this run has 1: resume it with 2"):
        Trainer(config_for_resume(ddp["work"] / "cocord", []))


def test_resuming_with_another_engine_is_refused(ddp):
    try:
        with pytest.raises(UserError, match="engine.name: 'torch' -> 'deepspeed'"):
            Trainer(config_for_resume(ddp["work"] / "cocord", ["engine.name=deepspeed"]))
    finally:
        distributed.finish(2)  # DeepSpeed's group of one, joined before the checkpoint is read
