"""Garbage-collector settings for the long-running services, and memory handed back after a
large turn (:func:`give_back`).

CPython's default young-generation threshold (700 allocations) runs a collection every few
requests of a service that allocates thousands of containers per request, and every full
collection walks every object the process holds. The services set a threshold fit for their
allocation rate and move what start-up made out of the collector's sight: measured under load
(bench_router, 32 connections) the router spent about 8% less CPU per turn and its p99 fell by
about a third. Reference cycles are still collected, only less often.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from collections.abc import Callable

# Young generation: collections after this many new containers; then every 20th young
# collection also collects the middle generation, and every 100th of those the old one.
THRESHOLDS = (50_000, 20, 100)


def tune() -> None:
    """Freezes what the process has allocated so far and sets :data:`THRESHOLDS`; call once,
    after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


# --- where the allocator puts large blocks ---------------------------------------------------

# glibc serves a block of M_MMAP_THRESHOLD bytes or more with a mapping of its own, returned to
# the system when freed, and raises that threshold to the size of each such block freed (up to
# 32 MiB): after one large answer (orjson reserves several times a JSON's size for its output)
# every block of a few MB went into the heap, where a growing buffer (a streamed answer's text,
# its event log) left a copy of itself behind at each step and short-lived blocks (the hub's
# reads, gRPC's pieces) were kept among long-lived ones. A threshold set once stays (glibc then
# no longer moves it, nor the trim threshold): larger blocks are mapped, grown in place
# (mremap), and handed back as soon as they are freed. Measured with bench/bench_memory.py
# (router peak, in answer sizes, a live stream of 0.5 MB in 4-byte deltas): 4.65-5.3x -> 4.0-4.3x
# at one turn, 4.0-4.15x -> 3.7-4.0x at four. 32 KiB rather than glibc's initial 128 KiB: the
# router's short-lived blocks (a hub read, aiohttp's pieces of it, a gathered write: 16-64 KiB)
# are then mapped whenever the heap has no room for them, not added to its top among long-lived
# ones (the same stream: 3.0-3.6x -> 2.5-3.3x; a mapping costs a few µs, a block made of tens
# of µs of work). Set by the router only.
MMAP_THRESHOLD = 32 * 1024
_M_MMAP_THRESHOLD = -3


def place_large_blocks() -> None:
    """Fixes glibc's mmap threshold at MMAP_THRESHOLD (see above); call once, at start. Not
    glibc: nothing to do."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


# --- memory handed back ---------------------------------------------------------------------

# glibc keeps memory the process freed for reuse rather than returning it: after a turn with a
# long answer (several copies of it for a moment, issue 13) a service kept most of that for
# good. malloc_trim returns the free pages at the top of each arena and every whole free page
# inside one; it costs about a millisecond per hundred MB held, so it runs only after a large
# turn, a little later (once the turn's last buffers are gone), at most once per
# TRIM_INTERVAL_S however many large turns end meanwhile.
TRIM_INTERVAL_S = 1.0
TRIM_DELAY_S = 0.1

_last_trim = -TRIM_INTERVAL_S
# The loop a trim is scheduled on: another loop (tests run several in one process) or a closed
# one never runs it, so a trim is then scheduled anew.
_trim_pending: asyncio.AbstractEventLoop | None = None
_malloc_trim: Callable[[int], int] | None = None


def give_back() -> None:
    """Hands the memory the process freed back to the system soon (after a large turn; see
    above). Called on an event loop; without one, at once."""
    global _trim_pending
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _trim()
        return
    if _trim_pending is loop:
        return
    _trim_pending = loop
    delay = max(TRIM_DELAY_S, _last_trim + TRIM_INTERVAL_S - time.monotonic())
    loop.call_later(delay, _trim)


def give_back_now() -> None:
    """Hands the memory the process freed back to the system at once, unless that was done
    less than TRIM_DELAY_S ago: before a step that allocates a long answer's size again on
    another thread's heap, which cannot reuse what this one freed."""
    if time.monotonic() - _last_trim >= TRIM_DELAY_S:
        _trim()


def _trim() -> None:
    global _last_trim, _trim_pending, _malloc_trim
    _trim_pending = None
    _last_trim = time.monotonic()
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = _no_trim
    _malloc_trim(0)


def _no_trim(_pad: int) -> int:
    return 0
