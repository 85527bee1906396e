import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.config import load_config
from cocord_fast.data.order import epoch_order
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError
from cocord_fast.training.metrics import MetricAccumulator, read_log
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import Trainer, train

from launch import train_losses
from markers import BACKENDS


def mean_train_loss(trainer, batches=3):
    """Cross-entropy of the student in eval mode over the first training batches of epoch 0."""
    student = trainer.method.student().eval()
    trainer.loaders.train.start(0)
    losses = []
    with torch.no_grad():
        for _, batch in zip(range(batches), trainer.loaders.train):
            losses.append(F.cross_entropy(student(batch.views[0]), batch.labels))
    return torch.stack(losses).mean().item()


def test_a_few_steps_lower_the_loss(tiny_overrides):
    trainer = Trainer(load_config(overrides=tiny_overrides + [
        "train.epochs=8", "optim.lr=0.05", "optim.schedule=cosine"]))
    before = mean_train_loss(trainer)
    trainer.fit()
    assert mean_train_loss(trainer) < before - 0.1


def test_run_directory_contents(tiny_overrides, tmp_path):
    result = train(load_config(overrides=tiny_overrides + ["train.ckpt_every=5"]))
    run = tmp_path / "run"
    assert result.step == 14  # 2 epochs of 7 steps
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "metrics.jsonl", "last.pt", "best.pt", "step_00000005.pt",
        "step_00000010.pt", "tensorboard"}
    assert load_config(run / "config.yaml").train.ckpt_every == 5
    records = read_log(run)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 15))
    for key in ("step", "epoch", "lr", "loss", "loss_cls", "img_per_s"):
        assert key in train_records[0]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [7, 14]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in evals)
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 14 and last["config"]["train"]["ckpt_every"] == 5
    assert last["last_top1"] == pytest.approx(evals[-1]["top1"])
    assert load_checkpoint(run / "best.pt")["best_top1"] == max(r["top1"] for r in evals)


def test_max_steps_stops_early_and_evaluates(tiny_overrides, tmp_path):
    result = train(load_config(overrides=tiny_overrides + ["train.max_steps=3"]))
    assert result.step == 3
    records = read_log(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_overrides, tmp_path, backend):
    """Stop mid-epoch at step 5, resume to step 14: every later loss and the final weights equal
    those of one uninterrupted run."""
    tiny_overrides = tiny_overrides + [f"data.backend={backend}"]
    full = tiny_overrides + [f"train.output_dir={tmp_path / 'full'}"]
    train(load_config(overrides=full))
    split = tiny_overrides + [f"train.output_dir={tmp_path / 'split'}"]
    train(load_config(overrides=split + ["train.max_steps=5"]))
    torch.manual_seed(999)  # a resumed process starts with other RNG state
    train(config_for_resume(tmp_path / "split", ["train.max_steps=0"]))


    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")  # bit-identical
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["method"] for run in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The eval at step 5 (the stop) is kept; the log has no duplicate train records.
    assert sorted(r["step"] for r in read_log(tmp_path / "split") if r["kind"] == "eval") == [5, 7, 14]


def test_resume_drops_log_records_written_after_the_checkpoint(tiny_overrides, tmp_path):
    train(load_config(overrides=tiny_overrides + ["train.max_steps=4"]))
    log = tmp_path / "run" / "metrics.jsonl"
    with open(log, "a") as f:  # as if the process died after logging step 5, amid step 6
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 1.0}) + "\n")
        f.write(json.dumps({"kind": "train", "step": 6, "loss": 1.0})[:20])
    assert [r["step"] for r in read_log(tmp_path / "run") if r["kind"] == "train"][-1] == 5
    train(load_config(overrides=tiny_overrides + ["train.resume=auto", "train.max_steps=6"]))
    steps = [r["step"] for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_an_existing_run_is_never_overwritten(tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["train.max_steps=1"])
    train(cfg)
    with pytest.raises(UserError, match="already holds a run; continue it with train.resume=auto"):
        Trainer(cfg)


def test_resume_from_a_missing_checkpoint_is_an_error(tiny_overrides, tmp_path):
    with pytest.raises(UserError, match="train.resume=.*no checkpoint at"):
        Trainer(load_config(overrides=tiny_overrides + [f"train.resume={tmp_path / 'nothing'}"]))


def test_unknown_model_fails_before_data_is_made(tmp_path, monkeypatch):
    import cocord_fast.data.demo as demo

    monkeypatch.setattr(demo, "ensure_demo_dataset", lambda root: pytest.fail("data was made"))
    with pytest.raises(UserError, match="model.student: unknown model 'resnet9'"):
        Trainer(load_config(overrides=["model.student=resnet9", f"train.output_dir={tmp_path}"]))


def test_divergence_stops_the_run_before_it_saves(tiny_overrides, tmp_path):
    """Logging is forced before every save, and a non-finite loss is a clear error there."""
    cfg = load_config(overrides=tiny_overrides + ["optim.lr=1e30", "train.log_every=100"])
    with pytest.raises(UserError, match="training diverged: non-finite metrics at step 7"):
        train(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_metric_accumulator_means_and_resets():
    acc = MetricAccumulator()
    acc.add({"a": torch.tensor(1.0), "b": torch.tensor(4.0)})
    acc.add({"a": torch.tensor(3.0), "b": torch.tensor(0.0)})
    assert acc.pop() == {"a": 2.0, "b": 2.0}
    assert acc.pop() == {}


def test_keep_last_bounds_the_periodic_checkpoints(tiny_overrides, tmp_path):
    train(load_config(overrides=tiny_overrides + ["train.ckpt_every=2", "train.keep_last=2"]))
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*.pt")) == [
        "step_00000012.pt", "step_00000014.pt"]
    assert load_checkpoint(tmp_path / "run" / "step_00000012.pt")["step"] == 12


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tiny_overrides, tmp_path,
                                                                 capsys):
    from test_checkpoint import flip_a_byte

    full = tiny_overrides + [f"train.output_dir={tmp_path / 'full'}"]
    train(load_config(overrides=full))
    train(load_config(overrides=tiny_overrides + ["train.max_steps=12", "train.ckpt_every=4"]))
    run = tmp_path / "run"
    for name in ("last.pt", "step_00000012.pt"):
        flip_a_byte(run / name)
    train(load_config(overrides=tiny_overrides + ["train.resume=auto"]))
    out = capsys.readouterr().out
    assert f"corrupt or truncated checkpoint {run / 'last.pt'}" in out
    assert "resuming from" in out and "step_00000008.pt (step 8)" in out


    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "full")


