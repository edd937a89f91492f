"""The tool loop (router_svc.tool_loop) against the real reference bootstrap and execution service
and the fake hub, with and without streaming, before any route is involved."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent
from prometheus_client import REGISTRY

from bootstrap_svc import server as bootstrap_server
from bootstrap_svc.config import BootstrapSettings
from router_svc import bootstrap, execution, include, replay, tool_loop, validate
from router_svc.config import RouterSettings
from router_svc.dialects import dialect_for
from router_svc.hub import HubClient
from router_svc.turn import Turn
from tests.fakehub import FakeHub, Reply

pytestmark = pytest.mark.timeout(60)
CI = {"type": "code_interpreter", "container": {"type": "auto"}}
HOSTED_SHELL = {"type": "shell", "environment": {"type": "container_auto"}}
LOCAL_SHELL = {"type": "shell", "environment": {"type": "local"}}
# A 1x1 PNG.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def python_call(code: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "name": "python", "arguments": orjson.dumps({"code": code}).decode()}


def shell_call(commands: list[str], call_id: str = "call_sh") -> dict[str, Any]:
    return {
        "id": call_id,
        "name": "shell",
        "arguments": orjson.dumps({"commands": commands}).decode(),
    }


@dataclass
class Env:
    svc: Any
    bootstrapper: bootstrap.GrpcBootstrapper
    hub: FakeHub

    async def turn(
        self, body: dict[str, Any], history: list[dict[str, Any]] | None = None, **ids: str
    ) -> Turn:
        req = validate.parse_turn_request({"model": "m", **body})
        response_id = f"resp_{time.monotonic_ns()}"
        declared = bootstrap.stateful_tools(req.tools)
        prepared = bootstrap.Prepared.EMPTY
        if declared:  # as turn.begin: no bootstrap call without a tool to prepare
            prepared = await self.bootstrapper.prepare(
                request_id=response_id,
                tenant="acme",
                tools=declared,
                response_id=response_id,
                conversation_id=ids.get("conversation_id", ""),
                previous_response_id=ids.get("previous_response_id", ""),
                headers={},
                metadata={},
            )
        return Turn(
            req=req,
            tenant="acme",
            response_id=response_id,
            created_at=int(time.time()),
            history=history or [],
            prepared=prepared,
            conversation_version=None,
            idempotency_key="",
        )


@pytest.fixture
async def env(hub: FakeHub, tmp_path: Path) -> AsyncIterator[Env]:
    running = await bootstrap_server.start(
        replace(
            BootstrapSettings(),
            listen="127.0.0.1:0",
            workdir=str(tmp_path / "sessions"),
            metrics_port=0,
            call_timeout_s=2.0,
            call_cpu_s=2,
        )
    )
    address = f"127.0.0.1:{running.port}"
    bootstrapper = bootstrap.GrpcBootstrapper(address, 10.0)
    executor = execution.GrpcExecutor(address)
    hub_client = HubClient(hub.url)
    settings = replace(RouterSettings(), hub_url=hub.url, bootstrap_address=address)
    svc = SimpleNamespace(
        settings=settings,
        dialect=dialect_for(settings.hub_api),
        hub=hub_client,
        executor=executor,
    )
    try:
        yield Env(svc, bootstrapper, hub)
    finally:
        await hub_client.close()
        await executor.close()
        await bootstrapper.close()
        await running.stop()


async def streamed(env: Env, turn: Turn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    loop = tool_loop.StreamLoop(env.svc, turn)
    events = loop.start()
    async for chunk in loop.rounds():
        events += loop.feed(chunk)
    events += loop.finish()
    return events, loop.response


# -- code_interpreter, whole answers -------------------------------------------------------------


async def test_a_python_call_runs_and_its_output_reaches_the_model(env: Env) -> None:
    env.hub.enqueue(
        Reply(tool_calls=[python_call("x = 6 * 7\nprint(x)")], finish_reason="tool_calls"),
        Reply(text_from_tool="The answer is {tool}."),
    )
    turn = await env.turn({"input": "Compute 6*7", "tools": [CI]})
    assert tool_loop.runs_tools(env.svc, turn)
    response = await tool_loop.answer(env.svc, turn)
    call, message = response["output"]
    container = turn.prepared.tools["code_interpreter"].resource_id
    assert call["type"] == "code_interpreter_call" and call["status"] == "completed"
    assert call["code"] == "x = 6 * 7\nprint(x)" and call["container_id"] == container
    # Kept whatever include says (stored, and replayed to later turns); shown only when asked.
    assert call["outputs"] == [{"type": "logs", "logs": "42"}]
    assert include.response(response, turn.req.include)["output"][0]["outputs"] is None
    assert message["content"][0]["text"] == "The answer is 42."
    assert response["status"] == "completed" and response["tools"][0]["container"] == container
    assert response["usage"]["input_tokens"] == 22 and response["usage"]["total_tokens"] == 36
    first, second = env.hub.chat_requests()
    assert [t["function"]["name"] for t in first["tools"]] == ["python"]
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "python"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}


async def test_outputs_logs_images_and_file_citations(env: Env) -> None:
    code = (
        "import base64\n"
        f"open('chart.png', 'wb').write(base64.b64decode({PNG!r}))\n"
        "open('report.csv', 'w').write('a,b\\n1,2\\n')\n"
        "print('written')"
    )
    env.hub.enqueue(
        Reply(tool_calls=[python_call(code)], finish_reason="tool_calls"),
        Reply(text="See report.csv and the chart in /mnt/data/chart.png."),
    )
    turn = await env.turn(
        {"input": "x", "tools": [CI], "include": ["code_interpreter_call.outputs"]}
    )
    response = await tool_loop.answer(env.svc, turn)
    call, message = response["output"]
    logs, image = call["outputs"]
    assert logs == {"type": "logs", "logs": "written"}
    assert image["type"] == "image" and image["url"] == f"data:image/png;base64,{PNG}"
    text = message["content"][0]["text"]
    cited = message["content"][0]["annotations"]
    assert [(a["filename"], text[a["start_index"] : a["end_index"]]) for a in cited] == [
        ("report.csv", "report.csv"),
        ("chart.png", "/mnt/data/chart.png"),
    ]
    assert all(a["type"] == "container_file_citation" for a in cited)
    assert all(a["container_id"] == call["container_id"] for a in cited)
    assert all(a["file_id"].startswith("cfile_") for a in cited)
    tool_message = env.hub.chat_requests()[1]["messages"][-1]["content"]
    assert "written" in tool_message and "/mnt/data/report.csv" in tool_message


async def test_a_timeout_is_the_calls_output_and_the_model_answers(env: Env) -> None:
    env.hub.enqueue(
        Reply(tool_calls=[python_call("while True:\n    pass")], finish_reason="tool_calls"),
        Reply(text_from_tool="Sorry: {tool}"),
    )
    response = await tool_loop.answer(env.svc, await env.turn({"input": "loop", "tools": [CI]}))
    call, message = response["output"]
    assert call["status"] == "failed"
    assert "stopped" in message["content"][0]["text"]
    assert response["status"] == "completed"


async def test_max_tool_calls_and_the_round_cap(env: Env) -> None:
    env.hub.enqueue(
        Reply(
            tool_calls=[python_call("1", "call_a"), python_call("2", "call_b")],
            finish_reason="tool_calls",
        ),
        Reply(text="done"),
    )
    response = await tool_loop.answer(
        env.svc, await env.turn({"input": "x", "tools": [CI], "max_tool_calls": 1})
    )
    first, second, message = response["output"]
    assert (first["status"], second["status"]) == ("completed", "incomplete")
    assert message["content"][0]["text"] == "done"
    answers = env.hub.chat_requests()[1]["messages"][-2:]
    assert answers[0]["content"] == "1" and answers[1]["content"] == "(not run)"
    # The next call is made without the tools: max_tool_calls is spent.
    assert "tools" not in env.hub.chat_requests()[1]

    env.hub.reset()
    env.svc.settings = SimpleNamespace(**{**vars(env.svc.settings), "tool_max_rounds": 2})
    env.hub.enqueue(
        Reply(tool_calls=[python_call("1")], finish_reason="tool_calls"),
        Reply(tool_calls=[python_call("2", "call_2")], finish_reason="tool_calls"),
    )
    response = await tool_loop.answer(env.svc, await env.turn({"input": "x", "tools": [CI]}))
    assert [i["status"] for i in response["output"]] == ["completed", "incomplete"]
    assert len(env.hub.chat_requests()) == 2 and "tools" not in env.hub.chat_requests()[1]


async def test_a_callers_function_call_ends_the_loop(env: Env) -> None:
    weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    env.hub.enqueue(
        Reply(
            tool_calls=[
                python_call("3 * 3"),
                {"id": "call_w", "name": "get_weather", "arguments": "{}"},
            ],
            finish_reason="tool_calls",
        )
    )
    response = await tool_loop.answer(
        env.svc, await env.turn({"input": "x", "tools": [weather, CI]})
    )
    assert [i["type"] for i in response["output"]] == ["code_interpreter_call", "function_call"]
    assert response["output"][1]["name"] == "get_weather"
    assert len(env.hub.chat_requests()) == 1
    names = [t["function"]["name"] for t in env.hub.chat_requests()[0]["tools"]]
    assert names == ["get_weather", "python"]


async def test_a_callers_tool_named_python_keeps_its_name(env: Env) -> None:
    own = {"type": "function", "name": "python", "parameters": {"type": "object"}}
    env.hub.enqueue(Reply(text="no call"))
    await tool_loop.answer(env.svc, await env.turn({"input": "x", "tools": [own, CI]}))
    names = [t["function"]["name"] for t in env.hub.chat_requests()[0]["tools"]]
    assert names == ["python", "python_tool"]


async def test_a_stored_call_is_replayed_as_the_call_and_output_it_was(env: Env) -> None:
    env.hub.enqueue(
        Reply(tool_calls=[python_call("y = 5\ny")], finish_reason="tool_calls"),
        Reply(text="five"),
    )
    first = await env.turn(
        {"input": "first", "tools": [CI], "include": ["code_interpreter_call.outputs"]}
    )
    one = await tool_loop.answer(env.svc, first)
    history = [*first.req.input_items, *one["output"]]
    env.hub.reset()
    env.hub.enqueue(
        Reply(tool_calls=[python_call("y * 2", "call_2")], finish_reason="tool_calls"),
        Reply(text_from_tool="{tool}"),
    )
    second = await env.turn(
        {"input": "again", "tools": [CI]}, history, previous_response_id=first.response_id
    )
    two = await tool_loop.answer(env.svc, second)
    # The same interpreter: y survived from the first turn.
    assert two["output"][-1]["content"][0]["text"] == "10"
    messages = env.hub.chat_requests()[0]["messages"]
    roles = [m["role"] for m in messages]
    assert roles[:4] == ["user", "assistant", "tool", "assistant"]
    call = messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "python", "arguments": '{"code":"y = 5\\ny"}'}
    assert messages[2] == {"role": "tool", "tool_call_id": call["id"], "content": "5"}


# -- shell -------------------------------------------------------------------------------------


async def test_a_shell_call_runs_each_command(env: Env) -> None:
    env.hub.enqueue(
        Reply(
            tool_calls=[shell_call(["echo hi > f.txt; cat f.txt", "exit 3"])],
            finish_reason="tool_calls",
        ),
        Reply(text_from_tool="{tool}"),
    )
    response = await tool_loop.answer(
        env.svc, await env.turn({"input": "x", "tools": [HOSTED_SHELL]})
    )
    call, output, message = response["output"]
    session = response["tools"][0]["environment"]["container_id"]
    assert call["type"] == "shell_call" and call["status"] == "completed"
    assert call["action"]["commands"] == ["echo hi > f.txt; cat f.txt", "exit 3"]
    assert call["environment"] == {"type": "container_reference", "container_id": session}
    assert output["type"] == "shell_call_output" and output["call_id"] == call["call_id"]
    assert output["output"] == [
        {"stdout": "hi\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}},
        {"stdout": "", "stderr": "", "outcome": {"type": "exit", "exit_code": 3}},
    ]
    assert (
        message["content"][0]["text"]
        == "$ echo hi > f.txt; cat f.txt\nhi\n[exit code 0]\n$ exit 3\n[exit code 3]\n[files written: /mnt/data/f.txt]"
    )


# -- streaming ---------------------------------------------------------------------------------


async def test_a_streamed_python_call_has_the_sdks_events(env: Env) -> None:
    env.hub.enqueue(
        Reply(tool_calls=[python_call("x = 6 * 7\nprint(x)")], finish_reason="tool_calls"),
        Reply(text_from_tool="The answer is {tool}."),
    )
    events, response = await streamed(env, await env.turn({"input": "x", "tools": [CI]}))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    start = kinds.index("response.output_item.added")
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[start + 1] == "response.code_interpreter_call.in_progress"
    deltas = [
        e["delta"] for e in events if e["type"] == "response.code_interpreter_call_code.delta"
    ]
    assert "".join(deltas) == "x = 6 * 7\nprint(x)"
    order = [
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    positions = [kinds.index(k, start) for k in order]
    assert positions == sorted(positions)
    assert kinds[-1] == "response.completed"
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [
        0,
        1,
    ]
    final = events[-1]["response"]
    # The client is shown the response without the outputs (include did not ask); the one kept
    # for storing has them.
    assert final == include.response(response, ()) and final is not response
    assert final["output"][0]["outputs"] is None
    assert response["output"][0]["outputs"] == [{"type": "logs", "logs": "42"}]
    assert [i["type"] for i in final["output"]] == ["code_interpreter_call", "message"]
    assert final["output"][1]["content"][0]["text"] == "The answer is 42."
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert (
        done[0]["item"]["status"] == "completed"
        and done[0]["item"]["code"] == "x = 6 * 7\nprint(x)"
        and done[0]["item"]["outputs"] is None
    )


async def test_a_streamed_shell_call_streams_its_output(env: Env) -> None:
    env.hub.enqueue(
        Reply(
            tool_calls=[shell_call(["printf one", "printf two >&2; exit 4"])],
            finish_reason="tool_calls",
        ),
        Reply(text="ok"),
    )
    events, response = await streamed(env, await env.turn({"input": "x", "tools": [HOSTED_SHELL]}))
    kinds = [e["type"] for e in events]
    commands = [e for e in events if e["type"] == "response.shell_call_command.done"]
    assert [c["command"] for c in commands] == ["printf one", "printf two >&2; exit 4"]
    deltas = [e["delta"] for e in events if e["type"] == "response.shell_call_output_content.delta"]
    assert {"stdout": "one"} in deltas and {"stderr": "two"} in deltas
    done = [e for e in events if e["type"] == "response.shell_call_output_content.done"]
    assert [d["output"][0]["outcome"] for d in done] == [
        {"type": "exit", "exit_code": 0},
        {"type": "exit", "exit_code": 4},
    ]
    assert kinds[-1] == "response.completed"
    assert [i["type"] for i in response["output"]] == ["shell_call", "shell_call_output", "message"]
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [0, 1, 2]


async def test_a_streamed_answer_cites_the_files_it_names(env: Env) -> None:
    env.hub.enqueue(
        Reply(
            tool_calls=[python_call("open('out.txt', 'w').write('x')")], finish_reason="tool_calls"
        ),
        Reply(text="Saved to out.txt for you"),
    )
    events, response = await streamed(env, await env.turn({"input": "x", "tools": [CI]}))
    added = [e for e in events if e["type"] == "response.output_text.annotation.added"]
    assert len(added) == 1 and added[0]["annotation"]["filename"] == "out.txt"
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_text.annotation.added") < kinds.index(
        "response.output_text.done"
    )
    part_done = next(e for e in events if e["type"] == "response.content_part.done")
    assert part_done["part"]["annotations"] == [added[0]["annotation"]]
    text_part = response["output"][1]["content"][0]
    assert text_part["annotations"] == [added[0]["annotation"]]
    assert text_part["text"][9:16] == "out.txt"


def _extra_keys(data: Any, model: Any, path: str = "") -> list[str]:
    """The keys of ``data`` that the SDK's ``model`` (parsed from it) has no field for."""
    found: list[str] = []
    if isinstance(model, pydantic.BaseModel) and isinstance(data, dict):
        for key, value in data.items():
            if key not in type(model).model_fields:
                found.append(f"{path}.{key}")
            else:
                found += _extra_keys(value, getattr(model, key), f"{path}.{key}")
    elif isinstance(model, list) and isinstance(data, list):
        for n, (d, m) in enumerate(zip(data, model, strict=False)):
            found += _extra_keys(d, m, f"{path}[{n}]")
    return found


