"""code_interpreter and shell that run: the openai SDK and openai-agents against the real router,
state service and reference bootstrap/execution service (bubblewrap sandboxes), with the fake hub
scripted to call the tools."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, CodeInterpreterTool, OpenAIResponsesModel, Runner, set_tracing_disabled

from bootstrap_svc import server as bootstrap_server
from bootstrap_svc.config import BootstrapSettings
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import ROUTER_READY, Process, Stack, ThreadLoop

CODE_INTERPRETER: Any = {"type": "code_interpreter", "container": {"type": "auto"}}
SHELL: Any = {"type": "shell", "environment": {"type": "container_auto"}}
OUTPUTS: Any = "code_interpreter_call.outputs"


def python(code: str, call_id: str = "call_py") -> Reply:
    arguments = json.dumps({"code": code})
    return Reply(
        tool_calls=[{"id": call_id, "name": "python", "arguments": arguments}],
        finish_reason="tool_calls",
    )


class Bootstrap:
    """The reference bootstrap and execution service, on a loop of its own."""

    def __init__(self, workdir: Path, **overrides: Any) -> None:
        self.tl = ThreadLoop()
        settings = replace(
            BootstrapSettings(),
            listen="127.0.0.1:0",
            workdir=str(workdir),
            metrics_port=0,
            **overrides,
        )
        self.running = self.tl.run(bootstrap_server.start(settings))
        self.address = f"127.0.0.1:{self.running.port}"
        self.workdir = str(workdir)

    def stop(self) -> None:
        self.tl.run(self.running.stop(0.5))
        self.tl.close()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Bootstrap]:
    b = Bootstrap(tmp_path / "sessions", call_timeout_s=2.0, call_cpu_s=2)
    yield b
    b.stop()


@pytest.fixture
def gateway(hub: FakeHub, sandbox: Bootstrap) -> Iterator[Stack]:
    s = Stack(hub.url, router={"bootstrap_address": sandbox.address}).start()
    yield s
    s.stop()


def test_the_answer_uses_the_tools_output(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    hub.enqueue(python("x = 6 * 7\nprint(f'x is {x}')"), Reply(text_from_tool="I ran it: {tool}."))
    response = client.responses.create(
        model="m",
        input="What is 6 times 7? Use Python.",
        tools=[CODE_INTERPRETER],
        include=["code_interpreter_call.outputs"],
    )
    assert response.output_text == "I ran it: x is 42."
    call = response.output[0]
    assert call.type == "code_interpreter_call" and call.status == "completed"
    assert call.code == "x = 6 * 7\nprint(f'x is {x}')"
    assert call.container_id == response.tools[0].container  # type: ignore[union-attr]
    assert call.outputs is not None and call.outputs[0].type == "logs"
    assert call.outputs[0].logs == "x is 42"
    # Stored as it was answered.
    again = client.responses.retrieve(response.id, include=[OUTPUTS])
    assert again.model_dump() == response.model_dump()
    tool_message = hub.chat_requests()[1]["messages"][-1]
    assert tool_message["role"] == "tool" and text_of(tool_message) == "x is 42"


def test_turn_two_of_a_chain_uses_a_variable_of_turn_one(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    hub.enqueue(python("secret = 1234"), Reply(text="Stored it."))
    first = client.responses.create(model="m", input="Remember 1234.", tools=[CODE_INTERPRETER])
    hub.enqueue(python("print(secret + 1)", "call_two"), Reply(text_from_tool="It was {tool}."))
    second = client.responses.create(
        model="m",
        input="Add one to it.",
        tools=[CODE_INTERPRETER],
        previous_response_id=first.id,
    )
    assert second.output_text == "It was 1235."
    assert second.output[0].container_id == first.output[0].container_id  # type: ignore[union-attr]
    # Turn two's model saw turn one's call and its output, as the call and output they were.
    messages = hub.chat_requests()[2]["messages"]
    assert [m["role"] for m in messages[:4]] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "python"
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {
        "code": "secret = 1234"
    }


def test_a_conversation_keeps_its_interpreter(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    conv = client.conversations.create()
    hub.enqueue(python("import math\nr = math.sqrt(81)"), Reply(text="ok"))
    client.responses.create(model="m", input="a", tools=[CODE_INTERPRETER], conversation=conv.id)
    hub.enqueue(python("r"), Reply(text_from_tool="{tool}"))
    answer = client.responses.create(
        model="m", input="b", tools=[CODE_INTERPRETER], conversation=conv.id
    )
    assert answer.output_text == "9.0"
    kinds = [i.type for i in client.conversations.items.list(conv.id, order="asc")]
    assert kinds == [
        "message",
        "code_interpreter_call",
        "message",
        "message",
        "code_interpreter_call",
        "message",
    ]


def test_the_streamed_turn_passes_the_sdks_stream_helper(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    hub.enqueue(
        python("total = sum(range(10))\ntotal"), Reply(text_from_tool="The total is {tool}.")
    )
    kinds: list[str] = []
    with client.responses.stream(
        model="m",
        input="Sum 0..9",
        tools=[CODE_INTERPRETER],
        include=["code_interpreter_call.outputs"],
    ) as events:
        code = ""
        for event in events:
            kinds.append(event.type)
            if event.type == "response.code_interpreter_call_code.delta":
                code += event.delta
        final = events.get_final_response()
    assert code == "total = sum(range(10))\ntotal"
    assert kinds[:2] == ["response.created", "response.in_progress"]
    expected = [
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]
    deduped = [k for n, k in enumerate(kinds[2:]) if n == 0 or k != kinds[2:][n - 1]]
    assert deduped[: len(expected)] == expected
    assert kinds[-1] == "response.completed"
    assert final.output_text == "The total is 45."
    call = final.output[0]
    assert call.type == "code_interpreter_call" and call.outputs is not None
    assert call.outputs[0].logs == "45"  # type: ignore[union-attr]
    stored = client.responses.retrieve(final.id, include=[OUTPUTS])
    # (The stream helper adds "parsed" to text parts; the items are otherwise the same.)
    assert stored.output[0].model_dump() == call.model_dump()
    assert stored.output_text == final.output_text and stored.usage == final.usage
    # A stored streamed turn replays through the same helper.
    with client.responses.stream(response_id=final.id) as replay:
        assert replay.get_final_response().output_text == "The total is 45."


def _outputs_of(item: Any) -> Any:
    assert item.type == "code_interpreter_call"
    return None if item.outputs is None else [o.model_dump() for o in item.outputs]


LOGS = [{"type": "logs", "logs": "turn one says hi"}]


def test_outputs_are_kept_for_later_turns_and_shown_only_when_asked(
    gateway: Stack, hub: FakeHub
) -> None:
    """As at OpenAI: a call's outputs are stored whatever include says (a chained turn replays
    the call with them), and every read shows them only when its include asks."""
    client = gateway.client()
    hub.enqueue(python("print('turn one says hi')"), Reply(text="Said it."))
    first = client.responses.create(model="m", input="Say hi.", tools=[CODE_INTERPRETER])
    assert _outputs_of(first.output[0]) is None
    hub.enqueue(Reply(text="It said hi."))
    second = client.responses.create(
        model="m", input="What did it say?", tools=[CODE_INTERPRETER], previous_response_id=first.id
    )
    assert second.output_text == "It said hi."
    messages = hub.chat_requests()[-1]["messages"]
    replayed = [m for m in messages if m["role"] == "tool"]
    assert [text_of(m) for m in replayed] == ["turn one says hi"]

    # GET /v1/responses/{id}, and its stream replay (a turn stored without stream events).
    assert _outputs_of(client.responses.retrieve(first.id).output[0]) is None
    assert _outputs_of(client.responses.retrieve(first.id, include=[OUTPUTS]).output[0]) == LOGS
    for asked, expected in (([], None), ([OUTPUTS], LOGS)):
        with client.responses.retrieve(first.id, stream=True, include=asked) as replay:
            events = list(replay)
        done = [e for e in events if e.type == "response.output_item.done"]
        assert _outputs_of(done[0].item) == expected
        assert _outputs_of(events[-1].response.output[0]) == expected  # type: ignore[union-attr]
    with httpx.Client(timeout=20) as http:
        bad = http.get(f"{gateway.url}/responses/{first.id}", params={"include[]": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "include"

    # A streamed turn: its events, then its stored events replayed, either way.
    hub.enqueue(python("print('turn one says hi')", "call_s"), Reply(text="Streamed."))
    with client.responses.stream(model="m", input="again", tools=[CODE_INTERPRETER]) as live:
        events = list(live)
        final = live.get_final_response()
    done = [e for e in events if e.type == "response.output_item.done"]
    assert _outputs_of(done[0].item) is None and _outputs_of(final.output[0]) is None
    for asked, expected in (([], None), ([OUTPUTS], LOGS)):
        with client.responses.retrieve(final.id, stream=True, include=asked) as replay:
            events = list(replay)
        done = [e for e in events if e.type == "response.output_item.done"]
        assert _outputs_of(done[0].item) == expected
        assert _outputs_of(events[-1].response.output[0]) == expected  # type: ignore[union-attr]

    # The call sent back as input (as openai-agents does): input_items show what include asks.
    call = client.responses.retrieve(first.id, include=[OUTPUTS]).output[0].model_dump()
    hub.enqueue(Reply(text="Seen."))
    third = client.responses.create(
        model="m",
        input=[call, {"role": "user", "content": "and?"}],  # type: ignore[list-item]
        tools=[CODE_INTERPRETER],
    )
    tool_messages = [m for m in hub.chat_requests()[-1]["messages"] if m["role"] == "tool"]
    assert [text_of(m) for m in tool_messages] == ["turn one says hi"]
    listed = client.responses.input_items.list(third.id, order="asc")
    assert _outputs_of(listed.data[0]) is None
    listed = client.responses.input_items.list(third.id, order="asc", include=[OUTPUTS])
    assert _outputs_of(listed.data[0]) == LOGS

    # Conversation items: listed and retrieved.
    conv = client.conversations.create()
    hub.enqueue(python("print('turn one says hi')", "call_c"), Reply(text="ok"))
    client.responses.create(model="m", input="hi", tools=[CODE_INTERPRETER], conversation=conv.id)
    items = client.conversations.items.list(conv.id, order="asc").data
    assert _outputs_of(items[1]) is None
    items = client.conversations.items.list(conv.id, order="asc", include=[OUTPUTS]).data
    assert _outputs_of(items[1]) == LOGS
    item_id = str(items[1].id)
    got = client.conversations.items.retrieve(item_id, conversation_id=conv.id)
    assert _outputs_of(got) is None
    got = client.conversations.items.retrieve(item_id, conversation_id=conv.id, include=[OUTPUTS])
    assert _outputs_of(got) == LOGS


def test_a_background_turn_keeps_the_outputs_and_shows_them_when_asked(
    gateway: Stack, hub: FakeHub
) -> None:
    client = gateway.client()
    hub.enqueue(python("print('turn one says hi')"), Reply(text="Said it."))
    started = client.responses.create(
        model="m", input="Say hi.", tools=[CODE_INTERPRETER], background=True
    )
    deadline = time.monotonic() + 20
    while client.responses.retrieve(started.id).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _outputs_of(client.responses.retrieve(started.id).output[0]) is None
    done = client.responses.retrieve(started.id, include=[OUTPUTS])
    assert done.status == "completed" and _outputs_of(done.output[0]) == LOGS
    for asked, expected in (([], None), ([OUTPUTS], LOGS)):
        with client.responses.retrieve(started.id, stream=True, include=asked) as replay:
            events = list(replay)
        items = [e.item for e in events if e.type == "response.output_item.done"]
        assert _outputs_of(items[0]) == expected
        assert _outputs_of(events[-1].response.output[0]) == expected  # type: ignore[union-attr]
    # A chained turn replays the call with what it printed.
    hub.enqueue(Reply(text="ok"))
    client.responses.create(model="m", input="and?", previous_response_id=started.id)
    tool_messages = [m for m in hub.chat_requests()[-1]["messages"] if m["role"] == "tool"]
    assert [text_of(m) for m in tool_messages] == ["turn one says hi"]


def test_a_shell_tool_runs_the_same_way(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    commands = {"commands": ["echo hello > greeting.txt", "cat greeting.txt", "ls /mnt/data"]}
    hub.enqueue(
        Reply(
            tool_calls=[{"id": "call_sh", "name": "shell", "arguments": json.dumps(commands)}],
            finish_reason="tool_calls",
        ),
        Reply(text="Done."),
    )
    response = client.responses.create(model="m", input="Write a file", tools=[SHELL])
    call, output, message = response.output
    assert call.type == "shell_call" and call.action.commands == commands["commands"]
    assert output.type == "shell_call_output" and output.call_id == call.call_id
    assert [o.stdout for o in output.output] == ["", "hello\n", "greeting.txt\n"]
    assert all(o.outcome.type == "exit" and o.outcome.exit_code == 0 for o in output.output)
    assert message.type == "message"
    hub.enqueue(
        Reply(
            tool_calls=[
                {"id": "call_2", "name": "shell", "arguments": '{"commands": ["cat greeting.txt"]}'}
            ],
            finish_reason="tool_calls",
        ),
        Reply(text_from_tool="{tool}"),
    )
    with client.responses.stream(
        model="m", input="again", tools=[SHELL], previous_response_id=response.id
    ) as events:
        deltas = [
            e.delta.stdout
            for e in events
            if e.type == "response.shell_call_output_content.delta" and e.delta.stdout
        ]
        final = events.get_final_response()
    assert "".join(deltas) == "hello\n"
    assert final.output_text.startswith("$ cat greeting.txt\nhello")


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "time limit"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "processes"),
    "memory bomb": (
        "hog = []\nwhile True:\n    hog.append(bytearray(64 * 1024 * 1024))",
        "memory",  # "It ran out of memory" or "memory limit of N MiB exceeded"
    ),
    "1 GB write": (
        "with open('big.bin', 'wb') as f:\n"
        "    for _ in range(1024):\n"
        "        f.write(b'0' * (1024 * 1024))",
        "size limit",
    ),
    "huge stdout": (
        "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 100_000)",
        "dropped",
    ),
    "socket": (
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
        "no network access",
    ),
}


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Bootstrap]:
    """A sandbox whose calls stop at 2 s of CPU but get 20 s of wall-clock time, so that a busy
    machine does not turn every hostile call into a timeout."""
    b = Bootstrap(tmp_path / "roomy", call_timeout_s=20.0, call_cpu_s=2)
    yield b
    b.stop()


def test_hostile_code_ends_in_a_tool_error_the_model_sees(hub: FakeHub, roomy: Bootstrap) -> None:
    """Each hostile call ends in a tool error that says what stopped it; the model sees it and
    answers; another conversation's interpreter keeps its state throughout."""
    gateway = Stack(hub.url, router={"bootstrap_address": roomy.address}).start()
    try:
        _hostile(gateway, hub, roomy)
    finally:
        gateway.stop()


