"""The type checks of a hub's answer: what passes (every shape the spec and common hubs send)
and the path each wrong type is reported at."""

from __future__ import annotations

from typing import Any

import pytest

from router_svc import errors, hub_shape


@pytest.mark.parametrize(
    "completion",
    [
        {"choices": []},
        {"choices": [{"message": {"content": None, "tool_calls": None}}], "usage": None},
        {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "x"}]}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "reasoning_content": "think",
                        "refusal": None,
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
                    },
                    "logprobs": {"content": None},
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "total_tokens": 3,
                "prompt_tokens_details": None,
                "completion_tokens_details": {"reasoning_tokens": 1},
            },
        },
    ],
)
def test_well_formed_completions_pass(completion: dict[str, Any]) -> None:
    hub_shape.check_completion(completion)


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [], "usage": {"prompt_tokens": 1}},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": None}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]},
        {"object": "chat.completion.chunk"},
    ],
)
def test_well_formed_chunks_pass(chunk: dict[str, Any]) -> None:
    hub_shape.check_chunk(chunk)


@pytest.mark.parametrize(
    ("chunk", "path"),
    [
        ({"choices": {}}, "'choices'"),
        ({"choices": [{"delta": {"content": 1}}]}, "'choices[0].delta.content'"),
        ({"choices": [{}, {"index": "1"}]}, "'choices[1].index'"),
        (
            {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": {}}}]}}]},
            "'choices[0].delta.tool_calls[0].function.arguments'",
        ),
        ({"usage": {"prompt_tokens": "3"}}, "'usage.prompt_tokens'"),
        ({"usage": {"completion_tokens_details": []}}, "'usage.completion_tokens_details'"),
    ],
)
def test_a_wrong_type_names_its_path(chunk: dict[str, Any], path: str) -> None:
    with pytest.raises(errors.UpstreamError) as raised:
        hub_shape.check_chunk(chunk)
    assert path in raised.value.message
    assert (raised.value.status, raised.value.code) == (502, "upstream_malformed_response")