async def test_every_streamed_tool_event_is_the_sdks_event_with_only_its_keys(env: Env) -> None:
    """Each event of a streamed python call (logs, an image, a citation) and of a shell call
    parses as the SDK's event of its type, with no key the SDK does not name (the response
    object of the lifecycle events is held to the SDK's Response in test_shapes)."""
    adapter: Any = pydantic.TypeAdapter(ResponseStreamEvent)
    code = f"import base64\nopen('chart.png', 'wb').write(base64.b64decode({PNG!r}))\nprint('ok')"
    env.hub.enqueue(
        Reply(tool_calls=[python_call(code)], finish_reason="tool_calls"),
        Reply(text="See /mnt/data/chart.png."),
        Reply(
            tool_calls=[shell_call(["printf one", "printf two >&2; exit 4"])],
            finish_reason="tool_calls",
        ),
        Reply(text="ok"),
    )
    outputs = {"include": ["code_interpreter_call.outputs"]}
    ci, _ = await streamed(env, await env.turn({"input": "x", "tools": [CI], **outputs}))
    shell, _ = await streamed(env, await env.turn({"input": "x", "tools": [HOSTED_SHELL]}))
    for event in [*ci, *shell]:
        parsed = adapter.validate_python(event)
        assert parsed.type == event["type"]
        data = {k: v for k, v in event.items() if k != "response"}
        assert _extra_keys(data, parsed) == [], event["type"]
    kinds = [e["type"] for e in ci]
    assert "response.output_text.annotation.added" in kinds
    done = next(e for e in ci if e["type"] == "response.output_item.done")
    assert [o["type"] for o in done["item"]["outputs"]] == ["logs", "image"]
    # (Output deltas come as the commands write: how many depends on the pipes.)
    kinds = [e["type"] for e in shell]
    kinds = [k for n, k in enumerate(kinds) if n == 0 or k != kinds[n - 1] or "content" not in k]
    assert kinds[2:15] == [
        "response.output_item.added",
        *[
            "response.shell_call_command.added",
            "response.shell_call_command.delta",
            "response.shell_call_command.done",
        ]
        * 2,
        "response.output_item.done",
        "response.output_item.added",
        "response.shell_call_output_content.delta",
        "response.shell_call_output_content.done",
        "response.output_item.done",
        "response.output_item.added",
    ]


