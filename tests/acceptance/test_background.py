"""Background responses (`background: true`) and cancelling them, through the openai SDK."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai.types.responses import Response

from respgw.state.v1 import resources_pb2, state_service_pb2, state_service_pb2_grpc
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
    # The hub holds its answer until the test has looked at the running response, so what the
    # test sees does not depend on how fast the client parses its first event.
    gate = threading.Event()
    hub.enqueue(Reply(text="streamed in the background", chunk_delay_s=0.05, hold=gate))
    with client.responses.stream(
        model="m", input="stream it", background=True, conversation=conv.id
    ) as s:
        first = next(iter(s))
        assert first.type == "response.created"
        response_id = first.response.id
        assert client.responses.retrieve(response_id).status in ("queued", "in_progress")
        assert list(client.conversations.items.list(conv.id)) == []
        gate.set()
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


def test_past_the_cap_a_background_response_is_a_429(hub: FakeHub) -> None:
    s = Stack(hub.url, router={"background_max_pending_per_tenant": 2}).start()
    try:
        client = s.client()
        hub.enqueue(*(Reply(text="slow", delay_s=1.5) for _ in range(3)))
        first = [client.responses.create(model="m", input="q", background=True) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as info:
            client.responses.create(model="m", input="one too many", background=True)
        body = info.value.body
        assert isinstance(body, dict)
        assert set(body) == {"message", "type", "param", "code"}
        assert body["code"] == "rate_limit_exceeded"
        # Foreground turns are not counted; a finished background response makes room.
        assert client.responses.create(model="m", input="now").status == "completed"
        client.responses.cancel(first[0].id)
        assert client.responses.create(model="m", input="q", background=True).status == "queued"
    finally:
        s.stop()


def test_background_options_are_accepted(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    started = client.responses.create(
        model="m",
        input="with options",
        background=True,
        extra_body={"background_options": {"completion_window": "2h", "continuation_id": "c1"}},
    )
    assert wait_for(client, started.id, until={"completed"}).output_text == "echo: with options"


def test_a_running_response_streams_live_to_its_end_and_then_replays_the_same(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="one two three four five", chunk_delay_s=0.1))
    started = client.responses.create(model="m", input="live", background=True)
    with client.responses.retrieve(started.id, stream=True) as events:
        live = [e.model_dump() for e in events]
    assert live[0]["type"] == "response.created"
    assert live[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in live] == list(range(len(live)))
    assert [e["delta"] for e in live if e["type"] == "response.output_text.delta"] == [
        "one", " two", " three", " four", " five",
    ]  # fmt: skip
    with client.responses.retrieve(started.id, stream=True, starting_after=3) as events:
        assert [e.model_dump() for e in events] == live[4:]


def test_a_hub_failure_ends_the_live_stream_with_response_failed(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="one two three four", chunk_delay_s=0.1, break_after_chunks=2))
    started = client.responses.create(model="m", input="doomed", background=True)
    with client.responses.retrieve(started.id, stream=True) as events:
        kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert client.responses.retrieve(started.id).status == "failed"


def test_a_cancel_ends_the_posted_stream_with_response_cancelled(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="a b c d e f g h i j k l m n o p", chunk_delay_s=0.1))
    seen = []
    with client.responses.create(model="m", input="cancel me", background=True, stream=True) as s:
        for event in s:
            seen.append(event.model_dump())
            if len(seen) == 4:
                assert client.responses.cancel(seen[0]["response"]["id"]).status == "cancelled"
    assert seen[-1]["type"] == "response.cancelled"
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))
    stored = client.responses.retrieve(seen[0]["response"]["id"])
    assert stored.status == "cancelled"


def test_a_final_turn_its_conversation_refuses_is_stored_failed(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create()
    hub.enqueue(Reply(text="one two three", chunk_delay_s=0.2))
    item = {"type": "message", "role": "user", "content": "mine", "id": "msg_taken"}
    started = client.responses.create(
        model="m",
        input=[item],
        conversation=conv.id,
        background=True,  # type: ignore[list-item]
    )
    # The same item id reaches the conversation while the response runs.
    client.conversations.items.create(conv.id, items=[item])  # type: ignore[list-item]
    failed = wait_for(client, started.id, until={"failed", "completed"})
    assert failed.status == "failed"
    assert failed.error is not None and "could not be stored" in failed.error.message
    with client.responses.retrieve(started.id, stream=True) as events:
        assert [e.type for e in events][-1] == "response.failed"


def test_a_response_whose_conversation_is_deleted_meanwhile_still_ends(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    conv = client.conversations.create()
    hub.enqueue(Reply(text="one two three", chunk_delay_s=0.2))
    started = client.responses.create(
        model="m", input="orphan", conversation=conv.id, background=True
    )
    client.conversations.delete(conv.id)
    done = wait_for(client, started.id, until={"completed", "failed"})
    assert done.status == "completed" and done.output_text == "one two three"


def test_a_response_cancelled_while_queued_streams_from_response_created(hub: FakeHub) -> None:
    """A background response cancelled before any router ran it has only its end in the event
    log; following it still starts with response.created (so the SDK's stream reading accepts
    it), ends with response.cancelled, and resumes consistently after any sequence number."""
    # No scan within the test: nothing claims the job, which stays queued.
    stack = Stack(hub.url, router={"background_scan_interval_s": 3600}).start()
    try:
        queued = {
            "id": "resp_queued1",
            "object": "response",
            "created_at": 1,
            "status": "queued",
            "background": True,
            "model": "m",
            "output": [],
        }

        async def enqueue() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.state_port}") as channel:
                stub = state_service_pb2_grpc.StateServiceStub(channel)
                await stub.EnqueueBackgroundResponse(
                    state_service_pb2.EnqueueBackgroundResponseRequest(
                        tenant="default",
                        response=resources_pb2.StoredResponse(
                            id="resp_queued1",
                            response_json=json.dumps(queued).encode(),
                            in_progress=True,
                        ),
                        spec=b"{}",
                    )
                )

        stack.tl.run(enqueue())
        client = stack.client()
        assert client.responses.cancel("resp_queued1").status == "cancelled"

        def events(after: int | None = None) -> list[dict[str, Any]]:
            params = {"stream": "true"}
            if after is not None:
                params["starting_after"] = str(after)
            with httpx.Client(timeout=10) as http:
                r = http.get(f"{stack.url}/responses/resp_queued1", params=params)
            lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            return [json.loads(line) for line in lines[:-1]]

        whole = events()
        assert whole[0]["type"] == "response.created"
        assert whole[-1]["type"] == "response.cancelled"
        assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
        assert events(after=0) == whole[1:]
        assert events(after=whole[-2]["sequence_number"]) == whole[-1:]
    finally:
        stack.stop()
