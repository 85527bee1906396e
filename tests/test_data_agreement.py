"""Every process of a run reads the same data, and a run resumes only on the data it was
trained on (data/fingerprint.py): a fingerprint of each split (samples, class names, a digest
of names and labels) is agreed on by all processes and kept in every checkpoint."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cocord_fast.config import load_config
from cocord_fast.data.fingerprint import BLOCK, Fingerprint, fingerprint
from cocord_fast.data.sources import open_source
from cocord_fast.errors import UserError
from cocord_fast.models import build_model
from cocord_fast.training.resume import config_for_resume
from cocord_fast.training.trainer import train

from data_trees import write_identity_tree
from launch import start, wait_for


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_identity_tree(tmp_path_factory.mktemp("agreement") / "data")


def copy_of(tree: Path, target: Path, change: str | None = None) -> Path:
    """A copy of the tree, with one `change`: a training file missing, one moved to another
    class (the same count), or a class folder renamed."""
    shutil.copytree(tree, target)
    train = target / "train"
    if change == "missing":
        (train / "class_1" / "05.jpg").unlink()
    elif change == "relabelled":
        (train / "class_1" / "05.jpg").rename(train / "class_2" / "05.jpg")
    elif change == "renamed class":
        for split in ("train", "val"):
            (target / split / "class_2").rename(target / split / "class_z")
    return target


def print_of(root: Path, split: str = "train") -> Fingerprint:
    return fingerprint(open_source("imagefolder", root, split == "train"))


def test_copies_at_other_paths_have_one_fingerprint_and_changes_show(tree, tmp_path):
    same = print_of(copy_of(tree, tmp_path / "copy"))
    assert same == print_of(tree) and same.num_samples == 12
    assert Fingerprint.from_dict(same.to_dict()) == same
    assert same.first_difference(print_of(tree)) is None
    missing = print_of(copy_of(tree, tmp_path / "missing", "missing"))
    assert same.first_difference(missing) == "12 samples against 11"
    relabelled = print_of(copy_of(tree, tmp_path / "relabelled", "relabelled"))
    assert relabelled.num_samples == 12 and relabelled.digest != same.digest
    assert same.first_difference(relabelled) == "names or labels differ in samples 0 to 11"
    renamed = print_of(copy_of(tree, tmp_path / "renamed", "renamed class"))
    assert same.first_difference(renamed) == (
        "3 classes against 3, the first different class 2: 'class_2' against 'class_z'; "
        "names or labels differ in samples 0 to 11")


def test_block_digests_locate_a_change_past_the_first_block():
    blocks = tuple(f"{i:016x}" for i in range(3))
    before = Fingerprint(3 * BLOCK - 5, None, blocks)
    after = Fingerprint(3 * BLOCK - 5, None, blocks[:1] + ("changed",) + blocks[2:])
    assert before.first_difference(after) == (f"names or labels differ in samples {BLOCK} to "
                                              f"{2 * BLOCK - 1}")
    longer = Fingerprint(3 * BLOCK, None, blocks[:2] + ("longer",))
    assert before.first_difference(longer) == f"{3 * BLOCK - 5} samples against {3 * BLOCK}"


WORKER = textwrap.dedent("""
    import os, sys
    from cocord_fast.cli import main
    # Each process its own copy of the data set, as nodes with local copies have.
    root = sys.argv[1 + int(os.environ["RANK"])]
    sys.exit(main(["train", f"data.root={root}", *sys.argv[3:]]))