def _types(events: list[dict[str, Any]]) -> list[str]:
    """The events' types, a run of one type of delta counted once (how many deltas a stream
    has depends on the hub's chunks and the pipes)."""
    kinds = [e["type"] for e in events]
    return [k for n, k in enumerate(kinds) if n == 0 or k != kinds[n - 1] or "delta" not in k]


async def test_a_stored_tool_turn_replays_with_the_live_streams_events(env: Env) -> None:
    """GET /v1/responses/{id}?stream=true of a turn stored without its events (a non-streamed
    one) rebuilds the events the live stream sends: the same types in the same order, each the
    SDK's event."""
    adapter: Any = pydantic.TypeAdapter(ResponseStreamEvent)
    env.hub.enqueue(
        Reply(
            tool_calls=[python_call("open('out.txt', 'w').write('x')\nprint('ok')")],
            finish_reason="tool_calls",
        ),
        Reply(text="Saved to out.txt for you"),
        Reply(
            tool_calls=[shell_call(["printf one", "printf two >&2; exit 4"])],
            finish_reason="tool_calls",
        ),
        Reply(text="ok"),
    )
    outputs = {"include": ["code_interpreter_call.outputs"]}
    for body in (
        {"input": "x", "tools": [CI], **outputs},
        {"input": "x", "tools": [HOSTED_SHELL]},
    ):
        turn = await env.turn(body)
        live, stored = await streamed(env, turn)
        rebuilt = replay.replay_events(include.response(stored, turn.req.include))
        assert _types(rebuilt) == _types(live)
        assert rebuilt[-1] == live[-1] | {"sequence_number": rebuilt[-1]["sequence_number"]}
        for event in rebuilt:
            parsed = adapter.validate_python(event)
            data = {k: v for k, v in event.items() if k != "response"}
            assert _extra_keys(data, parsed) == [], event["type"]
        done = [e["item"] for e in rebuilt if e["type"] == "response.output_item.done"]
        assert done == stored["output"]


