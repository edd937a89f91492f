"""The errors OpenAI gives that the gateway used to pass through to the hub (issue 12, item 10),
and what a Chat Completions hub gets of each kind of tool, through the official openai SDK against
the real router and state service. A refused request never reaches the hub."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakehub import FakeHub, Reply
from tests.support import Stack

WEATHER = {
    "type": "function",
    "name": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
NAMESPACE = {
    "type": "namespace",
    "name": "crm",
    "description": "The customer database",
    "tools": [
        {"type": "function", "name": "lookup", "description": "Find a customer"},
        {"type": "custom", "name": "note", "description": "Write a free-text note"},
    ],
}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}


@pytest.fixture(scope="module")
def responses_stack(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"default_model": "fake-model", "hub_api": "responses"})
    yield s.start()
    s.stop()


def refused(stack: Stack, **body: Any) -> tuple[str, str | None, str | None]:
    """The message, param and code of the 400 the SDK raised."""
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().responses.create(model="fake-model", **body)
    error = info.value.body
    assert info.value.status_code == 400
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}, "OpenAI's four keys"
    assert error["type"] == "invalid_request_error"
    return error["message"], error["param"], error["code"]


def metric(stack: Stack, name: str, **labels: str) -> float:
    with httpx.Client(timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{stack.port}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.findall(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", text, re.MULTILINE)
    return float(found[0]) if found else 0.0


# --- what OpenAI refuses ---------------------------------------------------------------------


def test_input_is_required_without_history(stack: Stack, hub: FakeHub) -> None:
    assert refused(stack) == (
        "Missing required parameter: 'input'.",
        "input",
        "missing_required_parameter",
    )
    assert refused(stack, input=[])[1:] == ("input", "empty_array")
    assert hub.requests == []
    # Continuing a response, there is something to answer.
    first = stack.client().responses.create(model="fake-model", input="Hello")
    again = stack.client().responses.create(
        model="fake-model", input=[], previous_response_id=first.id
    )
    assert again.status == "completed"


def test_a_function_call_output_without_its_call_is_refused(stack: Stack, hub: FakeHub) -> None:
    output = {"type": "function_call_output", "call_id": "call_nowhere", "output": "42"}
    assert refused(stack, input=[output]) == (
        "No tool call found for function call output with call_id call_nowhere.",
        "input",
        None,
    )
    assert hub.requests == []
    # With its call in the same input, it is a conversation the caller keeps itself.
    call = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"}
    done = stack.client().responses.create(
        model="fake-model",
        input=[call, {**output, "call_id": "call_1"}],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert done.status == "completed"


def test_a_function_call_output_may_answer_a_call_in_the_history(
    stack: Stack, hub: FakeHub
) -> None:
    hub.enqueue(
        Reply(
            tool_calls=[{"id": "call_1", "name": "weather", "arguments": "{}"}],
            finish_reason="tool_calls",
        )
    )
    client = stack.client()
    first = client.responses.create(model="fake-model", input="Weather?", tools=[WEATHER])  # type: ignore[list-item]
    second = client.responses.create(
        model="fake-model",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert second.status == "completed"


def test_a_function_call_output_whose_call_is_not_in_the_history(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    first = client.responses.create(model="fake-model", input="Hello")
    hub.reset()
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model="fake-model",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": "call_nowhere", "output": "42"}],
        )
    assert info.value.body == {
        "message": "No tool call found for function call output with call_id call_nowhere.",
        "type": "invalid_request_error",
        "param": "input",
        "code": None,
    }
    assert hub.requests == []


def test_tool_choice_required_needs_tools(stack: Stack, hub: FakeHub) -> None:
    assert refused(stack, input="x", tool_choice="required") == (
        "Tool choice 'required' must be specified with 'tools' parameter.",
        "tool_choice",
        None,
    )
    assert hub.requests == []


# --- what a chat hub gets of each tool ---------------------------------------------------------


def test_web_search_is_accepted_but_not_offered_and_counted(stack: Stack, hub: FakeHub) -> None:
    before = metric(stack, "respgw_router_tools_not_run_total", type="web_search")
    tools: Any = [{"type": "web_search"}, WEATHER]
    raw = stack.client().responses.with_raw_response.create(
        model="fake-model", input="News?", tools=tools
    )
    response = raw.parse()
    assert response.status == "completed"
    assert [t.type for t in response.tools] == ["web_search", "function"], "echoed as declared"
    # The client is told: the answer came without a search.
    assert raw.headers["x-respgw-tools-not-run"] == "web_search"
    [sent] = hub.chat_requests()
    assert [t["function"]["name"] for t in sent["tools"]] == ["weather"]
    assert metric(stack, "respgw_router_tools_not_run_total", type="web_search") - before == 1


@pytest.mark.parametrize("stream", [False, True])
def test_the_tools_not_run_are_named_in_a_header(stack: Stack, hub: FakeHub, stream: bool) -> None:
    """Web search, and code_interpreter and shell with no execution service, streamed or not;
    a turn whose tools all run has no such header."""
    tools: Any = [
        WEATHER,
        {"type": "shell", "environment": {"type": "container_auto"}},
        {"type": "web_search_preview"},
        {"type": "code_interpreter", "container": {"type": "auto"}},
    ]
    client = stack.client()
    with client.responses.with_streaming_response.create(
        model="fake-model", input="x", tools=tools, stream=stream
    ) as raw:
        named = raw.headers.get("x-respgw-tools-not-run")
        raw.read()
    assert named == "shell, web_search_preview, code_interpreter"
    plain = client.responses.with_raw_response.create(
        model="fake-model", input="x", tools=[WEATHER], stream=stream
    )
    assert "x-respgw-tools-not-run" not in plain.headers


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        (
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            "Hosted tool 'file_search' is not supported with fake-model: this server's model "
            "server speaks Chat Completions, and the gateway does not run 'file_search' itself.",
        ),
        (
            {"type": "mcp", "server_label": "docs", "server_url": "http://127.0.0.1:9/mcp"},
            "Hosted tool 'mcp' is not supported with fake-model: this server's model server "
            "speaks Chat Completions, and the gateway does not run 'mcp' itself.",
        ),
        (
            {"type": "local_shell"},
            "Tool 'local_shell' is not supported with fake-model: this server's model server "
            "speaks Chat Completions, which has no such tool. Declare a function tool instead.",
        ),
    ],
)
def test_tools_nobody_runs_are_refused_on_a_chat_hub(
    stack: Stack, hub: FakeHub, tool: dict[str, Any], message: str
) -> None:
    assert refused(stack, input="x", tools=[WEATHER, tool]) == (message, "tools", None)
    assert hub.requests == []


def test_a_chat_hub_refuses_before_the_history_is_loaded(stack: Stack, hub: FakeHub) -> None:
    file_search = {"type": "file_search", "vector_store_ids": ["vs_1"]}
    message, param, code = refused(
        stack, input="x", previous_response_id="resp_nope", tools=[WEATHER, file_search]
    )
    assert (param, code) == ("tools", None), "not previous_response_not_found"
    assert message.startswith("Hosted tool 'file_search' is not supported with fake-model")
    assert hub.requests == []


def test_tools_nobody_runs_reach_a_responses_hub(responses_stack: Stack, hub: FakeHub) -> None:
    tools: Any = [{"type": "file_search", "vector_store_ids": ["vs_1"]}]
    response = responses_stack.client().responses.create(model="m", input="x", tools=tools)
    assert response.status == "completed"
    assert hub.requests[0]["tools"] == tools


def test_a_streamed_request_with_a_refused_tool_is_answered(stack: Stack, hub: FakeHub) -> None:
    body = {
        "model": "fake-model",
        "input": "x",
        "stream": True,
        "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}],
    }
    with httpx.Client(timeout=5) as http:
        with http.stream("POST", f"{stack.url}/responses", json=body) as r:
            if r.status_code == 400:
                message = json.loads(r.read())["error"]["message"]
            else:
                events = [
                    json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")
                ]
                assert events[-1]["type"] == "response.failed"
                message = events[-1]["response"]["error"]["message"]
    assert message.startswith("Hosted tool 'file_search' is not supported with fake-model")
    assert hub.requests == []


def test_prompt_templates_are_refused_on_a_chat_hub(stack: Stack, hub: FakeHub) -> None:
    assert refused(stack, prompt={"id": "pmpt_1", "variables": {"city": "Paris"}}) == (
        "Prompt templates are not supported by this server: prompt 'pmpt_1' cannot be resolved, "
        "because its model server speaks Chat Completions. Send the prompt's text as "
        "'instructions' and 'input' instead.",
        "prompt",
        "unsupported_parameter",
    )
    assert hub.requests == []


def test_prompt_templates_reach_a_responses_hub(responses_stack: Stack, hub: FakeHub) -> None:
    prompt = {"id": "pmpt_1", "version": "2", "variables": {"city": "Paris"}}
    response = responses_stack.client().responses.create(model="m", prompt=prompt)  # type: ignore[arg-type]
    assert response.status == "completed"
    assert response.prompt is not None and response.prompt.id == "pmpt_1"
    assert hub.requests[0]["prompt"] == prompt


def test_namespace_and_custom_tools_are_offered_and_called_back(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(
        Reply(
            tool_calls=[
                {"id": "call_1", "name": "lookup", "arguments": '{"name":"Ada"}'},
                {"id": "call_2", "name": "apply_patch", "arguments": '{"input":"*** Begin"}'},
            ],
            finish_reason="tool_calls",
        ),
        Reply(text="Done."),
    )
    client = stack.client()
    tools: Any = [NAMESPACE, PATCH]
    first = client.responses.create(model="fake-model", input="Fix Ada's record", tools=tools)
    offered = hub.chat_requests()[0]["tools"]
    assert [t["function"]["name"] for t in offered] == ["lookup", "note", "apply_patch"]
    assert offered[1]["function"]["parameters"]["required"] == ["input"]
    lookup, patch = first.output
    assert lookup.type == "function_call"
    assert (lookup.name, lookup.namespace, lookup.arguments) == ("lookup", "crm", '{"name":"Ada"}')
    assert patch.type == "custom_tool_call"
    assert (patch.name, patch.input, patch.call_id) == ("apply_patch", "*** Begin", "call_2")

    second = client.responses.create(
        model="fake-model",
        previous_response_id=first.id,
        tools=tools,
        input=[
            {"type": "function_call_output", "call_id": "call_1", "output": "found"},
            {"type": "custom_tool_call_output", "call_id": "call_2", "output": "applied"},
        ],
    )
    assert second.output_text == "Done."
    messages = hub.chat_requests()[1]["messages"]
    assert [c["function"]["name"] for c in messages[1]["tool_calls"]] == ["lookup", "apply_patch"]
    assert [(m["role"], m["tool_call_id"]) for m in messages[2:]] == [
        ("tool", "call_1"),
        ("tool", "call_2"),
    ]


def test_streamed_namespace_and_custom_tool_calls(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(
        Reply(
            tool_calls=[
                {"id": "call_1", "name": "lookup", "arguments": '{"name":"Ada"}'},
                {"id": "call_2", "name": "apply_patch", "arguments": '{"input":"*** Begin"}'},
            ],
            finish_reason="tool_calls",
        )
    )
    tools: Any = [NAMESPACE, PATCH]
    with stack.client().responses.stream(model="fake-model", input="Fix", tools=tools) as stream:
        events = list(stream)
        final = stream.get_final_response()
    lookup, patch = final.output
    assert lookup.type == "function_call" and lookup.namespace == "crm"
    assert patch.type == "custom_tool_call" and patch.input == "*** Begin"
    by_item = [(e.type, getattr(e, "item_id", None)) for e in events]
    assert ("response.custom_tool_call_input.done", patch.id) in by_item
    assert ("response.function_call_arguments.delta", patch.id) not in by_item
    done = next(e for e in events if e.type == "response.custom_tool_call_input.done")
    assert done.input == "*** Begin"
