"""The chat dialect (router_svc.dialects.chat): the Chat Completions request and answer."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from openai._models import validate_type
from openai.types.chat import completion_create_params
from openai.types.responses import Response
from prometheus_client import REGISTRY
from pydantic import TypeAdapter

from router_svc import errors, inputs, validate
from router_svc.dialects.chat import (
    CUSTOM_TOOL_PARAMETERS,
    chat_messages,
    chat_request,
    from_chat_completion,
    usage_from_chat,
)
from router_svc.dialects.responses import responses_request
from router_svc.response import reasoning_item

CHAT_BODY = TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
CHAT_STREAM_BODY = TypeAdapter(completion_create_params.CompletionCreateParamsStreaming)


def req(**body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request({"model": "m", **body})


def checked(response: dict[str, Any]) -> Response:
    """The response validated strictly against the openai SDK's Response model."""
    assert "output_text" not in response  # computed by the SDK, never on the wire
    return validate_type(type_=Response, value=response)


def user(text: str) -> dict[str, Any]:
    return inputs.normalize_items(text)[0]


# --- chat_request: messages --------------------------------------------------------------------


def test_message_order_instructions_history_injected_input() -> None:
    history = [
        user("first question"),
        *inputs.normalize_items([{"role": "assistant", "content": "first answer"}]),
    ]
    injected = inputs.normalize_items([{"role": "developer", "content": "sandbox ready"}])
    body = chat_request(
        req(input="second question", instructions="be brief"), history, injected, stream=False
    )
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "system", "content": "sandbox ready"},
        {"role": "user", "content": "second question"},
    ]
    CHAT_BODY.validate_python(body)


def test_outputs_the_input_opens_with_go_before_the_injected_items() -> None:
    """A chat hub wants a tool call answered by the very next messages: the outputs that answer
    the history's last calls come right after them, then the injected items, then the rest."""
    history = [
        user("look both up"),
        *inputs.normalize_items(
            [
                {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
                {"type": "custom_tool_call", "call_id": "c2", "name": "grep", "input": "x"},
            ]
        ),
    ]
    injected = inputs.normalize_items([{"role": "developer", "content": "sandbox ready"}])
    request = req(
        previous_response_id="resp_earlier",
        input=[
            {"type": "function_call_output", "call_id": "c1", "output": "found"},
            {"type": "custom_tool_call_output", "call_id": "c2", "output": "no match"},
            {"role": "user", "content": "and now?"},
        ],
    )
    body = chat_request(request, history, injected, stream=False)
    assert [m["role"] for m in body["messages"]] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "system",
        "user",
    ]
    assert [m.get("tool_call_id") for m in body["messages"][2:4]] == ["c1", "c2"]
    assert body["messages"][4]["content"] == "sandbox ready"
    CHAT_BODY.validate_python(body)
    # Without injected items the order is the input's, as always.
    plain = chat_request(request, history, [], stream=False)
    assert [m["role"] for m in plain["messages"]] == ["user", "assistant", "tool", "tool", "user"]


def test_no_instructions_means_no_system_message() -> None:
    body = chat_request(req(input="hi"), [], [], stream=False)
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_developer_and_system_roles_become_system_text() -> None:
    items = inputs.normalize_items(
        [
            {"role": "developer", "content": "d"},
            {
                "role": "system",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_text", "text": "b"},
                ],
            },
        ]
    )
    messages = chat_messages(items)
    assert messages == [{"role": "system", "content": "d"}, {"role": "system", "content": "a\nb"}]


def test_tool_call_round_trip_is_one_assistant_message() -> None:
    items = inputs.normalize_items(
        [
            {"role": "user", "content": "weather in Paris and Rome?"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": "hmm"}],
            },
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "weather",
                "arguments": '{"city":"Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "c2",
                "name": "weather",
                "arguments": '{"city":"Rome"}',
            },
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [
                    {"type": "input_text", "text": "rain"},
                    {"type": "input_text", "text": "12C"},
                ],
            },
        ]
    )
    messages = chat_messages(items)
    assert messages == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain\n12C"},
    ]


def test_assistant_text_followed_by_calls_is_one_message() -> None:
    items = inputs.normalize_items(
        [
            {"role": "assistant", "content": "Let me check."},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
        ]
    )
    messages = chat_messages(items)
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[0]["content"] == "Let me check."
    assert [c["id"] for c in messages[0]["tool_calls"]] == ["c1"]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c2"]