def test_a_run_whose_checkpoints_are_all_damaged_is_not_restarted(tiny_overrides, tmp_path):
    from test_checkpoint import flip_a_byte

    train(load_config(overrides=tiny_overrides + ["train.max_steps=3"]))
    flip_a_byte(tmp_path / "run" / "last.pt")
    with pytest.raises(UserError, match="corrupt or truncated checkpoint .*last.pt"):
        Trainer(load_config(overrides=tiny_overrides + ["train.resume=auto"]))


def test_tensorboard_hides_the_steps_a_resumed_run_repeats(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_config(overrides=tiny_overrides + ["train.max_steps=6", "train.ckpt_every=4"]))
    run = tmp_path / "run"
    train(config_for_resume(run / "step_00000004.pt", ["train.max_steps=8"]))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = {r["step"]: r["loss"] for r in read_log(run) if r["kind"] == "train"}
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(1, 9)) == list(losses)
    assert all(s.value == pytest.approx(losses[s.step]) for s in scalars)


def test_triton_kernels_on_cpu_without_the_interpreter_are_a_clear_error(tiny_overrides,
                                                                         monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="train.kernels=triton on cpu: .*TRITON_INTERPRET=1"):
        Trainer(load_config(overrides=tiny_overrides + ["train.kernels=triton",
                                                        "train.device=cpu"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["kd", "crd", "cocord"])
def test_every_method_resumes_exactly_mid_epoch_and_at_an_epoch_boundary(tiny_overrides,
                                                                          tmp_path, method,
                                                                          backend):
    """Stopped after step 5 (mid-epoch) or 7 (the end of epoch 1), then resumed to step 14:
    every loss, and the whole method state (queue and pointer, slow copies, banks and Z),
    equal those of one uninterrupted run."""
    from launch import write_teacher

    teacher = write_teacher(tmp_path)
    overrides = tiny_overrides + [
        f"method.name={method}", f"data.backend={backend}", "model.teacher=resnet8",
        f"model.teacher_checkpoint={teacher}", "cocord.queue_size=40", "cocord.embed_dim=16",
        "cocord.proj_hidden_dim=16", "cocord.pred_hidden_dim=8", "crd.num_negatives=16",
        "crd.embed_dim=16"]


    train(load_config(overrides=overrides + [f"train.output_dir={tmp_path / 'full'}"]))
    full = load_checkpoint(tmp_path / "full" / "last.pt")["method"]
    for stop in (5, 7):
        run = tmp_path / f"stop{stop}"
        train(load_config(overrides=overrides + [f"train.output_dir={run}",
                                                 f"train.max_steps={stop}"]))
        torch.manual_seed(999)  # a resumed process starts with other RNG state
        train(config_for_resume(run, ["train.max_steps=0"]))
        full_losses = train_losses(tmp_path / "full")
        assert train_losses(run) == full_losses and len(full_losses) == 14
        resumed = load_checkpoint(run / "last.pt")["method"]
        assert all(torch.equal(resumed[k], full[k]) for k in full), stop


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unreadable_file_mid_run_saves_the_last_step_and_the_fixed_run_resumes_exactly(
        tiny_demo_root, tiny_overrides, tmp_path, backend):
    """The first image of step 4 (epoch 0) is truncated: the run saves step 3 and stops with
    the file named and what to do; with the file restored, the resumed run logs the losses
    and ends with the weights of a run that never stopped."""
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    overrides = tiny_overrides + [f"data.root={root}", f"data.backend={backend}"]
    train(load_config(overrides=overrides + [f"train.output_dir={tmp_path / 'full'}"]))
    bad = open_source("demo", root, train=True).path(int(epoch_order(120, 16, seed=0,
                                                                     epoch=0)[0][3 * 16]))
    intact = bad.read_bytes()
    bad.write_bytes(intact[:200])
    run = tmp_path / "stopped"
    with pytest.raises(UserError) as stopped:
        train(load_config(overrides=overrides + [f"train.output_dir={run}"]))
    assert str(stopped.value).startswith(f"cannot decode image {bad}: ")
    assert str(stopped.value).endswith(
        f"{run}/last.pt holds step 3, the last whose data every process could read: replace "
        f"the file with a readable image or set data.skip_corrupt=true, then continue with "
        f"--resume {run}")
    assert load_checkpoint(run / "last.pt")["step"] == 3
    (stop,) = [r for r in read_log(run) if r["kind"] == "stop"]
    assert stop["step"] == 3 and str(bad) in stop["error"]

    bad.write_bytes(intact)
    train(config_for_resume(run, []))
    assert train_losses(run) == train_losses(tmp_path / "full")
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["method"] for name in ("full", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
