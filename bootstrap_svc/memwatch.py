"""A memory bound for a whole session's processes, without cgroups: the service watches them.

Where a memory cgroup per session is not available (cgroup v2 without a delegated subtree that
has the memory controller, as on many hosts), sandboxes that must still bound a session as a
whole measure its processes from outside and kill them past the limit; this module does that for
the bubblewrap sandboxes of :mod:`bootstrap_svc.sandbox`.

- **Which processes.** Every sandbox has a PID namespace of its own (``--unshare-pid``), so its
  processes are exactly the descendants of its outer bubblewrap process: an orphan is adopted by
  the namespace's init, which is one of them, and nothing inside can leave the namespace. The
  tree is read from ``/proc/<pid>/task/<tid>/children`` (every thread's, since any thread may
  fork).
- **What is counted.** A process's resident anonymous and shared-memory pages plus its swap
  (``RssAnon + RssShmem + VmSwap`` of ``/proc/<pid>/status``, counters the kernel keeps, so cheap
  to read). Pages shared between processes (a fork's copy-on-write pages) count once per process
  there; so when that quick sum passes the limit, the exact figure is taken before anything is
  killed: the proportional set size of each process (``Pss_Anon + Pss_Shmem + SwapPss`` of
  ``/proc/<pid>/smaps_rollup``), which counts a shared page once in all. Files the processes map
  from disk (programs, libraries, mapped data files) are page cache the kernel can drop, and are
  not counted, as a memory cgroup would count them only until it reclaims them.
- **When.** Every ``interval_s`` (50 ms by default) while a call runs. Between calls a session's
  interpreter is frozen (:func:`freeze`), so nothing in the session runs or grows then.
- **What it misses.** Memory no process maps: tmpfs files (the sandbox's ``/tmp``, bounded by its
  size) and memfds no process maps (each bounded by the file-size limit). And memory allocated
  faster than the interval: each process stays bounded at once by its own address-space limit
  (RLIMIT_AS), which is the first line of defence; this is the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_KIB = 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_ROLLUP_FIELDS = (b"Pss_Anon:", b"Pss_Shmem:", b"SwapPss:")


def _host_has_swap() -> bool:
    try:
        with open("/proc/swaps", "rb") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True  # unknown: count swap, the slower way


# Swap is added to the quick figure only where there is swap (read once, at start-up).
SWAP = _host_has_swap()


def tree(root: int) -> list[int]:
    """The pids of ``root`` and all its descendants, ``root`` first and then its child (empty when
    ``root`` is gone)."""
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        out.append(pid)
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return out


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _fields(text: bytes, fields: tuple[bytes, ...]) -> int:
    """The sum of ``fields`` (lines "Name:  N kB") of a /proc file's text, in bytes."""
    total = 0
    for line in text.splitlines():
        if line.startswith(fields):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                total += int(parts[1]) * _KIB
    return total


def resident(pids: Iterable[int]) -> int:
    """Quick, and never less than :func:`proportional`: the resident memory of ``pids`` (file pages
    included, pages shared between them counted once per process) plus their swap, in bytes."""
    total = 0
    for pid in pids:
        statm = _read(f"/proc/{pid}/statm").split()
        if len(statm) > 1:
            total += int(statm[1]) * _PAGE
        if SWAP:
            total += _fields(_read(f"/proc/{pid}/status"), (b"VmSwap:",))
    return total


def proportional(pids: Iterable[int]) -> int:
    """Exact: the anonymous and shared memory of ``pids`` plus their swap, each page shared between
    processes counted once in all (proportional set size), in bytes."""
    return sum(_fields(_read(f"/proc/{pid}/smaps_rollup"), _ROLLUP_FIELDS) for pid in pids)