def test_reasoning_items_are_not_replayed() -> None:
    items = [
        reasoning_item("secret thoughts"),
        *inputs.normalize_items([{"role": "assistant", "content": "answer"}]),
    ]
    assert chat_messages(items) == [{"role": "assistant", "content": "answer"}]


def test_images_and_files_become_chat_parts() -> None:
    items = inputs.normalize_items(
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "high"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA"},
                    {"type": "input_image", "image_url": "https://x/z.png", "detail": "original"},
                    {
                        "type": "input_file",
                        "file_data": "data:application/pdf;base64,AA",
                        "filename": "a.pdf",
                    },
                ],
            },
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [
                    {"type": "input_text", "text": "chart:"},
                    {"type": "input_image", "image_url": "https://x/c.png"},
                ],
            },
        ]
    )
    messages = chat_messages(items)
    assert messages[0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "auto"}},
        {"type": "image_url", "image_url": {"url": "https://x/z.png"}},
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"},
        },
    ]
    assert messages[1]["content"] == [
        {"type": "text", "text": "chart:"},
        {"type": "image_url", "image_url": {"url": "https://x/c.png", "detail": "auto"}},
    ]


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_image", "file_id": "file_1"},
        {"type": "input_file", "file_url": "https://x/a.pdf"},
    ],
)
def test_content_a_chat_hub_cannot_fetch_is_a_clear_400(part: dict[str, Any]) -> None:
    request = req(input=[{"role": "user", "content": [part]}])
    with pytest.raises(errors.InvalidRequest) as info:
        chat_request(request, [], [], stream=False)
    assert info.value.code == "unsupported_value"
    assert info.value.status == 400


def test_assistant_refusal_and_custom_tool_calls() -> None:
    items = inputs.normalize_items(
        [
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
            {"role": "user", "content": "ok"},
            {"type": "custom_tool_call", "call_id": "c9", "name": "grep", "input": "TODO"},
            {"type": "custom_tool_call_output", "call_id": "c9", "output": "3 hits"},
        ]
    )
    messages = chat_messages(items)
    assert messages[0] == {"role": "assistant", "content": "", "refusal": "I can't."}
    assert messages[2]["tool_calls"][0]["function"] == {
        "name": "grep",
        "arguments": '{"input":"TODO"}',
    }
    assert messages[3] == {"role": "tool", "tool_call_id": "c9", "content": "3 hits"}


# --- chat_request: tools and parameters ----------------------------------------------------------

FUNCTION = {
    "type": "function",
    "name": "weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
TOOLS = [
    FUNCTION,
    {"type": "function", "name": "time"},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "shell"},
    {"type": "web_search"},
]


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


CODEX_NAMESPACE = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "spawn_agent",
            "description": "Spawn an agent",
            "parameters": {"type": "object", "properties": {"task": {"type": "string"}}},
            "strict": False,
        },
        {"type": "function", "name": "weather", "description": "Clashes with a top-level tool"},
        {"type": "custom", "name": "notes", "description": "Free-text notes"},
    ],
}
PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
}


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