# -- a local shell: its calls are the client's ----------------------------------------------


def tool_service_calls() -> float:
    """Every call the router made to a bootstrap or execution service, so far."""
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


@pytest.mark.parametrize("tool", [LOCAL_SHELL, {"type": "shell"}], ids=["local", "absent"])
async def test_a_local_shell_call_is_returned_to_the_client(env: Env, tool: dict[str, Any]) -> None:
    """A local shell (environment local, or none: OpenAI's default) is offered to the model; its
    call comes back as OpenAI's shell_call and ends the loop, and nothing asked a bootstrap or
    execution service anything."""
    before = tool_service_calls()
    env.hub.enqueue(
        Reply(
            tool_calls=[
                {
                    "id": "call_ls",
                    "name": "shell",
                    "arguments": '{"commands": ["ls -la", "pwd"], "timeout_ms": 5000}',
                }
            ],
            finish_reason="tool_calls",
        )
    )
    turn = await env.turn({"input": "What is here?", "tools": [tool]})
    assert turn.prepared.tools == {} and turn.tool_resources == {}
    assert tool_loop.runs_tools(env.svc, turn)
    response = await tool_loop.answer(env.svc, turn)
    [call] = response["output"]
    assert call == {
        "id": call["id"],
        "type": "shell_call",
        "status": "completed",
        "call_id": "call_ls",
        "action": {"commands": ["ls -la", "pwd"], "timeout_ms": 5000, "max_output_length": None},
        "environment": {"type": "local"},
    }
    assert call["id"].startswith("sh_")
    assert response["status"] == "completed" and response["tools"] == [tool]
    [sent] = env.hub.chat_requests()
    [offered] = sent["tools"]
    assert offered["function"]["name"] == "shell"
    assert "user's computer" in offered["function"]["description"]
    assert tool_service_calls() == before


