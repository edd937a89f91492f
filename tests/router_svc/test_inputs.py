"""Input items (router_svc/inputs.py): every form OpenAI accepts normalized into the stored item,
OpenAI's codes, params and messages for the malformed ones, and one table row per item type."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from openai._models import validate_type
from openai.types.responses.response_item import ResponseItem

from router_svc import errors, inputs, validate, vocabulary


def parse(body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request(body)


def rejected(body: Any) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as info:
        validate.parse_turn_request(body)
    return info.value


def items(raw: Any) -> list[dict[str, Any]]:
    # Continuing a response: a call output's call may be in its history.
    return parse({"model": "m", "input": raw, "previous_response_id": "resp_1"}).input_items


def test_every_input_message_form_normalizes() -> None:
    out = items(
        [
            {"role": "user", "content": "a"},
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "b"}],
            },
            {"role": "system", "content": "c"},
            {"role": "assistant", "content": "d", "phase": "final_answer"},
            {
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "e", "annotations": []},
                    {"type": "refusal", "refusal": "no"},
                ],
                "id": "msg_keep",
                "status": "incomplete",
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                    {"type": "input_image", "file_id": "file_1", "detail": "low"},
                    {
                        "type": "input_file",
                        "file_data": "data:application/pdf;base64,AA",
                        "filename": "a.pdf",
                    },
                ],
            },
        ]
    )
    assert [i["role"] for i in out] == [
        "user",
        "developer",
        "system",
        "assistant",
        "assistant",
        "user",
    ]
    assert all(i["type"] == "message" and i["id"].startswith("msg_") for i in out)
    assert out[0]["content"] == [{"type": "input_text", "text": "a"}]
    assert out[0]["status"] == "completed"
    assert out[3]["content"] == [
        {"type": "output_text", "annotations": [], "logprobs": [], "text": "d"}
    ]
    assert out[3]["phase"] == "final_answer"
    assert out[4]["id"] == "msg_keep"
    assert out[4]["status"] == "incomplete"
    assert out[4]["content"][1] == {"type": "refusal", "refusal": "no"}
    images = out[5]["content"]
    assert images[0] == {
        "type": "input_image",
        "detail": "auto",
        "file_id": None,
        "image_url": "data:image/png;base64,AAAA",
    }
    assert images[1] == {
        "type": "input_image",
        "detail": "low",
        "file_id": "file_1",
        "image_url": None,
    }
    assert images[2]["filename"] == "a.pdf"
    # What is stored is what the Responses API serves from input_items.
    for item in out:
        validate_type(type_=ResponseItem, value=item)  # type: ignore[arg-type]


def test_tool_items_normalize_with_ids_and_status() -> None:
    out = items(
        [
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "42"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [
                    {"type": "input_text", "text": "a"},
                    {"type": "input_image", "image_url": "http://x/y.png"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}]},
            {"type": "custom_tool_call", "call_id": "call_3", "name": "c", "input": "raw"},
            {"type": "custom_tool_call_output", "call_id": "call_3", "output": "ok"},
            {
                "type": "web_search_call",
                "status": "completed",
                "action": {"type": "search", "query": "q"},
            },
        ]
    )
    prefixes = [i["id"].split("_")[0] for i in out]
    assert prefixes == ["fc", "fco", "fco", "rs", "ctc", "ctco", "ws"]
    assert out[0] == {
        "id": out[0]["id"],
        "type": "function_call",
        "status": "completed",
        "arguments": "{}",
        "call_id": "call_1",
        "name": "f",
    }
    assert out[1]["status"] == "completed" and out[1]["output"] == "42"
    assert out[2]["output"][1]["detail"] == "auto"
    assert out[3] == {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "s"}],
    }
    assert out[6]["action"] == {"type": "search", "query": "q"}
    for item in out:
        validate_type(type_=ResponseItem, value=item)  # type: ignore[arg-type]


def test_caller_ids_are_kept_and_new_ids_unique() -> None:
    out = items(
        [{"role": "user", "content": "x"}] * 3
        + [{"type": "function_call", "id": "fc_mine", "call_id": "c", "name": "f", "arguments": ""}]
    )
    assert len({i["id"] for i in out}) == 4
    assert out[3]["id"] == "fc_mine"


def test_normalized_items_do_not_alias_the_body() -> None:
    body = {
        "model": "m",
        "input": [
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "output_text",
                        "text": "a",
                        "annotations": [{"type": "file_path", "file_id": "f", "index": 0}],
                    }
                ],
            },
            {
                "type": "web_search_call",
                "id": "ws_1",
                "status": "completed",
                "action": {"type": "search"},
            },
        ],
    }
    original = copy.deepcopy(body)
    req = parse(body)
    req.input_items[0]["content"][0]["annotations"].append("x")
    req.input_items[1]["action"]["type"] = "changed"
    assert body == original


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (5, "invalid_type", "input"),
        ({"role": "user", "content": "x"}, "invalid_type", "input"),
        ([5], "invalid_type", "input[0]"),
        ([{}], "missing_required_parameter", "input[0].type"),
        ([{"type": "message", "content": "x"}], "missing_required_parameter", "input[0].role"),
        ([{"role": "tool", "content": "x"}], "invalid_value", "input[0].role"),
        ([{"role": "user"}], "missing_required_parameter", "input[0].content"),
        ([{"role": "user", "content": 3}], "invalid_type", "input[0].content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "unknown_parameter", "input[0].name"),
        ([{"role": "user", "content": "x", "status": "done"}], "invalid_value", "input[0].status"),
        (
            [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}],
            "invalid_value",
            "input[0].content[0].type",
        ),
        (
            [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}],
            "invalid_value",
            "input[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "input_text"}]}],
            "missing_required_parameter",
            "input[0].content[0].text",
        ),
        (
            [{"role": "user", "content": [{"type": "input_text", "text": 1}]}],
            "invalid_type",
            "input[0].content[0].text",
        ),
        (
            [{"role": "user", "content": [{"type": "input_text", "text": "x", "x": 1}]}],
            "unknown_parameter",
            "input[0].content[0].x",
        ),
        (
            [{"role": "user", "content": [{"text": "x"}]}],
            "missing_required_parameter",
            "input[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "input_image"}]}],
            "missing_required_parameter",
            "input[0].content[0]",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "u", "detail": "max"}],
                }
            ],
            "invalid_value",
            "input[0].content[0].detail",
        ),
        (
            [{"role": "user", "content": [{"type": "input_file", "filename": "a"}]}],
            "missing_required_parameter",
            "input[0].content[0]",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "A", "format": "wav"}}
                    ],
                }
            ],
            "invalid_value",
            "input[0].content[0].type",
        ),
        (
            [{"role": "assistant", "content": [{"type": "refusal"}]}],
            "missing_required_parameter",
            "input[0].content[0].refusal",
        ),
        (
            [{"role": "assistant", "content": "x", "phase": "draft"}],
            "invalid_value",
            "input[0].phase",
        ),
        ([{"role": "user", "content": "x", "id": ""}], "empty_string", "input[0].id"),
        ([{"role": "user", "content": "x", "id": 7}], "invalid_type", "input[0].id"),
        (
            [{"type": "function_call", "name": "f", "arguments": "{}"}],
            "missing_required_parameter",
            "input[0].call_id",
        ),
        (
            [{"type": "function_call", "call_id": "c", "arguments": "{}"}],
            "missing_required_parameter",
            "input[0].name",
        ),
        (
            [{"type": "function_call", "call_id": "c", "name": "f"}],
            "missing_required_parameter",
            "input[0].arguments",
        ),
        (
            [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}],
            "invalid_type",
            "input[0].arguments",
        ),
        (
            [{"type": "function_call_output", "output": "x"}],
            "missing_required_parameter",
            "input[0].call_id",
        ),
        (
            [{"type": "function_call_output", "call_id": "c"}],
            "missing_required_parameter",
            "input[0].output",
        ),
        (
            [{"type": "function_call_output", "call_id": "c", "output": 5}],
            "invalid_type",
            "input[0].output",
        ),
        (
            [
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "refusal", "refusal": "x"}],
                }
            ],
            "invalid_value",
            "input[0].output[0].type",
        ),
        ([{"type": "reasoning", "summary": []}], "missing_required_parameter", "input[0].id"),
        ([{"type": "reasoning", "id": "rs_1"}], "missing_required_parameter", "input[0].summary"),
        (
            [{"type": "reasoning", "id": "rs_1", "summary": [{"type": "text", "text": "x"}]}],
            "invalid_value",
            "input[0].summary[0].type",
        ),
        ([{"type": "teleport"}], "invalid_value", "input[0].type"),
        (
            [
                {"role": "user", "content": "ok"},
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "ok"}, {"type": "input_text"}],
                },
            ],
            "missing_required_parameter",
            "input[1].content[1].text",
        ),
    ],
)
def test_invalid_input_items(raw: Any, code: str, param: str) -> None:
    error = rejected({"model": "m", "input": raw})
    assert (error.code, error.param) == (code, param)
    if code != "invalid_value":  # OpenAI's invalid_value messages quote the value, not the path
        assert f"'{param}'" in error.message


@pytest.mark.parametrize(
    "ref",
    [{"type": "item_reference", "id": "msg_1"}, {"id": "msg_1"}, {"type": None, "id": "msg_1"}],
)
def test_item_references_are_kept_for_the_turn_to_resolve(ref: Any) -> None:
    """The typed form and OpenAI's bare form (only an id) are both references, marked by
    position; a function call output after one is checked once it is resolved."""
    raw = [
        {"role": "user", "content": "hi"},
        ref,
        {"type": "function_call_output", "call_id": "call_9", "output": "ok"},
    ]
    req = parse({"model": "m", "input": raw})
    assert req.input_items[1] == {"type": "item_reference", "id": "msg_1"}
    assert req.references == (1,)
    assert req.unstored == () and req.stored_inputs() is req.input_items
    assert parse({"model": "m", "input": "hi"}).references == ()


@pytest.mark.parametrize(
    ("ref", "code", "param"),
    [
        ({"type": "item_reference"}, "missing_required_parameter", "input[0].id"),
        ({"type": "item_reference", "id": ""}, "empty_string", "input[0].id"),
        ({"type": "item_reference", "id": 7}, "invalid_type", "input[0].id"),
        ({"type": "item_reference", "id": "msg_1", "role": "user"}, "unknown_parameter", "input[0].role"),
        ({"type": "item_reference", "id": "msg_1", "content": "x"}, "unknown_parameter", "input[0].content"),
    ],
)  # fmt: skip
def test_malformed_item_references(ref: Any, code: str, param: str) -> None:
    error = rejected({"model": "m", "input": [ref]})
    assert (error.code, error.param) == (code, param)


def test_item_references_are_refused_where_nothing_resolves_them() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        inputs.normalize_items([{"id": "msg_1"}], param="items")
    assert (info.value.code, info.value.param) == ("unsupported_value", "items[0]")
    assert "msg_1" in info.value.message


def test_normalize_items_for_conversations_uses_its_param() -> None:
    out = inputs.normalize_items([{"role": "user", "content": "x"}], param="items")
    assert out[0]["role"] == "user"
    with pytest.raises(errors.InvalidRequest) as info:
        inputs.normalize_items([{"role": "user"}], param="items")
    assert info.value.param == "items[0].content"


def test_call_items_keep_the_fields_the_gateway_does_not_interpret() -> None:
    """Items read back from input_items carry created_by (and calls caller and async): sent
    again, they are stored as given, not trimmed and not refused."""
    extra = {"caller": {"type": "direct"}, "created_by": "resp_elsewhere"}
    items = inputs.normalize_items(
        [
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "f",
                "arguments": "{}",
                "async": True,
            }
            | extra
            | {"namespace": "ns"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"} | extra,
            {"type": "custom_tool_call", "call_id": "c2", "name": "g", "input": "x", "async": False}
            | extra,
            {"type": "custom_tool_call_output", "call_id": "c2", "output": "ok"} | extra,
        ]
    )
    for item in items:
        assert item["caller"] == {"type": "direct"}
        assert item["created_by"] == "resp_elsewhere"
    assert items[0]["async"] is True
    assert items[0]["namespace"] == "ns"
    assert items[2]["async"] is False


def test_every_item_type_has_a_row() -> None:
    assert set(inputs.ITEMS) == set(vocabulary.ITEM_TYPES)
    for kind, (keys, _) in inputs.ITEMS.items():
        assert keys is None or {"type", "id"} <= set(keys), kind


AS_GIVEN = [kind for kind, (keys, _) in inputs.ITEMS.items() if keys is None]


@pytest.mark.parametrize("kind", AS_GIVEN)
def test_items_of_built_in_tools_are_stored_as_given_with_an_id(kind: str) -> None:
    raw = {"type": kind, "status": "anything", "action": {"nested": [1, {"x": None}]}}
    [item] = inputs.normalize_items([raw])
    assert item == {"id": item["id"], **raw}
    assert item["id"].startswith(vocabulary.ID_PREFIXES[kind] + "_")
    assert next(iter(item)) == "id"
    item["action"]["nested"].append(2)
    assert raw["action"] == {"nested": [1, {"x": None}]}, "the stored item is a copy"
    [kept] = inputs.normalize_items([{**raw, "id": "mine"}])
    assert kept["id"] == "mine"


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        (5, "invalid_type", "Invalid type for 'input[0].type': expected a string, but got an "
         "integer instead."),
        (["message"], "invalid_type", "expected a string, but got an array instead."),
        ({"t": 1}, "invalid_type", "expected a string, but got an object instead."),
        ("", "invalid_value", "Invalid value: ''. Supported values are: 'message', "),
        ("telepathy_call", "invalid_value", "'program', 'program_output', and 'item_reference'."),
    ],
)  # fmt: skip
def test_an_unknown_item_type_is_refused_in_openai_words(
    kind: Any, code: str, message: str
) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        inputs.normalize_items([{"type": kind, "id": "x_1"}])
    assert (info.value.code, info.value.param) == (code, "input[0].type")
    assert message in info.value.message
