"""``item_reference`` inputs through the router, the real state service and the fake hub, with the
official SDK: each reference is replaced in place by the item the tenant stored (a stored
response's input or output, a conversation's item), for a Chat Completions hub and a Responses-API
hub alike; an id the tenant has no item for is OpenAI's 400 naming the reference."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client import REGISTRY

from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack


def state_calls() -> dict[str, float]:
    """How many state calls the router made so far, by method (the in-process registry)."""
    calls: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name != "respgw_router_state_call_latency_seconds":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                calls[sample.labels["method"]] = sample.value
    return calls


def made_since(before: dict[str, float]) -> dict[str, float]:
    after = state_calls()
    return {m: n - before.get(m, 0) for m, n in after.items() if n != before.get(m, 0)}


def chat_messages(request: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m)) for m in request["messages"]]


def ref(item_id: str | None) -> Any:
    return {"type": "item_reference", "id": item_id}


@pytest.fixture
def responses_stack(hub: FakeHub) -> Iterator[Stack]:
    s = Stack(hub.url, router={"hub_api": "responses"}).start()
    yield s
    s.stop()


def test_references_resolve_in_place_from_stored_responses(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="Hello Ada."), Reply(text="You are Ada."))
    first = client.responses.create(model="m", input="My name is Ada.")
    question = client.responses.input_items.list(first.id).data[0]
    answer = first.output[0]
    before = state_calls()
    second = client.responses.create(
        model="m",
        input=[
            ref(question.id),
            {"id": str(answer.id)},  # the bare form OpenAI accepts
            {"role": "user", "content": "Who am I?"},
        ],
    )
    assert second.output_text == "You are Ada."
    assert made_since(before) == {"GetItems": 1, "PutTurn": 1}, "one lookup for both"
    assert chat_messages(hub.chat_requests()[-1]) == [
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada."),
        ("user", "Who am I?"),
    ]
    # Stored as resolved: the items themselves, with their ids and content as first stored.
    stored = list(client.responses.input_items.list(second.id, order="asc"))
    assert [i.id for i in stored[:2]] == [question.id, answer.id]
    assert stored[0].model_dump() == question.model_dump()
    assert stored[1].model_dump() == answer.model_dump()
    # A later turn chained on it replays the resolved items.
    hub.enqueue(Reply(text="Still Ada."))
    client.responses.create(model="m", input="And now?", previous_response_id=second.id)
    assert [r for r, _ in chat_messages(hub.chat_requests()[-1])] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]


def test_references_in_the_history_need_no_lookup(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="Hello Ada."), Reply(text="again"))
    first = client.responses.create(model="m", input="My name is Ada.")
    before = state_calls()
    client.responses.create(
        model="m", input=[ref(first.output[0].id)], previous_response_id=first.id
    )
    assert "GetItems" not in made_since(before)
    assert chat_messages(hub.chat_requests()[-1]) == [
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada."),
        ("assistant", "Hello Ada."),
    ]


def test_a_plain_turn_makes_no_extra_state_call(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="one"), Reply(text="two"), Reply(text="three"))
    before = state_calls()
    first = client.responses.create(model="m", input="hi")
    assert made_since(before) == {"PutTurn": 1}
    before = state_calls()
    client.responses.create(model="m", input="again", previous_response_id=first.id)
    assert set(made_since(before)) <= {"GetHistory", "PutTurn"}
    assert made_since(before)["PutTurn"] == 1


def test_references_to_conversation_items(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "The code is 42."}]
    )
    [kept] = client.conversations.items.list(conv.id).data
    other = client.conversations.create()
    hub.enqueue(Reply(text="42"))
    answer = client.responses.create(
        model="m",
        conversation=other.id,
        input=[ref(kept.id), {"role": "user", "content": "What is the code?"}],
    )
    assert answer.output_text == "42"
    assert chat_messages(hub.chat_requests()[-1]) == [
        ("user", "The code is 42."),
        ("user", "What is the code?"),
    ]
    # The other conversation now holds the resolved item too.
    items = list(client.conversations.items.list(other.id, order="asc"))
    assert [i.id for i in items][:1] == [kept.id]
    assert items[0].model_dump() == kept.model_dump()


def test_a_reference_to_an_item_already_in_the_conversation_is_not_stored_twice(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "The code is 42."}]
    )
    [kept] = client.conversations.items.list(conv.id).data
    hub.enqueue(Reply(text="42"))
    turn = client.responses.create(
        model="m", conversation=conv.id, input=[ref(kept.id), {"role": "user", "content": "?"}]
    )
    assert chat_messages(hub.chat_requests()[-1]) == [
        ("user", "The code is 42."),
        ("user", "The code is 42."),
        ("user", "?"),
    ]
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert items[0].id == kept.id
    assert [i.id for i in items].count(kept.id) == 1
    assert len(items) == 3  # the item, the new question, the answer
    assert [i.id for i in client.responses.input_items.list(turn.id)] == [items[1].id]


def test_an_unknown_reference_is_a_400_naming_it(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"api_keys": "key-a=tenant-a,key-b=tenant-b"}).start()
    try:
        a, b = stack.client("key-a"), stack.client("key-b")
        hub.enqueue(Reply(text="secret answer"), Reply(text="gone"))
        mine = a.responses.create(model="m", input="secret")
        gone = a.responses.create(model="m", input="soon deleted")
        a.responses.delete(gone.id)
        conv = a.conversations.create(
            items=[
                {"type": "message", "role": "user", "content": "a's secret"},
                {"type": "message", "role": "user", "content": "soon removed"},
            ]
        )
        kept, removed = a.conversations.items.list(conv.id, order="asc").data
        a.conversations.items.delete(removed.id, conversation_id=conv.id)
        for client, missing in [
            (a, "msg_nope"),  # never stored
            (b, mine.output[0].id),  # another tenant's response item
            (b, kept.id),  # another tenant's conversation item
            (a, gone.output[0].id),  # its response was deleted
            (a, removed.id),  # deleted from its conversation
        ]:
            calls = len(hub.requests)
            with pytest.raises(openai.BadRequestError) as info:
                client.responses.create(
                    model="m",
                    input=[
                        {"role": "user", "content": "x"},
                        {"type": "message", "role": "user", "content": "y"},
                        ref(missing),
                    ],
                )
            error = info.value.body
            assert isinstance(error, dict)
            assert error["type"] == "invalid_request_error"
            assert error["param"] == "input[2]"
            assert missing in error["message"]
            assert len(hub.requests) == calls, "the hub is not called"
    finally:
        stack.stop()


@pytest.mark.parametrize("streaming", [False, True])
def test_responses_hub_gets_the_resolved_items(
    responses_stack: Stack, hub: FakeHub, streaming: bool
) -> None:
    client = responses_stack.client()
    hub.enqueue(Reply(text="first answer"), Reply(text="second answer"))
    first = client.responses.create(model="m", input="first question")
    answer = first.output[0]
    body: dict[str, Any] = {
        "model": "m",
        "input": [{"role": "user", "content": "first question"}, {"id": answer.id}],
    }
    if streaming:
        with client.responses.stream(**body) as s:
            for _ in s:
                pass
            second = s.get_final_response()
    else:
        second = client.responses.create(**body)
    assert second.output_text == "second answer"
    sent = hub.requests[-1]["input"]
    assert all(item.get("type") != "item_reference" for item in sent)
    assert sent[-1]["id"] == answer.id and sent[-1]["role"] == "assistant"
    assert sent[-1]["content"][0]["text"] == "first answer"


def test_a_referenced_function_call_answers_its_output(stack: Stack, hub: FakeHub) -> None:
    """A tool loop that sends the model's call back as a reference: the call's output is
    checked against the resolved call, as if the call itself had been sent."""
    client = stack.client()
    call = {"id": "call_w", "name": "weather", "arguments": '{"city":"Paris"}'}
    hub.enqueue(Reply(tool_calls=[call], finish_reason="tool_calls"), Reply(text="Sunny."))
    tools: Any = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
    first = client.responses.create(model="m", input="Weather in Paris?", tools=tools)
    [fc] = first.output
    assert fc.type == "function_call"
    output: Any = {"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}
    second = client.responses.create(
        model="m", tools=tools, input=[{"role": "user", "content": "Weather?"}, ref(fc.id), output]
    )
    assert second.output_text == "Sunny."
    messages = hub.chat_requests()[-1]["messages"]
    assert messages[1]["tool_calls"][0]["id"] == fc.call_id
    assert messages[2] == {"role": "tool", "tool_call_id": fc.call_id, "content": "sunny"}
    # An output whose call is referenced by an unknown id: the reference is what is wrong.
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", tools=tools, input=[ref("fc_nope"), output])
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "input[0]"


def test_a_background_turn_runs_on_the_resolved_items(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="Hello Ada."), Reply(text="You are Ada."))
    first = client.responses.create(model="m", input="My name is Ada.")
    started = client.responses.create(
        model="m",
        background=True,
        input=[ref(first.output[0].id), {"role": "user", "content": "Who am I?"}],
    )
    deadline = time.monotonic() + 10
    while client.responses.retrieve(started.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert chat_messages(hub.chat_requests()[-1]) == [
        ("assistant", "Hello Ada."),
        ("user", "Who am I?"),
    ]
    stored = list(client.responses.input_items.list(started.id, order="asc"))
    assert stored[0].model_dump() == first.output[0].model_dump()
