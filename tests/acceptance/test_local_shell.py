"""The shell tool's local mode through the openai SDK and openai-agents: a ``shell`` tool whose
``environment`` is ``{"type": "local"}`` (or absent, OpenAI's default) has its calls returned to
the client, which runs them and sends ``shell_call_output`` items in its next request. The real
router, state service and reference bootstrap/execution service, the fake hub scripted to call
the tool."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import (
    Agent,
    OpenAIResponsesModel,
    Runner,
    ShellCallOutcome,
    ShellCommandOutput,
    ShellCommandRequest,
    ShellResult,
    ShellTool,
    set_tracing_disabled,
)
from openai.types.responses import ResponseFunctionShellToolCall
from prometheus_client import REGISTRY

from tests.acceptance.test_background import wait_for
from tests.acceptance.test_stateful_tools import Bootstrap
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack

LOCAL: Any = {"type": "shell", "environment": {"type": "local"}}
DEFAULT: Any = {"type": "shell"}  # no environment: local, as in OpenAI's API


def shell(commands: list[str], call_id: str = "call_sh") -> Reply:
    arguments = json.dumps({"commands": commands})
    return Reply(
        tool_calls=[{"id": call_id, "name": "shell", "arguments": arguments}],
        finish_reason="tool_calls",
    )


def tool_service_calls() -> float:
    """Every call the router made to a bootstrap or execution service so far (the router runs
    in this process)."""
    names = (
        "respgw_router_bootstrap_call_latency_seconds",
        "respgw_router_execution_call_latency_seconds",
    )
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name in names
        for sample in metric.samples
        if sample.name.endswith("_count")
    )


def exited(stdout: str, code: int = 0) -> dict[str, Any]:
    return {"stdout": stdout, "stderr": "", "outcome": {"type": "exit", "exit_code": code}}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Bootstrap]:
    b = Bootstrap(tmp_path / "sessions")
    yield b
    b.stop()


@pytest.fixture
def gateway(hub: FakeHub, sandbox: Bootstrap) -> Iterator[Stack]:
    """A gateway with a bootstrap and execution service: a local shell must not use it."""
    s = Stack(hub.url, router={"bootstrap_address": f"127.0.0.1:{sandbox.running.port}"}).start()
    yield s
    s.stop()


@pytest.mark.parametrize("tool", [LOCAL, DEFAULT], ids=["local", "absent"])
def test_the_client_runs_the_call_and_the_answer_uses_its_output(
    gateway: Stack, hub: FakeHub, sandbox: Bootstrap, tool: Any
) -> None:
    client = gateway.client()
    before = tool_service_calls()
    hub.enqueue(shell(["ls ~/notes", "cat ~/notes/today.txt"]))
    response = client.responses.create(model="m", input="What is on my list?", tools=[tool])
    [call] = response.output
    assert isinstance(call, ResponseFunctionShellToolCall)
    assert call.status == "completed" and call.call_id == "call_sh"
    assert call.action.commands == ["ls ~/notes", "cat ~/notes/today.txt"]
    assert call.environment is not None and call.environment.type == "local"
    assert response.status == "completed" and response.output_text == ""
    # The tool is echoed as declared: no container was made for it.
    assert [t.model_dump(exclude_none=True) for t in response.tools] == [tool]
    assert tool_service_calls() == before and sandbox.live_sessions() == []
    # The model was offered a command tool.
    [offered] = hub.chat_requests()[0]["tools"]
    assert offered["function"]["name"] == "shell"

    # The client ran the commands; it sends their output.
    output = {
        "type": "shell_call_output",
        "call_id": call.call_id,
        "output": [exited("today.txt\n"), exited("milk\neggs\n")],
    }
    hub.enqueue(Reply(text_from_tool="You need: {tool}"))
    answer = client.responses.create(
        model="m", input=[output], tools=[tool], previous_response_id=response.id
    )
    messages = hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == "call_sh"
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {
        "commands": ["ls ~/notes", "cat ~/notes/today.txt"]
    }
    assert messages[2]["tool_call_id"] == "call_sh"
    said = "today.txt\n[exit code 0]\nmilk\neggs\n[exit code 0]"
    assert text_of(messages[2]) == said
    assert answer.output_text == f"You need: {said}"
    assert tool_service_calls() == before and sandbox.live_sessions() == []

    # Both turns are stored as answered; the client's output item verbatim (with its id).
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    [stored] = client.responses.input_items.list(answer.id).data
    assert stored.type == "shell_call_output"
    assert stored.model_dump(exclude={"id"}, exclude_none=True) == output
    assert stored.id.startswith("sho_")


def test_a_streamed_call_passes_the_sdks_stream_helper(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    conversation = client.conversations.create()
    hub.enqueue(shell(["git status"]))
    with client.responses.stream(
        model="m", input="Is my tree clean?", tools=[LOCAL], conversation=conversation.id
    ) as events:
        kinds = [e.type for e in events]
        final = events.get_final_response()
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.shell_call_command.added",
        "response.shell_call_command.delta",
        "response.shell_call_command.done",
        "response.output_item.done",
        "response.completed",
    ]
    [call] = final.output
    assert call.type == "shell_call" and call.status == "completed"
    assert call.environment is not None and call.environment.type == "local"
    # The stored turn replays with the live stream's events.
    with client.responses.stream(response_id=final.id) as replayed:
        assert [e.type for e in replayed] == kinds

    # The next turn of the conversation answers the call, streamed too.
    hub.enqueue(Reply(text_from_tool="git says: {tool}"))
    output = {
        "type": "shell_call_output",
        "call_id": call.call_id,
        "output": [exited("nothing to commit, working tree clean\n")],
        "max_output_length": 4096,
    }
    with client.responses.stream(
        model="m", input=[output], tools=[LOCAL], conversation=conversation.id
    ) as events:
        answer = events.get_final_response()
    assert answer.output_text == ("git says: nothing to commit, working tree clean\n[exit code 0]")
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [i.type for i in items] == ["message", "shell_call", "shell_call_output", "message"]
    assert items[1].model_dump() == call.model_dump()
    assert items[2].model_dump(exclude={"id"}, exclude_none=True) == output


def test_the_whole_input_without_stored_state(gateway: Stack, hub: FakeHub) -> None:
    """A client that keeps the history itself (store: false) sends the call back with its
    output; a timed-out command reaches the model as such."""
    client = gateway.client()
    hub.enqueue(shell(["sleep 100"]))
    first = client.responses.create(model="m", input="wait", tools=[DEFAULT], store=False)
    [call] = first.output
    hub.enqueue(Reply(text_from_tool="{tool}"))
    timed_out = {"stdout": "", "stderr": "", "outcome": {"type": "timeout"}}
    answer = client.responses.create(
        model="m",
        tools=[DEFAULT],
        store=False,
        input=[
            {"role": "user", "content": "wait"},
            call.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"type": "shell_call_output", "call_id": call.call_id, "output": [timed_out]},
        ],
    )
    assert answer.output_text == "[timed out]"
    messages = hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]


def test_a_background_turn_returns_the_call_too(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    before = tool_service_calls()
    hub.enqueue(shell(["make test"]))
    started = client.responses.create(model="m", input="test it", tools=[LOCAL], background=True)
    finished = wait_for(client, started.id, until={"completed", "failed"})
    [call] = finished.output
    assert finished.status == "completed" and call.type == "shell_call"
    assert call.environment is not None and call.environment.type == "local"
    assert tool_service_calls() == before
    hub.enqueue(Reply(text_from_tool="{tool}"))
    output = {"type": "shell_call_output", "call_id": call.call_id, "output": [exited("ok\n")]}
    answer = client.responses.create(
        model="m", input=[output], tools=[LOCAL], previous_response_id=finished.id
    )
    assert answer.output_text == "ok\n[exit code 0]"


def test_a_call_never_answered_gets_a_placeholder(gateway: Stack, hub: FakeHub) -> None:
    """A client that asks something else instead of answering the call: the chat model still
    gets an answer to every call it made, as chat hubs want."""
    client = gateway.client()
    hub.enqueue(shell(["rm -rf build"]))
    first = client.responses.create(model="m", input="clean up", tools=[LOCAL])
    hub.enqueue(Reply(text="ok, I will not."))
    client.responses.create(
        model="m", input="No, don't.", tools=[LOCAL], previous_response_id=first.id
    )
    messages = hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]
    assert text_of(messages[2]) == "(This call was not run.)"


def test_a_callers_function_and_a_local_shell_call_in_one_answer(
    gateway: Stack, hub: FakeHub
) -> None:
    client = gateway.client()
    lookup: Any = {"type": "function", "name": "lookup", "parameters": {}, "strict": False}
    hub.enqueue(
        Reply(
            tool_calls=[
                {"id": "call_fn", "name": "lookup", "arguments": "{}"},
                {"id": "call_sh", "name": "shell", "arguments": '{"commands": ["whoami"]}'},
            ],
            finish_reason="tool_calls",
        ),
        Reply(text="done"),
    )
    response = client.responses.create(
        model="m", input="x", tools=[lookup, LOCAL], parallel_tool_calls=True
    )
    assert [i.type for i in response.output] == ["function_call", "shell_call"]
    assert hub.chat_requests()[0]["parallel_tool_calls"] is True
    answer = client.responses.create(
        model="m",
        tools=[lookup, LOCAL],
        previous_response_id=response.id,
        input=[
            {"type": "function_call_output", "call_id": "call_fn", "output": "found"},
            {"type": "shell_call_output", "call_id": "call_sh", "output": [exited("me\n")]},
        ],
    )
    assert answer.output_text == "done"
    messages = hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert len(messages[1]["tool_calls"]) == 2


def test_a_responses_hub_gets_the_local_shell_as_declared(hub: FakeHub, sandbox: Bootstrap) -> None:
    stack = Stack(
        hub.url,
        router={"bootstrap_address": f"127.0.0.1:{sandbox.running.port}", "hub_api": "responses"},
    ).start()
    before = tool_service_calls()
    try:
        with httpx.Client(timeout=20) as http:
            r = http.post(
                f"{stack.url}/responses", json={"model": "m", "input": "x", "tools": [LOCAL]}
            )
        assert r.status_code == 200
        assert hub.requests[-1]["tools"] == [LOCAL]
        assert r.json()["tools"] == [LOCAL]
        assert tool_service_calls() == before
    finally:
        stack.stop()


@pytest.fixture
async def agent_client(gateway: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=gateway.url, api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_openai_agents_shell_tool_with_a_local_executor(
    agent_client: openai.AsyncOpenAI, hub: FakeHub
) -> None:
    """openai-agents' ShellTool (local: its own executor runs the commands) end to end: the
    agent runs the gateway's shell_call, sends the shell_call_output, and the model's answer
    uses it."""
    ran: list[list[str]] = []

    def executor(request: ShellCommandRequest) -> ShellResult:
        ran.append(list(request.data.action.commands))
        return ShellResult(
            output=[
                ShellCommandOutput(
                    stdout="3 files\n",
                    outcome=ShellCallOutcome(type="exit", exit_code=0),
                    command=request.data.action.commands[0],
                )
            ]
        )

    agent = Agent(
        name="operator",
        instructions="Use the shell.",
        tools=[ShellTool(executor=executor)],
        model=OpenAIResponsesModel(model="m", openai_client=agent_client),
    )
    hub.enqueue(shell(["ls | wc -l"]), Reply(text_from_tool="The shell said: {tool}"))
    result = await Runner.run(agent, "How many files?")
    assert ran == [["ls | wc -l"]]
    assert result.final_output == "The shell said: 3 files\n[exit code 0]"
    sent = hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in sent[-2:]] == ["assistant", "tool"]