async def test_a_local_shell_without_an_execution_service(env: Env) -> None:
    """A router with no execution service still offers a local shell (nothing runs here)."""
    env.hub.enqueue(Reply(tool_calls=[shell_call(["date"])], finish_reason="tool_calls"))
    svc = SimpleNamespace(**{**vars(env.svc), "executor": None})
    turn = await env.turn({"input": "x", "tools": [LOCAL_SHELL]})
    assert tool_loop.runs_tools(svc, turn)
    response = await tool_loop.answer(svc, turn)
    assert [i["type"] for i in response["output"]] == ["shell_call"]


async def test_a_local_shells_skills_are_described_to_the_model(env: Env) -> None:
    skill = {"name": "pdf", "description": "Reads PDF files.", "path": "/home/u/skills/pdf"}
    env.hub.enqueue(Reply(text="ok"))
    tool = {"type": "shell", "environment": {"type": "local", "skills": [skill]}}
    await tool_loop.answer(env.svc, await env.turn({"input": "x", "tools": [tool]}))
    description = env.hub.chat_requests()[0]["tools"][0]["function"]["description"]
    assert "- pdf: Reads PDF files. (in /home/u/skills/pdf)" in description


async def test_tool_choice_shell_forces_the_local_shell(env: Env) -> None:
    env.hub.enqueue(Reply(text="ok"))
    body = {"input": "x", "tools": [LOCAL_SHELL], "tool_choice": {"type": "shell"}}
    await tool_loop.answer(env.svc, await env.turn(body))
    sent = env.hub.chat_requests()[0]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "shell"}}