def _hostile(gateway: Stack, hub: FakeHub, sandbox: Bootstrap) -> None:
    client = gateway.client()
    bystander = client.conversations.create()
    hub.enqueue(python("kept = 'bystander'\nopen('mine.txt', 'w').write('mine')"), Reply(text="ok"))
    client.responses.create(
        model="m", input="set", tools=[CODE_INTERPRETER], conversation=bystander.id
    )
    said: dict[str, str] = {}
    for name, (code, says) in HOSTILE.items():
        hub.enqueue(python(code), Reply(text_from_tool="Tool said: {tool}"))
        response = client.responses.create(model="m", input=name, tools=[CODE_INTERPRETER])
        assert response.status == "completed", name
        seen = text_of(hub.chat_requests()[-1]["messages"][-1])
        assert response.output_text == f"Tool said: {seen}", name
        assert says in seen, (name, seen[-500:])
        said[name] = seen
        hub.enqueue(python("print(kept, open('mine.txt').read())"), Reply(text_from_tool="{tool}"))
        alive = client.responses.create(
            model="m", input="still?", tools=[CODE_INTERPRETER], conversation=bystander.id
        )
        assert alive.output_text == "bystander mine", name
    # The huge stdout reached the model clipped (--tool-output-chars, 16000 by default).
    assert len(said["huge stdout"]) < 17_000
    # Another session's files, by its directory beside this one's and by the service's path.
    theirs = client.conversations.items.list(bystander.id, order="asc").data[1]
    assert theirs.type == "code_interpreter_call"
    probe = (
        "found = []\n"
        f"for path in ['../{theirs.container_id}/mine.txt', '/mnt/{theirs.container_id}/mine.txt',\n"
        f"             '{sandbox.workdir}/{theirs.container_id}/mine.txt']:\n"
        "    try:\n"
        "        found.append(open(path).read())\n"
        "    except OSError as exc:\n"
        "        found.append(type(exc).__name__)\n"
        "print(found)"
    )
    hub.enqueue(python(probe), Reply(text_from_tool="{tool}"))
    nosy = client.responses.create(model="m", input="peek", tools=[CODE_INTERPRETER])
    assert nosy.output_text == str(["FileNotFoundError"] * 3)