""")


@pytest.mark.parametrize("change, says", [
    ("relabelled", "train split, rank 1 ({host}) against rank 0 ({host}): sample 5 is "
                   "'class_1/05.jpg' (class 1) on rank 0 and 'class_1/06.jpg' (class 1) on "
                   "rank 1"),
    ("missing", "train split, rank 1 ({host}) against rank 0 ({host}): 12 samples against "
                "11; sample 5 is 'class_1/05.jpg' (class 1) on rank 0 and 'class_1/06.jpg' "
                "(class 1) on rank 1"),
])
def test_processes_that_read_other_data_all_stop_saying_how(tree, tmp_path, change, says):
    roots = [copy_of(tree, tmp_path / "rank0"), copy_of(tree, tmp_path / "rank1", change)]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    overrides = ["data.dataset=imagefolder", "data.image_size=16", "data.batch_size=2",
                 "data.eval_batch_size=4", "data.num_workers=0", "data.backend=torch",
                 "model.student=resnet8", "train.device=cpu", "train.epochs=1",
                 "train.progress=false", f"train.output_dir={tmp_path / 'run'}",
                 "engine.timeout_s=60"]
    job = start("torchrun", [script, *roots, *overrides], tmp_path, tmp_path / "out.log")
    wait_for(job, lambda: job.poll() is not None, "the end of the launch")
    output = (tmp_path / "out.log").read_text()
    host = subprocess.run([sys.executable, "-c", "import socket; print(socket.gethostname())"],
                          capture_output=True, text=True).stdout.strip()
    message = (f"cocord-fast: error: the processes do not read the same data in "
               f"data.root={roots[0]}")
    assert job.returncode != 0 and output.count(message) == 1, output[-3000:]
    assert says.format(host=host) in output, output[-3000:]
    assert "rank 1: the processes do not read" not in output  # rank 1 said it itself
    assert not (tmp_path / "run" / "last.pt").exists()


def resumable_run(tree: Path, tmp_path: Path, *extra: str) -> Path:
    """A run on a copy of the tree (tmp_path/data), stopped at step 2 of 6."""
    root = copy_of(tree, tmp_path / "data")
    train(load_config(overrides=[
        f"data.root={root}", "data.dataset=imagefolder", "data.image_size=16",
        "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "data.backend=torch",
        "model.student=resnet8", "train.device=cpu", "train.epochs=2", "train.max_steps=2",
        "train.progress=false", f"train.output_dir={tmp_path / 'run'}", *extra]))
    return tmp_path / "run"


def test_a_resume_on_changed_data_is_refused_saying_what_changed(tree, tmp_path, capsys):
    run = resumable_run(tree, tmp_path)
    (tmp_path / "data" / "train" / "class_1" / "05.jpg").rename(
        tmp_path / "data" / "train" / "class_2" / "05.jpg")
    with pytest.raises(UserError) as err:
        train(config_for_resume(run, ["train.max_steps=0"]))
    assert str(err.value) == (
        f"{run / 'last.pt'} was trained on other data than {tmp_path / 'data'} holds now "
        f"(train split: names or labels differ in samples 0 to 11 (then against now)): its "
        f"data position and every dataset index would name other images. Restore the data, "
        f"or continue on purpose with train.resume_on_changed_data=true")
    capsys.readouterr()
    result = train(config_for_resume(run, ["train.max_steps=0",
                                           "train.resume_on_changed_data=true"]))
    assert result.step == 6
    assert "continuing on changed data (train.resume_on_changed_data): train split: names or " \
           "labels differ in samples 0 to 11 (then against now)" in capsys.readouterr().out


def test_crd_never_continues_on_another_number_of_samples(tree, tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("resnet8", 3).state_dict(), teacher)
    run = resumable_run(tree, tmp_path, "method.name=crd", "model.teacher=resnet8",
                        f"model.teacher_checkpoint={teacher}", "crd.num_negatives=4",
                        "crd.embed_dim=8")
    (tmp_path / "data" / "train" / "class_1" / "05.jpg").unlink()
    with pytest.raises(UserError, match=r"was trained on other data \(train split: 12 samples "
                                        r"against 11 \(then against now\)\), and its crd state "
                                        r"holds one row per training sample \(12\): it cannot "
                                        r"continue on 11; start a new run"):
        train(config_for_resume(run, ["train.max_steps=0", "train.resume_on_changed_data=true"]))
