"""Methods and data sources as plugins (`plugins.py`): the example package under
tests/plugin_example adds a method and a source without a line inside cocord_fast. The method
through its entry point, as pip installs it, in processes of their own; the source registered
in this process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cocord_fast.checkpoints.files import load_checkpoint
from cocord_fast.config import load_config
from cocord_fast.data.sources import describe_sources
from cocord_fast.errors import UserError
from cocord_fast.plugins import METHODS, SOURCES, Registry
from cocord_fast.training.trainer import train

from launch import write_teacher
from markers import BACKENDS

EXAMPLE = Path(__file__).parent / "plugin_example"


@pytest.fixture
def installed_example(tmp_path) -> dict[str, str]:
    """The example package laid out as pip installs it (its module, and a dist-info folder
    whose entry_points.txt is its pyproject.toml's), on the path of the processes a test
    starts: their environment."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "cocord_plugin_example.py", site)
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
        for group, points in project["entry-points"].items()))
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}


def cocord_fast(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cocord_fast", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_method_of_another_package_trains_resumes_and_is_compared(
        installed_example, tiny_overrides, tmp_path):
    listed = cocord_fast(installed_example, "methods")
    assert listed.returncode == 0 and "logit_mse (logit MSE, cocord_plugin_example)" in \
        listed.stdout and "logit_mse.weight: 1.0" in listed.stdout
    run = tmp_path / "run"
    overrides = [*tiny_overrides, "method.name=logit_mse", "logit_mse.weight=0.5",
                 "model.teacher=resnet8", f"model.teacher_checkpoint={write_teacher(tmp_path)}"]
    first = cocord_fast(installed_example, "train", *overrides, "train.max_steps=5")
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(run / "last.pt")["step"] == 5
    resumed = cocord_fast(installed_example, "train", *overrides, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    last = load_checkpoint(run / "last.pt")
    # 2 epochs of 120 images in batches of 16: 14 steps. The buffer counted the images of
    # all of them: the resumed run started from the saved count.
    assert last["step"] == 14 and int(last["method"]["images_seen"]) == 14 * 16
    compared = cocord_fast(installed_example, "compare", run, "--out", tmp_path / "report")
    assert compared.returncode == 0, compared.stderr
    assert "logit MSE" in compared.stdout
    # The package gone, its run is named with the way back.
    gone = cocord_fast({**installed_example, "PYTHONPATH": ""}, "compare", run, "--out",
                       tmp_path / "report")
    assert gone.returncode != 0
    assert "method.name: unknown method 'logit_mse'" in gone.stderr
    assert "entry-point group cocord_fast.methods" in gone.stderr


@pytest.fixture
def memory_source():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import cocord_plugin_example
        SOURCES.add(cocord_plugin_example.InMemory)
        yield cocord_plugin_example.InMemory
    finally:
        SOURCES.remove("memory")
        sys.path.remove(str(EXAMPLE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_source_of_another_package_feeds_a_run(memory_source, tiny_overrides, tmp_path,
                                                 backend):
    assert "memory (cocord_plugin_example): Ten classes of 16x16 images" in describe_sources()
    cfg = load_config(overrides=[*tiny_overrides, "data.dataset=memory", "data.root=",
                                 f"data.backend={backend}", "train.max_steps=6"])
    result = train(cfg)
    assert result.step == 6 and 0 <= result.top1 <= 100
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["data"]["train"]["num_samples"] == 200
    assert saved["data"]["val"]["num_samples"] == 50
    with pytest.raises(UserError, match="data.image_size=64: data.dataset=memory has 16x16 "
                                        "images, which are never resized"):
        train(load_config(overrides=[*tiny_overrides, "data.dataset=memory",
                                     "data.image_size=64"]))


def test_plugins_that_clash_or_lie_about_their_name_are_refused(monkeypatch):
    class Twin:
        name = "kd"

    with pytest.raises(UserError, match="two methods are named 'kd'"):
        METHODS.add(Twin)
    registry = Registry("method", "cocord_fast.no_such_group",
                        ("cocord_fast.methods.kd:KD", "cocord_fast.methods.kd:KD"))
    with pytest.raises(UserError, match="two methods are named 'kd'"):
        registry.all()
    with pytest.raises(UserError, match="data.dataset: unknown data source 'nope'; known: "
                                        "demo, cifar100, imagefolder, shards"):
        load_config(overrides=["data.dataset=nope"])
