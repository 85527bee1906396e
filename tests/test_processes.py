"""The process helpers in one process: which device a process drives (and the LOCAL_RANK that
goes with it), gathers that carry host data only, DeepSpeed following the run's device, and
the watchdog that names why a group stops; and the turns in which the processes of two nodes
fill caches. The 2-process training runs are in test_distributed.py and test_deepspeed.py."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from cocord_fast import distributed
from cocord_fast.errors import UserError

from launch import launch_nodes, run_nodes


@pytest.fixture
def no_launcher(monkeypatch):
    """A process no launcher started (what the test sets comes undone afterwards)."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_a_single_process_on_cuda_n_drives_it_and_gives_deepspeed_its_local_rank(no_launcher):
    assert distributed.process_device("cuda:1", cuda_devices=2) == torch.device("cuda", 1)
    assert os.environ["LOCAL_RANK"] == "1"  # DeepSpeed and NCCL take the GPU from it
    assert distributed.process_device("cuda:0", cuda_devices=2) == torch.device("cuda", 0)
    assert os.environ["LOCAL_RANK"] == "0"


def test_each_launched_process_drives_the_gpu_of_its_local_rank(no_launcher):
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("LOCAL_RANK", "1")
    for name in ("cuda", "auto" if torch.cuda.is_available() else "cuda", "cuda:1"):
        if name == "cuda:1":
            no_launcher.setenv("WORLD_SIZE", "1")  # one process the launcher put on GPU 1
        assert distributed.process_device(name, cuda_devices=2) == torch.device("cuda", 1)


@pytest.mark.parametrize("name,world,local_rank,gpus,message", [
    ("gpu", None, None, 2, r"train.device='gpu': expected auto, cpu, cuda or cuda:N"),
    ("cpu:1", None, None, 2, r"expected auto, cpu, cuda or cuda:N"),
    ("cuda", None, None, 0, "CUDA is not available on this machine"),
    ("cuda:2", None, None, 2, r"is cuda:2, but this process sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"),
    ("cuda", "2", "2", 2, r"is cuda:2, but this process sees 2 GPU\(s\)"),
    ("cuda:1", "2", "0", 2, "would put every process on one GPU"),
    ("cuda:1", "1", "0", 2, "the launcher gave this process LOCAL_RANK=0, the GPU DeepSpeed and "
                            "NCCL use: set train.device=cuda and choose the GPU with "
                            "CUDA_VISIBLE_DEVICES"),
])
def test_devices_a_process_cannot_drive_are_refused_before_any_work(no_launcher, name, world,
                                                                     local_rank, gpus, message):
    for variable, value in (("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        if value is not None:
            no_launcher.setenv(variable, value)
    with pytest.raises(UserError, match=message):
        distributed.process_device(name, cuda_devices=gpus)


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for value in values for t in tensors_in(value)]


@pytest.fixture
def two_ranks(monkeypatch):
    """`all_gather_object` of a 2-process group, recording what this rank hands it."""
    handed = []

    def gather(output, obj):
        handed.append(obj)
        output[:] = [obj, obj]

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    return handed


def test_gathers_carry_host_copies_of_gpu_tensors(two_ranks):
    """A pickled CUDA tensor unpickles onto its sender's GPU in every receiver: whatever the
    caller passes, the gather is handed CPU tensors (GPU tensors faked without a GPU)."""
    with FakeTensorMode():
        on_gpu = {"rng": {"cuda": torch.zeros(16, dtype=torch.uint8, device="cuda:1")},
                  "batchnorm": [torch.ones(4, device="cuda:1")], "skipped_files": 3}
    gathered = distributed.all_gather_objects(on_gpu)
    handed = tensors_in(two_ranks[0])
    assert [t.device.type for t in handed] == ["cpu", "cpu"]
    assert gathered[1]["skipped_files"] == 3


def test_batchnorm_statistics_of_a_model_on_a_gpu_are_saved_from_the_cpu(two_ranks):
    with FakeTensorMode():
        model = nn.Sequential(nn.Conv2d(3, 4, 3, device="cuda:1"),
                              nn.BatchNorm2d(4, device="cuda:1"))
    stats = distributed.own_batchnorm_statistics(model)
    assert sorted(stats) == ["1.running_mean", "1.running_var"]
    assert {t.device.type for t in stats.values()} == {"cpu"}


def test_deepspeed_takes_the_runs_device_not_the_one_it_detects():
    """On a CUDA machine DeepSpeed picks its CUDA accelerator by itself, and would move a
    train.device=cpu student to the GPU: the engine sets the run's accelerator first."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from cocord_fast.engines.deepspeed_engine import _use_accelerator_of

    detected = get_accelerator()
    try:
        set_accelerator(CUDA_Accelerator())  # what DeepSpeed detects where CUDA exists
        _use_accelerator_of(torch.device("cpu"))
        assert get_accelerator().device_name() == "cpu"
    finally:
        set_accelerator(detected)


def run_watchdog(peer_failure: str, beats: str) -> subprocess.CompletedProcess:
    """A process whose watchdog (timeout 0.5 s, polling every 0.05 s) reads `peer_failure`
    from the store, while its main thread runs `beats` and then blocks."""
    code = textwrap.dedent(f"""
        import time
        from cocord_fast.watchdog import Watchdog
        reported = []
        dog = Watchdog(0.5, lambda: {peer_failure}, reported.append, poll_s=0.05)
        {beats}
        time.sleep(30)  # a collective that never returns
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_the_watchdog_names_a_peers_failure_and_ends_the_process():
    done = run_watchdog(peer_failure="'rank 3: cannot decode image x.jpg'", beats="")
    assert done.returncode == 1
    assert done.stderr.strip() == "cocord-fast: error: stopped because rank 3: cannot decode image x.jpg"


def test_the_watchdog_ends_a_process_that_waits_longer_than_the_timeout():
    done = run_watchdog(peer_failure="None", beats="""for step in range(1, 6):
            time.sleep(0.2)  # each step well within the timeout
            dog.beat(f"step {step}")""")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "cocord-fast: error: no answer from the other processes within engine.timeout_s=0.5s "
        "(this one is waiting after step 5; one is stuck or gone)")


