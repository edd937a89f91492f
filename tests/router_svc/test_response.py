"""The Response object (router_svc.response): its echo of the request, its items and errors."""

from __future__ import annotations

from typing import Any

from openai._models import validate_type
from openai.types.responses import Response

from router_svc import validate
from router_svc.dialects.chat.request import (
    chat_request,
)
from router_svc.response import error_object, response_object


def req(**body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request({"model": "m", **body})


def checked(response: dict[str, Any]) -> Response:
    """The response validated strictly against the openai SDK's Response model."""
    assert "output_text" not in response  # computed by the SDK, never on the wire
    return validate_type(type_=Response, value=response)


# A function tool as the caller declares it.
FUNCTION = {
    "type": "function",
    "name": "weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


# --- response_object ---------------------------------------------------------------------------


def test_response_object_echoes_defaults_like_openai() -> None:
    response = response_object(
        req(input="x"),
        response_id="resp_1",
        created_at=100,
        status="completed",
        output=[],
        completed_at=101,
    )
    assert response == {
        "id": "resp_1",
        "object": "response",
        "created_at": 100,
        "status": "completed",
        "background": False,
        "completed_at": 101,
        "conversation": None,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "model": "m",
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt": None,
        "prompt_cache_key": None,
        "prompt_cache_retention": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
        "access_programs": None,
        "image": None,
        "moderation": None,
        "prompt_cache_options": None,
        "prompt_cache_diagnostics": None,
    }
    checked(response)


def test_response_object_echoes_every_parameter() -> None:
    request = req(
        input="x",
        instructions="sys",
        conversation={"id": "conv_9"},
        store=True,
        background=True,
        metadata={"k": "v"},
        max_output_tokens=100,
        max_tool_calls=4,
        temperature=0.5,
        top_p=0.7,
        top_logprobs=2,
        parallel_tool_calls=False,
        tools=[
            FUNCTION,
            {"type": "code_interpreter", "container": {"type": "auto"}},
            {"type": "shell"},
        ],
        tool_choice={"type": "function", "name": "weather"},
        text={"format": {"type": "json_object"}},
        reasoning={"effort": "high"},
        truncation="auto",
        user="u",
        safety_identifier="sid",
        prompt_cache_key="pck",
        prompt_cache_retention="24h",
        service_tier="priority",
        prompt={"id": "pmpt_1"},
    )
    response = response_object(
        request,
        response_id="resp_2",
        created_at=5,
        status="in_progress",
        output=[],
        tool_resources={"code_interpreter": "cntr_abc", "shell": "cntr_sh"},
    )
    expected = {
        "background": True,
        "completed_at": None,
        "conversation": {"id": "conv_9"},
        "instructions": "sys",
        "metadata": {"k": "v"},
        "max_output_tokens": 100,
        "max_tool_calls": 4,
        "temperature": 0.5,
        "top_p": 0.7,
        "top_logprobs": 2,
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "name": "weather"},
        "text": {"format": {"type": "json_object"}, "verbosity": "medium"},
        "reasoning": {"effort": "high", "summary": None},
        "truncation": "auto",
        "user": "u",
        "safety_identifier": "sid",
        "prompt_cache_key": "pck",
        "prompt_cache_retention": "24h",
        "service_tier": "priority",
        "prompt": {"id": "pmpt_1"},
        "store": True,
    }
    assert {k: response[k] for k in expected} == expected
    assert response["tools"][0] == FUNCTION
    assert response["tools"][1] == {"type": "code_interpreter", "container": "cntr_abc"}
    assert response["tools"][2] == {
        "type": "shell",
        "environment": {"type": "container_reference", "container_id": "cntr_sh"},
    }
    assert request.tools[1]["container"] == {"type": "auto"}, "the request's tools are not changed"
    parsed = checked(response)
    assert parsed.conversation is not None and parsed.conversation.id == "conv_9"


def test_response_object_echoes_penalties() -> None:
    response = response_object(
        req(input="x", presence_penalty=0.5, frequency_penalty=-1),
        response_id="r",
        created_at=1,
        status="completed",
        output=[],
    )
    assert (response["presence_penalty"], response["frequency_penalty"]) == (0.5, -1)
    checked(response)


def test_echoed_function_tools_always_carry_strict_description_and_parameters() -> None:
    request = req(
        input="x",
        tools=[
            {"type": "function", "name": "bare"},
            {"type": "function", "name": "null_strict", "strict": None, "parameters": None},
            {"type": "function", "name": "loose", "strict": False, "description": "d"},
            FUNCTION,
            {"type": "web_search"},
        ],
    )
    response = response_object(
        request, response_id="r", created_at=1, status="completed", output=[]
    )
    assert response["tools"] == [
        {
            "type": "function",
            "name": "bare",
            "description": None,
            "parameters": None,
            "strict": False,
        },
        {
            "type": "function",
            "name": "null_strict",
            "strict": False,
            "parameters": None,
            "description": None,
        },
        {
            "type": "function",
            "name": "loose",
            "strict": False,
            "description": "d",
            "parameters": None,
        },
        FUNCTION,
        {"type": "web_search"},
    ]
    assert request.tools[0] == {"type": "function", "name": "bare"}, "the request is not changed"
    checked(response)
    # A chat hub gets no strict it was not given: the function is called best-effort.
    chat = chat_request(request, [], [], stream=False)
    assert [t["function"].get("strict") for t in chat["tools"]] == [None, None, False, True]


def test_platform_only_fields_echo_in_the_response_objects_shapes() -> None:
    request = req(
        input="x",
        access_programs={"cyber": "daybreak_blue"},
        image={"context_compression": "auto"},
        moderation={"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}},
        prompt_cache_options={"ttl": "12h", "comparison_response_id": "resp_0", "prewarm": False},
        background_options={"completion_window": "soonest"},
        context_management=[{"type": "compaction", "compact_threshold": 1000}],
        stream_options={"include_obfuscation": False},
        service_tier="fast",
    )
    response = response_object(
        request, response_id="r", created_at=1, status="completed", output=[]
    )
    assert response["access_programs"] == {"cyber": "daybreak_blue"}
    assert response["image"] == {"context_compression": "disabled"}
    assert response["moderation"] is None
    assert response["prompt_cache_options"] == {
        "mode": "implicit",
        "ttl": "12h",
        "comparison_response_id": "resp_0",
    }
    assert response["prompt_cache_diagnostics"] == {"type": "unavailable"}
    assert response["service_tier"] == "priority"
    assert not {"background_options", "context_management", "stream_options"} & set(response)
    checked(response)

    explicit = response_object(
        req(input="x", access_programs={}, image={"context_compression": "enabled"}),
        response_id="r",
        created_at=1,
        status="completed",
        output=[],
    )
    assert explicit["access_programs"] is None, "null is OpenAI's implicit Standard program"
    assert explicit["image"] == {"context_compression": "enabled"}
    checked(explicit)


def test_completed_at_defaults_to_now_only_when_completed() -> None:
    request = req(input="x")
    done = response_object(request, response_id="r", created_at=1, status="completed", output=[])
    assert isinstance(done["completed_at"], int) and done["completed_at"] > 1
    failed = response_object(
        request, response_id="r", created_at=1, status="failed", output=[], completed_at=9
    )
    assert failed["completed_at"] is None


def test_error_object_keeps_openai_codes_only() -> None:
    assert error_object("rate_limit_exceeded", "slow") == {
        "code": "rate_limit_exceeded",
        "message": "slow",
    }
    assert error_object("upstream_error", "hub died") == {
        "code": "server_error",
        "message": "hub died",
    }
