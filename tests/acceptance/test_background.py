"""Background responses (`background: true`) and cancelling them, through the openai SDK."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from openai.types.responses import Response

from state_svc.config import StateSettings
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack


def wait_for(
    client: openai.OpenAI, response_id: str, *, until: set[str], timeout: float = 10
) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        got = client.responses.retrieve(response_id)
        if got.status in until:
            return got
        assert time.monotonic() < deadline, f"still {got.status}"
        time.sleep(0.05)


def test_background_response_runs_after_the_reply_and_is_stored(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="done in the background", delay_s=0.5))
    started = client.responses.create(model="m", input="take your time", background=True)
    assert started.status == "queued"
    assert started.background is True
    running = client.responses.retrieve(started.id)
    assert running.status in ("queued", "in_progress")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="next", previous_response_id=started.id)
    assert info.value.code == "previous_response_in_progress"
    finished = wait_for(client, started.id, until={"completed"})
    assert finished.output_text == "done in the background"
    chained = client.responses.create(model="m", input="next", previous_response_id=started.id)
    assert [text_of(m) for m in hub.chat_requests()[-1]["messages"]] == [
        "take your time",
        "done in the background",
        "next",
    ]
    assert chained.status == "completed"


def test_cancel_a_running_background_response(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="too late", delay_s=1.5))
    started = client.responses.create(model="m", input="slow", background=True)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled"
    time.sleep(2)
    assert client.responses.retrieve(started.id).status == "cancelled"
    # Cancelling again changes nothing.
    assert client.responses.cancel(started.id).status == "cancelled"


def test_cancel_rules(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    plain = client.responses.create(model="m", input="not background")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.cancel(plain.id)
    assert info.value.code == "not_cancellable"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_missing")
    quick = client.responses.create(model="m", input="quick", background=True)
    done = wait_for(client, quick.id, until={"completed"})
    assert client.responses.cancel(quick.id).status == "completed"
    assert done.output_text == "echo: quick"


def test_background_failure_is_stored_as_failed(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(status=500))
    started = client.responses.create(model="m", input="doomed", background=True)
    failed = wait_for(client, started.id, until={"failed"})
    assert failed.error is not None and failed.error.message


def test_background_stream_and_conversation(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create()
    hub.enqueue(Reply(text="streamed in the background", chunk_delay_s=0.05))
    with client.responses.stream(
        model="m", input="stream it", background=True, conversation=conv.id
    ) as s:
        first = next(iter(s))
        assert first.type == "response.created"
        response_id = first.response.id
        assert client.responses.retrieve(response_id).status in ("queued", "in_progress")
        assert list(client.conversations.items.list(conv.id)) == []
        for _ in s:
            pass
        final = s.get_final_response()
    assert final.output_text == "streamed in the background"
    stored = client.responses.retrieve(response_id)
    assert stored.status == "completed"
    items = [text_of(i.model_dump()) for i in client.conversations.items.list(conv.id, order="asc")]
    assert items == ["stream it", "streamed in the background"]


def test_a_router_that_stops_stores_its_unfinished_background_responses_as_failed(
    hub: FakeHub, tmp_path: Path
) -> None:
    state = replace(StateSettings(), backend="sqlite", sqlite_path=str(tmp_path / "state.db"))
    first = Stack(hub.url, state=state, router={"drain_timeout_s": 0.3}).start()
    try:
        hub.enqueue(Reply(text="never delivered", delay_s=3))
        started = first.client().responses.create(model="m", input="slow", background=True)
    finally:
        first.stop()
    second = Stack(hub.url, state=state).start()
    try:
        stored = second.client().responses.retrieve(started.id)
        assert stored.status == "failed"
        assert stored.error is not None and "stopped" in stored.error.message
    finally:
        second.stop()
