"""Chat messages (router_svc.dialects.chat.messages): Responses items as Chat Completions messages."""

from __future__ import annotations

from typing import Any

import pytest

from router_svc import errors, inputs
from router_svc.dialects.chat.messages import chat_messages
from router_svc.dialects.chat.request import chat_request
from router_svc.response import reasoning_item
from tests.router_svc.dialects.chat.support import (
    CHAT_BODY,
    req,
    user,
)

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