def kill(pids: Iterable[int]) -> None:
    """SIGKILL to each of ``pids`` that still exists."""
    for pid in pids:
        if pid <= 0:  # never a process group
            continue
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def state(pid: int) -> bytes:
    """The process's state letter (b"" when it is gone): R, S, D, T (stopped), Z (zombie)..."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(b")")[2][1:2]


async def _pause(rounds: int) -> None:
    """Lets other tasks run; after a few rounds, lets the processes waited for run too."""
    await asyncio.sleep(0 if rounds < 20 else 0.001)


def _signal(pid: int, pidfd: int, sig: signal.Signals) -> None:
    """Sends ``sig`` through ``pidfd`` (which names that very process, never a later one with the
    same pid) when there is one, else to ``pid``; never to a process group."""
    with contextlib.suppress(OSError):
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, sig)
        elif pid > 0:
            os.kill(pid, sig)


async def freeze(root: int, keep: int, pidfd: int = -1, timeout_s: float = 1.0) -> list[int] | None:
    """Stops a sandbox between calls: SIGSTOP to ``keep`` (the interpreter: all its threads
    stop), then SIGKILL to every other process under ``root`` but the sandbox's own two (``root``,
    the outer bubblewrap, and its child, the namespace's init) until none is left (zombies, which
    hold no memory, wait for the interpreter to reap them). Returns the pids left under ``root``,
    or None when it did not settle within ``timeout_s``. ``pidfd``: a pidfd of ``keep``."""
    if keep <= 0:
        return None
    _signal(keep, pidfd, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    rounds = 0
    while state(keep) not in (b"T", b"Z", b"X", b""):
        if time.monotonic() > deadline:
            return None
        rounds += 1
        await _pause(rounds)
    while True:
        pids = tree(root)
        others = [pid for pid in pids[2:] if pid != keep and state(pid) not in (b"Z", b"X", b"")]
        if not others:
            return pids
        if time.monotonic() > deadline:
            return None
        kill(others)
        rounds += 1
        await _pause(rounds)


def thaw(pid: int, pidfd: int = -1) -> None:
    """Lets a frozen interpreter run again (SIGCONT; ``pidfd``: a pidfd of it)."""
    _signal(pid, pidfd, signal.SIGCONT)


def message(limit: int, used: int) -> str:
    """What the model reads when a session passed its memory limit."""
    return (
        f"It was stopped: memory limit of {limit / (1 << 20):g} MiB exceeded (the session's "
        f"processes together used {used / (1 << 20):.0f} MiB)."
    )


@dataclass
class Watch:
    """Watches the processes under ``root`` while a call runs: :meth:`run` returns once they,
    with the processes ``beside`` (the session's frozen interpreter while a command runs), use
    more than ``limit`` bytes, after killing every process under ``root``."""

    root: int
    limit: int
    interval_s: float = 0.05
    beside: Sequence[int] = ()
    used: int = 0  # the exact figure that passed the limit
    samples: int = 0
    _beside_quick: int | None = None
    _beside_exact: int | None = None

    def message(self) -> str:
        return message(self.limit, self.used)

    def quick(self) -> tuple[list[int], int]:
        """The tree under ``root`` and its quick figure, the processes beside included."""
        if self._beside_quick is None:
            self._beside_quick = resident(self.beside)
        pids = tree(self.root)
        return pids, resident(pids) + self._beside_quick

    def exact(self, pids: Sequence[int]) -> int:
        if self._beside_exact is None:
            self._beside_exact = proportional(self.beside)
        return proportional(pids) + self._beside_exact

    async def run(self) -> None:
        backoff = 0.0
        while True:
            await asyncio.sleep(self.interval_s + backoff)
            self.samples += 1
            pids, quick = self.quick()
            if quick <= self.limit:
                continue
            # Shared pages make the quick figure too high: the exact one decides. It walks every
            # page table (about 15 ms of CPU per GiB resident), so it runs off the event loop and
            # is not taken again before ten times as long has passed (it uses at most a tenth of
            # the time: forked workers sharing a large parent's pages stay affordable).
            began = time.monotonic()
            exact = await asyncio.to_thread(self.exact, pids)
            if exact > self.limit:
                self.used = exact
                kill(pids)
                kill(tree(self.root))  # anything forked meanwhile (the namespace's init took
                return  # the rest with it)
            backoff = 10 * (time.monotonic() - began)
