"""The chat answer (router_svc.dialects.chat.result): a chat completion as the Response object."""

from __future__ import annotations

from typing import Any

import pytest

from router_svc import errors
from router_svc.dialects.chat.result import from_chat_completion, usage_from_chat
from tests.router_svc.dialects.chat.support import (
    USAGE,
    back,
    checked,
    completion,
    req,
)

# --- back from chat ------------------------------------------------------------------------------


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
