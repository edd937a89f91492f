"""Streaming events, checked by the openai SDK's own SSE parsing, strict validation and stream helper."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import httpx2
import orjson
import pytest
from openai import OpenAI
from openai._models import validate_type
from openai._streaming import Stream
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStream
from openai.types.responses import Response, ResponseStreamEvent

from router_svc import errors, event_log, validate
from router_svc.dialects.chat import stream as chat_stream
from router_svc.dialects.chat.stream import ChatStreamTranslator
from router_svc.dialects.responses import ResponsesStreamTranslator
from router_svc.event_log import EventLog
from router_svc.events import SSE_DONE, STREAM_INCOMPLETE, sse_encode
from router_svc.replay import replay_events, stored_stream, stored_stream_iter

TOOLS = [{"type": "function", "name": "weather"}, {"type": "function", "name": "time"}]


def req(**body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request({"model": "m", "input": "hi", "tools": TOOLS, **body})


class SdkResult:
    """What the SDK made of an event stream."""

    def __init__(self, events: list[Any], final: Any) -> None:
        self.events = events
        self.final = final

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]


def through_sdk(
    events: list[dict[str, Any]], *, starting_after: int | None = None, after_done: bytes = b""
) -> SdkResult:
    """Feeds the SSE bytes to the SDK exactly as a server would send them, ``data: [DONE]`` last.

    The client validates every event strictly against the SDK's types and the SDK's stream helper
    (ResponseStream) accumulates them, raising on any inconsistency: a first event other than
    response.created, a delta before its item, a repeated output_index, a changed identity.
    """
    body = b"".join(sse_encode(e) for e in events) + SSE_DONE + after_done
    client = OpenAI(
        api_key="test", base_url="http://127.0.0.1:9/v1", _strict_response_validation=True
    )
    try:
        http = httpx2.Response(
            200,
            content=body,
            headers={"content-type": "text/event-stream"},
            request=httpx2.Request("POST", "http://127.0.0.1:9/v1/responses"),
        )
        raw: Stream[Any] = Stream(cast_to=ResponseStreamEvent, response=http, client=client)  # type: ignore[arg-type]
        helper: ResponseStream[Any] = ResponseStream(
            raw_stream=raw, text_format=omit, input_tools=omit, starting_after=starting_after
        )
        parsed = list(helper)
        return SdkResult(parsed, helper._state._completed_response)
    finally:
        client.close()


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish, **extra}],
    }


def usage_chunk(prompt: int = 7, completion: int = 3) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def call(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    out: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        out.update(id=id, type="function")
    return out


def run(
    chunks: Iterable[dict[str, Any]],
    request: validate.TurnRequest | None = None,
    *,
    fail: tuple[str, str] | None = None,
    **kwargs: Any,
) -> tuple[ChatStreamTranslator, list[dict[str, Any]]]:
    translator = ChatStreamTranslator(
        request or req(), response_id="resp_1", created_at=100, **kwargs
    )
    events = translator.start()
    for c in chunks:
        events += translator.feed(c)
    events += translator.fail(*fail) if fail else translator.finish()
    return translator, events


def assert_well_formed(events: list[dict[str, Any]]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[1]["type"] == "response.in_progress"
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert ids == {"resp_1"}
    added: dict[int, str] = {}
    for e in events:
        if e["type"] == "response.output_item.added":
            assert e["output_index"] not in added, "an output_index is used once"
            added[e["output_index"]] = e["item"]["id"]
        elif "output_index" in e:
            assert added[e["output_index"]] == e.get("item_id", e.get("item", {}).get("id"))
    assert sorted(added) == list(range(len(added)))


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def test_sse_encoding() -> None:
    event = {"type": "response.output_text.delta", "sequence_number": 3, "delta": "é\n"}
    encoded = sse_encode(event)
    assert encoded.startswith(b"event: response.output_text.delta\ndata: ")
    assert encoded.endswith(b"\n\n")
    assert encoded.count(b"\n") == 3, "the JSON payload stays on one line"
    assert orjson.loads(encoded.split(b"data: ", 1)[1]) == event


def test_streams_end_with_done_and_the_sdk_stops_there() -> None:
    assert SSE_DONE == b"data: [DONE]\n\n"
    _, events = run([chunk({"content": "Hi"}), chunk(finish="stop")])
    garbage = sse_encode({"type": "response.output_text.delta", "sequence_number": 99})
    sdk = through_sdk(events, after_done=garbage + b"data: {not json\n\n")
    assert sdk.types == types(events), "nothing after [DONE] is read"
    assert sdk.final.output_text == "Hi"


def test_text_stream() -> None:
    translator, events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk(finish="stop"),
            usage_chunk(),
        ]
    )
    assert types(events) == [
        "response.created",
        "response.in_progress",
        *TEXT_EVENTS,
        "response.completed",
    ]
    assert_well_formed(events)
    created = events[0]["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    added = events[2]["item"]
    assert (
        added["status"] == "in_progress" and added["content"] == [] and added["role"] == "assistant"
    )
    assert events[3]["part"] == {
        "type": "output_text",
        "annotations": [],
        "logprobs": [],
        "text": "",
    }
    assert [e["delta"] for e in events[4:6]] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello"
    assert events[8]["item"]["status"] == "completed"
    final = events[-1]["response"]
    assert final is translator.response
    assert final["status"] == "completed"
    assert final["output"][0]["id"] == added["id"]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["total_tokens"] == 10
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 0

    sdk = through_sdk(events)
    assert sdk.types == types(events)
    assert sdk.events[5].snapshot == "Hello"  # the SDK accumulated the deltas
    assert sdk.final.output_text == "Hello"
    assert sdk.final.id == "resp_1"
    assert sdk.final.usage.output_tokens == 3


def test_function_call_stream_name_and_id_only_in_first_delta() -> None:
    translator, events = run(
        [
            chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call(0, id="call_a", name="weather", args="")],
                }
            ),
            chunk({"tool_calls": [call(0, args='{"city":')]}),
            chunk({"tool_calls": [call(0, args='"Paris"}')]}),
            chunk(finish="tool_calls"),
            usage_chunk(),
        ]
    )
    assert types(events)[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert_well_formed(events)
    added = events[2]["item"]
    assert added["id"].startswith("fc_")
    assert (added["call_id"], added["name"], added["arguments"], added["status"]) == (
        "call_a",
        "weather",
        "",
        "in_progress",
    )
    assert events[5]["arguments"] == '{"city":"Paris"}' and events[5]["name"] == "weather"
    item = translator.response["output"][0]
    assert item == {**added, "status": "completed", "arguments": '{"city":"Paris"}'}
    sdk = through_sdk(events)
    assert sdk.events[4].snapshot == '{"city":"Paris"}'
    [fc] = sdk.final.output
    assert (fc.type, fc.call_id, fc.arguments) == ("function_call", "call_a", '{"city":"Paris"}')


def test_text_then_parallel_calls_each_item_closes_before_the_next() -> None:
    translator, events = run(
        [
            chunk({"content": "Checking both."}),
            chunk({"tool_calls": [call(0, id="call_a", name="weather", args='{"city":"Paris"}')]}),
            chunk({"tool_calls": [call(1, id="call_b", name="time", args="")]}),
            chunk({"tool_calls": [call(1, args="{}")]}),
            chunk(finish="tool_calls"),
        ]
    )
    assert_well_formed(events)
    item_events = [
        (e["type"], e["output_index"])
        for e in events
        if e["type"].startswith("response.output_item")
    ]
    assert item_events == [
        ("response.output_item.added", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.output_item.done", 2),
    ]
    output = translator.response["output"]
    assert [i["type"] for i in output] == ["message", "function_call", "function_call"]
    assert [i.get("call_id") for i in output[1:]] == ["call_a", "call_b"]
    assert translator.response["usage"] is None, "no usage chunk, no usage"
    sdk = through_sdk(events)
    assert [o.type for o in sdk.final.output] == ["message", "function_call", "function_call"]
    assert sdk.final.output_text == "Checking both."


def test_calls_only() -> None:
    _, events = run(
        [
            chunk({"tool_calls": [call(0, id="call_a", name="weather", args="{}")]}),
            chunk({"tool_calls": [call(1, id="call_b", name="weather", args="{}")]}),
            chunk(finish="tool_calls"),
        ]
    )
    assert_well_formed(events)
    assert types(events).count("response.output_item.added") == 2
    assert "response.output_text.delta" not in types(events)
    assert len(through_sdk(events).final.output) == 2


def test_call_added_only_once_its_name_is_known() -> None:
    translator, events = run(
        [
            chunk({"tool_calls": [call(0, id="call_a")]}),
            chunk({"tool_calls": [call(0, args='{"a"')]}),
            chunk({"tool_calls": [call(0, name="weather", args=":1}")]}),
            chunk(finish="tool_calls"),
        ]
    )
    assert types(events)[2:4] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
    ]
    assert events[2]["item"]["name"] == "weather"
    assert events[3]["delta"] == '{"a":1}'
    assert translator.response["output"][0]["arguments"] == '{"a":1}'
    through_sdk(events)


def test_call_without_index_or_id() -> None:
    translator, events = run(
        [
            chunk(
                {
                    "tool_calls": [
                        {"id": "call_a", "function": {"name": "weather", "arguments": "{}"}}
                    ]
                }
            ),
            chunk(
                {"tool_calls": [{"id": "call_b", "function": {"name": "time", "arguments": ""}}]}
            ),
            chunk({"tool_calls": [{"function": {"arguments": "{}"}}]}),
            chunk(
                {"tool_calls": [{"index": 2, "function": {"name": "weather", "arguments": "{}"}}]}
            ),
            chunk(finish="tool_calls"),
        ]
    )
    output = translator.response["output"]
    assert [(i["call_id"][:5], i["name"], i["arguments"]) for i in output] == [
        ("call_", "weather", "{}"),
        ("call_", "time", "{}"),
        ("call_", "weather", "{}"),
    ]
    assert output[0]["call_id"] == "call_a" and output[1]["call_id"] == "call_b"
    assert output[2]["call_id"] not in ("call_a", "call_b"), "a call without id gets one of its own"
    through_sdk(events)


def test_interleaved_call_deltas_are_an_upstream_error() -> None:
    translator = ChatStreamTranslator(req(), response_id="resp_1", created_at=1)
    translator.feed(chunk({"tool_calls": [call(0, id="a", name="weather", args="{")]}))
    translator.feed(chunk({"tool_calls": [call(1, id="b", name="time", args="{")]}))
    with pytest.raises(errors.UpstreamError):
        translator.feed(chunk({"tool_calls": [call(0, args="}")]}))
    events = translator.fail("server_error", "bad stream")
    assert types(events) == ["error", "response.failed"]


def test_reasoning_then_text() -> None:
    translator, events = run(
        [
            chunk({"reasoning_content": "Think"}),
            chunk({"reasoning": "ing."}),
            chunk({"content": "42"}),
            chunk(finish="stop"),
        ]
    )
    assert types(events)[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    reasoning, message = translator.response["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert reasoning["status"] == "completed"
    assert message["content"][0]["text"] == "42"
    sdk = through_sdk(events)
    assert [o.type for o in sdk.final.output] == ["reasoning", "message"]


def test_refusal_stream() -> None:
    translator, events = run(
        [chunk({"refusal": "I can't "}), chunk({"refusal": "help."}), chunk(finish="stop")]
    )
    assert types(events)[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert translator.response["output"][0]["content"] == [
        {"type": "refusal", "refusal": "I can't help."}
    ]
    through_sdk(events)


def test_max_tokens_makes_the_response_incomplete() -> None:
    _translator, events = run(
        [chunk({"content": "Once upon"}), chunk(finish="length"), usage_chunk(3, 16)]
    )
    assert types(events)[-2:] == ["response.output_item.done", "response.incomplete"]
    assert events[-2]["item"]["status"] == "incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 16
    assert final["completed_at"] is None
    assert_well_formed(events)
    sdk = through_sdk(events)
    assert sdk.types[-1] == "response.incomplete"
    assert sdk.events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert sdk.final is None, "the SDK only completes on response.completed"


def test_max_tokens_in_a_call_after_text() -> None:
    translator, events = run(
        [
            chunk({"content": "a"}),
            chunk({"tool_calls": [call(0, id="c", name="weather", args='{"ci')]}),
            chunk(finish="length"),
        ]
    )
    assert [i["status"] for i in translator.response["output"]] == ["completed", "incomplete"]
    through_sdk(events)


# --- how a chat hub's stream ends ----------------------------------------------------------------

HELLO = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
]


@pytest.mark.parametrize(
    ("tail", "terminal", "reason"),
    [
        # vLLM, SGLang, llama.cpp, Ollama: finish_reason in the last choice chunk, then usage.
        ([chunk(finish="stop"), usage_chunk()], "response.completed", None),
        # The finish_reason on the chunk with the last text (older vLLM, some proxies).
        ([chunk({"content": "!"}, finish="stop")], "response.completed", None),
        # Names other servers give a natural stop (TGI) count as finished too.
        ([chunk(finish="eos_token")], "response.completed", None),
        # A later chunk without finish_reason does not take it back.
        ([chunk(finish="stop"), chunk()], "response.completed", None),
        ([chunk(finish="length"), usage_chunk()], "response.incomplete", "max_output_tokens"),
        ([chunk(finish="content_filter")], "response.incomplete", "content_filter"),
    ],
    ids=["stop", "stop with text", "eos_token", "stop then empty", "length", "content_filter"],
)
def test_a_stream_the_hub_finished(
    tail: list[dict[str, Any]], terminal: str, reason: str | None
) -> None:
    """Whether [DONE] followed or the hub just closed the stream after its finish_reason, the
    translator sees the same chunks: the finish_reason alone says the answer is finished."""
    translator, events = run([*HELLO, *tail])
    assert_well_formed(events)
    assert types(events)[-2:] == ["response.output_item.done", terminal]
    final = translator.response
    assert final["status"] == terminal.removeprefix("response.")
    assert final["incomplete_details"] == (None if reason is None else {"reason": reason})
    assert final["output"][0]["status"] == ("completed" if reason is None else "incomplete")
    assert final["output"][0]["content"][0]["text"].startswith("Hello")
    sdk = through_sdk(events)
    assert sdk.types[-1] == terminal
    assert (sdk.final is not None) == (reason is None)


def test_a_stream_the_hub_finished_with_tool_calls() -> None:
    translator, events = run(
        [
            chunk({"tool_calls": [call(0, id="call_a", name="weather", args='{"c":')]}),
            chunk({"tool_calls": [call(0, args="1}")]}),
            chunk(finish="tool_calls"),
        ]
    )
    assert types(events)[-1] == "response.completed"
    assert translator.response["status"] == "completed"
    assert translator.response["output"][0]["status"] == "completed"
    assert translator.response["output"][0]["arguments"] == '{"c":1}'
    assert through_sdk(events).final.output[0].type == "function_call"


EARLY_ENDS: dict[str, list[dict[str, Any]]] = {
    # The hub closed the stream cleanly mid-answer, with or without [DONE] (the translator sees
    # the same chunks either way): no finish_reason ever came.
    "mid text": HELLO,
    "usage but no finish_reason": [*HELLO, usage_chunk()],
    "empty chunks only": [*HELLO, chunk(), chunk({})],
    "before any chunk": [],
    "mid call": [*HELLO, chunk({"tool_calls": [call(0, id="call_a", name="weather", args="{")]})],
    "call waiting for its name": [chunk({"tool_calls": [call(0, id="call_a", args="{")]})],
    # vLLM ends a request its engine aborted with finish_reason "abort", then [DONE].
    "abort": [*HELLO, chunk(finish="abort"), usage_chunk()],
    "error": [*HELLO, chunk(finish="error")],
}


@pytest.mark.parametrize("name", EARLY_ENDS)
def test_a_stream_that_ends_before_the_hub_finished_fails(name: str) -> None:
    translator = ChatStreamTranslator(req(), response_id="resp_1", created_at=100)
    events = translator.start()
    for c in EARLY_ENDS[name]:
        events += translator.feed(c)
    with pytest.raises(errors.UpstreamError) as raised:
        translator.finish()
    assert raised.value.code == STREAM_INCOMPLETE
    assert "before the answer was finished" in raised.value.message
    assert translator.response["status"] == "in_progress", "finish() decided nothing"
    # What the router then does (streaming._pump): fail() with the error's code and message.
    events += translator.fail(raised.value.code, raised.value.message)
    assert_well_formed(events)
    assert types(events)[-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_stream_incomplete"
    assert not {"response.completed", "response.incomplete"} & set(types(events))
    final = translator.response
    assert final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": raised.value.message}
    statuses = [item["status"] for item in final["output"]]
    if statuses:  # the item being streamed is left incomplete; those before it were closed
        assert statuses == [*["completed"] * (len(statuses) - 1), "incomplete"]
    sdk = through_sdk(events)
    assert sdk.final is None and sdk.types[-1] == "response.failed"
    replayed = replay_events(orjson.loads(orjson.dumps(final)))
    assert collapsed(replayed) == collapsed(events), "a stored failure replays the same"
    through_sdk(replayed)


def test_failure_mid_text() -> None:
    _translator, events = run(
        [chunk({"content": "Partial"})], fail=("server_error", "The model server went away.")
    )
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "error",
        "response.failed",
    ]
    assert_well_formed(events)
    assert events[-2] == {
        "type": "error",
        "sequence_number": 5,
        "code": "server_error",
        "message": "The model server went away.",
        "param": None,
    }
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "The model server went away."}
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Partial"
    sdk = through_sdk(events)
    assert sdk.types[-2:] == ["error", "response.failed"]
    assert sdk.events[-1].response.error.message == "The model server went away."


def test_failure_before_output_and_codes_outside_openais_list() -> None:
    translator, events = run([], fail=("upstream_timeout", "The model server timed out."))
    assert types(events) == ["response.created", "response.in_progress", "error", "response.failed"]
    assert events[2]["code"] == "upstream_timeout", "the error event keeps the gateway's code"
    assert translator.response["error"]["code"] == "server_error"
    through_sdk(events)


def test_failure_while_a_call_waits_for_its_name() -> None:
    translator, events = run(
        [chunk({"tool_calls": [call(0, id="call_a", args="{")]})], fail=("server_error", "x")
    )
    assert types(events)[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "error",
        "response.failed",
    ]
    assert translator.response["output"][0]["status"] == "incomplete"
    through_sdk(events)


def test_terminal_is_final() -> None:
    translator, _events = run([chunk({"content": "x"}), chunk(finish="stop")])
    final = translator.response
    assert translator.feed(chunk({"content": "more"})) == []
    assert translator.finish() == []
    assert translator.fail("server_error", "late") == []
    assert translator.response is final
    assert final["output"][0]["content"][0]["text"] == "x"


def test_start_is_implied_and_once() -> None:
    translator = ChatStreamTranslator(req(), response_id="resp_1", created_at=1)
    events = translator.feed(chunk({"content": "x"}))
    assert types(events)[:2] == ["response.created", "response.in_progress"]
    assert translator.start() == []


def test_response_property_while_streaming() -> None:
    translator = ChatStreamTranslator(req(), response_id="resp_1", created_at=1)
    translator.start()
    translator.feed(chunk({"content": "Hel"}))
    translator.feed(chunk({"content": "lo"}))
    snapshot = translator.response
    assert snapshot["status"] == "in_progress"
    assert snapshot["output"][0]["content"][0]["text"] == "Hello"
    validate_type(type_=Response, value=snapshot)


def test_text_read_while_streaming_then_continued_is_kept_exactly() -> None:
    # Non-ASCII, a character split over no delta, a lone surrogate (a JSON escape allows one).
    pieces = ["h\u00e9", "\u2028", "\U0001f600", "x\ud800", "", "y" * 300, "\u00fc"]
    translator = ChatStreamTranslator(req(), response_id="resp_1", created_at=1)
    translator.start()
    for n, piece in enumerate(pieces):
        translator.feed(chunk({"content": piece}))
        if n in (1, 3):
            read = translator.response["output"][0]["content"][0]["text"]
            assert read == "".join(pieces[: n + 1])
    events = translator.feed(chunk(finish="stop")) + translator.finish()
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == "".join(pieces)
    assert translator.response["output"][0]["content"][0]["text"] == "".join(pieces)


@pytest.mark.parametrize("block", [1, 5, 64])
def test_text_decoded_a_block_at_a_time_is_kept_exactly(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # The text is decoded onto itself a block at a time (grown in place): pieces of every width,
    # read mid-stream (what was read stays as it was), then continued.
    monkeypatch.setattr(chat_stream, "_TEXT_BLOCK", block)
    pieces = [p * n for n in range(1, 40) for p in ("a", "\u00e9", "\u20ac", "\U0001f600", " ")]
    translator = ChatStreamTranslator(req(), response_id="resp_1", created_at=1)
    translator.start()
    reads: list[tuple[str, str]] = []
    for n, piece in enumerate(pieces):
        translator.feed(chunk({"content": piece}))
        if n % 37 == 0:
            read = translator.response["output"][0]["content"][0]["text"]
            reads.append((read, "".join(pieces[: n + 1])))
    events = translator.feed(chunk(finish="stop")) + translator.finish()
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == "".join(pieces)
    assert all(read == expected for read, expected in reads)


def test_logprobs_stream_when_included() -> None:
    lp = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]}
    request = req(include=["message.output_text.logprobs"])
    translator, events = run([chunk({"content": "Hi"}, logprobs=lp), chunk(finish="stop")], request)
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    entry = {"token": "Hi", "bytes": [72, 105], "logprob": -0.5, "top_logprobs": []}
    assert delta["logprobs"] == [entry]
    assert translator.response["output"][0]["content"][0]["logprobs"] == [entry]
    through_sdk(events)
    _, plain = run([chunk({"content": "Hi"}, logprobs=lp), chunk(finish="stop")])
    assert next(e for e in plain if e["type"] == "response.output_text.delta")["logprobs"] == []


def test_echo_and_tool_resources_in_every_snapshot() -> None:
    request = validate.parse_turn_request(
        {
            "model": "m",
            "input": "x",
            "instructions": "sys",
            "metadata": {"k": "v"},
            "conversation": "conv_1",
            "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}],
        }
    )
    _, events = run(
        [chunk({"content": "x"}), chunk(finish="stop")],
        request,
        tool_resources={"code_interpreter": "cntr_1"},
    )
    for e in events:
        if "response" in e:
            r = e["response"]
            assert (r["instructions"], r["metadata"], r["conversation"]) == (
                "sys",
                {"k": "v"},
                {"id": "conv_1"},
            )
            assert r["tools"] == [{"type": "code_interpreter", "container": "cntr_1"}]
    through_sdk(events)


def test_other_choices_are_ignored() -> None:
    other = {"index": 1, "delta": {"content": "other"}, "finish_reason": None}
    translator, _ = run(
        [
            {
                **chunk({"content": "main"}),
                "choices": [chunk({"content": "main"})["choices"][0], other],
            },
            chunk(finish="stop"),
        ]
    )
    assert translator.response["output"][0]["content"][0]["text"] == "main"


# --- a Responses hub ---------------------------------------------------------------------------


def upstream_events() -> list[dict[str, Any]]:
    up = {
        "id": "resp_up",
        "object": "response",
        "created_at": 1,
        "model": "gpt",
        "status": "in_progress",
        "output": [],
    }
    message = {
        "id": "msg_up",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    done_message = {
        **message,
        "status": "completed",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hi!"}],
    }
    fc = {
        "type": "function_call",
        "status": "in_progress",
        "call_id": "call_u",
        "name": "weather",
        "arguments": "",
    }
    fc_done = {**fc, "status": "completed", "arguments": "{}"}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    return [
        {"type": "response.created", "sequence_number": 0, "response": up},
        {"type": "response.in_progress", "sequence_number": 1, "response": up},
        {
            "type": "response.output_item.added",
            "sequence_number": 2,
            "output_index": 0,
            "item": message,
        },
        {
            "type": "response.content_part.added",
            "sequence_number": 3,
            "output_index": 0,
            "item_id": "msg_up",
            "content_index": 0,
            "part": part,
        },
        {
            "type": "response.output_text.delta",
            "sequence_number": 4,
            "output_index": 0,
            "item_id": "msg_up",
            "content_index": 0,
            "delta": "Hi!",
            "logprobs": [],
            "obfuscation": "xyz",
        },
        {
            "type": "response.output_text.done",
            "sequence_number": 5,
            "output_index": 0,
            "item_id": "msg_up",
            "content_index": 0,
            "text": "Hi!",
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "sequence_number": 6,
            "output_index": 0,
            "item_id": "msg_up",
            "content_index": 0,
            "part": {**part, "text": "Hi!"},
        },
        {
            "type": "response.output_item.done",
            "sequence_number": 7,
            "output_index": 0,
            "item": done_message,
        },
        {"type": "response.output_item.added", "sequence_number": 8, "output_index": 1, "item": fc},
        {
            "type": "response.function_call_arguments.delta",
            "sequence_number": 9,
            "output_index": 1,
            "item_id": "",
            "delta": "{}",
        },
        {
            "type": "response.function_call_arguments.done",
            "sequence_number": 10,
            "output_index": 1,
            "item_id": "",
            "arguments": "{}",
        },
        {
            "type": "response.output_item.done",
            "sequence_number": 11,
            "output_index": 1,
            "item": fc_done,
        },
        {
            "type": "response.completed",
            "sequence_number": 12,
            "response": {
                **up,
                "status": "completed",
                "completed_at": 2,
                "output": [done_message, fc_done],
                "usage": {
                    "input_tokens": 1,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": 2,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 3,
                },
            },
        },
    ]


def run_responses(
    upstream: list[dict[str, Any]], *, fail: tuple[str, str] | None = None
) -> tuple[ResponsesStreamTranslator, list[dict[str, Any]]]:
    translator = ResponsesStreamTranslator(
        req(metadata={"a": "b"}), response_id="resp_1", created_at=100
    )
    events = translator.start()
    for event in upstream:
        events += translator.feed(event)
    events += translator.fail(*fail) if fail else translator.finish()
    return translator, events


def test_responses_hub_events_are_re_emitted_as_ours() -> None:
    translator, events = run_responses(upstream_events())
    assert_well_formed(events)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        *types(upstream_events())[2:],
    ]
    assert events[0]["response"]["metadata"] == {"a": "b"}
    assert events[4]["obfuscation"] == "xyz", "fields we do not know pass through"
    final = translator.response
    assert final is events[-1]["response"]
    assert (final["id"], final["created_at"], final["model"], final["completed_at"]) == (
        "resp_1",
        100,
        "m",
        2,
    )
    assert final["output"][0]["id"] == "msg_up"
    fc_id = final["output"][1]["id"]
    assert fc_id.startswith("fc_")
    assert events[8]["item"]["id"] == events[11]["item"]["id"] == fc_id
    assert events[9]["item_id"] == events[10]["item_id"] == fc_id
    assert final["usage"]["total_tokens"] == 3
    assert translator.finish() == []
    sdk = through_sdk(events)
    assert sdk.final.id == "resp_1" and sdk.final.output_text == "Hi!"


@pytest.mark.parametrize(
    ("cut", "statuses"),
    [
        (2, []),  # before any item
        (6, ["incomplete"]),  # mid text
        (8, ["completed"]),  # between two items
        (10, ["completed", "incomplete"]),  # mid call
        (12, ["completed", "completed"]),  # every item done, but no terminal event
    ],
)
def test_responses_hub_stream_that_stops_early_fails(cut: int, statuses: list[str]) -> None:
    """A Responses hub's stream is finished only by its terminal event; without one, finish()
    raises and the caller answers response.failed, never response.completed."""
    translator = ResponsesStreamTranslator(req(), response_id="resp_1", created_at=100)
    events = translator.start()
    for event in upstream_events()[:cut]:
        events += translator.feed(event)
    with pytest.raises(errors.UpstreamError) as raised:
        translator.finish()
    assert raised.value.code == STREAM_INCOMPLETE
    events += translator.fail(raised.value.code, raised.value.message)
    assert types(events)[-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_stream_incomplete"
    assert "response.completed" not in types(events)
    assert translator.response["status"] == "failed"
    assert translator.response["error"]["code"] == "server_error"
    assert [i["status"] for i in translator.response["output"]] == statuses
    assert_well_formed(events)
    sdk = through_sdk(events)
    assert sdk.final is None


def test_responses_hub_failure_is_passed_on() -> None:
    up = upstream_events()
    failed = {
        "type": "response.failed",
        "sequence_number": 3,
        "response": {
            **up[0]["response"],
            "status": "failed",
            "error": {"code": "server_error", "message": "boom"},
        },
    }
    translator, events = run_responses(
        [
            *up[:2],
            {
                "type": "error",
                "sequence_number": 2,
                "code": "server_error",
                "message": "boom",
                "param": None,
            },
            failed,
        ]
    )
    assert types(events) == ["response.created", "response.in_progress", "error", "response.failed"]
    assert translator.response["error"] == {"code": "server_error", "message": "boom"}
    assert translator.response["id"] == "resp_1"
    through_sdk(events)


# --- replay ------------------------------------------------------------------------------------

SCENARIOS: dict[str, tuple[list[dict[str, Any]], tuple[str, str] | None]] = {
    "text": ([chunk({"content": "Hello"}), chunk(finish="stop"), usage_chunk()], None),
    "empty": ([chunk(finish="stop")], None),
    "call": (
        [
            chunk({"tool_calls": [call(0, id="call_a", name="weather", args='{"x":1}')]}),
            chunk(finish="tool_calls"),
        ],
        None,
    ),
    "call without arguments": (
        [chunk({"tool_calls": [call(0, id="call_a", name="time")]}), chunk(finish="tool_calls")],
        None,
    ),
    "text and calls": (
        [
            chunk({"content": "Both."}),
            chunk({"tool_calls": [call(0, id="call_a", name="weather", args="{}")]}),
            chunk({"tool_calls": [call(1, id="call_b", name="time", args="{}")]}),
            chunk(finish="tool_calls"),
            usage_chunk(),
        ],
        None,
    ),
    "reasoning and text": (
        [chunk({"reasoning_content": "Hmm."}), chunk({"content": "42"}), chunk(finish="stop")],
        None,
    ),
    "text and refusal": (
        [chunk({"content": "Well"}), chunk({"refusal": "No."}), chunk(finish="stop")],
        None,
    ),
    "max tokens": ([chunk({"content": "Once upon"}), chunk(finish="length")], None),
    "failed mid text": ([chunk({"content": "Part"})], ("server_error", "gone")),
    "failed mid refusal": (
        [chunk({"content": "a"}), chunk({"refusal": "b"})],
        ("server_error", "gone"),
    ),
    "failed mid call": (
        [
            chunk({"content": "a"}),
            chunk({"tool_calls": [call(0, id="c", name="weather", args="{")]}),
        ],
        ("server_error", "gone"),
    ),
    "failed after a closed item": (
        [chunk({"content": "a"}), chunk({"tool_calls": [call(0, id="c", name="weather")]})],
        ("server_error", "gone"),
    ),
    "failed before output": ([], ("rate_limit_exceeded", "slow down")),
}


def normalized(events: list[dict[str, Any]]) -> list[Any]:
    return orjson.loads(orjson.dumps(events))  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", SCENARIOS)
def test_replay_repeats_the_live_stream_exactly(name: str) -> None:
    chunks, fail = SCENARIOS[name]
    translator, live = run(chunks, fail=fail)
    replayed = replay_events(orjson.loads(orjson.dumps(translator.response)))
    assert normalized(replayed) == normalized(live)
    through_sdk(replayed)


def collapsed(events: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """Event types in order, each run of deltas for one part counted once."""
    keyed = [(e["type"], e.get("output_index"), e.get("content_index")) for e in events]
    return [key for key, _ in itertools.groupby(keyed)]


def test_replay_of_many_deltas_has_the_same_types_in_the_same_order() -> None:
    chunks = [
        chunk({"reasoning_content": "a"}),
        chunk({"reasoning_content": "b"}),
        *[chunk({"content": c}) for c in "Hello world"],
        chunk({"tool_calls": [call(0, id="call_a", name="weather", args="{")]}),
        *[chunk({"tool_calls": [call(0, args=c)]}) for c in '"city": 1}'],
        chunk({"tool_calls": [call(1, id="call_b", name="time", args="{}")]}),
        chunk(finish="tool_calls"),
        usage_chunk(),
    ]
    translator, live = run(chunks)
    replayed = replay_events(translator.response)
    assert len(replayed) < len(live)
    assert collapsed(replayed) == collapsed(live)
    assert replayed[-1]["response"] == live[-1]["response"]
    assert [e["sequence_number"] for e in replayed] == list(range(len(replayed)))
    sdk = through_sdk(replayed)
    assert sdk.final.output_text == "Hello world"


def test_replay_of_a_responses_hub_result_with_summaries() -> None:
    response = replay_events(
        {
            **run([chunk({"content": "x"}), chunk(finish="stop")])[0].response,
            "output": [
                {
                    "id": "rs_1",
                    "type": "reasoning",
                    "summary": [
                        {"type": "summary_text", "text": "s1"},
                        {"type": "summary_text", "text": "s2"},
                    ],
                },
                {
                    "id": "ws_1",
                    "type": "web_search_call",
                    "status": "completed",
                    "action": {"type": "search", "query": "q"},
                },
                {
                    "id": "msg_1",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "annotations": [], "text": "done"}],
                },
            ],
        }
    )
    assert types(response).count("response.reasoning_summary_part.added") == 2
    assert types(response).count("response.reasoning_summary_text.delta") == 2
    web = [e for e in response if e.get("output_index") == 1]
    assert types(web) == ["response.output_item.added", "response.output_item.done"]
    assert web[0]["item"]["status"] == "in_progress"
    sdk = through_sdk(response)
    assert sdk.final.output_text == "done"


@pytest.mark.parametrize(
    ("status", "last"),
    [
        ("in_progress", "response.in_progress"),
        ("cancelled", "response.in_progress"),
        ("queued", "response.created"),
    ],
)
def test_replay_of_unfinished_responses_has_no_terminal_event(status: str, last: str) -> None:
    translator, _ = run([chunk({"content": "x"}), chunk(finish="stop")])
    events = replay_events({**translator.response, "status": status, "output": []})
    assert types(events)[-1] == last
    assert events[0]["response"]["status"] == ("queued" if status == "queued" else "in_progress")


def test_replay_starting_after_is_filtered_by_the_sdk() -> None:
    translator, live = run([chunk({"content": "Hi"}), chunk(finish="stop")])
    sdk = through_sdk(replay_events(translator.response), starting_after=4)
    assert [e.sequence_number for e in sdk.events] == list(range(5, len(live)))


def _without(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] != kind]


def _broken_delta(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k != "logprobs"}
        if e["type"] == "response.output_text.delta"
        else e
        for e in events
    ]


def _other_response_id(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last = events[-1]
    return [*events[:-1], {**last, "response": {**last["response"], "id": "resp_other"}}]


def _repeated_index(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "output_index": 0} if e.get("output_index") == 1 else e for e in events]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda events: events[1:],  # no response.created first
        lambda events: _without(events, "response.output_item.added"),  # a delta before its item
        _broken_delta,  # a required field missing
        _other_response_id,  # the response id changes
        _repeated_index,  # an output_index used twice
    ],
)
def test_the_sdk_check_catches_broken_sequences(mutate: Any) -> None:
    """A negative control: the harness above fails on the errors it is there to catch."""
    _, events = run(
        [
            chunk({"content": "a"}),
            chunk({"tool_calls": [call(0, id="c", name="weather", args="{}")]}),
            chunk(finish="stop"),
        ]
    )
    through_sdk(events)
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises RuntimeError or ValidationError
        through_sdk(mutate(events))


# --- the stored event log -------------------------------------------------------------------


def logged(
    events: list[dict[str, Any]], response: dict[str, Any], *, compact: bool = True
) -> bytes:
    """The log a streamed turn stores: every event as sent, the terminal one included; in the
    compact form from the first event unless ``compact`` is false (a short stream's is not)."""
    log = EventLog(compact=compact)
    for event in events:
        log.add(event)
    return log.dump(response)


def from_storage(log: bytes, response: dict[str, Any]) -> list[dict[str, Any]]:
    """What GET ?stream=true sends: the log and the response, as read back from storage (made
    whole, and one event at a time as the route makes them: the same events)."""
    stored = orjson.loads(orjson.dumps(response))
    whole = stored_stream(stored, orjson.loads(log) or None)
    assert list(stored_stream_iter(stored, orjson.loads(log) or None)) == whole
    return whole


def test_the_stored_log_replays_every_delta_as_it_was_sent() -> None:
    text = "".join(f"w{i} " for i in range(2000))
    chunks = [
        *[chunk({"reasoning_content": c}) for c in "think, then answer"],
        *[chunk({"content": text[i : i + 3]}) for i in range(0, len(text), 3)],
        *[chunk({"refusal": c}) for c in "no"],
        chunk({"tool_calls": [call(0, id="call_a", name="weather", args="{")]}),
        *[chunk({"tool_calls": [call(0, args=c)]}) for c in '"city": "Zürich 🌧"}'],
        chunk(finish="tool_calls"),
        usage_chunk(),
    ]
    translator, live = run(chunks)
    log = logged(live, translator.response)
    records = orjson.loads(log)
    assert len(records) < 30 < len(live), "deltas of one text are one record"
    assert text[300:330].encode() not in log, "the log does not repeat the answer"
    replayed = from_storage(log, translator.response)
    assert normalized(replayed) == normalized(live)
    assert through_sdk(replayed).final.output_text == text


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_stored_log_of_every_scenario_replays_the_live_stream(name: str) -> None:
    chunks, fail = SCENARIOS[name]
    translator, live = run(chunks, fail=fail)
    assert normalized(from_storage(logged(live, translator.response), translator.response)) == (
        normalized(live)
    )


def test_a_long_runs_lengths_are_read_back_a_slice_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lengths of 1 to 300 characters (varints of one and two bytes), read back 8 base64
    # characters (6 bytes) at a time: a varint split between slices still reads whole.
    monkeypatch.setattr(event_log, "_LENGTHS_SLICE", 8)
    sizes = [1 + (n * 37) % 300 for n in range(400)]
    text = "".join(chr(0x61 + n % 26) * size for n, size in enumerate(sizes))
    pieces, at = [], 0
    for size in sizes:
        pieces.append(text[at : at + size])
        at += size
    translator, live = run([*[chunk({"content": p}) for p in pieces], chunk(finish="stop")])
    log = logged(live, translator.response)
    assert len(orjson.loads(log)) < 20, "the deltas are one run"
    replayed = from_storage(log, translator.response)
    assert normalized(replayed) == normalized(live)
    assert [e["delta"] for e in replayed if e["type"] == "response.output_text.delta"] == pieces


def test_deltas_with_logprobs_are_stored_whole() -> None:
    top = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    chunks = [
        *[chunk({"content": c}, logprobs={"content": [{**top, "token": c}]}) for c in "abc"],
        chunk(finish="stop"),
    ]
    translator, live = run(chunks, req(include=["message.output_text.logprobs"]))
    assert any(e.get("logprobs") for e in live)
    log = logged(live, translator.response)
    assert normalized(from_storage(log, translator.response)) == normalized(live)


def test_deltas_with_and_without_logprobs_in_one_text_replay_exactly() -> None:
    top = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    chunks = [
        chunk({"content": "ab"}, logprobs={"content": [{**top, "token": "ab"}]}),
        chunk({"content": "cd"}),
        chunk({"content": "ef"}),
        chunk({"content": "gh"}, logprobs={"content": [{**top, "token": "gh"}]}),
        chunk({"content": "ij"}),
        chunk(finish="stop"),
    ]
    translator, live = run(chunks, req(include=["message.output_text.logprobs"]))
    log = logged(live, translator.response)
    assert log
    assert normalized(from_storage(log, translator.response)) == normalized(live)


def test_deltas_that_do_not_add_up_to_the_response_are_not_replayed_from_it() -> None:
    # A Responses hub whose deltas say something else than its final text: the log cannot be
    # rebuilt from the stored response, so none is stored and the replay is the response's own.
    translator, live = run(
        [chunk({"content": "Hello"}), chunk({"content": " you"}), chunk(finish="stop")]
    )
    response = orjson.loads(orjson.dumps(translator.response))
    response["output"][0]["content"][0]["text"] = "Hello YOU"
    assert logged(live, response) == b""
    replayed = stored_stream(response, None)
    assert through_sdk(replayed).final.output_text == "Hello YOU"


def test_a_short_stream_is_stored_as_its_events() -> None:
    translator, live = run([chunk({"content": c}) for c in "abc"] + [chunk(finish="stop")])
    log = logged(live, translator.response, compact=False)
    assert orjson.loads(log) == normalized(live)


def test_a_log_of_whole_events_is_replayed_as_stored() -> None:
    # Logs stored before the compact form, and background responses' logs, hold every event.
    translator, live = run([chunk({"content": c}) for c in "abc"] + [chunk(finish="stop")])
    replayed = stored_stream(translator.response, normalized(live))
    assert normalized(replayed) == normalized(live)


@pytest.mark.parametrize("compact", [True, False])
def test_a_cancelled_responses_stored_log_ends_with_its_cancellation(compact: bool) -> None:
    translator, live = run([chunk({"content": "Hi"}), chunk(finish="stop")])
    live = live[:-1]  # cancelled before its end
    response = {**translator.response, "status": "cancelled"}
    events = from_storage(logged(live, response, compact=compact), response)
    assert types(events)[-1] == "response.cancelled"
    assert events[-1]["sequence_number"] == len(events) - 1
    assert normalized(events[:-1]) == normalized(live)
