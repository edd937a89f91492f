"""Chat tools (router_svc.dialects.chat.tools): the declared tools offered as functions, calls read
back."""

from __future__ import annotations

from typing import Any

import pytest

from router_svc import inputs
from router_svc.dialects.chat.request import chat_request
from router_svc.dialects.chat.tools import CUSTOM_TOOL_PARAMETERS
from tests.router_svc.dialects.chat.support import (
    CHAT_BODY,
    CODEX_NAMESPACE,
    FUNCTION,
    PATCH,
    TOOLS,
    back,
    req,
)


def test_only_function_tools_reach_a_chat_hub() -> None:
    body = chat_request(req(input="x", tools=TOOLS), [], [], stream=False)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather of a city",
                "parameters": FUNCTION["parameters"],
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "time"}},
    ]
    CHAT_BODY.validate_python(body)


def test_no_function_tools_means_no_tool_fields() -> None:
    body = chat_request(
        req(input="x", tools=TOOLS[2:], tool_choice="required", parallel_tool_calls=False),
        [],
        [],
        stream=False,
    )
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(body)


def test_namespace_and_custom_tools_are_offered_as_functions() -> None:
    tools = [{"type": "web_search", "external_web_access": False}, CODEX_NAMESPACE, FUNCTION, PATCH]
    body = chat_request(req(input="x", tools=tools), [], [], stream=False)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "spawn_agent",
                "description": "Spawn an agent",
                "parameters": {"type": "object", "properties": {"task": {"type": "string"}}},
                "strict": False,
            },
        },
        # Its own name is taken by the top-level function: qualified by its namespace.
        {
            "type": "function",
            "function": {
                "name": "multi_agent_v1__weather",
                "description": "Clashes with a top-level tool",
            },
        },
        {
            "type": "function",
            "function": {
                "name": "notes",
                "description": "Free-text notes",
                "parameters": dict(CUSTOM_TOOL_PARAMETERS),
            },
        },
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather of a city",
                "parameters": FUNCTION["parameters"],
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "apply_patch",
                "description": "Apply a patch\n\nThe input must follow this lark grammar:\n"
                "start: /.+/",
                "parameters": dict(CUSTOM_TOOL_PARAMETERS),
            },
        },
    ]
    CHAT_BODY.validate_python(body)


def test_calls_to_namespace_and_custom_tools_replay_under_their_offered_names() -> None:
    tools = [CODEX_NAMESPACE, FUNCTION, PATCH]
    history = inputs.normalize_items(
        [
            {"role": "user", "content": "go"},
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "weather",
                "namespace": "multi_agent_v1",
                "arguments": "{}",
            },
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": "{}"},
            {"type": "custom_tool_call", "call_id": "c3", "name": "apply_patch", "input": "*** x"},
            {"type": "function_call_output", "call_id": "c1", "output": "a"},
            {"type": "function_call_output", "call_id": "c2", "output": "b"},
            {"type": "custom_tool_call_output", "call_id": "c3", "output": "c"},
        ]
    )
    body = chat_request(req(input="next", tools=tools), history, [], stream=False)
    calls = body["messages"][1]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in calls] == [
        ("c1", "multi_agent_v1__weather"),
        ("c2", "weather"),
        ("c3", "apply_patch"),
    ]
    assert calls[2]["function"]["arguments"] == '{"input":"*** x"}'
    CHAT_BODY.validate_python(body)


@pytest.mark.parametrize(
    ("choice", "chat_name"),
    [
        ({"type": "function", "name": "spawn_agent"}, "spawn_agent"),
        ({"type": "custom", "name": "apply_patch"}, "apply_patch"),
        ({"type": "custom", "name": "notes"}, "notes"),
    ],
)
def test_tool_choice_names_the_offered_function(choice: dict[str, Any], chat_name: str) -> None:
    request = req(input="x", tools=[CODEX_NAMESPACE, FUNCTION, PATCH], tool_choice=choice)
    body = chat_request(request, [], [], stream=False)
    assert body["tool_choice"] == {"type": "function", "function": {"name": chat_name}}
    allowed = {"type": "allowed_tools", "mode": "auto", "tools": [choice]}
    request = req(input="x", tools=[CODEX_NAMESPACE, FUNCTION, PATCH], tool_choice=allowed)
    body = chat_request(request, [], [], stream=False)
    assert [t["function"]["name"] for t in body["tools"]] == [chat_name]


def test_chat_calls_come_back_as_the_items_of_their_tools() -> None:
    request = req(input="x", tools=[CODEX_NAMESPACE, FUNCTION, PATCH])

    def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    response = back(
        {
            "content": None,
            "tool_calls": [
                tool_call("c1", "spawn_agent", '{"task":"t"}'),
                tool_call("c2", "multi_agent_v1__weather", "{}"),
                tool_call("c3", "weather", "{}"),
                tool_call("c4", "apply_patch", '{"input":"*** Begin Patch"}'),
                tool_call("c5", "notes", "not json"),
                tool_call("c6", "unknown", "{}"),
            ],
        },
        request,
        finish="tool_calls",
    )
    out = response["output"]
    assert [(i["type"], i["name"], i.get("namespace")) for i in out] == [
        ("function_call", "spawn_agent", "multi_agent_v1"),
        ("function_call", "weather", "multi_agent_v1"),
        ("function_call", "weather", None),
        ("custom_tool_call", "apply_patch", None),
        ("custom_tool_call", "notes", "multi_agent_v1"),
        ("function_call", "unknown", None),
    ]
    assert out[0]["arguments"] == '{"task":"t"}' and out[0]["id"].startswith("fc_")
    assert out[3] == {
        "id": out[3]["id"],
        "type": "custom_tool_call",
        "status": "completed",
        "call_id": "c4",
        "input": "*** Begin Patch",
        "name": "apply_patch",
    }
    assert out[3]["id"].startswith("ctc_")
    assert out[4]["input"] == "not json", "arguments that are not the one input are the input"


@pytest.mark.parametrize(
    ("choice", "chat_choice", "names"),
    [
        ("auto", "auto", ["weather", "time"]),
        ("none", "none", ["weather", "time"]),
        ("required", "required", ["weather", "time"]),
        (
            {"type": "function", "name": "time"},
            {"type": "function", "function": {"name": "time"}},
            ["weather", "time"],
        ),
        (
            {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "time"}],
            },
            "required",
            ["time"],
        ),
        ({"type": "code_interpreter"}, None, ["weather", "time"]),
        ({"type": "web_search_preview"}, None, ["weather", "time"]),
    ],
)
def test_tool_choice_mapping(choice: Any, chat_choice: Any, names: list[str]) -> None:
    body = chat_request(req(input="x", tools=TOOLS, tool_choice=choice), [], [], stream=False)
    assert body.get("tool_choice") == chat_choice
    assert [t["function"]["name"] for t in body["tools"]] == names
