"""The scripts in bench/ as users run them: gpu_check.sh's control flow and budget, data.py and
engines.py (with and without DALI and DeepSpeed), index.py."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
    *kernels.py*) exit 3 ;;
    *"pip install -q --no-deps"*) exec sleep "${INSTALL_SLEEP:-0}" ;;
esac
"""


def run_gpu_check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "TRITON_INTERPRET": "1",
             **env}, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_gpu_check_runs_every_part_past_a_failure_and_names_it(tmp_path):
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "nvidia_dali.whl").touch()
    result, calls = run_gpu_check(tmp_path, GPU_CHECK_WHEELS=str(wheels),
                                  COCORD_REFERENCE=str(tmp_path / "CoCoRD"),
                                  TMPDIR=str(tmp_path))
    jpegs = str(tmp_path / "cocord_fast_jpegs")
    assert result.returncode == 1, result.stdout + result.stderr
    assert [call.split()[:3] for call in calls] == [
        ["-m", "pip", "install"], ["-m", "pip", "install"], ["-m", "pytest", "-q"],
        ["bench/kernels.py", "--quick", "--out"], ["-m", "cocord_fast", "bench"],
        ["-m", "cocord_fast", "bench"], ["-m", "cocord_fast", "bench"],
        ["bench/versus_reference.py", "--reference", str(tmp_path / "CoCoRD")],
        ["bench/data.py", "--threads", "8"], ["bench/data.py", "--write-tree", jpegs],
        ["-m", "cocord_fast", "bench"], ["-m", "cocord_fast", "bench"],
        ["bench/engines.py", "--engines", "torch"], ["-m", "cocord_fast", "bench"]]
    assert str(wheels / "nvidia_dali.whl") in calls[1] and "-m gpu" in calls[2]
    benches = [call for call in calls if "cocord_fast bench" in call]
    assert [("--image-size 32" in c, c.split("--compile ")[1].split()[0]) for c in benches] == [
        (True, "off"), (True, "reduce-overhead"), (False, "off"), (False, "off"), (False, "off"),
        (False, "default")]
    assert all("--data pipeline" in b and f"data.root={jpegs}" in b for b in benches[3:5])
    assert "data.read_ahead" not in benches[3] and "data.read_ahead=false" in benches[4]
    assert "--device cuda" in calls[7]
    assert calls[12].split()[1:6] == ["--engines", "torch", "deepspeed:1", "torch+compile",
                                      "deepspeed:1+compile"] and "--image-size 224" in calls[12]
    assert all(f"--out {tmp_path / 'out'}" in call
               for call in calls[3:] if "--write-tree" not in call)
    summary = (tmp_path / "out" / "gpu_check_summary.txt").read_text()
    assert "FAILED:\n  kernels (exit 3)\n" in summary and "bench_224_compile" in summary
    assert (tmp_path / "out" / "kernels.log").is_file()


def test_gpu_check_ends_within_its_budget_when_a_part_hangs(tmp_path):
    started = time.perf_counter()
    result, calls = run_gpu_check(tmp_path, GPU_CHECK_BUDGET_S="2", INSTALL_SLEEP="30")
    assert time.perf_counter() - started < 20
    assert result.returncode == 1 and len(calls) == 1
    summary = (tmp_path / "out" / "gpu_check_summary.txt").read_text()
    assert "install (timed out after 2s)" in summary
    assert "pytest_gpu (skipped: the 2s budget is spent)" in summary


def run_bench_script(script: str, *args: str, hide: str | None = None,
                     check: bool = True) -> subprocess.CompletedProcess:
    """bench/SCRIPT as users run it, with the top-level package `hide` as if not installed."""
    hidden = f"sys.modules[{hide!r}] = None; " if hide else ""
    code = f"import runpy, sys; {hidden}runpy.run_path('bench/{script}', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_data_bench(*args: str, hide_dali: bool = False) -> subprocess.CompletedProcess:
    return run_bench_script("data.py", *args, hide="nvidia" if hide_dali else None)


def test_data_bench_writes_a_tree_the_trainer_reads(tmp_path):
    from cocord_fast.data.sources import open_source

    run_data_bench("--write-tree", str(tmp_path / "jpegs"), "--images", "6", "--classes", "3",
                   "--source-size", "64", "48")
    train = open_source("imagefolder", tmp_path / "jpegs", train=True)
    assert len(train) == 6 and train.num_classes == 3
    assert len(open_source("imagefolder", tmp_path / "jpegs", train=False)) == 3