async def test_local_and_hosted_calls_of_one_round(env: Env) -> None:
    """Parallel calls: the python call runs here, the local shell call goes to the client, and
    the loop stops there (as with the caller's own functions)."""
    env.hub.enqueue(
        Reply(
            tool_calls=[python_call("print(2 + 2)"), shell_call(["uname -a"])],
            finish_reason="tool_calls",
        )
    )
    response = await tool_loop.answer(
        env.svc, await env.turn({"input": "x", "tools": [CI, LOCAL_SHELL]})
    )
    ci, call = response["output"]
    assert ci["type"] == "code_interpreter_call" and ci["status"] == "completed"
    assert call["type"] == "shell_call" and call["environment"] == {"type": "local"}
    assert len(env.hub.chat_requests()) == 1


async def test_a_malformed_local_shell_call_is_answered_here(env: Env) -> None:
    """A call without commands cannot be run anywhere: the model is told, as with a hosted
    shell, and may call again."""
    env.hub.enqueue(
        Reply(
            tool_calls=[{"id": "call_bad", "name": "shell", "arguments": "ls"}],
            finish_reason="tool_calls",
        ),
        Reply(tool_calls=[shell_call(["ls"], "call_good")], finish_reason="tool_calls"),
    )
    response = await tool_loop.answer(
        env.svc, await env.turn({"input": "x", "tools": [LOCAL_SHELL]})
    )
    assert [i["type"] for i in response["output"]] == [
        "shell_call",
        "shell_call_output",
        "shell_call",
    ]
    assert response["output"][2]["call_id"] == "call_good"
    told = env.hub.chat_requests()[1]["messages"][-1]
    assert told["role"] == "tool" and "nothing ran" in told["content"]


