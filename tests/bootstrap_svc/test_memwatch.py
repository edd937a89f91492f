"""The session memory watch on real process trees (no sandbox needed): which processes it sees,
how it counts shared pages, and that it kills a tree past its limit and leaves one under it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bootstrap_svc import memwatch

pytestmark = pytest.mark.timeout(60)

# A parent holding `mib` MiB (written) forks `n` children that share those pages, one of them from
# a thread (so the tree must read every thread's children); each child may add `own` MiB of its
# own. Prints "ready" once all are up.
TREE = """
import os, sys, threading, time
mib, n, own = (int(a) for a in sys.argv[1:])
big = b"x" * (mib << 20)
r, w = os.pipe()
def child():
    if os.fork() == 0:
        mine = b"y" * (own << 20)
        os.write(w, b"1")
        time.sleep(60)
        os._exit(0)
for _ in range(n - 1):
    child()
t = threading.Thread(target=child)
t.start()
t.join()
got = 0
while got < n:
    got += len(os.read(r, n))
print("ready", flush=True)
time.sleep(60)
"""


def _start(mib: int, n: int, own: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE, str(mib), str(n), str(own)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    memwatch.kill(memwatch.tree(proc.pid))
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture
def shared() -> Iterator[subprocess.Popen[str]]:
    """A 64 MiB parent and 4 children sharing its pages."""
    proc = _start(64, 4, 0)
    yield proc
    _stop(proc)


def test_the_tree_is_the_root_and_every_descendant(shared: subprocess.Popen[str]) -> None:
    pids = memwatch.tree(shared.pid)
    assert pids[0] == shared.pid and len(pids) == 5  # the child forked by a thread included
    assert memwatch.tree(2**22 + 7) == []  # no such process


def test_shared_pages_count_once_in_the_exact_figure(shared: subprocess.Popen[str]) -> None:
    pids = memwatch.tree(shared.pid)
    quick, exact = memwatch.resident(pids), memwatch.proportional(pids)
    mib = 1 << 20
    # Resident sizes count the parent's 64 MiB in each of the five processes ...
    assert quick > 5 * 64 * mib
    # ... the proportional ones once in all (plus what the interpreters use themselves).
    assert 64 * mib < exact < 120 * mib
    # Measuring leaves the tree running: not stopped (T), whether it is asleep (S) or still
    # finishing its start (R) when looked at.
    assert memwatch.state(shared.pid) in (b"S", b"R")


async def test_a_tree_under_the_limit_is_left_alone(shared: subprocess.Popen[str]) -> None:
    # The quick figure (over 320 MiB) passes the limit: each sample takes the exact one (about
    # 90 MiB), and spaces the next by ten times what that took.
    watch = memwatch.Watch(shared.pid, 200 << 20, interval_s=0.02)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watch.run(), 1.0)
    assert watch.samples >= 2 and watch.used == 0 and shared.poll() is None
    assert len(memwatch.tree(shared.pid)) == 5


async def test_a_tree_past_the_limit_is_killed_whole() -> None:
    proc = _start(16, 4, 48)  # 16 MiB shared, 4 x 48 MiB of their own: about 210 MiB
    try:
        pids = memwatch.tree(proc.pid)
        assert len(pids) == 5
        watch = memwatch.Watch(proc.pid, 150 << 20, interval_s=0.02)
        began = time.monotonic()
        await asyncio.wait_for(watch.run(), 10)
        assert watch.used > 150 << 20 and time.monotonic() - began < 5
        assert "memory limit of 150 MiB exceeded" in watch.message()
        assert proc.wait(5) == -9
        # Its children were killed too (in a sandbox, its init takes the namespace with it).
        for _ in range(200):
            if all(memwatch.state(pid) in (b"", b"Z", b"X") for pid in pids):
                break
            await asyncio.sleep(0.01)
        assert all(memwatch.state(pid) in (b"", b"Z", b"X") for pid in pids)
    finally:
        _stop(proc)
