"""A streamed turn opens at once, as at OpenAI: response.created and response.in_progress go out
before the hub answers, a hub failure ends the stream with error and response.failed (stored
as failed, or nothing without --store-running-streams), and every stream ends with data: [DONE]."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.fakehub import FakeHub, Reply
from tests.support import Stack


def read_stream(stack: Stack, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The events and the raw data lines."""
    lines: list[str] = []
    with httpx.Client(timeout=20) as http:
        with http.stream("POST", f"{stack.url}/responses", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    return events, lines


def test_created_goes_out_before_the_hub_answers(stack: Stack, hub: FakeHub) -> None:
    """The hub holds its answer until the test has read the stream's first two events: a router
    that waited for the hub before sending them would get the hub's 504 (HOLD_TIMEOUT_S) and fail
    the turn instead."""
    gate = threading.Event()
    hub.enqueue(Reply(text="held answer", hold=gate))
    events: list[dict[str, Any]] = []
    lines: list[str] = []
    with httpx.Client(timeout=60) as http:
        body = {"model": "m", "input": "x", "stream": True}
        with http.stream("POST", f"{stack.url}/responses", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line)
                if line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                if len(events) == 2 and not gate.is_set():
                    gate.set()  # both arrived while the hub was still holding its answer
    assert gate.is_set(), "the stream ended before its second event"
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[-1]["type"] == "response.completed", events[-2:]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "held answer"
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply(status=500), "upstream_error"),
        (Reply(status=400, error_body={"error": {"message": "bad"}}), "upstream_rejected"),
    ],
)
@pytest.mark.parametrize("running", [True, False])
def test_a_hub_failure_ends_the_stream_and_stores_it_failed(
    hub: FakeHub, reply: Reply, code: str, running: bool
) -> None:
    stack = Stack(hub.url, router={"store_running_streams": running}).start()
    try:
        check_hub_failure(stack, hub, reply, code, running)
    finally:
        stack.stop()


def check_hub_failure(stack: Stack, hub: FakeHub, reply: Reply, code: str, running: bool) -> None:
    """The same events either way; stored as failed when the running turn was stored (so that it
    is never left in progress), nothing stored otherwise."""
    hub.enqueue(reply)
    events, lines = read_stream(stack, {"model": "m", "input": "x"})
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert events[2]["code"] == code
    assert events[3]["response"]["status"] == "failed"
    assert lines[-1] == "data: [DONE]"
    with httpx.Client() as http:
        url = f"{stack.url}/responses/{events[0]['response']['id']}"
        deadline = time.monotonic() + 10
        while True:
            stored = http.get(url)
            if not running or stored.json().get("status") == "failed":
                break
            assert time.monotonic() < deadline, stored.text
            time.sleep(0.02)
    if running:
        assert stored.json()["error"] == events[3]["response"]["error"]
    else:
        assert stored.status_code == 404


def test_an_unreachable_hub_ends_the_stream(hub: FakeHub) -> None:
    stack = Stack("http://127.0.0.1:9/v1").start()
    try:
        events, lines = read_stream(stack, {"model": "m", "input": "x"})
        assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
        assert events[-2]["code"] == "upstream_unreachable"
        assert lines[-1] == "data: [DONE]"
    finally:
        stack.stop()


def test_a_replayed_stream_ends_with_done(stack: Stack, hub: FakeHub) -> None:
    events, _ = read_stream(stack, {"model": "m", "input": "x"})
    response_id = events[0]["response"]["id"]
    with httpx.Client() as http:
        replay = http.get(f"{stack.url}/responses/{response_id}", params={"stream": "true"})
    data = [line for line in replay.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert [json.loads(d[6:]) for d in data[:-1]] == events
