"""Garbage-collector settings for the long-running services.

CPython's default young-generation threshold (700 allocations) runs a collection every few
requests of a service that allocates thousands of containers per request, and every full
collection walks every object the process holds. The services set a threshold fit for their
allocation rate and move what start-up made out of the collector's sight: measured under load
(bench_router, 32 connections) the router spent about 8% less CPU per turn and its p99 fell by
about a third. Reference cycles are still collected, only less often.
"""

from __future__ import annotations

import gc

# Young generation: collections after this many new containers; then every 20th young
# collection also collects the middle generation, and every 100th of those the old one.
THRESHOLDS = (50_000, 20, 100)


def tune() -> None:
    """Freezes what the process has allocated so far and sets :data:`THRESHOLDS`; call once,
    after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
