"""The dialect seam (router_svc.dialects): one per --hub-api value, chosen once, each whole."""

from __future__ import annotations

from typing import Any

import pytest
from openai._models import validate_type
from openai.types.chat import completion_create_params
from openai.types.responses import Response, response_create_params
from pydantic import TypeAdapter

from router_svc import dialects, errors, events, inputs, validate
from router_svc.dialects import chat, responses

CHAT_BODY = TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
RESPONSES_BODY = TypeAdapter(response_create_params.ResponseCreateParamsNonStreaming)


def req(**body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request({"model": "m", "input": "hi", **body})


def test_each_setting_value_names_its_dialect_and_any_other_is_refused() -> None:
    assert set(dialects.DIALECTS) == {"chat", "responses"}
    for name in dialects.DIALECTS:
        assert dialects.dialect_for(name).name == name
    assert isinstance(dialects.dialect_for("chat"), chat.ChatDialect)
    assert isinstance(dialects.dialect_for("responses"), responses.ResponsesDialect)
    with pytest.raises(ValueError, match=r"--hub-api must be chat or responses, got 'x'"):
        dialects.dialect_for("x")


def test_what_the_gateway_does_for_the_hub_is_the_chat_dialects_only() -> None:
    chat_hub, responses_hub = dialects.dialect_for("chat"), dialects.dialect_for("responses")
    assert (chat_hub.tool_loop, chat_hub.seals_reasoning, chat_hub.own_compaction) == (
        True,
        True,
        False,
    )
    assert (
        responses_hub.tool_loop,
        responses_hub.seals_reasoning,
        responses_hub.own_compaction,
    ) == (False, False, True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
        ({"tools": [{"type": "local_shell"}]}, "tools"),
    ],
)
def test_each_dialect_refuses_what_its_hub_cannot_do(body: dict[str, Any], param: str) -> None:
    request = req(**body)  # well-formed: validation knows no hub
    with pytest.raises(errors.InvalidRequest) as info:
        dialects.dialect_for("chat").refuse(request)
    assert (info.value.param, info.value.status) == (param, 400)
    dialects.dialect_for("responses").refuse(request)  # the hub itself decides
    for name in dialects.DIALECTS:
        dialects.dialect_for(name).refuse(req(tools=[{"type": "function", "name": "f"}]))


@pytest.mark.parametrize("stream", [False, True])
def test_each_dialect_builds_the_request_of_its_api(stream: bool) -> None:
    request = req(instructions="be brief", temperature=0.5)
    history = [inputs.user_message("before")]
    chat_hub = dialects.dialect_for("chat")
    body = chat_hub.request(request, history, [], stream=stream)
    assert chat_hub.path == "/chat/completions"
    assert body == chat.chat_request(request, history, [], stream=stream)
    assert [m["content"] for m in body["messages"]] == ["be brief", "before", "hi"]
    if not stream:
        CHAT_BODY.validate_python(body)
    responses_hub = dialects.dialect_for("responses")
    body = responses_hub.request(request, history, [], stream=stream)
    assert responses_hub.path == "/responses"
    assert body == responses.responses_request(request, history, [], stream=stream)
    assert body["store"] is False and body["input"][0] == history[0]
    if not stream:
        RESPONSES_BODY.validate_python(body)


def test_each_dialect_reads_its_answer_into_the_one_response_object() -> None:
    request = req()
    completion = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hey"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    answered = dialects.dialect_for("chat").result(
        request, completion, response_id="resp_1", created_at=1, tool_resources={}
    )
    validate_type(type_=Response, value=answered)
    assert answered["output"][0]["content"][0]["text"] == "hey"
    upstream = {
        "id": "resp_hub",
        "object": "response",
        "status": "completed",
        "output": [answered["output"][0]],
        "usage": answered["usage"],
    }
    passed = dialects.dialect_for("responses").result(
        request, upstream, response_id="resp_2", created_at=1, tool_resources={}
    )
    validate_type(type_=Response, value=passed)
    assert passed["id"] == "resp_2" and passed["output"] == upstream["output"]
    assert passed["usage"] == answered["usage"]


def test_each_dialects_translator_opens_the_stream_with_the_shared_events() -> None:
    sealed: list[str] = []

    def seal(text: str) -> str:
        sealed.append(text)
        return "sealed"

    for name in dialects.DIALECTS:
        translator = dialects.dialect_for(name).translator(
            req(), response_id="resp_1", created_at=1, tool_resources={}, seal_reasoning=seal
        )
        assert isinstance(translator, events.Translator)
        opened = translator.start()
        assert [e["type"] for e in opened] == ["response.created", "response.in_progress"]
        assert [e["sequence_number"] for e in opened] == [0, 1]
    chat_translator = dialects.dialect_for("chat").translator(
        req(), response_id="resp_1", created_at=1, tool_resources={}, seal_reasoning=seal
    )
    assert isinstance(chat_translator, chat.ChatStreamTranslator)
    assert chat_translator.seal_reasoning is seal


def test_each_dialect_asks_for_a_summary_and_reads_it() -> None:
    items = [inputs.user_message("a long history")]
    chat_hub = dialects.dialect_for("chat")
    body = chat_hub.summary_request("m", items, "be brief", "Summarize.")
    CHAT_BODY.validate_python(body)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "user"]
    assert body["messages"][-1]["content"] == "Summarize."
    answer = {
        "choices": [{"message": {"role": "assistant", "content": "short"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
    text, usage = chat_hub.summary(answer)
    assert text == "short" and usage is not None and usage["total_tokens"] == 6
    assert chat_hub.summary({"choices": []}) == (None, None)

    responses_hub = dialects.dialect_for("responses")
    body = responses_hub.summary_request("m", items, None, "Summarize.")
    RESPONSES_BODY.validate_python(body)
    assert body["store"] is False and "instructions" not in body
    assert body["input"][0] == items[0] and len(body["input"]) == 2
    assert body["input"][1]["role"] == "user"
    assert body["input"][1]["content"] == [{"type": "input_text", "text": "Summarize."}]
    output = [{"type": "message", "content": [{"type": "output_text", "text": "short"}]}]
    assert responses_hub.summary({"output": output, "usage": {"total_tokens": 2}}) == (
        "short",
        {"total_tokens": 2},
    )
    assert responses_hub.summary({"output": [], "usage": None}) == ("", None)
