import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cocord_fast import default_job as demo_job
from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.cli import main
from cocord_fast.config import load_config
from cocord_fast.models import build_model


def test_train_eval_export_end_to_end(tiny_overrides, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  student: resnet8\ntrain:\n  epochs: 1\n")
    assert main(["train", str(recipe), *tiny_overrides, "train.epochs=1"]) == 0
    assert "top-1" in capsys.readouterr().out
    checkpoint = tmp_path / "run" / "last.pt"

    assert main(["eval", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("top-1 ")[1].split()[0])
    assert top1 == pytest.approx(load_checkpoint(checkpoint)["last_top1"])
    assert "(40 images)" in out

    assert main(["export", str(checkpoint), str(tmp_path / "student.pth")]) == 0
    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(tmp_path / "student.pth", weights_only=True), strict=True)
    assert main(["export", str(checkpoint), str(tmp_path / "wrapped.pth"), "--key", "model"]) == 0
    wrapped = torch.load(tmp_path / "wrapped.pth", weights_only=True)["model"]
    assert all(torch.equal(wrapped[k], v) for k, v in model.state_dict().items())

    assert main(["train", "--resume", str(tmp_path / "run"), "train.epochs=2"]) == 0
    assert load_checkpoint(checkpoint)["step"] == 14


def test_default_job_trains_teacher_and_students_compares_them_and_reuses_them(
        tiny_demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # CRD's banks made the largest memory of any stage (2 x 120 samples x 65536 x 4 B = 60 MB,
    # and its heads and gathered rows grow with them), while CoCoRD's queue stays 1 MB.
    overrides = (f"data.root={tiny_demo_root}", "data.batch_size=16", "train.epochs=1",
                 "crd.num_negatives=16", "crd.embed_dim=65536", "train.progress=false")
    rows = demo_job.run_default_job(overrides=overrides)
    assert [row["run"] for row in rows[0]] == [stage for stage, _ in demo_job.STAGES]
    assert [row["method"] for row in rows[0]] == ["vanilla", "vanilla", "KD", "DKD", "DIST", "CRD",
                                                  "CoCoRD"]
    assert all(row["teacher"] == "resnet20" for row in rows[0][2:])
    # Each stage's peak is its own: the CoCoRD stage, trained after CRD, peaks lower by at
    # least the difference of their banks (a running maximum over the job could not).
    stages = {row["run"]: row for row in rows[0]}
    assert all(row["peak_memory_mb"] > 0 for row in rows[0])
    crd, cocord = stages["crd"], stages["cocord"]
    assert crd["peak_memory_mb"] - cocord["peak_memory_mb"] > crd["bank_mb"] - cocord["bank_mb"] > 50
    out = capsys.readouterr().out
    assert "resnet8 on demo (baseline: vanilla)" in out and "Δ top-1" in out  # compare's table
    assert (tmp_path / "runs" / "demo" / "compare" / "compare.json").is_file()
    teacher = tmp_path / "runs" / "demo" / "teacher" / "last.pt"
    stamp = teacher.stat().st_mtime_ns

    # Seed 0 is reused as it is; seed 1 is a whole job of its own, teacher included.
    again = demo_job.run_default_job(seeds=(0, 1), overrides=overrides)
    assert teacher.stat().st_mtime_ns == stamp
    assert [r["top1"] for r in again[0]] == [r["top1"] for r in rows[0]]
    seed1 = Path("runs/demo/seed1")
    assert [row["path"] for row in again[1]] == [str(seed1 / stage) for stage, _ in demo_job.STAGES]
    assert load_checkpoint(seed1 / "cocord" / "last.pt")["config"]["model"][
        "teacher_checkpoint"] == str(seed1 / "teacher" / "last.pt")
    summary = json.loads((tmp_path / "runs" / "demo" / "seeds.json").read_text())
    assert [entry["top1"]["values"] for entry in summary] == [
        [again[0][i]["top1"], again[1][i]["top1"]] for i in range(len(demo_job.STAGES))]
    assert "2 seeds (0, 1): mean ± standard deviation" in capsys.readouterr().out


def test_demo_command_takes_seeds_and_overrides_only(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo_job, "run_default_job", lambda *args: calls.append(args))
    assert main(["demo", "--seeds", "0,2", "--out", str(tmp_path), "data.backend=torch"]) == 0
    assert calls == [((0, 2), tmp_path, ("data.backend=torch",))]
    assert main(["demo", "configs/demo/kd.yaml"]) == 2
    assert "the demo takes its recipes from configs/demo/" in capsys.readouterr().err
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(SystemExit):
            main(["demo", "--seeds", bad])
        assert "--seeds" in capsys.readouterr().err


def test_a_missing_demo_teacher_trains_where_and_as_the_stage_reads_its_data(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = []
    monkeypatch.setattr(demo_job, "train_stage", lambda *stage: trained.append(load_config(*stage)))
    stage = load_config(demo_job.CONFIGS / "demo" / "cocord.yaml", [
        "data.root=/data/demo", "data.backend=torch", "data.num_workers=3", "train.device=cpu",
        "train.progress=false", "optim.lr=0.5"])
    demo_job.ensure_demo_teacher(stage)
    (teacher,) = trained
    assert (teacher.data.root, teacher.data.backend, teacher.data.num_workers,
            teacher.train.device, teacher.train.progress) == ("/data/demo", "torch", 3, "cpu", False)
    assert teacher.optim.lr == load_config(demo_job.CONFIGS / "demo" / "teacher.yaml").optim.lr
    assert teacher.model.student == "resnet20" and teacher.train.resume == "auto"


def test_a_stage_that_fails_ends_the_job_with_its_exit_code_and_says_where(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    not_a_directory = tmp_path / "data"
    not_a_directory.write_text("")
    assert main(["demo", f"data.root={not_a_directory}", "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "the stage in runs/demo/teacher ended with exit code 2" in err


def test_signals_reach_the_stage_through_the_job(tmp_path):
    """The stage runs in a session of its own: what the job hears, it sends on."""
    stage = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stage.stdout.readline() == "ready\n"
    with demo_job.forwarding({signal.SIGTERM}, stage):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stage.wait(timeout=10) == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_config_and_models_commands(capsys):
    assert main(["config"]) == 0
    assert "max_steps: 0" in capsys.readouterr().out
    assert main(["config", "optim.lr=0.3"]) == 0
    assert "lr: 0.3" in capsys.readouterr().out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet32x4" in out and "ShuffleV2" in out and "resnet101" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["train", "train.epochs=x"], "train.epochs: expected int"),
    (["train", "model.student=resnet9", "train.output_dir=OUT"], "model.student: unknown model 'resnet9'"),
    (["train", "data.dataset=cifar100", "data.root=/nonexistent", "train.output_dir=OUT"],
     "no CIFAR-100 data under data.root=/nonexistent"),
    (["train", "data.dataset=imagefolder", "data.root=/nonexistent", "train.output_dir=OUT"],
     "data.root=/nonexistent does not exist"),
    (["eval", "BAD"], "BAD is not a checkpoint"),
    (["export", "/nonexistent.pt", "out.pth"], "does not exist"),
    (["train", "missing.yaml"], "cannot read config file missing.yaml"),
])
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_bytes(b"\x00not a checkpoint")
    argv = [a.replace("OUT", str(tmp_path / "run")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "cocord_fast", "train", "optim.lr=abc"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "optim.lr: expected float, got 'abc'" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluation_images_left_out_are_reported_and_saved(tmp_path, capsys):
    from data_trees import write_identity_tree

    root = write_identity_tree(tmp_path / "tree", classes=3, per_class=4, val_per_class=2)
    damaged = sorted((root / "val").rglob("*.jpg"))[0]
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated
    run = tmp_path / "run"
    assert main(["train", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=32",
                 "data.batch_size=4", "data.num_workers=0", "data.backend=torch",
                 "data.skip_corrupt=true", "model.student=resnet8", "train.max_steps=1",
                 "train.progress=false", f"train.output_dir={run}"]) == 0
    assert "; 5 images, 1 unreadable image left out)" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["last_eval"]["skipped_files"] == 1
    assert main(["eval", str(run / "last.pt")]) == 0
    assert "(5 images, 1 unreadable image left out)" in capsys.readouterr().out
