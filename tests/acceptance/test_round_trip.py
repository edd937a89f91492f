"""Every item type round-trips, through the openai SDK (issue 12, "Round trip everything").

For each of: an assistant message with ``phase``, a (plain) reasoning item, a function call and
its output, a custom tool call and its output, and a call to a ``namespace`` tool's function:

1. turn 1 stores it (as the model's output, or as the client's input);
2. GET /v1/responses/{id} returns the response exactly as created, and input_items lists the
   stored input exactly as sent (with the ids and statuses the gateway gave it);
3. turn 2, chained with previous_response_id, sends the hub exactly the expected chat messages;
4. the same items sent back as explicit input with ``store: false`` (the Codex way) make the hub
   request of turn 2 again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests.fakehub import FakeHub, Reply
from tests.support import Stack

WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}
SQL: dict[str, Any] = {"type": "custom", "name": "run_sql", "description": "Runs one SQL query"}
LOOKUP: dict[str, Any] = {
    "type": "function",
    "name": "lookup",
    "description": "Finds a customer",
    "parameters": {"type": "object", "properties": {"email": {"type": "string"}}},
}
CRM: dict[str, Any] = {
    "type": "namespace",
    "name": "crm",
    "description": "The customer database",
    "tools": [LOOKUP],
}


@dataclass
class Turns:
    """The JSON of both turns as the gateway answered and stored them."""

    first: dict[str, Any]
    first_input: list[dict[str, Any]]
    second: dict[str, Any]
    second_input: list[dict[str, Any]]
    chained_messages: list[dict[str, Any]]


def created(client: openai.OpenAI, **params: Any) -> dict[str, Any]:
    raw = client.responses.with_raw_response.create(**params)
    body: dict[str, Any] = raw.http_response.json()
    return body


def streamed(client: openai.OpenAI, **params: Any) -> dict[str, Any]:
    """The response of a streamed turn, as JSON, from its ``response.completed`` event."""
    raw = client.responses.with_raw_response.create(stream=True, **params)
    completed: dict[str, Any] | None = None
    for line in raw.http_response.iter_lines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if event["type"] == "response.completed":
                completed = event["response"]
    assert completed is not None
    return completed


def stored_input(client: openai.OpenAI, response_id: str) -> list[dict[str, Any]]:
    raw = client.responses.input_items.with_raw_response.list(response_id, order="asc")
    data: list[dict[str, Any]] = raw.http_response.json()["data"]
    return data


def contains(kept: Any, given: Any) -> bool:
    """Whether ``kept`` holds everything of ``given``: the same values, objects with at least
    its fields (the gateway adds ids, statuses and an output_text's empty annotations and
    logprobs, as OpenAI does)."""
    if isinstance(given, dict):
        return isinstance(kept, dict) and all(
            k in kept and contains(kept[k], v) for k, v in given.items()
        )
    if isinstance(given, list):
        return (
            isinstance(kept, list)
            and len(kept) == len(given)
            and all(contains(a, b) for a, b in zip(kept, given, strict=True))
        )
    return bool(kept == given)


def assert_stored_as_sent(sent: list[dict[str, Any]], stored: list[dict[str, Any]]) -> None:
    """Each item is stored with every field as sent (a string content as its one text part),
    plus the id and status the gateway gives an item without them."""
    assert len(stored) == len(sent)
    for given, kept in zip(sent, stored, strict=True):
        assert kept["id"]
        for key, value in given.items():
            if key == "content" and isinstance(value, str):
                assert [p["text"] for p in kept["content"]] == [value]
            else:
                assert contains(kept[key], value), (key, kept[key], value)


def round_trip(
    client: openai.OpenAI,
    hub: FakeHub,
    *,
    first_input: list[dict[str, Any]],
    second_input: list[dict[str, Any]],
    expected: list[dict[str, Any]],
    first_reply: Reply | None = None,
    tools: list[dict[str, Any]] | None = None,
    stream: bool = False,
) -> Turns:
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if first_reply is not None:
        hub.enqueue(first_reply)
    first = (streamed if stream else created)(
        client, model="fake-model", input=first_input, **extra
    )
    raw = client.responses.with_raw_response.retrieve(first["id"])
    assert raw.http_response.json() == first
    stored_first = stored_input(client, first["id"])
    assert_stored_as_sent(first_input, stored_first)

    second = created(
        client, model="fake-model", input=second_input, previous_response_id=first["id"], **extra
    )
    chained = hub.chat_requests()[-1]["messages"]
    assert chained == expected
    assert client.responses.with_raw_response.retrieve(second["id"]).http_response.json() == second
    stored_second = stored_input(client, second["id"])
    assert_stored_as_sent(second_input, stored_second)

    # The Codex way: every item sent again, nothing stored.
    replayed = [*stored_first, *first["output"], *stored_second]
    created(client, model="fake-model", input=replayed, store=False, **extra)
    assert hub.chat_requests()[-1]["messages"] == chained
    # The items as the client gave them (without the ids the gateway added) do the same.
    created(
        client,
        model="fake-model",
        input=[*first_input, *first["output"], *second_input],
        store=False,
        **extra,
    )
    assert hub.chat_requests()[-1]["messages"] == chained
    return Turns(first, stored_first, second, stored_second, chained)


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    yield stack.client()


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def test_assistant_messages_keep_their_phase(client: openai.OpenAI, hub: FakeHub) -> None:
    first_input: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": "Plan the trip."},
        {
            "type": "message",
            "role": "assistant",
            "phase": "commentary",
            "content": [{"type": "output_text", "text": "Looking at trains.", "annotations": []}],
        },
        {
            "type": "message",
            "role": "assistant",
            "phase": "final_answer",
            "content": "Take the 9:10.",
        },
        {"type": "message", "role": "user", "content": "Thanks."},
    ]
    turns = round_trip(
        client,
        hub,
        first_input=first_input,
        second_input=[{"type": "message", "role": "user", "content": "And back?"}],
        expected=[
            {"role": "user", "content": "Plan the trip."},
            {"role": "assistant", "content": "Looking at trains."},
            {"role": "assistant", "content": "Take the 9:10."},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "echo: Thanks."},
            {"role": "user", "content": "And back?"},
        ],
    )
    assert [i.get("phase") for i in turns.first_input] == [None, "commentary", "final_answer", None]
    items = client.responses.input_items.list(turns.first["id"], order="asc").data
    assert [getattr(i, "phase", None) for i in items] == [
        None,
        "commentary",
        "final_answer",
        None,
    ]


def test_phase_reaches_a_responses_hub(hub: FakeHub) -> None:
    """A Responses hub gets the items as stored, phase included, chained or sent back; the phase
    of its own answer is kept."""
    stack = Stack(hub.url, router={"default_model": "fake-model", "hub_api": "responses"}).start()
    try:
        client = stack.client()
        said = {
            "type": "message",
            "role": "assistant",
            "phase": "commentary",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        }
        hub.enqueue(Reply(text="All good.", phase="final_answer"))
        first = created(client, model="fake-model", input=[{"role": "user", "content": "Hi"}, said])
        retrieved = client.responses.with_raw_response.retrieve(first["id"])
        assert retrieved.http_response.json() == first
        assert client.responses.retrieve(first["id"]).output[0].phase == "final_answer"  # type: ignore[union-attr]
        stored = stored_input(client, first["id"])
        created(client, model="fake-model", input="Go on", previous_response_id=first["id"])
        chained = hub.requests[-1]["input"]
        then = {"type": "message", "role": "user", "content": "Go on"}
        created(client, model="fake-model", input=[*stored, *first["output"], then], store=False)
        explicit = hub.requests[-1]["input"]
    finally:
        stack.stop()
    assert chained[:3] == [*stored, *first["output"]]
    assert [i.get("phase") for i in chained] == [None, "commentary", "final_answer", None]
    assert explicit[:3] == chained[:3]
    assert explicit[3]["content"] == chained[3]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_reasoning_is_stored_and_not_replayed_to_a_chat_hub(
    client: openai.OpenAI, hub: FakeHub, stream: bool
) -> None:
    turns = round_trip(
        client,
        hub,
        stream=stream,
        first_reply=Reply(text="It is 4.", reasoning="Two and two make four."),
        first_input=[{"type": "message", "role": "user", "content": "2+2?"}],
        second_input=[{"type": "message", "role": "user", "content": "And 3+3?"}],
        expected=[
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"},
        ],
    )
    reasoning = turns.first["output"][0]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Two and two make four."}]
    # A reasoning item the client sends is stored as sent.
    given = {
        "type": "reasoning",
        "id": "rs_client1",
        "summary": [{"type": "summary_text", "text": "Thought about it."}],
        "content": [{"type": "reasoning_text", "text": "Long thoughts."}],
    }
    response = created(
        client, model="fake-model", input=[{"role": "user", "content": "Hm?"}, given]
    )
    assert stored_input(client, response["id"])[1] == given
    assert hub.chat_requests()[-1]["messages"] == [{"role": "user", "content": "Hm?"}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_function_calls_and_outputs(client: openai.OpenAI, hub: FakeHub, stream: bool) -> None:
    turns = round_trip(
        client,
        hub,
        stream=stream,
        tools=[WEATHER],
        first_reply=Reply(
            text=None,
            tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}],
            finish_reason="tool_calls",
        ),
        first_input=[{"type": "message", "role": "user", "content": "Weather in Paris?"}],
        second_input=[{"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}],
        expected=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_1", "get_weather", '{"city":"Paris"}')],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        ],
    )
    fc = turns.first["output"][0]
    assert (fc["type"], fc["call_id"], fc["name"]) == ("function_call", "call_1", "get_weather")


def test_function_calls_sent_by_the_client(client: openai.OpenAI, hub: FakeHub) -> None:
    """A call and its output given as input (an agent that ran the tool itself)."""
    round_trip(
        client,
        hub,
        tools=[WEATHER],
        first_input=[
            {"type": "message", "role": "user", "content": "Weather in Rome?"},
            {
                "type": "function_call",
                "id": "fc_client1",
                "call_id": "call_r",
                "name": "get_weather",
                "arguments": '{"city": "Rome"}',
                "status": "completed",
                "caller": {"type": "direct"},
                "async": False,
                "created_by": "resp_elsewhere",
            },
            {
                "type": "function_call_output",
                "call_id": "call_r",
                "output": [{"type": "input_text", "text": "Rainy"}],
                "created_by": "resp_elsewhere",
            },
        ],
        second_input=[{"type": "message", "role": "user", "content": "Umbrella?"}],
        expected=[
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_r", "get_weather", '{"city": "Rome"}')],
            },
            {"role": "tool", "tool_call_id": "call_r", "content": "Rainy"},
            {"role": "assistant", "content": "echo: Weather in Rome?"},
            {"role": "user", "content": "Umbrella?"},
        ],
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_custom_tool_calls_and_outputs(client: openai.OpenAI, hub: FakeHub, stream: bool) -> None:
    turns = round_trip(
        client,
        hub,
        stream=stream,
        tools=[SQL],
        first_reply=Reply(
            text=None,
            tool_calls=[{"id": "call_s", "name": "run_sql", "arguments": '{"input": "SELECT 1"}'}],
            finish_reason="tool_calls",
        ),
        first_input=[{"type": "message", "role": "user", "content": "Count the rows."}],
        second_input=[{"type": "custom_tool_call_output", "call_id": "call_s", "output": "1 row"}],
        expected=[
            {"role": "user", "content": "Count the rows."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_s", "run_sql", '{"input":"SELECT 1"}')],
            },
            {"role": "tool", "tool_call_id": "call_s", "content": "1 row"},
        ],
    )
    ctc = turns.first["output"][0]
    assert (ctc["type"], ctc["name"], ctc["input"]) == ("custom_tool_call", "run_sql", "SELECT 1")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_namespace_calls_replay_under_their_offered_name(
    client: openai.OpenAI, hub: FakeHub, stream: bool
) -> None:
    # The namespace's "lookup" is offered as crm__lookup (a top-level function has its name), its
    # custom tool "note" under its own name; the model calls both at once.
    note = {"type": "custom", "name": "note", "description": "Writes a note"}
    tools = [{**CRM, "tools": [LOOKUP, note]}, {**LOOKUP, "description": "Finds a word"}]
    turns = round_trip(
        client,
        hub,
        stream=stream,
        tools=tools,
        first_reply=Reply(
            text="Let me look.",
            tool_calls=[
                {"id": "call_n", "name": "crm__lookup", "arguments": '{"email":"a@b.c"}'},
                {"id": "call_m", "name": "note", "arguments": '{"input":"asked about a@b.c"}'},
            ],
            finish_reason="tool_calls",
        ),
        first_input=[{"type": "message", "role": "user", "content": "Who is a@b.c?"}],
        second_input=[
            {"type": "function_call_output", "call_id": "call_n", "output": '{"name":"Ada"}'},
            {"type": "custom_tool_call_output", "call_id": "call_m", "output": "noted"},
        ],
        expected=[
            {"role": "user", "content": "Who is a@b.c?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    call("call_n", "crm__lookup", '{"email":"a@b.c"}'),
                    call("call_m", "note", '{"input":"asked about a@b.c"}'),
                ],
            },
            {"role": "tool", "tool_call_id": "call_n", "content": '{"name":"Ada"}'},
            {"role": "tool", "tool_call_id": "call_m", "content": "noted"},
        ],
    )
    message, fc, ctc = turns.first["output"]
    assert message["type"] == "message"
    assert (fc["type"], fc["name"], fc["namespace"]) == ("function_call", "lookup", "crm")
    assert (ctc["type"], ctc["name"], ctc["namespace"], ctc["input"]) == (
        "custom_tool_call",
        "note",
        "crm",
        "asked about a@b.c",
    )
    offered = [t["function"]["name"] for t in hub.chat_requests()[-1]["tools"]]
    assert offered == ["crm__lookup", "note", "lookup"]


LOCAL_SHELL: dict[str, Any] = {"type": "shell", "environment": {"type": "local"}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_local_shell_calls_and_outputs(client: openai.OpenAI, hub: FakeHub, stream: bool) -> None:
    """A local shell's call is the client's to run: its shell_call_output comes in turn 2."""
    turns = round_trip(
        client,
        hub,
        stream=stream,
        tools=[LOCAL_SHELL],
        first_reply=Reply(
            text=None,
            tool_calls=[
                {
                    "id": "call_sh",
                    "name": "shell",
                    "arguments": '{"commands": ["ls"], "max_output_length": 2000}',
                }
            ],
            finish_reason="tool_calls",
        ),
        first_input=[{"type": "message", "role": "user", "content": "What is here?"}],
        second_input=[
            {
                "type": "shell_call_output",
                "call_id": "call_sh",
                "max_output_length": 2000,
                "output": [
                    {
                        "stdout": "a.txt\n",
                        "stderr": "",
                        "outcome": {"type": "exit", "exit_code": 0},
                    }
                ],
            }
        ],
        expected=[
            {"role": "user", "content": "What is here?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("call_sh", "shell", '{"commands":["ls"],"max_output_length":2000}')
                ],
            },
            {"role": "tool", "tool_call_id": "call_sh", "content": "a.txt\n[exit code 0]"},
        ],
    )
    sh = turns.first["output"][0]
    assert (sh["type"], sh["call_id"], sh["status"]) == ("shell_call", "call_sh", "completed")
    assert sh["environment"] == {"type": "local"}
    assert sh["action"] == {"commands": ["ls"], "timeout_ms": None, "max_output_length": 2000}


def test_shell_calls_sent_by_the_client(client: openai.OpenAI, hub: FakeHub) -> None:
    """A shell call and its output given as input (an agent that keeps its own history)."""
    round_trip(
        client,
        hub,
        tools=[{"type": "shell"}],
        first_input=[
            {"type": "message", "role": "user", "content": "Disk?"},
            {
                "type": "shell_call",
                "id": "sh_client1",
                "call_id": "call_df",
                "action": {"commands": ["df -h /"], "timeout_ms": 1000},
                "status": "completed",
                "environment": {"type": "local"},
            },
            {
                "type": "shell_call_output",
                "call_id": "call_df",
                "output": [{"stdout": "", "stderr": "slow", "outcome": {"type": "timeout"}}],
            },
        ],
        second_input=[{"type": "message", "role": "user", "content": "Again?"}],
        expected=[
            {"role": "user", "content": "Disk?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("call_df", "shell", '{"commands":["df -h /"],"timeout_ms":1000}')
                ],
            },
            {"role": "tool", "tool_call_id": "call_df", "content": "slow\n[timed out]"},
            {"role": "assistant", "content": "echo: Disk?"},
            {"role": "user", "content": "Again?"},
        ],
    )
