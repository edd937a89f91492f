"""The responses dialect (router_svc.dialects.responses): the request and answer of a Responses hub."""

from __future__ import annotations

import pytest

from router_svc import errors, inputs
from router_svc.dialects.chat.messages import (
    OPENED_REASONING,
    chat_messages,
)
from router_svc.dialects.responses import from_responses_result, responses_request
from router_svc.response import reasoning_item
from tests.router_svc.dialects.support import FUNCTION, checked, req, user

# --- responses_request -------------------------------------------------------------------------


def test_responses_hub_is_used_statelessly() -> None:
    request = req(
        input="now",
        instructions="current",
        previous_response_id="resp_1",
        background=True,
        stream=True,
        stream_options={"include_obfuscation": False},
        temperature=0.3,
        metadata={"a": "b"},
        tools=[FUNCTION],
    )
    history = [
        user("before"),
        reasoning_item("no encrypted content"),
        {**reasoning_item("x"), "encrypted_content": "gAAA"},
    ]
    injected = inputs.normalize_items([{"role": "developer", "content": "inj"}])
    body = responses_request(request, history, injected, stream=True)
    assert body["store"] is False
    assert not {"previous_response_id", "conversation", "background"} & set(body)
    assert body["instructions"] == "current"
    assert body["model"] == "m"
    assert body["stream"] is True and body["stream_options"] == {"include_obfuscation": False}
    assert (body["temperature"], body["metadata"], body["tools"]) == (0.3, {"a": "b"}, [FUNCTION])
    assert [i.get("role") or i["type"] for i in body["input"]] == [
        "user",
        "reasoning",
        "developer",
        "user",
    ]
    assert body["input"][1]["encrypted_content"] == "gAAA"
    assert body["input"][-1] is request.input_items[0]

    plain = responses_request(
        req(input="x", stream=True, conversation="conv_1"), [], [], stream=False
    )
    assert "stream" not in plain and "conversation" not in plain and "instructions" not in plain


def test_responses_hub_gets_known_fields_only() -> None:
    body = responses_request(
        req(
            input="x",
            client_metadata={"installation_id": "i"},
            background_options={"completion_window": "soonest"},
            presence_penalty=0,
            frequency_penalty=0.3,
            seed=3,
            top_logprobs=2,
        ),
        [],
        [],
        stream=False,
    )
    assert "client_metadata" not in body, "fields the gateway does not know reach no hub"
    assert "presence_penalty" not in body, "a zero penalty changes nothing and is not sent"
    assert (body["frequency_penalty"], body["seed"], body["top_logprobs"]) == (0.3, 3, 2)
    assert "background_options" not in body, "the gateway runs background turns itself"


# --- back from a Responses hub -------------------------------------------------------------------


def test_responses_hub_result_gets_our_id_and_echo() -> None:
    upstream = {
        "id": "resp_upstream",
        "object": "response",
        "created_at": 99,
        "status": "incomplete",
        "completed_at": None,
        "incomplete_details": {"reason": "max_output_tokens"},
        "model": "gpt-upstream",
        "store": False,
        "output": [
            {
                "id": "rs_up",
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "s"}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "f",
                "arguments": "{}",
                "status": "completed",
            },
            {
                "id": "msg_up",
                "type": "message",
                "status": "incomplete",
                "role": "assistant",
                "content": [{"type": "output_text", "annotations": [], "text": "par"}],
            },
        ],
        "usage": {
            "input_tokens": 1,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 2,
            "output_tokens_details": {"reasoning_tokens": 1},
            "total_tokens": 3,
        },
    }
    request = req(input="x", previous_response_id="resp_prev", metadata={"a": "1"})
    response = from_responses_result(request, upstream, response_id="resp_ours", created_at=5)
    assert response["id"] == "resp_ours" and response["created_at"] == 5
    assert response["model"] == "m" and response["store"] is True
    assert response["previous_response_id"] == "resp_prev" and response["metadata"] == {"a": "1"}
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"] == upstream["usage"]
    assert [i["id"] for i in response["output"]][::2] == ["rs_up", "msg_up"]
    assert response["output"][1]["id"].startswith("fc_")
    checked(response)


def test_responses_hub_reports_the_strictness_it_applied() -> None:
    request = req(
        input="x",
        tools=[
            {"type": "function", "name": "normalized", "parameters": {"type": "object"}},
            {"type": "function", "name": "mine", "strict": False},
            {"type": "function", "name": "unreported"},
        ],
    )
    upstream = {
        "status": "completed",
        "output": [],
        "tools": [
            {"type": "function", "name": "normalized", "strict": True},
            {"type": "function", "name": "mine", "strict": True},
            {"type": "web_search"},
            "nonsense",
        ],
    }
    response = from_responses_result(request, upstream, response_id="r", created_at=1)
    assert [t["strict"] for t in response["tools"]] == [True, False, False]
    checked(response)


def test_responses_hub_without_output_is_an_upstream_error() -> None:
    with pytest.raises(errors.UpstreamError):
        from_responses_result(
            req(input="x"), {"status": "completed"}, response_id="r", created_at=1
        )


def test_opened_reasoning_goes_on_the_assistant_message_after_it() -> None:
    opened = {"type": OPENED_REASONING, "text": "think"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    messages = chat_messages(
        [
            {"type": "message", "role": "user", "content": "q"},
            opened,
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "r"},
            {**opened, "text": "lost"},  # a user message follows it: nowhere to put it
            {"type": "message", "role": "user", "content": "again"},
            {**opened, "text": "last"},
            {"type": "message", "role": "assistant", "content": "a"},
        ]
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user", "assistant"]
    assert messages[1]["reasoning_content"] == "think"
    assert messages[4]["reasoning_content"] == "last"
    assert all("lost" not in str(m) for m in messages)
    assert "reasoning_content" not in messages[0]
