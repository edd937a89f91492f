"""The Responses API through the official openai SDK, against the real router and state service
(in-process, on real sockets) and the fake hub."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack


def client_for(stack: Stack) -> openai.OpenAI:
    return stack.client()


def test_create_retrieve_and_usage(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    resp = client.responses.create(model="fake-model", input="Hello there", metadata={"k": "v"})
    assert resp.id.startswith("resp_")
    assert resp.object == "response"
    assert resp.status == "completed"
    assert resp.output_text == "echo: Hello there"
    assert resp.metadata == {"k": "v"}
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (
        11,
        7,
        18,
    )
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    again = client.responses.retrieve(resp.id)
    assert again.model_dump() == resp.model_dump()


def test_model_falls_back_to_default_and_hub_gets_it(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    client.responses.create(model="other-model", input="x", temperature=0.3, max_output_tokens=64)
    sent = hub.chat_requests()[-1]
    assert sent["model"] == "other-model"
    assert sent["temperature"] == 0.3
    assert sent["max_tokens"] == 64


def test_function_calls_round_trip_as_one_assistant_message(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    hub.enqueue(
        Reply(
            text=None,
            tool_calls=[
                {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"id": "call_b", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            ],
            finish_reason="tool_calls",
        )
    )
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": False,
        }
    ]
    first = client.responses.create(model="fake-model", input="Weather?", tools=tools)  # type: ignore[arg-type]
    calls = [o for o in first.output if o.type == "function_call"]
    assert [(c.call_id, c.name) for c in calls] == [
        ("call_a", "get_weather"),
        ("call_b", "get_weather"),
    ]
    assert all(c.id and c.id.startswith("fc") for c in calls)
    assert hub.chat_requests()[0]["tools"][0]["function"]["name"] == "get_weather"

    second = client.responses.create(
        model="fake-model",
        previous_response_id=first.id,
        tools=tools,  # type: ignore[arg-type]
        input=[
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "call_b",
                "output": [{"type": "input_text", "text": "rainy"}],
            },
        ],
    )
    assert second.status == "completed"
    messages = hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [tc["id"] for tc in messages[1]["tool_calls"]] == ["call_a", "call_b"]
    assert messages[2]["tool_call_id"] == "call_a" and text_of(messages[2]) == "sunny"
    assert messages[3]["tool_call_id"] == "call_b" and "rainy" in text_of(messages[3])


def test_max_output_tokens_makes_an_incomplete_response(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    hub.enqueue(Reply(text="cut off", finish_reason="length"))
    resp = client.responses.create(model="fake-model", input="long", max_output_tokens=16)
    assert resp.status == "incomplete"
    assert (
        resp.incomplete_details is not None
        and resp.incomplete_details.reason == "max_output_tokens"
    )


def test_stream_text_is_accepted_by_the_sdk_and_stored(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    hub.enqueue(Reply(text="one two three"))
    with client.responses.stream(model="fake-model", input="count") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 3
    assert final.output_text == "one two three"
    # Stored before response.completed went out: chaining at once finds it.
    chained = client.responses.create(
        model="fake-model", input="next", previous_response_id=final.id
    )
    assert chained.status == "completed"
    messages = hub.chat_requests()[-1]["messages"]
    assert [text_of(m) for m in messages] == ["count", "one two three", "next"]
    assert client.responses.retrieve(final.id).output_text == "one two three"


def test_stream_function_calls(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    hub.enqueue(
        Reply(
            text="Let me check.",
            tool_calls=[
                {"id": "call_1", "name": "lookup", "arguments": '{"q": "a"}'},
                {"id": "call_2", "name": "lookup", "arguments": '{"q": "b"}'},
            ],
            finish_reason="tool_calls",
        )
    )
    with client.responses.stream(model="fake-model", input="go") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    args_done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [e.arguments for e in args_done] == ['{"q": "a"}', '{"q": "b"}']
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(len(seqs)))
    stored = client.responses.retrieve(final.id)
    assert [o.type for o in stored.output] == ["message", "function_call", "function_call"]


def test_stream_replay_from_storage(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    hub.enqueue(Reply(text="replay me please"))
    with client.responses.stream(model="fake-model", input="r") as stream:
        live = [e.model_dump(warnings=False) for e in stream]
        final = stream.get_final_response()
    replayed = [e.model_dump() for e in client.responses.retrieve(final.id, stream=True)]
    assert [e["type"] for e in replayed] == [e["type"] for e in live]
    assert replayed[-1]["response"]["id"] == final.id
    after = [e for e in client.responses.retrieve(final.id, stream=True, starting_after=3)]
    assert [e.sequence_number for e in after] == list(range(4, len(live)))


def test_hub_failure_mid_stream_fails_the_response_and_stores_it_failed(
    stack: Stack, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text="a b c d e f", break_after_chunks=2))
    with httpx.Client(timeout=10) as http:
        with http.stream(
            "POST", f"{stack.url}/responses", json={"model": "m", "input": "x", "stream": True}
        ) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    types = [e["type"] for e in events]
    assert types[0] == "response.created"
    assert types[-2:] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"]
    client = client_for(stack)
    # It was stored as running beside the stream: its failure replaces that, never left running.
    deadline = time.monotonic() + 10
    while (kept := client.responses.retrieve(failed["id"])).status != "failed":
        assert time.monotonic() < deadline, kept.status
        time.sleep(0.02)
    assert kept.error is not None and kept.error.message == failed["error"]["message"]


def test_client_disconnect_mid_stream_still_stores_the_turn(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="w1 w2 w3 w4 w5 w6", chunk_delay_s=0.1))
    with httpx.Client(timeout=10) as http:
        with http.stream(
            "POST", f"{stack.url}/responses", json={"model": "m", "input": "x", "stream": True}
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    response_id = json.loads(line[6:])["response"]["id"]
                    break
    client = client_for(stack)
    deadline = time.monotonic() + 10
    while True:
        try:
            stored = client.responses.retrieve(response_id)
            if stored.status != "in_progress":  # retrievable as running until it ends
                break
        except openai.NotFoundError:
            pass
        assert time.monotonic() < deadline, "the turn was never stored"
        time.sleep(0.1)
    assert stored.status == "completed"
    assert stored.output_text == "w1 w2 w3 w4 w5 w6"


def test_store_false_is_not_retrievable_nor_chainable(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    resp = client.responses.create(model="m", input="secret", store=False)
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="x", previous_response_id=resp.id)
    assert info.value.code == "previous_response_not_found"


def test_delete_and_input_items(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    resp = client.responses.create(
        model="m",
        input=[{"role": "user", "content": f"part {i}"} for i in range(5)],  # type: ignore[misc]
    )
    page = client.responses.input_items.list(resp.id, limit=2)
    assert [text_of(i.model_dump()) for i in page.data] == ["part 4", "part 3"]
    assert page.has_more is True
    everything = [
        text_of(i.model_dump()) for i in client.responses.input_items.list(resp.id, limit=2)
    ]
    assert everything == ["part 4", "part 3", "part 2", "part 1", "part 0"]
    asc = client.responses.input_items.list(resp.id, order="asc")
    assert [text_of(i.model_dump()) for i in asc.data] == [f"part {i}" for i in range(5)]
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)


def test_conversation_items_come_first_and_the_turn_is_appended(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "I like tea."}],
        metadata={"topic": "drinks"},
    )
    assert conv.metadata == {"topic": "drinks"}
    resp = client.responses.create(model="m", input="What do I like?", conversation=conv.id)
    assert resp.conversation is not None and resp.conversation.id == conv.id
    messages = hub.chat_requests()[-1]["messages"]
    assert [text_of(m) for m in messages] == ["I like tea.", "What do I like?"]
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [text_of(i.model_dump()) for i in items] == [
        "I like tea.",
        "What do I like?",
        "echo: What do I like?",
    ]
    second = client.responses.create(model="m", input="Again?", conversation={"id": conv.id})
    assert second.conversation is not None and second.conversation.id == conv.id
    assert len(hub.chat_requests()[-1]["messages"]) == 4


def test_conversation_and_previous_response_are_mutually_exclusive(
    stack: Stack, hub: FakeHub
) -> None:
    client = client_for(stack)
    conv = client.conversations.create()
    first = client.responses.create(model="m", input="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model="m", input="y", conversation=conv.id, previous_response_id=first.id
        )
    assert info.value.code == "mutually_exclusive_parameters"
    assert len(hub.chat_requests()) == 1


def test_idempotency_key_returns_the_first_result(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    headers = {"Idempotency-Key": "key-123"}
    first = client.responses.create(model="m", input="once", extra_headers=headers)
    again = client.responses.create(model="m", input="once", extra_headers=headers)
    assert again.id == first.id
    assert len(hub.chat_requests()) == 1


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (Reply(status=500), 502, "upstream_error"),
        (Reply(status=400, error_body={"error": {"message": "bad"}}), 502, "upstream_rejected"),
        (Reply(malformed=True), 502, "upstream_malformed_response"),
        (
            Reply(
                status=400,
                error_body={
                    "error": {"message": "This model's maximum context length is 10 tokens"}
                },
            ),
            400,
            "context_length_exceeded",
        ),
    ],
)
def test_hub_failures_are_clear_errors_and_store_nothing(
    stack: Stack, hub: FakeHub, reply: Reply, status: int, code: str
) -> None:
    hub.enqueue(reply)
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


def test_hub_timeout_is_a_504(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"hub_timeout_s": 0.3}).start()
    try:
        hub.enqueue(Reply(text="late", delay_s=2))
        with httpx.Client(timeout=10) as http:
            r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
    finally:
        stack.stop()


def test_unreachable_hub_is_a_502(hub: FakeHub) -> None:
    stack = Stack("http://127.0.0.1:9/v1").start()
    try:
        with httpx.Client(timeout=10) as http:
            r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unreachable"
    finally:
        stack.stop()


def test_state_outage_is_a_503_and_the_hub_is_not_called(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    first = client.responses.create(model="m", input="x")
    stack.stop_state()
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.create(model="m", input="y", previous_response_id=first.id)
    assert info.value.status_code == 503
    assert info.value.code == "state_unavailable"
    assert len(hub.chat_requests()) == 1


def test_a_turn_that_cannot_be_stored_is_not_a_200(stack: Stack, hub: FakeHub) -> None:
    stack.stop_state()
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
    assert r.status_code == 503
    # The state service was down before the turn: the hub is not called and nothing is written,
    # so a retry is safe (issue 13). A turn that may be stored says false: test_retries.py.
    assert r.headers["x-should-retry"] == "true"
    assert hub.chat_requests() == []


def test_invalid_requests_never_reach_the_hub(stack: Stack, hub: FakeHub) -> None:
    cases = [
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature", "invalid_type"),
        ({"model": "m", "input": "x", "max_output_tokens": 5}, "max_output_tokens", None),
        # An unknown top-level field is ignored unless --strict-params (test_request_params.py);
        # inside an object it is refused.
        ({"model": "m", "input": "x", "text": {"bogus": 1}}, "text.bogus", "unknown_parameter"),
        ({"model": "m", "input": "x", "metadata": {"k" * 65: "v"}}, "metadata", None),
    ]
    with httpx.Client(timeout=10) as http:
        for body, param, code in cases:
            r = http.post(f"{stack.url}/responses", json=body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param, error
            if code:
                assert error["code"] == code
        r = http.post(
            f"{stack.url}/responses",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = http.get(f"{stack.url}/nothing-here")
        assert r.status_code == 404 and set(r.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
    assert hub.chat_requests() == []


def test_api_keys_scope_tenants(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"api_keys": "key-a=tenant-a,key-b=tenant-b"}).start()
    try:
        a = stack.client("key-a")
        b = stack.client("key-b")
        wrong = stack.client("nope")
        resp = a.responses.create(model="m", input="mine")
        assert a.responses.retrieve(resp.id).id == resp.id
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(resp.id)
        with pytest.raises(openai.BadRequestError) as info:
            b.responses.create(model="m", input="x", previous_response_id=resp.id)
        assert info.value.code == "previous_response_not_found"
        with pytest.raises(openai.AuthenticationError) as auth:
            wrong.responses.create(model="m", input="x")
        assert auth.value.code == "invalid_api_key"
        conv = a.conversations.create()
        with pytest.raises(openai.NotFoundError):
            b.conversations.retrieve(conv.id)
    finally:
        stack.stop()


async def test_async_sdk_streams_and_chains(stack: Stack, hub: FakeHub) -> None:
    client = openai.AsyncOpenAI(base_url=stack.url, api_key="unused", max_retries=0)
    first = await client.responses.create(model="m", input="async one")
    async with client.responses.stream(
        model="m", input="async two", previous_response_id=first.id
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.previous_response_id == first.id
    got = await client.responses.retrieve(final.id)
    assert got.output_text == final.output_text
    await client.close()


def test_stream_max_tokens_ends_incomplete_and_is_stored(stack: Stack, hub: FakeHub) -> None:
    client = client_for(stack)
    hub.enqueue(Reply(text="cut short here", finish_reason="length"))
    with client.responses.stream(model="m", input="long", max_output_tokens=16) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "response.incomplete"
    assert "response.completed" not in types
    last = events[-1]
    assert last.type == "response.incomplete"
    stored = client.responses.retrieve(last.response.id)
    assert stored.status == "incomplete"
    assert stored.incomplete_details is not None
    assert stored.incomplete_details.reason == "max_output_tokens"
    assert stored.output_text == "cut short here"
    sent = hub.chat_requests()[-1]
    assert sent["max_tokens"] == 16 and sent["stream_options"] == {"include_usage": True}


def test_bad_query_parameters_are_400s_naming_them(stack: Stack, hub: FakeHub) -> None:
    resp = client_for(stack).responses.create(model="m", input="x")
    with httpx.Client(timeout=10) as http:
        for query, param in [
            ("input_items?limit=abc", "limit"),
            ("input_items?limit=0", "limit"),
            ("input_items?order=sideways", "order"),
            ("?stream=true&starting_after=x", "starting_after"),
        ]:
            r = http.get(f"{stack.url}/responses/{resp.id}/{query}".replace("/?", "?"))
            assert r.status_code == 400, (query, r.text)
            assert r.json()["error"]["param"] == param
