"""Work done in turns by the processes of a group: rank 0; then the first process of every
other node; then the rest. A block that fills a cache (a download, a data index, the demo data
set) then fills it once where every node sees the same cache, once per node where each has its
own, and the other processes find it filled.

A turn can take long (a first index of ImageNet on a network file system, a download), far
longer than `engine.timeout_s`. So nobody waits in a collective, whose own timeout would end
it: the processes wait on the group's store, where each turn's processes count themselves done.
While a turn runs, a thread of each of its processes feeds that process's watchdog
(`watchdog.py`) and counts up a sign of life in the store; a waiting process feeds its own
watchdog only while that count moves. So a slow turn is waited for as long as it takes; a
process that fails in its turn leaves its reason in the store (`cli.run_command`), and the
waiting processes stop with it at once; one that dies without a word, or hangs with its
thread gone, stops signalling, and the others give up after `engine.timeout_s`, saying whose
turn it was.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

from . import distributed
from .errors import UserError

ALIVE_EVERY_S = 1.0  # how often a process in its turn says it is alive
LONGEST_POLL_S = 0.5  # a waiting process reads the store at least this often
_calls = 0  # in_turns blocks entered: every process enters the same ones, in order
TURN_NAMES = ("rank 0", "the first process of each other node", "the other processes")


@contextmanager
def in_turns(what: str) -> Iterator[None]:
    """Runs the block in the three turns described above; every process returns once every
    turn is done. `what`: the work, for the messages of a wait that ends in a timeout."""
    if distributed.world_size() == 1:
        yield
        return
    global _calls
    _calls += 1
    store = dist.distributed_c10d._get_default_store()
    keys = f"cocord_fast/turns/{_calls}"
    turn = 0 if distributed.is_main() else 1 if distributed.local_rank() == 0 else 2
    store.add(f"{keys}/members/{turn}", 1)
    store.add(f"{keys}/joined", 1)
    _wait(lambda: store.add(f"{keys}/joined", 0) >= distributed.world_size(),
          lambda: 0, f"{what}: every process joining")
    members = [store.add(f"{keys}/members/{t}", 0) for t in range(3)]
    for earlier in range(turn):
        _wait_for_turn(store, keys, earlier, members[earlier], what)
    with _signalling_alive(store, f"{keys}/alive/{turn}", f"{what} (its own turn)"):
        yield
    store.add(f"{keys}/done/{turn}", 1)
    for later in range(turn + 1, 3):
        _wait_for_turn(store, keys, later, members[later], what)


def _wait_for_turn(store: dist.Store, keys: str, turn: int, members: int, what: str) -> None:
    _wait(lambda: store.add(f"{keys}/done/{turn}", 0) >= members,
          lambda: store.add(f"{keys}/alive/{turn}", 0),
          f"{what} (the turn of {TURN_NAMES[turn]})")


def _wait(done, sign_of_life, where: str) -> None:
    """Polls the store until `done()`, feeding this process's watchdog whenever
    `sign_of_life()` changed; ends at once with the reason a failed process left."""
    last, delay = None, 0.01
    while not done():
        if failure := distributed.peer_failure():
            raise UserError(f"stopped because {failure}")
        if (alive := sign_of_life()) != last:
            last = alive
            distributed.heartbeat(where)
        time.sleep(delay)
        delay = min(delay * 1.5, LONGEST_POLL_S)
    distributed.heartbeat(where)


@contextmanager
def _signalling_alive(store: dist.Store, key: str, where: str) -> Iterator[None]:
    """While the block runs: this process's watchdog fed, and `key` counted up, every
    `ALIVE_EVERY_S`."""
    stop = threading.Event()

    def signal() -> None:
        while True:
            distributed.heartbeat(where)
            try:
                store.add(key, 1)
            except RuntimeError:  # the store is gone: the group is ending anyway
                return
            if stop.wait(ALIVE_EVERY_S):
                return

    thread = threading.Thread(target=signal, name="cocord-fast-turn", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