async def test_a_streamed_local_shell_call_has_the_sdks_events(env: Env) -> None:
    adapter: Any = pydantic.TypeAdapter(ResponseStreamEvent)
    before = tool_service_calls()
    env.hub.enqueue(
        Reply(tool_calls=[shell_call(["ls", "cat notes.txt"])], finish_reason="tool_calls")
    )
    turn = await env.turn({"input": "x", "tools": [LOCAL_SHELL]})
    events, response = await streamed(env, turn)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *[
            "response.shell_call_command.added",
            "response.shell_call_command.delta",
            "response.shell_call_command.done",
        ]
        * 2,
        "response.output_item.done",
        "response.completed",
    ]
    for event in events:
        parsed = adapter.validate_python(event)
        data = {k: v for k, v in event.items() if k != "response"}
        assert _extra_keys(data, parsed) == [], event["type"]
    added, done = events[2]["item"], events[-2]["item"]
    assert added["status"] == "in_progress" and done["status"] == "completed"
    assert added["id"] == done["id"] and done["environment"] == {"type": "local"}
    assert done["action"]["commands"] == ["ls", "cat notes.txt"]
    assert response["output"] == [done] and response["status"] == "completed"
    assert tool_service_calls() == before
    rebuilt = replay.replay_events(response)
    assert _types(rebuilt) == _types(events)


async def test_the_clients_shell_call_output_reaches_the_model(env: Env) -> None:
    """The next turn: the stored shell_call (history) and the client's shell_call_output (input)
    are the function call and its one answer, right after it."""
    env.hub.enqueue(Reply(tool_calls=[shell_call(["cat notes.txt"])], finish_reason="tool_calls"))
    first = await tool_loop.answer(
        env.svc, await env.turn({"input": "read notes", "tools": [LOCAL_SHELL]})
    )
    [call] = first["output"]
    output = {
        "type": "shell_call_output",
        "call_id": call["call_id"],
        "output": [
            {"stdout": "buy milk\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}
        ],
    }
    env.hub.enqueue(Reply(text_from_tool="Your notes say: {tool}"))
    history = [{"type": "message", "role": "user", "content": "read notes"}, call]
    turn = await env.turn({"input": [output], "tools": [LOCAL_SHELL]}, history)
    answered = await tool_loop.answer(env.svc, turn)
    messages = env.hub.chat_requests()[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "shell"
    assert messages[2]["tool_call_id"] == call["call_id"]
    assert messages[2]["content"] == "buy milk\n[exit code 0]"
    assert answered["output"][0]["content"][0]["text"] == "Your notes say: buy milk\n[exit code 0]"