IN_TURNS = textwrap.dedent("""
    import json, os, time, torch
    from cocord_fast import distributed
    from cocord_fast.turns import in_turns
    distributed.init(torch.device("cpu"), 60)
    with in_turns("a test"):
        start = time.time()
        time.sleep(0.5)  # long enough that turns which overlapped would show it
        end = time.time()
    with open(f"turn_{os.environ['RANK']}.json", "w") as f:
        json.dump({"local_rank": int(os.environ["LOCAL_RANK"]), "start": start, "end": end}, f)
    distributed.finish(0)
""")


def test_caches_are_filled_by_rank_0_then_each_nodes_first_process_then_the_rest(tmp_path):
    """Two nodes of two processes: rank 0 alone; then the other node's first process; then
    the remaining two, together."""
    script = tmp_path / "in_turns.py"
    script.write_text(IN_TURNS)
    launch_nodes([script], tmp_path, nodes=2, per_node=2)
    turns = {int(p.stem.split("_")[1]): json.loads(p.read_text())
             for p in tmp_path.glob("turn_*.json")}
    assert sorted(turns) == [0, 1, 2, 3]
    first_of_other_node = [r for r, t in turns.items() if r != 0 and t["local_rank"] == 0]
    assert len(first_of_other_node) == 1
    second = turns[first_of_other_node[0]]
    rest = [t for r, t in turns.items() if r != 0 and t["local_rank"] != 0]
    assert turns[0]["end"] <= second["start"]
    assert all(second["end"] <= t["start"] for t in rest)
    assert max(t["start"] for t in rest) < min(t["end"] for t in rest)  # the last turn is shared


LONG_TURN = textwrap.dedent("""
    import os, sys, time, torch
    from cocord_fast import distributed
    from cocord_fast.cli import run_command
    from cocord_fast.errors import UserError
    from cocord_fast.turns import in_turns

    def command():
        distributed.init(torch.device("cpu"), 2)  # engine.timeout_s=2
        with in_turns("a long first index"):
            if distributed.rank() == 0:
                time.sleep(7)  # much longer than the timeout
                if sys.argv[1] == "fail":
                    raise UserError("the data folder vanished")
        open(f"through_{os.environ['RANK']}", "w").close()
        return 0

    sys.exit(distributed.finish(run_command(command)))
""")


@pytest.mark.parametrize("outcome", ["finish", "fail"])
def test_a_turn_longer_than_the_timeout_is_waited_for_and_its_failure_named(tmp_path,
                                                                            outcome):
    """Two nodes (an agent each) of one process: rank 0's turn takes 7 s against a timeout of
    2 s; the other node's process waits for it, and stops with its reason when it fails."""
    script = tmp_path / "long_turn.py"
    script.write_text(LONG_TURN)
    nodes = run_nodes([script, outcome], tmp_path)
    output = "".join(node.stdout + node.stderr for node in nodes)
    if outcome == "finish":
        assert [node.returncode for node in nodes] == [0, 0], output[-3000:]
        assert sorted(p.name for p in tmp_path.glob("through_*")) == ["through_0", "through_1"]
        assert "no answer" not in output
    else:
        assert all(node.returncode != 0 for node in nodes) and not list(tmp_path.glob("through_*"))
        assert "cocord-fast: error: the data folder vanished" in nodes[0].stderr, output[-3000:]
        assert "cocord-fast: error: stopped because rank 0: the data folder vanished" in \
            nodes[1].stderr, output[-3000:]


def test_a_wait_on_a_turn_lasts_while_it_shows_life_and_times_out_when_it_stops():
    code = textwrap.dedent("""
        import time
        from cocord_fast import distributed, turns
        from cocord_fast.watchdog import Watchdog
        distributed._watchdog = Watchdog(0.5, lambda: None, lambda message: None, poll_s=0.05)
        started = time.monotonic()
        alive = lambda: int((time.monotonic() - started) * 10)  # a new sign 10 times a second
        turns._wait(lambda: time.monotonic() - started > 2, alive, "a slow turn")
        print("waited", flush=True)
        frozen = time.monotonic()
        turns._wait(lambda: False, lambda: int(min(time.monotonic() - frozen, 1) * 10),
                    "indexing (the turn of rank 0)")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout == "waited\n"  # 2 s of waiting on a turn alive, past the 0.5 s timeout
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "cocord-fast: error: no answer from the other processes within engine.timeout_s=0.5s "
        "(this one is waiting after indexing (the turn of rank 0); one is stuck or gone)")