def test_tools_not_run_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def count(kind: str) -> float:
        labels = {"type": kind}
        return REGISTRY.get_sample_value("respgw_router_tools_not_run_total", labels) or 0.0

    request = req(input="x", tools=[{"type": "web_search"}, FUNCTION, {"type": "shell"}])
    before = count("web_search"), count("shell")
    with caplog.at_level(logging.WARNING, logger="router_svc.dialects.chat"):
        for _ in range(2):
            body = chat_request(request, [], [], stream=False)
    assert [t["function"]["name"] for t in body["tools"]] == ["weather"]
    assert (count("web_search") - before[0], count("shell") - before[1]) == (2, 2)
    logged = [getattr(r, "tool_type", None) for r in caplog.records]
    assert logged.count("web_search") <= 1 and logged.count("shell") <= 1


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]},
        {"tools": [{"type": "mcp", "server_label": "s"}]},
        {"prompt": {"id": "pmpt_1"}},
    ],
)
def test_a_chat_request_refuses_what_a_chat_hub_cannot_do(body: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        chat_request(req(input="x", **body), [], [], stream=False)
    assert info.value.param in ("tools", "prompt")
    # A Responses hub gets them.
    sent = responses_request(req(input="x", **body), [], [], stream=False)
    assert {k: sent[k] for k in body} == body


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


def test_parameters_mapped_and_unusable_ones_dropped() -> None:
    request = req(
        input="x",
        instructions="sys",
        tools=[FUNCTION],
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.9,
        user="u-1",
        max_output_tokens=64,
        top_logprobs=3,
        text={
            "format": {
                "type": "json_schema",
                "name": "out",
                "schema": {"type": "object"},
                "strict": True,
            },
            "verbosity": "low",
        },
        reasoning={"effort": "low", "summary": "auto"},
        store=False,
        metadata={"a": "b"},
        truncation="auto",
        service_tier="flex",
        prompt_cache_key="k",
        safety_identifier="s",
        include=["message.output_text.logprobs"],
        max_tool_calls=2,
    )
    body = chat_request(request, [], [], stream=False)
    assert set(body) == {
        "model",
        "messages",
        "tools",
        "parallel_tool_calls",
        "temperature",
        "top_p",
        "user",
        "max_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "reasoning_effort",
    }
    assert body["parallel_tool_calls"] is False
    assert (body["temperature"], body["top_p"], body["user"]) == (0.2, 0.9, "u-1")
    assert body["max_tokens"] == 64
    assert (body["logprobs"], body["top_logprobs"]) == (True, 3)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }
    assert body["reasoning_effort"] == "low"
    CHAT_BODY.validate_python(body)


def test_hub_sampling_fields_reach_a_chat_hub() -> None:
    sampling = {
        "presence_penalty": 0.5,
        "frequency_penalty": 0,
        "seed": 42,
        "stop": ["END"],
        "top_k": 20,
        "min_p": 0.1,
        "repetition_penalty": 1.05,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    body = chat_request(
        req(input="x", top_logprobs=5, client_metadata={"a": "b"}, **sampling),
        [],
        [],
        stream=False,
    )
    assert {k: body[k] for k in sampling} == sampling
    assert body["top_logprobs"] == 5 and body["logprobs"] is True
    assert "client_metadata" not in body, "fields the gateway does not know reach no hub"
    CHAT_BODY.validate_python(body)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "name": "n", "schema": {}, "description": "d"},
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "description": "d"}},
        ),
    ],
)
def test_text_format_to_response_format(fmt: dict[str, Any], expected: Any) -> None:
    body = chat_request(req(input="x", text={"format": fmt}), [], [], stream=False)
    assert body.get("response_format") == expected


def test_top_logprobs_zero_asks_for_nothing() -> None:
    body = chat_request(req(input="x", top_logprobs=0), [], [], stream=False)
    assert "logprobs" not in body and "top_logprobs" not in body


def test_logprobs_requested_by_include_alone() -> None:
    body = chat_request(
        req(input="x", include=["message.output_text.logprobs"]), [], [], stream=False
    )
    assert body["logprobs"] is True and "top_logprobs" not in body


def test_streaming_asks_for_usage() -> None:
    body = chat_request(req(input="x", stream=True), [], [], stream=True)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    CHAT_STREAM_BODY.validate_python(body)
    assert "stream" not in chat_request(req(input="x"), [], [], stream=False)


def test_chat_request_leaves_request_and_history_untouched() -> None:
    request = req(
        input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
        tools=[FUNCTION],
    )
    history = [user("h")]
    before = copy.deepcopy((request.body, request.input_items, history))
    chat_request(request, history, [], stream=True)
    assert (request.body, request.input_items, history) == before


# --- back from chat ------------------------------------------------------------------------------


def completion(
    message: dict[str, Any], finish: str = "stop", usage: Any = None, **choice: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                **choice,
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


def back(
    message: dict[str, Any], request: validate.TurnRequest | None = None, **kwargs: Any
) -> dict[str, Any]:
    response = from_chat_completion(
        request or req(input="x"), completion(message, **kwargs), response_id="resp_1", created_at=7
    )
    checked(response)
    return response


def test_text_completion_becomes_a_message_item() -> None:
    response = back({"content": "Hello!"}, usage=USAGE)
    assert response["status"] == "completed"
    assert response["id"] == "resp_1" and response["created_at"] == 7
    [item] = response["output"]
    assert item["id"].startswith("msg_")
    assert item == {
        "id": item["id"],
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello!"}],
    }
    assert response["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 15,
    }


def test_tool_calls_become_function_call_items() -> None:
    response = back(
        {
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "time", "arguments": "{}"},
                },
            ],
        },
        finish="tool_calls",
    )
    message, first, second = response["output"]
    assert message["type"] == "message"
    assert first["id"].startswith("fc_") and first["id"] != second["id"]
    assert first == {
        "id": first["id"],
        "type": "function_call",
        "status": "completed",
        "arguments": '{"city":"Paris"}',
        "call_id": "call_a",
        "name": "weather",
    }
    assert (second["call_id"], second["name"]) == ("call_b", "time")


