"""The hub's time bounds are separate: connecting, the wait for the answer to start, the gap
between two pieces of it, and (only when set) the whole call; a long live stream that keeps
sending is never cut."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.fakehub import FakeHub, Reply
from tests.support import Stack


def streamed(stack: Stack, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.Client(timeout=20) as http:
        with http.stream("POST", f"{stack.url}/responses", json={**body, "stream": True}) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def test_a_long_stream_that_keeps_sending_is_not_cut(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"hub_idle_timeout_s": 0.5}).start()
    try:
        # 12 words, 0.2 s apart: well past the idle bound in all, never quiet for that long.
        hub.enqueue(Reply(text=" ".join(f"w{n}" for n in range(12)), chunk_delay_s=0.2))
        events = streamed(stack, {"model": "m", "input": "x"})
    finally:
        stack.stop()
    assert events[-1]["type"] == "response.completed"


def test_a_stream_that_goes_quiet_ends_with_a_timeout(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"hub_idle_timeout_s": 0.3}).start()
    try:
        hub.enqueue(Reply(text="a b c", chunk_delay_s=1.0))
        events = streamed(stack, {"model": "m", "input": "x"})
    finally:
        stack.stop()
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_timeout"
    assert "sent nothing" in events[-2]["message"]


def test_an_answer_that_does_not_start_is_a_504(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"hub_first_byte_timeout_s": 0.3}).start()
    try:
        hub.enqueue(Reply(text="late", delay_s=2))
        with httpx.Client(timeout=10) as http:
            r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
    finally:
        stack.stop()
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "did not start answering" in error["message"]
