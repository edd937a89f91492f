"""The Vercel AI SDK (``ai`` with ``@ai-sdk/openai``'s Responses model, pinned in tests/clients)
through the real router and state service to the fake hub: multi-turn with
``previousResponseId``, with the whole message history, in a conversation, and with a tool the
SDK runs; each scenario streams at least one turn (``streamText``)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from router_svc import validate
from tests import clients
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack

SCRIPT = clients.CLIENTS / "vercel_ai.mjs"


def scenario(stack: Stack, name: str, **env: str) -> list[dict[str, Any]]:
    """Runs one scenario of vercel_ai.mjs; each turn's result, or its error."""
    clients.installed()
    finished = clients.run(
        [clients.node(), str(SCRIPT), name],
        env={**os.environ, "RESPGW_BASE_URL": stack.url, **env},
        cwd=clients.CLIENTS,
        timeout=60,
    )
    assert finished.returncode == 0 and not finished.timed_out, finished.describe()
    turns: list[dict[str, Any]] = json.loads(finished.stdout)
    return turns


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The bodies of the POST /v1/responses requests the in-process router validated."""
    bodies: list[dict[str, Any]] = []
    parse = validate.parse_turn_request

    def recording(body: Any, **kwargs: Any) -> validate.TurnRequest:
        bodies.append(body)
        return parse(body, **kwargs)

    monkeypatch.setattr(validate, "parse_turn_request", recording)
    return bodies


def succeeded(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    failed = [t["error"] for t in turns if "error" in t]
    assert not failed, failed
    return turns


def conversation(request: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m)) for m in request["messages"]]


def test_turns_chained_by_previous_response_id(stack: Stack, hub: FakeHub) -> None:
    first, second, third = succeeded(scenario(stack, "previous-response-id"))
    assert [t["text"] for t in (first, second, third)] == [
        "echo: My name is Ada.",
        "echo: What is my name?",
        "echo: Spell it.",
    ]
    assert second["deltas"] == 5, "streamed word by word"
    assert len({t["responseId"] for t in (first, second, third)}) == 3
    # The gateway kept the history: the hub sees every earlier turn.
    assert conversation(hub.chat_requests()[2]) == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"),
        ("assistant", "echo: What is my name?"),
        ("user", "Spell it."),
    ]
    stored = stack.client().responses.retrieve(third["responseId"])
    assert stored.previous_response_id == second["responseId"]


def test_turns_passing_the_whole_history_unstored(stack: Stack, hub: FakeHub) -> None:
    first, second = succeeded(scenario(stack, "messages-stateless"))
    assert first["text"] == "echo: My name is Ada."
    assert second["text"] == "echo: What is my name?" and second["deltas"] > 0
    assert conversation(hub.chat_requests()[1]) == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"),
    ]


def test_turns_in_a_conversation(stack: Stack, hub: FakeHub) -> None:
    conv = stack.client().conversations.create()
    first, second = succeeded(scenario(stack, "conversation", RESPGW_CONVERSATION_ID=conv.id))
    assert first["text"] == "echo: My name is Ada."
    assert second["text"] == "echo: What is my name?" and second["deltas"] > 0
    assert conversation(hub.chat_requests()[1]) == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"),
    ]
    items = stack.client().conversations.items.list(conv.id, order="asc")
    assert [getattr(i, "role", None) for i in items] == ["user", "assistant"] * 2


def test_a_tool_the_sdk_runs(stack: Stack, hub: FakeHub) -> None:
    call = {"id": "call_w", "name": "weather", "arguments": '{"city":"Paris"}'}
    hub.enqueue(Reply(tool_calls=[call], finish_reason="tool_calls"), Reply(text="It is sunny."))
    [result] = succeeded(scenario(stack, "tools"))
    assert result["text"] == "It is sunny." and result["steps"] == 2
    assert result["toolResults"] == [{"toolName": "weather", "output": "sunny in Paris"}]
    asked, answered = hub.chat_requests()
    assert [t["function"]["name"] for t in asked["tools"]] == ["weather"]
    assert answered["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_w",
        "content": "sunny in Paris",
    }


def test_turns_passing_the_whole_history_stored(
    stack: Stack, hub: FakeHub, received: list[dict[str, Any]]
) -> None:
    """With store on, the SDK sends the earlier answer as an item_reference: the gateway
    resolves it from the stored turn and the hub sees the message itself."""
    first, second = succeeded(scenario(stack, "messages-stored"))
    assert first["text"] == "echo: My name is Ada."
    assert second["text"] == "echo: What is my name?" and second["deltas"] > 0
    # On the wire the SDK sent the first answer as a reference to it, not the message.
    answer_id = stack.client().responses.retrieve(first["responseId"]).output[0].id
    assert [i.get("type", "message") for i in received[1]["input"]] == [
        "message",
        "item_reference",
        "message",
    ]
    assert received[1]["input"][1]["id"] == answer_id
    assert conversation(hub.chat_requests()[1]) == [
        ("user", "My name is Ada."),
        ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"),
    ]
    # The second turn's stored input holds the resolved item, as the first turn stored it.
    client = stack.client()
    answer = client.responses.retrieve(first["responseId"]).output[0]
    inputs = list(client.responses.input_items.list(second["responseId"], order="asc"))
    assert [i.type for i in inputs] == ["message"] * 3
    assert inputs[1].id == answer.id and inputs[1].model_dump() == answer.model_dump()