def test_calls_only_have_no_message_item() -> None:
    response = back(
        {
            "content": None,
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        finish="tool_calls",
    )
    assert [i["type"] for i in response["output"]] == ["function_call"]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_from_the_hub_comes_first(field: str) -> None:
    response = back({"content": "42", field: "Let me think."})
    reasoning, message = response["output"]
    assert reasoning["id"].startswith("rs_")
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert reasoning["summary"] == []
    assert message["type"] == "message"


def test_no_reasoning_item_without_reasoning() -> None:
    response = back({"content": "42", "reasoning_content": None})
    assert [i["type"] for i in response["output"]] == ["message"]


@pytest.mark.parametrize(
    ("finish", "status", "reason"),
    [
        ("length", "incomplete", "max_output_tokens"),
        ("content_filter", "incomplete", "content_filter"),
        ("stop", "completed", None),
    ],
)
def test_finish_reasons(finish: str, status: str, reason: str | None) -> None:
    response = back({"content": "cut sh"}, finish=finish)
    assert response["status"] == status
    assert response["incomplete_details"] == ({"reason": reason} if reason else None)
    assert response["output"][0]["status"] == ("incomplete" if reason else "completed")
    assert (response["completed_at"] is None) == (status != "completed")


def test_length_marks_only_the_last_item_incomplete() -> None:
    response = back(
        {
            "content": "a",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x'}}
            ],
        },
        finish="length",
    )
    assert [i["status"] for i in response["output"]] == ["completed", "incomplete"]


def test_refusal_becomes_a_refusal_part() -> None:
    response = back({"content": None, "refusal": "I can't help with that."})
    assert response["output"][0]["content"] == [
        {"type": "refusal", "refusal": "I can't help with that."}
    ]


def test_logprobs_only_when_included() -> None:
    logprobs = {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
            }
        ]
    }
    plain = back({"content": "Hi"}, logprobs=logprobs)
    assert plain["output"][0]["content"][0]["logprobs"] == []
    included = back(
        {"content": "Hi"},
        req(input="x", include=["message.output_text.logprobs"]),
        logprobs=logprobs,
    )
    assert included["output"][0]["content"][0]["logprobs"] == [
        {
            "token": "Hi",
            "bytes": [72, 105],
            "logprob": -0.1,
            "top_logprobs": [{"token": "Hi", "bytes": [72, 105], "logprob": -0.1}],
        }
    ]


def test_empty_completion_is_a_completed_empty_response() -> None:
    response = back({"content": ""})
    assert response["output"] == [] and response["status"] == "completed"


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"choices": []},
        {"choices": [None]},
        {"choices": [{"index": 0}]},
        {"choices": [{"message": "text"}]},
    ],
)
def test_nonsense_from_the_hub_is_an_upstream_error(bad: dict[str, Any]) -> None:
    with pytest.raises(errors.UpstreamError):
        from_chat_completion(req(input="x"), bad, response_id="r", created_at=1)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ("junk", None),
        (
            {"prompt_tokens": 3, "completion_tokens": 4},
            {
                "input_tokens": 3,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": 4,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 7,
            },
        ),
        (
            {
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "total_tokens": 9,
                "prompt_tokens_details": None,
            },
            {
                "input_tokens": 3,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": 4,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 9,
            },
        ),
    ],
)
def test_usage_from_chat(usage: Any, expected: Any) -> None:
    assert usage_from_chat(usage) == expected


def test_response_echoes_tool_resources() -> None:
    request = req(input="x", tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])
    response = from_chat_completion(
        request,
        completion({"content": "ok"}),
        response_id="r",
        created_at=1,
        tool_resources={"code_interpreter": "cntr_1"},
    )
    assert response["tools"] == [{"type": "code_interpreter", "container": "cntr_1"}]
    checked(response)
