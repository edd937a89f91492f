"""A hub whose answer has a field of the wrong type (issue 13, item 6): a 502 in OpenAI's shape
(a stream ends with ``error`` and ``response.failed``), never a 500 and never an answer with
silently missing text or counts, and nothing stored. One case per malformed field, non-streamed
and streamed, against the fake hub as a Chat Completions hub and as a Responses hub."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.acceptance.test_retries import item_texts, sse_events
from tests.fakehub import FakeHub, Reply
from tests.support import Stack

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-x",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "fine", "tool_calls": [CALL]},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}

# (case, path to the field from the completion, the wrong value). In a stream the same field is
# broken in a chunk, with "delta" in place of "message".
MALFORMED: list[tuple[str, tuple[str | int, ...], Any]] = [
    ("choices not a list", ("choices",), {"0": {"message": {"content": "x"}}}),
    ("choices a string", ("choices",), "none"),
    ("a choice not an object", ("choices", 0), "text"),
    ("message a string", ("choices", 0, "message"), "text"),
    ("content a number", ("choices", 0, "message", "content"), 5),
    ("content an object", ("choices", 0, "message", "content"), {"text": "x"}),
    ("a content part not an object", ("choices", 0, "message", "content"), ["x"]),
    ("refusal a number", ("choices", 0, "message", "refusal"), 1),
    ("reasoning_content a list", ("choices", 0, "message", "reasoning_content"), ["r"]),
    ("tool_calls an object", ("choices", 0, "message", "tool_calls"), CALL),
    ("a tool call a string", ("choices", 0, "message", "tool_calls", 0), "call"),
    ("function a string", ("choices", 0, "message", "tool_calls", 0, "function"), "f"),
    (
        "arguments an object",
        ("choices", 0, "message", "tool_calls", 0, "function", "arguments"),
        {"city": "Paris"},
    ),
    ("function name a number", ("choices", 0, "message", "tool_calls", 0, "function", "name"), 7),
    ("tool call id a number", ("choices", 0, "message", "tool_calls", 0, "id"), 12),
    ("finish_reason a number", ("choices", 0, "finish_reason"), 0),
    ("logprobs a list", ("choices", 0, "logprobs"), []),
    ("usage a list", ("usage",), [3, 1, 4]),
    ("prompt_tokens a string", ("usage", "prompt_tokens"), "many"),
    ("completion_tokens a float", ("usage", "completion_tokens"), 1.5),
    ("total_tokens a boolean", ("usage", "total_tokens"), True),
    ("prompt_tokens_details a string", ("usage", "prompt_tokens_details"), "none"),
    (
        "reasoning_tokens a string",
        ("usage", "completion_tokens_details", "reasoning_tokens"),
        "0",
    ),
]
CASES = [pytest.param(path, value, id=case) for case, path, value in MALFORMED]


def broken(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target: Any = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


def chunks(path: tuple[str | int, ...], value: Any) -> list[bytes]:
    """A well-formed stream but for one chunk with the field broken."""
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]}
    delta = {"content": " fine", "tool_calls": [{**CALL, "index": 0}]}
    middle = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {**base, "choices": [], "usage": COMPLETION["usage"]}
    if path[0] == "usage":
        usage = broken(usage, path, value)
    else:
        where = tuple("delta" if step == "message" else step for step in path)
        middle = broken(middle, where, value)
    return [orjson.dumps(c) for c in (first, middle, last, usage)]


def test_the_well_formed_answers_are_answered(stack: Stack, hub: FakeHub) -> None:
    # The cases below differ from these in one field only.
    hub.enqueue(
        Reply(raw_body=orjson.dumps(COMPLETION)),
        Reply(raw_chunks=chunks(("usage", "prompt_tokens"), 3)),
    )
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/responses"
        plain = http.post(url, json={"model": "m", "input": "x", "tools": tools})
        streamed = http.post(url, json={"model": "m", "input": "x", "tools": tools, "stream": True})
    assert plain.status_code == 200, plain.text
    assert [o["type"] for o in plain.json()["output"]] == ["message", "function_call"]
    assert plain.json()["usage"]["input_tokens"] == 3
    events = sse_events(streamed.content)
    assert events[-1]["type"] == "response.completed", events[-1]
    assert events[-1]["response"]["usage"]["input_tokens"] == 3


def assert_failed(http: httpx.Client, url: str) -> None:
    """The streamed turn at ``url`` is stored as failed (as a streamed turn is stored while it
    runs, see README "Streams"), with no output items."""
    stored = http.get(url)
    assert stored.status_code == 200, stored.text
    assert stored.json()["status"] == "failed"
    assert stored.json()["error"]["code"] == "server_error"
    items = http.get(f"{url}/input_items").json()["data"]
    assert [i["type"] for i in items] == ["message"]


@pytest.mark.parametrize(("path", "value"), CASES)
def test_a_malformed_hub_answer_is_a_502_and_stores_nothing(
    stack: Stack, hub: FakeHub, path: tuple[str | int, ...], value: Any
) -> None:
    client = stack.client()  # no retries: each would be a new hub call
    conv = client.conversations.create()
    hub.enqueue(
        Reply(raw_body=orjson.dumps(broken(COMPLETION, path, value))),
        Reply(raw_body=orjson.dumps(broken(COMPLETION, path, value))),
    )
    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.create(model="m", input="x", conversation=conv.id)
    assert raised.value.status_code == 502
    error = raised.value.body
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "upstream_malformed_response")
    assert "".join(str(p) for p in path[-1:]) in error["message"]
    assert item_texts(client, conv.id) == []
    # Without a conversation, as plain as a turn gets.
    with pytest.raises(openai.APIStatusError) as plain:
        client.responses.create(model="m", input="x")
    assert plain.value.status_code == 502


@pytest.mark.parametrize(("path", "value"), CASES)
def test_a_malformed_hub_chunk_fails_the_stream_and_is_stored_failed(
    stack: Stack, hub: FakeHub, path: tuple[str | int, ...], value: Any
) -> None:
    hub.enqueue(Reply(raw_chunks=chunks(path, value)), Reply(raw_chunks=chunks(path, value)))
    client = stack.client()
    conv = client.conversations.create()
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/responses"
        r = http.post(url, json={"model": "m", "input": "x", "stream": True})
        assert r.status_code == 200
        events = sse_events(r.content)
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"], events[-2:]
        assert events[-2]["code"] == "upstream_malformed_response"
        # response.error.code is one of OpenAI's fixed codes.
        assert events[-1]["response"]["error"]["code"] == "server_error"
        assert r.content.endswith(b"data: [DONE]\n\n")
        # Stored as it ended (retrievable, as at OpenAI), with no output a later turn builds on.
        assert_failed(http, f"{url}/{events[0]['response']['id']}")
        # A streamed turn in a conversation is sent once stored: here it never is.
        held = http.post(
            url, json={"model": "m", "input": "x", "stream": True, "conversation": conv.id}
        )
    if held.headers["content-type"].startswith("text/event-stream"):
        assert sse_events(held.content)[-1]["type"] == "response.failed"
    else:
        assert held.status_code == 502
        assert held.json()["error"]["code"] == "upstream_malformed_response"
    assert item_texts(client, conv.id) == []


# --- a Responses hub ------------------------------------------------------------------------------

RESPONSE: dict[str, Any] = {
    "id": "resp_up",
    "object": "response",
    "status": "completed",
    "output": [
        {
            "id": "msg_up",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "fine", "annotations": []}],
        }
    ],
    "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
}
RESPONSE_CASES = [
    pytest.param(("output",), {"0": {}}, id="output an object"),
    pytest.param(("output", 0), "text", id="an output item a string"),
    pytest.param(("output", 0, "type"), 3, id="an item type a number"),
    pytest.param(("status",), 5, id="status a number"),
    pytest.param(("status",), "done", id="status unknown"),
    pytest.param(("usage",), [3, 1], id="usage a list"),
    pytest.param(("usage", "input_tokens"), "3", id="input_tokens a string"),
    pytest.param(("error",), "bad", id="error a string"),
    pytest.param(("incomplete_details",), ["x"], id="incomplete_details a list"),
]
# (what is broken in which event of a stream, the value)
EVENT_CASES = [
    pytest.param(3, "delta", 5, id="a delta a number"),
    pytest.param(3, "output_index", "0", id="output_index a string"),
    pytest.param(2, "item", "msg", id="an item a string"),
    pytest.param(4, "text", ["fine"], id="text a list"),
]


@pytest.fixture
def responses_stack(hub: FakeHub) -> Iterator[Stack]:
    """The gateway in front of a Responses-API hub."""
    s = Stack(hub.url, router={"default_model": "fake-model", "hub_api": "responses"}).start()
    yield s
    s.stop()


def response_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    item = response["output"][0] if isinstance(response["output"], list) else {}
    running = {**response, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": "msg_up", "output_index": 0, "content_index": 0}
    return [
        {"type": "response.created", "response": running},
        {"type": "response.in_progress", "response": running},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.output_text.delta", **where, "delta": "fine"},
        {"type": "response.output_text.done", **where, "text": "fine"},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": response},
    ]


def test_a_well_formed_responses_hub_answer_is_answered(
    responses_stack: Stack, hub: FakeHub
) -> None:
    hub.enqueue(
        Reply(raw_body=orjson.dumps(RESPONSE)),
        Reply(raw_chunks=[orjson.dumps(e) for e in response_events(RESPONSE)]),
    )
    with httpx.Client(timeout=10) as http:
        url = f"{responses_stack.url}/responses"
        plain = http.post(url, json={"model": "m", "input": "x"})
        streamed = http.post(url, json={"model": "m", "input": "x", "stream": True})
    assert plain.status_code == 200, plain.text
    assert plain.json()["output"][0]["content"][0]["text"] == "fine"
    assert sse_events(streamed.content)[-1]["type"] == "response.completed"


@pytest.mark.parametrize(("path", "value"), RESPONSE_CASES)
def test_a_malformed_responses_hub_answer_is_a_502(
    responses_stack: Stack, hub: FakeHub, path: tuple[str | int, ...], value: Any
) -> None:
    bad = broken(RESPONSE, path, value)
    hub.enqueue(
        Reply(raw_body=orjson.dumps(bad)),
        Reply(
            raw_chunks=[orjson.dumps(e) for e in response_events(RESPONSE)[:-1]]
            + [orjson.dumps({"type": "response.completed", "response": bad})]
        ),
    )
    client = responses_stack.client()
    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.create(model="m", input="x")
    assert raised.value.status_code == 502
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "upstream_malformed_response"
    with httpx.Client(timeout=10) as http:
        url = f"{responses_stack.url}/responses"
        r = http.post(url, json={"model": "m", "input": "x", "stream": True})
        events = sse_events(r.content)
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"], events[-2:]
        assert events[-2]["code"] == "upstream_malformed_response"
        assert_failed(http, f"{url}/{events[0]['response']['id']}")


@pytest.mark.parametrize(("index", "name", "value"), EVENT_CASES)
def test_a_malformed_responses_hub_event_fails_the_stream(
    responses_stack: Stack, hub: FakeHub, index: int, name: str, value: Any
) -> None:
    events = response_events(RESPONSE)
    events[index] = {**events[index], name: value}
    hub.enqueue(Reply(raw_chunks=[orjson.dumps(e) for e in events]))
    with httpx.Client(timeout=10) as http:
        url = f"{responses_stack.url}/responses"
        r = http.post(url, json={"model": "m", "input": "x", "stream": True})
        sent = sse_events(r.content)
        assert [e["type"] for e in sent[-2:]] == ["error", "response.failed"], sent[-2:]
        assert sent[-2]["code"] == "upstream_malformed_response"
        assert_failed(http, f"{url}/{sent[0]['response']['id']}")
