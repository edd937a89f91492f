"""Each way a hub's stream can end, through the real router and state service: a turn is stored
(and answered ``response.completed`` or ``response.incomplete``) only when the hub said it had
finished; a stream that ends early is answered ``response.failed`` and nothing is stored that a
later turn could build on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakehub import FakeHub, Reply
from tests.support import Stack

CALL = {"id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}'}


@pytest.fixture(scope="module")
def chat_stack(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def responses_stack(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"default_model": "fake-model", "hub_api": "responses"})
    yield s.start()
    s.stop()


def stream_events(stack: Stack, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of one streamed POST /v1/responses, read as raw SSE."""
    with httpx.Client(timeout=20) as http:
        with http.stream("POST", f"{stack.url}/responses", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            return [
                json.loads(line[6:])
                for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]


def stored(stack: Stack, response_id: str) -> openai.types.responses.Response | None:
    try:
        return stack.client().responses.retrieve(response_id)
    except openai.NotFoundError:
        return None


def stored_failed(stack: Stack, response_id: str) -> openai.types.responses.Response:
    """The failed form of a stream that failed, once stored (it replaces the running form
    beside the stream's end)."""
    deadline = time.monotonic() + 10
    while True:
        kept = stored(stack, response_id)
        if kept is not None and kept.status == "failed":
            return kept
        assert time.monotonic() < deadline, kept
        time.sleep(0.02)


FINISHED = {
    "stop, then [DONE]": (Reply(text="all of it"), "completed", None),
    "length": (Reply(text="cut by the limit", finish_reason="length"), "incomplete", "length"),
    "tool_calls": (Reply(tool_calls=[CALL], finish_reason="tool_calls"), "completed", None),
    "content_filter": (
        Reply(text="filtered", finish_reason="content_filter"),
        "incomplete",
        "content_filter",
    ),
    # The hub said it finished, then closed the stream without [DONE]: the answer is whole.
    "stop, no [DONE]": (Reply(text="all of it", send_done=False), "completed", None),
}


@pytest.mark.parametrize("name", FINISHED)
def test_a_finished_stream_is_stored_as_the_hub_ended_it(
    chat_stack: Stack, hub: FakeHub, name: str
) -> None:
    reply, status, finish_reason = FINISHED[name]
    hub.enqueue(reply)
    events = stream_events(chat_stack, {"input": "go"})
    terminal = events[-1]
    assert terminal["type"] == f"response.{status}"
    response = terminal["response"]
    assert response["status"] == status
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(
        finish_reason or ""
    )
    assert response["incomplete_details"] == ({"reason": reason} if reason else None)
    kept = stored(chat_stack, response["id"])
    assert kept is not None and kept.status == status
    assert [o.type for o in kept.output] == [o["type"] for o in response["output"]]


EARLY = {
    "no finish_reason, no [DONE]": Reply(
        text="half an ans", send_finish_reason=False, send_done=False
    ),
    "[DONE] without finish_reason": Reply(text="half an ans", send_finish_reason=False),
    "no finish_reason, mid call": Reply(
        tool_calls=[CALL], send_finish_reason=False, send_done=False
    ),
    "finish_reason abort, then [DONE]": Reply(text="half an ans", finish_reason="abort"),
}


@pytest.mark.parametrize("name", EARLY)
def test_an_early_end_fails_and_nothing_builds_on_it(
    chat_stack: Stack, hub: FakeHub, name: str
) -> None:
    hub.enqueue(EARLY[name])
    events = stream_events(chat_stack, {"input": "go"})
    types = [e["type"] for e in events]
    assert types[0] == "response.created"
    assert types[-2:] == ["error", "response.failed"]
    assert not {"response.completed", "response.incomplete"} & set(types)
    assert events[-2]["code"] == "upstream_stream_incomplete"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["output"][-1]["status"] == "incomplete"
    # Stored as failed (it was retrievable as in progress while it ran), as it was answered.
    error = stored_failed(chat_stack, failed["id"]).error
    assert error is not None and error.message == failed["error"]["message"]
    # Nothing to build on: the partial answer never reaches a later turn.
    hub.enqueue(Reply(text="again"))
    chat_stack.client().responses.create(input="and then?", previous_response_id=failed["id"])
    assert [m["role"] for m in hub.chat_requests()[-1]["messages"]] == ["user", "user"]


def test_an_early_end_in_a_conversation_appends_nothing(chat_stack: Stack, hub: FakeHub) -> None:
    client = chat_stack.client()
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "a"}])
    hub.enqueue(Reply(text="half", send_finish_reason=False))
    events = stream_events(chat_stack, {"input": "b", "conversation": conv.id})
    assert events[-1]["type"] == "response.failed"
    assert len(list(client.conversations.items.list(conv.id))) == 1
    hub.enqueue(Reply(text="whole"))
    client.responses.create(input="c", conversation=conv.id)
    last = hub.chat_requests()[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "user"], "the failed turn is not in the history"


def test_an_early_end_of_a_background_stream_is_stored_as_failed(
    chat_stack: Stack, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text="half", send_finish_reason=False, send_done=False))
    events = stream_events(chat_stack, {"input": "go", "background": True})
    assert events[-1]["type"] == "response.failed"
    response_id = events[-1]["response"]["id"]
    deadline = time.monotonic() + 10
    while True:
        kept = stored(chat_stack, response_id)
        if kept is not None and kept.status != "in_progress" and kept.status != "queued":
            break
        assert time.monotonic() < deadline, "the background response stayed in progress"
        time.sleep(0.05)
    assert kept.status == "failed"
    assert kept.error is not None and kept.error.code == "server_error"


def test_the_sdk_sees_an_early_end_as_a_failure(chat_stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="half an answer", send_finish_reason=False))
    with chat_stack.client().responses.stream(model="m", input="go") as s:
        types = [e.type for e in s]
        with pytest.raises(RuntimeError):
            s.get_final_response()
    assert types[-2:] == ["error", "response.failed"]


def test_a_responses_hub_stream_without_its_terminal_event_fails(
    responses_stack: Stack, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text="half an answer", send_terminal=False))
    events = stream_events(responses_stack, {"input": "go"})
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_stream_incomplete"
    stored_failed(responses_stack, events[-1]["response"]["id"])
    hub.enqueue(Reply(text="a whole answer"))
    events = stream_events(responses_stack, {"input": "go"})
    assert events[-1]["type"] == "response.completed"
    assert stored(responses_stack, events[-1]["response"]["id"]) is not None
