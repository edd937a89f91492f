"""The chat request (router_svc.dialects.chat.request): its parameters, and what it refuses."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from router_svc import errors, validate
from router_svc.dialects.chat import ChatDialect
from router_svc.dialects.chat.request import chat_request, check_chat_hub
from router_svc.dialects.responses import ResponsesDialect, responses_request
from tests.router_svc.dialects.chat.support import (
    CHAT_BODY,
    CHAT_STREAM_BODY,
    FUNCTION,
    req,
    user,
)


def test_tools_not_run_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def count(kind: str) -> float:
        labels = {"type": kind}
        return REGISTRY.get_sample_value("respgw_router_tools_not_run_total", labels) or 0.0

    hosted = {"type": "shell", "environment": {"type": "container_auto"}}
    request = req(input="x", tools=[{"type": "web_search"}, FUNCTION, hosted])
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


# --- what a chat hub cannot do, refused where the turn is parsed (ChatDialect.refuse) ------------


def parse(body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request(body)


def rejected(body: Any) -> errors.InvalidRequest:
    """The error a chat hub's dialect refuses the well-formed request with."""
    with pytest.raises(errors.InvalidRequest) as info:
        ChatDialect().refuse(parse(body))
    return info.value


NAMESPACE = {
    "type": "namespace",
    "name": "crm",
    "description": "The CRM",
    "tools": [
        {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
        {"type": "custom", "name": "note"},
    ],
}


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        (
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            "Hosted tool 'file_search' is not supported with m: this server's model server "
            "speaks Chat Completions, and the gateway does not run 'file_search' itself.",
        ),
        (
            {"type": "mcp", "server_label": "s", "server_url": "http://127.0.0.1:1"},
            "Hosted tool 'mcp' is not supported with m:",
        ),
        ({"type": "image_generation"}, "Hosted tool 'image_generation' is not supported with m:"),
        ({"type": "tool_search"}, "Hosted tool 'tool_search' is not supported with m:"),
        ({"type": "local_shell"}, "Tool 'local_shell' is not supported with m:"),
        ({"type": "computer_use_preview"}, "Tool 'computer_use_preview' is not supported"),
        ({"type": "apply_patch"}, "Tool 'apply_patch' is not supported with m:"),
    ],
)
def test_tools_nobody_would_run_are_refused_for_a_chat_hub(
    tool: dict[str, Any], message: str
) -> None:
    body = {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}, tool]}
    error = rejected(body)
    assert error.message.startswith(message)
    assert (error.param, error.code, error.status) == ("tools", None, 400)
    # A Responses hub runs them (OpenAI's own); without a hub the request is well-formed.
    ResponsesDialect().refuse(parse(body))
    with pytest.raises(errors.InvalidRequest):
        check_chat_hub(parse(body))


def test_web_search_and_stateful_tools_are_accepted_but_not_run_on_a_chat_hub() -> None:
    tools = [
        {"type": "web_search", "external_web_access": False},
        NAMESPACE,
        {"type": "custom", "name": "c"},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "web_search_preview"},
        {"type": "web_search"},
        {"type": "shell", "environment": {"type": "container_auto"}},
    ]
    req = parse({"model": "m", "input": "x", "tools": tools})
    ChatDialect().refuse(req)
    assert check_chat_hub(req) == [
        "web_search",
        "code_interpreter",
        "web_search_preview",
        "shell",
    ]
    # A local shell (environment local, or none) is the tool loop's to offer, always.
    for local in ({"type": "shell"}, {"type": "shell", "environment": {"type": "local"}}):
        assert check_chat_hub(parse({"model": "m", "input": "x", "tools": [local]})) == []


@pytest.mark.parametrize(
    ("options", "param", "code"),
    [
        ({"memory_limit": "2g"}, "memory_limit", "invalid_value"),
        ({"file_ids": ["file-1"]}, "file_ids", "unsupported_parameter"),
        (
            {"network_policy": {"type": "allowlist", "allowed_domains": ["pypi.org"]}},
            "network_policy",
            "unsupported_value",
        ),
        (
            {"skills": [{"type": "skill_reference", "skill_id": "s"}]},
            "skills",
            "unsupported_parameter",
        ),
    ],
)
def test_an_auto_containers_options_the_sessions_cannot_honour_are_refused(
    options: dict[str, Any], param: str, code: str
) -> None:
    ci = {"type": "code_interpreter", "container": {"type": "auto", **options}}
    shell = {"type": "shell", "environment": {"type": "container_auto", **options}}
    for tool, where in ((ci, "container"), (shell, "environment")):
        body = {"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}, tool]}
        error = rejected(body)
        assert (error.param, error.code, error.status) == (f"tools[1].{where}.{param}", code, 400)
        # A Responses hub (OpenAI's) has its own containers.
        ResponsesDialect().refuse(parse(body))
    # What the sessions honour: a memory_limit, no network, no files, no skills.
    honoured = {"memory_limit": "4g", "network_policy": {"type": "disabled"}, "file_ids": []}
    ChatDialect().refuse(
        parse(
            {
                "model": "m",
                "input": "x",
                "tools": [
                    {"type": "code_interpreter", "container": {"type": "auto", **honoured}},
                    {"type": "shell", "environment": {"type": "container_auto", **honoured}},
                ],
            }
        )
    )


def test_prompt_templates_are_refused_for_a_chat_hub() -> None:
    body = {"model": "m", "prompt": {"id": "pmpt_1", "variables": {"city": "Paris"}}}
    error = rejected(body)
    assert (error.param, error.code) == ("prompt", "unsupported_parameter")
    assert error.message.startswith(
        "Prompt templates are not supported by this server: prompt 'pmpt_1' cannot be resolved"
    )
    # A Responses hub (OpenAI's) resolves it.
    ResponsesDialect().refuse(parse(body))
    assert parse(body).body["prompt"] == body["prompt"]