def test_index_bench_times_the_listing_and_the_index_read(tmp_path):
    run_bench_script("index.py", "--files", "300", "--classes", "3", "--repeats", "1",
                     "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("index_*.json")).read_text())
    assert report["files"] == 300 and report["index_bytes_per_file"] > 0
    assert all(report[f"{row}_s"] > 0 and report[f"{row}_s_per_million"] > 0
               for row in ("pathlib_listing", "scan", "index_read"))


def test_data_bench_without_dali_times_torchvision_and_says_why(tmp_path):
    result = run_data_bench("--images", "8", "--classes", "2", "--source-size", "64", "48",
                            "--image-size", "32", "--batch-size", "4", "--threads", "0",
                            "--epochs", "1", "--repeats", "1", "--views", "1",
                            "--out", str(tmp_path), hide_dali=True)
    assert "DALI is not installed" in result.stdout
    (path,) = tmp_path.glob("data_*.json")
    report = json.loads(path.read_text())
    assert [(row["backend"], row["data"]) for row in report["rows"]] == [
        ("torch", "imagefolder"), ("torch", "shards")]
    assert all(row["img_per_s"] > 0 for row in report["rows"]) and report["convert_s"] > 0
    assert report["skipped"]["dali"] == "DALI is not installed"
    assert report["training_wait"] == []


def test_data_bench_times_the_training_threads_wait_with_the_read_ahead_on_and_off(tmp_path):
    pytest.importorskip("nvidia.dali")
    run_data_bench("--images", "8", "--classes", "2", "--source-size", "64", "48",
                   "--image-size", "32", "--batch-size", "4", "--threads", "1", "--epochs", "1",
                   "--repeats", "1", "--views", "1", "--step-ms", "1", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("data_*.json")).read_text())
    assert [row["read_ahead"] for row in report["training_wait"]] == [True, False]
    assert all(row["wait_ms_per_batch"] > 0 and row["batches"] == 2
               for row in report["training_wait"])


ENGINES_TINY = ["--teacher", "resnet8", "--student", "resnet8", "--image-size", "32",
                "--batch-size", "4", "--warmup", "1", "--steps", "1", "--rounds", "1"]


def test_engines_bench_without_deepspeed_times_torch_and_says_why(tmp_path):
    result = run_bench_script("engines.py", "--engines", "torch", "deepspeed:1+compile",
                              *ENGINES_TINY, "--out", str(tmp_path), hide="deepspeed")
    assert "deepspeed:1+compile" in result.stdout and "DeepSpeed is not installed" in result.stdout
    (path,) = tmp_path.glob("engines_*.json")
    report = json.loads(path.read_text())
    assert [row["engine"] for row in report["rows"]] == ["torch"]
    assert report["rows"][0]["img_per_s"] > 0
    assert "DeepSpeed is not installed" in report["skipped"]["deepspeed:1+compile"]


@pytest.mark.parametrize("engine", ["torch:1", "deepspeed:1+fast", "zero:1"])
def test_engines_bench_names_a_misspelt_engine_before_any_work(engine, tmp_path):
    result = run_bench_script("engines.py", "--engines", "torch", engine, *ENGINES_TINY,
                              "--out", str(tmp_path), check=False)
    assert result.returncode != 0 and f"--engines: {engine!r}" in result.stderr
    assert not list(tmp_path.iterdir())


def test_bank_scores_bench_times_each_torch_path_against_the_gather(tmp_path):
    result = run_bench_script("bank_scores.py", "--rows", "300", "200000", "--batch-size", "2",
                              "--warmup", "0", "--repeats", "1", "--out", str(tmp_path))
    (path,) = tmp_path.glob("bank_scores_*.json")
    report = json.loads(path.read_text())
    rows = {(row["N"], row["impl"]): row for row in report["rows"]}
    assert set(rows) == {(n, impl) for n in (300, 200000)
                         for impl in ("gather", "whole bank", "chunked")}
    assert rows[300, "gather"]["rule"] == "whole bank"
    assert rows[200000, "gather"]["rule"] == "chunked"
    assert rows[300, "gather"]["x_gather"] == 1 and rows[300, "chunked"]["ms"] > 0
    assert "the rule picks: chunked" in result.stdout and path.with_suffix(".png").exists()
