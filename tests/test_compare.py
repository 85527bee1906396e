"""`cocord-fast compare` on runs the tests make: the table, the baseline difference, the
grouping of other students, and the JSON and plots it writes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cocord_fast.cli import main
from cocord_fast.compare import format_seed_summary, seed_summary
from cocord_fast.config import load_config
from cocord_fast.errors import UserError
from cocord_fast.training.trainer import train

from launch import write_teacher


@pytest.fixture
def runs(tiny_overrides, tmp_path):
    teacher = write_teacher(tmp_path)
    made = {}
    for name, method, extra in (("alone", "vanilla", []), ("cocord", "cocord", []),
                                ("crd", "crd", ["train.max_steps=10"])):
        made[name] = tmp_path / name
        train(load_config(overrides=tiny_overrides + [
            f"method.name={method}", "model.teacher=resnet8",
            f"model.teacher_checkpoint={teacher}",
            "cocord.queue_size=40", "cocord.embed_dim=16", "cocord.proj_hidden_dim=16",
            "cocord.pred_hidden_dim=8", "crd.num_negatives=16", "crd.embed_dim=16",
            f"train.output_dir={made[name]}", *extra]))
    return made


def test_compare_prints_one_table_against_the_first_run_and_writes_json_and_plots(
        runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", str(runs["alone"]), str(runs["cocord"]), str(runs["crd"]),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("run "))
    assert header.split() == ["run", "method", "teacher", "passes", "steps", "state", "top-1",
                              "best", "top-5", "Δ", "top-1", "img/s", "slowest", "rank", "data",
                              "wait", "wall", "s", "peak", "MB", "bank", "MB"]
    rows = {row["run"]: row for row in json.loads((out / "compare.json").read_text())}
    assert [rows[r]["method"] for r in ("alone", "cocord", "crd")] == ["vanilla", "CoCoRD", "CRD"]
    # METHOD.md: the student's own pass; CoCoRD two student, two slow-student and one teacher
    # pass; CRD one student and one teacher pass.
    assert [rows[r]["encoder_passes"] for r in ("alone", "cocord", "crd")] == [1, 5, 2]
    assert rows["alone"]["delta_top1"] == 0
    assert rows["cocord"]["delta_top1"] == pytest.approx(rows["cocord"]["top1"]
                                                         - rows["alone"]["top1"])
    assert rows["cocord"]["steps"] == "14/14" and rows["cocord"]["state"] == "finished"
    assert rows["crd"]["steps"] == "10/10" and rows["crd"]["state"] == "finished"
    assert rows["cocord"]["bank_mb"] == pytest.approx(40 * 16 * 4 / 2 ** 20)
    assert rows["crd"]["bank_mb"] == pytest.approx(2 * 120 * 16 * 4 / 2 ** 20)
    assert all(rows[r]["wall_s"] > 0 and rows[r]["img_per_s"] > 0 for r in rows)
    # One process: the slowest rank is the run itself.
    assert all(rows[r]["slowest_rank_img_per_s"] == rows[r]["img_per_s"] for r in rows)
    assert all(0 <= rows[r]["data_wait_share"] <= 1 for r in rows)
    assert {p.name for p in out.glob("*.png")} == {"resnet8_on_demo_top1.png",
                                                   "resnet8_on_demo_losses.png",
                                                   "resnet8_on_demo_speed.png", "summary.png"}


def test_runs_of_other_students_form_their_own_table(runs, tiny_overrides, tmp_path, capsys):
    other = tmp_path / "resnet14"
    train(load_config(overrides=tiny_overrides + ["model.student=resnet14", "train.max_steps=7",
                                                  f"train.output_dir={other}"]))
    assert main(["compare", str(runs["alone"]), str(other), "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "2 tables: runs compare within one student and data set" in text
    assert "resnet8 on demo (baseline: alone)" in text
    assert "resnet14 on demo (baseline: resnet14)" in text


def test_a_run_still_going_is_shown_as_such_and_a_non_run_is_refused(runs, tmp_path, capsys):
    # As if the 10-step run were a whole schedule of 14 steps that has not ended yet.
    config = runs["crd"] / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 10", "max_steps: 0"))
    assert main(["compare", str(runs["crd"]), "--out", str(tmp_path / "r")]) == 0
    assert "10/14  in progress or stopped" in capsys.readouterr().out
    with pytest.raises(UserError, match="is not a run directory"):
        from cocord_fast.compare import compare
        compare([tmp_path], tmp_path / "r")


def test_seed_summary_is_the_mean_and_sample_deviation_of_each_stage_over_seeds():
    def row(run, top1, delta, wall):
        return {"run": run, "method": run, "student": "resnet8", "top1": top1,
                "delta_top1": delta, "wall_s": wall}

    rows = {0: [row("alone", 70.0, 0.0, 10.0), row("kd", 74.0, 4.0, 20.0)],
            2: [row("alone", 72.0, 0.0, 12.0), row("kd", 73.0, 1.0, None)],
            1: [row("alone", 68.0, 0.0, 11.0), row("kd", 75.0, 7.0, 22.0)]}
    alone, kd = seed_summary(rows)
    assert alone["seeds"] == [0, 1, 2]
    assert alone["top1"] == {"mean": 70.0, "std": 2.0, "values": [70.0, 68.0, 72.0]}
    assert kd["top1"]["mean"] == 74.0 and kd["top1"]["std"] == pytest.approx(1.0)
    assert kd["delta_top1"]["std"] == pytest.approx(3.0)  # deltas 4, 7, 1: sqrt((0 + 9 + 9) / 2)
    assert kd["wall_s"] is None  # a seed without it makes no mean
    table = format_seed_summary([alone, kd]).splitlines()
    assert table[0].split() == ["run", "method", "model", "top-1", "Δ", "top-1", "wall", "s"]
    assert "70.00 ± 2.00" in table[1] and "+4.00 ± 3.00" in table[2] and table[2].endswith("-")


def test_only_the_first_cpu_run_of_a_process_reports_its_peak_memory():
    """A later run's resident memory would include what earlier runs of the process left; and
    a run's process does not report the peak of the process that started it (1.6 GB here),
    as ru_maxrss would after fork and exec."""
    code = ("import torch\n"
            "from cocord_fast.training.metrics import PeakMemory\n"
            "first, second = PeakMemory(torch.device('cpu')), PeakMemory(torch.device('cpu'))\n"
            "print(first.read_mb(), second.read_mb())\n")
    held = torch.ones(400_000_000)  # this process's peak: at least 1.6 GB
    first, second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()
    del held
    assert 0 < float(first) < 1200 and second == "None"
