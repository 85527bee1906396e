import os
import signal

import torch

# Triton kernels run on CPU only in its interpreter, which must be chosen before any
# @triton.jit decorator executes. Where there is a CUDA device they run compiled on it: the
# interpreter would be handed CUDA tensors by the GPU tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cocord_fast.data import demo  # noqa: E402

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """No test touches the user's cache: the demo data set and indexes go to a per-session
    folder. Session-wide, so that it holds for module fixtures too (they are set up before
    any function-scoped one): a module fixture once copied the tiny demo set into ~/.cache."""
    found = os.environ.get("COCORD_FAST_CACHE")
    os.environ["COCORD_FAST_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if found is None:
        os.environ.pop("COCORD_FAST_CACHE")
    else:
        os.environ["COCORD_FAST_CACHE"] = found


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A run stopped by a signal leaves its stop signals ignored (its process is on the way
    out): the next test finds the handlers this one found."""
    found = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in found.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: with two threads, OpenMP waits on a core another process holds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> Path:
    """A small demo data set (10 classes, 12 train and 4 val images each) made once per session."""
    root = tmp_path_factory.mktemp("tiny_demo") / "data"
    original = dict(demo.SPLITS)
    demo.SPLITS.update(train=12, val=4)
    try:
        demo.ensure_demo_dataset(root)
    finally:
        demo.SPLITS.update(original)
    return root


@pytest.fixture
def tiny_overrides(tiny_demo_root, tmp_path) -> list[str]:
    """Overrides that make any recipe a seconds-long run on the tiny demo data, on the CPU
    (also where there is a GPU: the tests compare against CPU references)."""
    return [f"data.root={tiny_demo_root}", "data.dataset=demo", "data.batch_size=16",
            "train.device=cpu",
            "data.eval_batch_size=64", "data.num_workers=0", "model.student=resnet8",
            "train.epochs=2", "train.log_every=1", "train.progress=false",
            f"train.output_dir={tmp_path / 'run'}"]
