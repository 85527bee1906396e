"""A demo recipe under a launcher after the 1-process default job's teacher: a finished run is
read as a teacher by any number of processes (CPU, gloo)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from cocord_fast.configs import ROOT as CONFIGS
from cocord_fast.data.index_files import default_cache_dir
from launch import BIN, launch

pytestmark = pytest.mark.slow

STUDENT_RUN = ["data.batch_size=8", "train.max_steps=2", "train.device=cpu",
               "train.progress=false"]


@pytest.fixture(scope="module")
def demo_job(tiny_demo_root, tmp_path_factory):
    """A folder where the demo teacher was trained by one process, as `cocord-fast train`
    does first, on the tiny demo data placed where the demo recipes look for it."""
    work = tmp_path_factory.mktemp("demo_job")
    shutil.copytree(tiny_demo_root, default_cache_dir() / "data", dirs_exist_ok=True)
    done = subprocess.run(
        [BIN / "cocord-fast", "train", CONFIGS / "demo" / "teacher.yaml",
         "train.device=cpu", "train.progress=false"],
        cwd=work, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return work


@pytest.mark.parametrize("launcher,engine", [
    ("torchrun", ["engine.name=torch"]),
    ("deepspeed", ["engine.name=deepspeed", "engine.zero_stage=1"]),
])
def test_two_ranks_distil_from_the_teacher_one_process_trained(demo_job, launcher, engine):
    teacher = (demo_job / "runs/demo/teacher/last.pt").read_bytes()
    output = launch(launcher, [BIN / "cocord-fast", "train", CONFIGS / "demo" / "cocord.yaml",
                               *STUDENT_RUN, *engine,
                               f"train.output_dir=runs/{launcher}_cocord"], demo_job)
    assert "resume it with" not in output
    assert (demo_job / f"runs/{launcher}_cocord/last.pt").is_file()
    assert (demo_job / "runs/demo/teacher/last.pt").read_bytes() == teacher  # read, not resumed
