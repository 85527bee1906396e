"""One budget of open shards for the whole process (data/open_files.py): training and
evaluation over more shards than the limit on open files allows, and descriptors never closed
under a read."""
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

from PIL import Image

from cocord_fast.data.open_files import OpenFiles


def write_one_sample_shards(split: Path, count: int) -> None:
    split.mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(jpeg, format="JPEG")
    for number in range(count):
        with tarfile.open(split / f"shard-{number:06d}.tar", "w") as tar:
            for name, data in ((f"{number:06d}.jpg", jpeg.getvalue()),
                               (f"{number:06d}.cls", str(number % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


TRAIN_AND_EVALUATE = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))
    from cocord_fast.config import DataConfig
    from cocord_fast.data import build_loaders
    cfg = DataConfig(dataset="shards", root=sys.argv[1], image_size=8, batch_size=50,
                     eval_batch_size=50, num_workers=0, backend="torch")
    loaders = build_loaders(cfg, num_views=1, seed=0)
    loaders.train.start(0)
    trained = sum(len(batch.index) for batch in loaders.train)
    evaluated = sum(len(batch.index) for batch in loaders.val)
    print(trained, evaluated)
""")


def test_training_and_evaluation_over_more_shards_than_open_files_allow(tmp_path):
    """A limit of 600 open files (its reserve: 256) and 400 + 400 shards: a budget per split
    would hold 344 + 344 descriptors at once, past the limit (EMFILE at evaluation)."""
    for split in ("train", "val"):
        write_one_sample_shards(tmp_path / "data" / split, 400)
    script = tmp_path / "run.py"
    script.write_text(TRAIN_AND_EVALUATE)
    done = subprocess.run([sys.executable, script, tmp_path / "data"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["400", "400"]


def test_the_least_recently_used_file_is_closed_but_never_under_a_read(tmp_path,
                                                                       monkeypatch):
    paths = []
    for number in range(3):
        paths.append(tmp_path / f"{number}.bin")
        paths[-1].write_bytes(bytes([number]) * 10)
    files = OpenFiles()
    files.budget = 2
    assert files.read(paths[0], 0, 3) == b"\0\0\0" and files.read(paths[1], 5, 1) == b"\1"
    files.read(paths[0], 0, 1)  # 0 is now the most recently used
    assert files.read(paths[2], 0, 2) == b"\2\2"
    assert list(files.files) == [paths[0], paths[2]]  # 1 was closed

    # A read in progress through file 0 keeps it open; file 2 is closed for file 1 instead.
    entered, release = threading.Event(), threading.Event()
    pread = os.pread

    def slow_pread(descriptor, length, start):
        if descriptor == files.files[paths[0]].descriptor:
            entered.set()
            release.wait(10)
        return pread(descriptor, length, start)

    monkeypatch.setattr(os, "pread", slow_pread)
    reader = threading.Thread(target=lambda: files.read(paths[0], 0, 1))
    reader.start()
    assert entered.wait(10)
    files.read(paths[2], 0, 1)  # 2 becomes the newest: 0, the oldest, is in use
    assert files.read(paths[1], 0, 1) == b"\1"
    assert list(files.files) == [paths[0], paths[1]]
    release.set()
    reader.join(10)
    files.close(paths)
    assert not files.files
