"""POST /v1/responses/input_tokens through the openai SDK's ``responses.input_tokens.count``:
the hub's tokenizer counts the request the turn would send (history included), or the gateway
estimates and says so."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from tests.fakehub import FakeHub, Reply, responses_token_count, token_count
from tests.support import Stack

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    }
]


def count(client: openai.OpenAI, **params: Any) -> tuple[int, str]:
    raw = client.responses.input_tokens.with_raw_response.count(**params)
    parsed = raw.parse()
    assert parsed.object == "response.input_tokens"
    return parsed.input_tokens, raw.headers["x-respgw-token-count"]


def estimate_of(body: dict[str, Any]) -> int:
    text = {k: body[k] for k in ("instructions", "messages", "input", "tools") if k in body}
    return math.ceil(len(orjson.dumps(text)) / 4)


def test_the_tokenizer_counts_what_the_turn_sends(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    params: dict[str, Any] = {
        "model": "fake-model",
        "instructions": "Be brief.",
        "input": "What is the weather in Paris today?",
        "tools": TOOLS,
    }
    tokens, method = count(client, **params)
    assert method == "tokenizer"
    assert hub.chat_requests() == []  # the model generated nothing
    asked = hub.tokenize_requests()
    assert len(asked) == 1
    client.responses.create(**params)
    sent = hub.chat_requests()[-1]
    # The tokenizer got the very messages and tools of the turn's hub request.
    assert asked[0]["messages"] == sent["messages"]
    assert asked[0]["tools"] == sent["tools"]
    assert asked[0]["model"] == "fake-model"
    assert asked[0]["add_generation_prompt"] is True
    assert tokens == token_count(sent["messages"], sent["tools"])


def test_history_is_counted(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    first = client.responses.create(model="fake-model", input="Remember the number 42.")
    alone, _ = count(client, model="fake-model", input="Which number?")
    chained, method = count(
        client, model="fake-model", input="Which number?", previous_response_id=first.id
    )
    assert method == "tokenizer"
    assert chained > alone
    second = client.responses.create(
        model="fake-model", input="Which number?", previous_response_id=first.id
    )
    sent = hub.chat_requests()[-1]
    assert hub.tokenize_requests()[-1]["messages"] == sent["messages"]
    assert chained == token_count(sent["messages"])
    # Counting stored nothing: the chain goes on from the second turn, as it would without it.
    third, _ = count(client, model="fake-model", input="And?", previous_response_id=second.id)
    assert third > chained
    items = client.responses.input_items.list(second.id)
    assert len(items.data) == 1


def test_conversation_history_is_counted(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "An earlier question."}]
    )
    tokens, _ = count(client, model="fake-model", input="Now?", conversation=conv.id)
    messages = hub.tokenize_requests()[-1]["messages"]
    assert [m["content"] for m in messages] == ["An earlier question.", "Now?"]
    assert tokens == token_count(messages)
    assert client.conversations.items.list(conv.id).data[0].type == "message"
    assert len(client.conversations.items.list(conv.id).data) == 1  # nothing appended


def test_without_a_tokenizer_the_count_is_estimated_and_it_is_remembered(
    stack: Stack, hub: FakeHub
) -> None:
    hub.tokenizer = False
    client = stack.client()
    tokens, method = count(client, model="fake-model", input="Hello there", tools=TOOLS)
    assert method == "estimated"
    client.responses.create(model="fake-model", input="Hello there", tools=TOOLS)
    assert tokens == estimate_of(hub.chat_requests()[-1])
    again, method = count(client, model="fake-model", input="Hello there, again")
    assert method == "estimated"
    assert again > 0
    assert len(hub.tokenize_requests()) == 1  # asked once, then remembered


def test_tokenizer_off_estimates_without_asking(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"default_model": "fake-model", "tokenizer": "off"}).start()
    try:
        tokens, method = count(stack.client(), input="Hello there")
    finally:
        stack.stop()
    assert method == "estimated"
    assert tokens > 0
    assert hub.tokenize_requests() == []


def test_llamacpp_applies_the_template_then_tokenizes(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"default_model": "fake-model", "tokenizer": "llamacpp"})
    stack.start()
    try:
        tokens, method = count(stack.client(), input="Hello there", instructions="Be brief.")
    finally:
        stack.stop()
    assert method == "tokenizer"
    assert hub.paths == ["/apply-template", "/tokenize"]
    messages = hub.requests[0]["messages"]
    assert hub.requests[1]["parse_special"] is True
    assert tokens == token_count(messages)


def test_a_count_without_a_model_asks_for_the_served_one(hub: FakeHub) -> None:
    stack = Stack(hub.url).start()
    try:
        tokens, method = count(stack.client(), input="Hello there")
    finally:
        stack.stop()
    assert method == "tokenizer"
    assert "model" not in hub.tokenize_requests()[0]
    assert tokens == token_count([{"role": "user", "content": "Hello there"}])


def test_a_responses_hub_counts_with_its_own_endpoint(hub: FakeHub) -> None:
    stack = Stack(hub.url, router={"default_model": "fake-model", "hub_api": "responses"}).start()
    try:
        client = stack.client()
        params: dict[str, Any] = {
            "input": "Hello there",
            "instructions": "Be brief.",
            "tools": TOOLS,
            "personality": "pragmatic",
        }
        tokens, method = count(client, **params)
        asked = hub.requests[-1]
        hub.tokenizer = False
        estimated, estimated_method = count(client, **params)
    finally:
        stack.stop()
    assert method == "tokenizer"
    assert tokens == responses_token_count(asked)
    # Only the fields OpenAI's endpoint takes; the gateway's own (store, prompt_cache_key) not.
    assert set(asked) == {"model", "input", "instructions", "tools", "personality"}
    assert asked["personality"] == "pragmatic"
    assert estimated_method == "estimated"
    assert estimated == estimate_of(asked)
    assert hub.paths == ["/v1/responses/input_tokens"] * 2


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    yield stack.client()


def test_bad_input_is_a_400(client: openai.OpenAI, hub: FakeHub) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.input_tokens.count(model="fake-model", input=[{"role": "wizard"}])  # type: ignore[list-item]
    assert info.value.body["param"] == "input[0].role"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.input_tokens.count(model="fake-model")
    assert info.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.input_tokens.count(model="fake-model", input="x", personality="p" * 65)
    assert info.value.body["code"] == "string_above_max_length"  # type: ignore[index]
    assert hub.requests == []


def test_what_a_chat_hub_cannot_do_is_refused_before_the_history_is_loaded(
    client: openai.OpenAI, hub: FakeHub
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.input_tokens.count(
            model="fake-model",
            input="x",
            previous_response_id="resp_nope",
            tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}],
        )
    error: Any = info.value.body
    assert (error["param"], error["code"]) == ("tools", None), "not previous_response_not_found"
    assert error["message"].startswith(
        "Hosted tool 'file_search' is not supported with fake-model: this server's model server "
        "speaks Chat Completions"
    )
    assert hub.requests == []


def test_an_unknown_previous_response_is_the_turns_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.input_tokens.count(
            model="fake-model", input="x", previous_response_id="resp_nope"
        )
    assert info.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.input_tokens.count(model="fake-model", input="x", conversation="conv_no")


def test_a_tokenizer_answering_garbage_is_a_502(client: openai.OpenAI, hub: FakeHub) -> None:
    hub.enqueue(Reply(raw_body=b'{"count": "many"}'))
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.input_tokens.count(model="fake-model", input="x")
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_malformed_response"  # type: ignore[index]
    hub.enqueue(Reply(raw_body=b"not json"))
    with pytest.raises(openai.InternalServerError):
        client.responses.input_tokens.count(model="fake-model", input="x")
    # A failing tokenizer is a failure, not a missing one: it is asked again next time.
    hub.enqueue(Reply(status=500))
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.input_tokens.count(model="fake-model", input="x")
    assert info.value.body["code"] == "upstream_error"  # type: ignore[index]
    # The server's own 404 about the request (vLLM's unknown model) is not a missing endpoint.
    unknown = {"error": {"message": "The model `m` does not exist.", "type": "NotFoundError"}}
    hub.enqueue(Reply(status=404, error_body=unknown))
    with pytest.raises(openai.InternalServerError) as info:
        client.responses.input_tokens.count(model="m", input="x")
    assert info.value.body["code"] == "upstream_rejected"  # type: ignore[index]
    _, method = count(client, model="fake-model", input="x")
    assert method == "tokenizer"
    assert len(hub.tokenize_requests()) == 5


def test_stateful_tool_items_are_counted_as_the_tool_loop_sends_them(
    client: openai.OpenAI, hub: FakeHub
) -> None:
    """A code_interpreter call in the input goes to a chat hub as the tool loop replays it."""
    items: list[Any] = [
        {"type": "message", "role": "user", "content": "Compute 6*7."},
        {
            "type": "code_interpreter_call",
            "id": "ci_1",
            "code": "print(6*7)",
            "container_id": "cntr_1",
            "status": "completed",
            "outputs": [{"type": "logs", "logs": "42"}],
        },
        {"type": "message", "role": "user", "content": "And?"},
    ]
    tokens, method = count(client, model="fake-model", input=items)
    assert method == "tokenizer"
    client.responses.create(model="fake-model", input=items, store=False)
    sent = hub.chat_requests()[-1]["messages"]
    assert any(m.get("tool_calls") for m in sent)  # the call replayed as a function call
    assert hub.tokenize_requests()[-1]["messages"] == sent
    assert tokens == token_count(sent)