def test_a_callers_function_is_returned_to_it(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client()
    lookup: Any = {
        "type": "function",
        "name": "lookup",
        "parameters": {"type": "object", "properties": {}},
        "strict": False,
    }
    hub.enqueue(
        Reply(
            tool_calls=[
                {"id": "call_py", "name": "python", "arguments": '{"code": "2 ** 10"}'},
                {"id": "call_lookup", "name": "lookup", "arguments": "{}"},
            ],
            finish_reason="tool_calls",
        ),
        Reply(text="1024 and found"),
    )
    # The outputs are kept (and so replayed to the model) though include did not ask for them.
    response = client.responses.create(model="m", input="x", tools=[lookup, CODE_INTERPRETER])
    assert [i.type for i in response.output] == ["code_interpreter_call", "function_call"]
    answered = client.responses.create(
        model="m",
        tools=[lookup, CODE_INTERPRETER],
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": "call_lookup", "output": "found"}],
    )
    assert answered.output_text == "1024 and found"
    messages = hub.chat_requests()[1]["messages"]
    # Each call is answered by the very next message, as chat hubs want.
    for n, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            assert messages[n + 1]["role"] == "tool"
            assert call["id"] in [m.get("tool_call_id") for m in messages[n + 1 : n + 3]]
    assert [text_of(m) for m in messages if m["role"] == "tool"] == ["1024", "found"]


@pytest.fixture
async def agent_client(gateway: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=gateway.url, api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_openai_agents_code_interpreter_tool(
    agent_client: openai.AsyncOpenAI, hub: FakeHub
) -> None:
    agent = Agent(
        name="analyst",
        instructions="Use Python for arithmetic.",
        tools=[CodeInterpreterTool(tool_config=CODE_INTERPRETER)],
        model=OpenAIResponsesModel(model="m", openai_client=agent_client),
    )
    hub.enqueue(python("print(2 ** 20)"), Reply(text_from_tool="2**20 = {tool}"))
    result = await Runner.run(agent, "What is 2 to the 20th?")
    assert result.final_output == "2**20 = 1048576"
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds and kinds[-1] == "message_output_item"
    hub.enqueue(python("print(2 ** 21)", "call_2"), Reply(text_from_tool="{tool}"))
    follow = await Runner.run(
        agent, [*result.to_input_list(), {"role": "user", "content": "and 21?"}]
    )
    assert follow.final_output == "2097152"


def test_a_responses_hub_gets_the_tools_as_declared(hub: FakeHub, sandbox: Bootstrap) -> None:
    stack = Stack(
        hub.url, router={"bootstrap_address": sandbox.address, "hub_api": "responses"}
    ).start()
    try:
        with httpx.Client(timeout=20) as http:
            r = http.post(
                f"{stack.url}/responses",
                json={"model": "m", "input": "x", "tools": [CODE_INTERPRETER]},
            )
        assert r.status_code == 200
        sent = hub.requests[-1]
        assert sent["tools"] == [CODE_INTERPRETER]
    finally:
        stack.stop()


def test_respgw_local_with_the_echo_hub_runs_fenced_code(tmp_path: Path) -> None:
    """`respgw local --echo-hub --bootstrap`: the echo hub calls the tools with a fenced block."""
    local = Process(
        [
            "local",
            "--echo-hub",
            "--bootstrap",
            "--port",
            "0",
            "--sqlite-path",
            str(tmp_path / "state.db"),
            "--bootstrap-workdir",
            str(tmp_path / "sessions"),
        ]
    )
    port = local.start(ROUTER_READY)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        first = client.responses.create(
            model="echo",
            input="Run this:\n```python\nanswer = 6 * 7\nprint(answer)\n```",
            tools=[CODE_INTERPRETER],
        )
        assert first.output_text == "The tool said: 42"
        assert first.output[0].type == "code_interpreter_call"
        with client.responses.stream(
            model="echo",
            input="```python\nanswer + 1\n```",
            tools=[CODE_INTERPRETER],
            previous_response_id=first.id,
        ) as events:
            final = events.get_final_response()
        assert final.output_text == "The tool said: 43"
        shell = client.responses.create(
            model="echo", input="```sh\necho from the shell\n```", tools=[SHELL]
        )
        assert shell.output_text.startswith("The tool said: $ echo from the shell\nfrom the shell")
    finally:
        client.close()
        assert local.stopped_gracefully(), "".join(local.lines[-20:])
