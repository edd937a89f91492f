"""The services' garbage-collector settings."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import gctune


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pads malloc_trim is called with (it is not called for real)."""
    called: list[int] = []

    def trim(pad: int) -> int:
        called.append(pad)
        return 1

    monkeypatch.setattr(gctune, "_malloc_trim", trim)
    return called


def test_tune_sets_the_thresholds_and_freezes_what_exists(restored: None) -> None:
    kept = [{"made": "at start-up"}]
    gctune.tune()
    assert gc.get_threshold() == gctune.THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert kept


async def test_give_back_trims_once_soon_however_often_it_is_called(
    monkeypatch: pytest.MonkeyPatch, trims: list[int]
) -> None:
    monkeypatch.setattr(gctune, "_last_trim", -gctune.TRIM_INTERVAL_S)
    monkeypatch.setattr(gctune, "TRIM_DELAY_S", 0.01)
    for _ in range(5):
        gctune.give_back()
    assert trims == []  # later, once the turn's buffers are gone
    await asyncio.sleep(0.1)
    assert trims == [0]
    # Within TRIM_INTERVAL_S of it: one more trim, at the end of the interval.
    monkeypatch.setattr(gctune, "TRIM_INTERVAL_S", 0.2)
    gctune.give_back()
    gctune.give_back()
    await asyncio.sleep(0.05)
    assert trims == [0]
    await asyncio.sleep(0.3)
    assert trims == [0, 0]


def test_give_back_without_an_event_loop_trims_at_once(trims: list[int]) -> None:
    gctune.give_back()
    assert trims == [0]


def test_a_trim_pending_on_a_loop_that_closed_does_not_stop_the_next(
    monkeypatch: pytest.MonkeyPatch, trims: list[int]
) -> None:
    monkeypatch.setattr(gctune, "_last_trim", -gctune.TRIM_INTERVAL_S)
    monkeypatch.setattr(gctune, "TRIM_DELAY_S", 0.01)

    async def large_turn(wait: float) -> None:
        gctune.give_back()
        await asyncio.sleep(wait)

    asyncio.run(large_turn(0))  # the loop closes before its trim is due
    assert trims == []
    asyncio.run(large_turn(0.1))
    assert trims == [0]


def test_malloc_trim_is_found_or_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gctune, "_malloc_trim", None)
    gctune._trim()  # glibc's, or none where there is no glibc: never an error
    assert gctune._malloc_trim is not None


_MAPPED_AFTER = """
import ctypes, sys
from gateway import gctune

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    gctune.place_large_blocks()
big = bytearray(16 * 1024 * 1024)
del big
before = libc.mallinfo2().hblkhd
block = bytearray(1024 * 1024)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize(("mode", "mapped"), [("fixed", True), ("glibc", False)])
def test_large_blocks_stay_mapped_after_a_larger_one_was_freed(mode: str, mapped: bool) -> None:
    # glibc raises its mmap threshold to the size of each mapped block freed: a later block of
    # 1 MB then goes into the heap. Once the threshold is fixed, it is mapped of its own. Run in
    # a fresh interpreter: in a long-lived process a block that size may come from free heap
    # space whatever the threshold.
    out = subprocess.run(
        [sys.executable, "-c", _MAPPED_AFTER, mode],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grew = int(out.stdout.strip())
    assert (grew >= 1024 * 1024) is mapped, (mode, grew)
