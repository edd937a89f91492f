"""The outbox of a streamed turn (router_svc.streaming): the pump waits while the client is
behind, by events and by the characters of their deltas."""

from __future__ import annotations

import asyncio

import pytest

from router_svc import streaming


def delta(text: str) -> dict[str, object]:
    return {"type": "response.output_text.delta", "delta": text}


async def waits(queue: streaming._Outbox) -> bool:
    """Whether the pump would wait for room now."""
    task = asyncio.ensure_future(queue.room())
    await asyncio.sleep(0.01)
    waiting = not task.done()
    task.cancel()
    return waiting


async def test_the_pump_waits_for_the_client_past_the_characters_of_its_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streaming, "STREAM_BACKLOG_CHARS", 100)
    queue = streaming._Outbox(backlog=256)
    queue.put_event(delta("x" * 60))
    assert not await waits(queue)
    queue.put_event(delta("x" * 60))  # 2 events, 120 characters
    assert await waits(queue)
    queue.taken(await queue.get())
    assert queue.chars == 60
    assert not await waits(queue)
    queue.put_event({"type": "response.output_text.done", "text": "x" * 1000})  # no delta
    assert not await waits(queue)
    queue.taken(await queue.get())
    queue.taken(await queue.get())
    assert queue.chars == 0


async def test_the_pump_waits_for_the_client_past_the_events_of_its_backlog() -> None:
    queue = streaming._Outbox(backlog=2)
    for _ in range(3):
        queue.put_event(delta("x"))
    assert await waits(queue)
    queue.taken(await queue.get())
    assert not await waits(queue)


async def test_a_buffered_stream_never_waits() -> None:
    queue = streaming._Outbox(backlog=0)
    for _ in range(10):
        queue.put_event(delta("x" * streaming.STREAM_BACKLOG_CHARS))
    assert not await waits(queue)
