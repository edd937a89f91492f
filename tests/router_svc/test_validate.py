"""The request (router_svc/validate.py): every field of POST /v1/responses checked with OpenAI's
codes, params and messages, and the request as a whole (input items: test_inputs.py)."""

from __future__ import annotations

import copy
import inspect
import logging
import re
from typing import Any

import pytest
from prometheus_client import REGISTRY

from router_svc import errors, validate, vocabulary
from router_svc.ids import new_id


def parse(body: Any, **kwargs: Any) -> validate.TurnRequest:
    return validate.parse_turn_request(body, **kwargs)


def rejected(body: Any, **kwargs: Any) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as info:
        validate.parse_turn_request(body, **kwargs)
    return info.value


def test_new_id_is_prefixed_random_hex() -> None:
    first, second = new_id("resp"), new_id("resp")
    assert re.fullmatch(r"resp_[0-9a-f]{48}", first)
    assert first != second


def test_minimal_request_defaults() -> None:
    req = parse({"model": "m", "input": "hello"})
    assert req.model == "m"
    assert req.store is True
    assert req.stream is False
    assert req.background is False
    assert req.instructions is None
    assert req.previous_response_id is None
    assert req.conversation_id is None
    assert req.metadata == {}
    assert req.tools == []
    assert req.include == []
    [item] = req.input_items
    assert re.fullmatch(r"msg_[0-9a-f]{48}", item["id"])
    assert item == {
        "id": item["id"],
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": "hello"}],
    }


def test_every_sdk_request_field_is_accepted() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "input": [{"role": "user", "content": "hi"}],
        "instructions": "be brief",
        "previous_response_id": "resp_abc",
        "store": True,
        "stream": True,
        "stream_options": {"include_obfuscation": False},
        "background": True,
        "metadata": {"k": "v"},
        "max_output_tokens": 16,
        "max_tool_calls": 3,
        "temperature": 2,
        "top_p": 0.5,
        "top_logprobs": 20,
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "name": "f"},
        "tools": [
            {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
            {"type": "code_interpreter", "container": {"type": "auto"}},
            {"type": "web_search"},
        ],
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {}}, "verbosity": "low"},
        "reasoning": {"effort": "high", "summary": "auto"},
        "truncation": "auto",
        "include": ["message.output_text.logprobs", "reasoning.encrypted_content"],
        "user": "u",
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"ttl": "30m"},
        "service_tier": "flex",
        "prompt": {"id": "pmpt_1", "version": "2", "variables": {"x": "y"}},
        "context_management": [{"type": "compaction", "compact_threshold": 1000}],
        "access_programs": {"cyber": "standard"},
        "image": {"context_compression": "auto"},
        "moderation": {"model": "omni-moderation-latest"},
        "background_options": {"completion_window": "soonest", "continuation_id": "c"},
    }
    # Every field of the SDK is exercised here (conversation, which excludes previous_response_id,
    # in test_conversation_id_forms).
    assert set(body) | {"conversation"} >= vocabulary.REQUEST_FIELDS
    original = copy.deepcopy(body)
    req = parse(body)
    assert body == original, "the caller's body must never be mutated"
    assert req.body is body
    assert req.stream is True and req.background is True
    assert req.previous_response_id == "resp_abc"
    assert req.instructions == "be brief"
    assert req.metadata == {"k": "v"}
    assert [t["type"] for t in req.tools] == ["function", "code_interpreter", "web_search"]
    assert req.include == ["message.output_text.logprobs", "reasoning.encrypted_content"]


def test_nulls_mean_absent() -> None:
    fields = [
        "instructions",
        "previous_response_id",
        "conversation",
        "store",
        "stream",
        "background",
        "metadata",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_logprobs",
        "tool_choice",
        "tools",
        "text",
        "reasoning",
        "truncation",
        "include",
        "input",
    ]
    # Null input is no input: with nothing to continue from either, that is refused.
    error = rejected({"model": "m", **dict.fromkeys(fields)})
    assert (error.code, error.param) == ("missing_required_parameter", "input")
    req = parse({"model": "m", **dict.fromkeys(fields), "previous_response_id": "resp_1"})
    assert req.store is True
    assert req.input_items == []


@pytest.mark.parametrize(
    ("body", "code", "param", "message"),
    [
        (
            {"input": "x"},
            "missing_required_parameter",
            "model",
            "Missing required parameter: 'model'.",
        ),
        (
            {"model": 3},
            "invalid_type",
            "model",
            "Invalid type for 'model': expected a string, but got an integer instead.",
        ),
        ({"model": ""}, "empty_string", "model", "empty string"),
        (
            {"model": "m", "temperature": "hot"},
            "invalid_type",
            "temperature",
            "Invalid type for 'temperature': expected a decimal, but got a string instead.",
        ),
        (
            {"model": "m", "temperature": 2.5},
            "decimal_above_max_value",
            "temperature",
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5 instead.",
        ),
        (
            {"model": "m", "temperature": -0.1},
            "decimal_below_min_value",
            "temperature",
            "decimal below minimum value",
        ),
        (
            {"model": "m", "temperature": True},
            "invalid_type",
            "temperature",
            "got a boolean instead",
        ),
        (
            {"model": "m", "top_p": 1.01},
            "decimal_above_max_value",
            "top_p",
            "Expected a value <= 1",
        ),
        ({"model": "m", "top_p": -1}, "decimal_below_min_value", "top_p", "Expected a value >= 0"),
        (
            {"model": "m", "max_output_tokens": 15},
            "integer_below_min_value",
            "max_output_tokens",
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, but got 15 instead.",
        ),
        (
            {"model": "m", "max_output_tokens": 16.5},
            "invalid_type",
            "max_output_tokens",
            "expected an integer, but got a decimal",
        ),
        ({"model": "m", "max_tool_calls": -1}, "integer_below_min_value", "max_tool_calls", ">= 0"),
        (
            {"model": "m", "top_logprobs": 21},
            "integer_above_max_value",
            "top_logprobs",
            "Expected a value <= 20",
        ),
        ({"model": "m", "top_logprobs": -1}, "integer_below_min_value", "top_logprobs", ">= 0"),
        (
            {"model": "m", "store": "yes"},
            "invalid_type",
            "store",
            "expected a boolean, but got a string",
        ),
        (
            {"model": "m", "stream": 1},
            "invalid_type",
            "stream",
            "expected a boolean, but got an integer",
        ),
        ({"model": "m", "background": []}, "invalid_type", "background", "got an array"),
        (
            {"model": "m", "parallel_tool_calls": "no"},
            "invalid_type",
            "parallel_tool_calls",
            "expected a boolean",
        ),
        (
            {"model": "m", "truncation": "sometimes"},
            "invalid_value",
            "truncation",
            "Invalid value: 'sometimes'. Supported values are: 'auto' and 'disabled'.",
        ),
        (
            {"model": "m", "service_tier": "gold"},
            "invalid_value",
            "service_tier",
            "'auto', 'default', 'flex'",
        ),
        (
            {"model": "m", "prompt_cache_retention": "1h"},
            "invalid_value",
            "prompt_cache_retention",
            "'in_memory' and '24h'",
        ),
        (
            {"model": "m", "safety_identifier": "x" * 129},
            "string_above_max_length",
            "safety_identifier",
            "maximum length 128",
        ),
        ({"model": "m", "user": 5}, "invalid_type", "user", "expected a string"),
        (
            {"model": "m", "instructions": ["x"]},
            "invalid_type",
            "instructions",
            "expected a string, but got an array",
        ),
        ({"model": "m", "include": "x"}, "invalid_type", "include", "expected an array"),
        (
            {"model": "m", "include": ["nope"]},
            "invalid_value",
            "include[0]",
            "Invalid value: 'nope'.",
        ),
        (
            {"model": "m", "stream_options": {"x": 1}},
            "unknown_parameter",
            "stream_options.x",
            "Unknown parameter: 'stream_options.x'.",
        ),
        (
            {"model": "m", "stream_options": {"include_obfuscation": "no"}},
            "invalid_type",
            "stream_options.include_obfuscation",
            "boolean",
        ),
        (
            {"model": "m", "previous_response_id": "resp_1", "conversation": "conv_1"},
            "mutually_exclusive_parameters",
            "conversation",
            "'previous_response_id' or 'conversation'",
        ),
        (
            {"model": "m", "previous_response_id": "abc"},
            "invalid_value",
            "previous_response_id",
            "Expected an ID that begins with 'resp'.",
        ),
        (
            {"model": "m", "previous_response_id": ""},
            "empty_string",
            "previous_response_id",
            "empty string",
        ),
        (
            {"model": "m", "previous_response_id": 5},
            "invalid_type",
            "previous_response_id",
            "expected a string",
        ),
        (
            {"model": "m", "conversation": "abc"},
            "invalid_value",
            "conversation",
            "begins with 'conv'",
        ),
        (
            {"model": "m", "conversation": {"id": "x"}},
            "invalid_value",
            "conversation.id",
            "begins with 'conv'",
        ),
        (
            {"model": "m", "conversation": {}},
            "missing_required_parameter",
            "conversation.id",
            "'conversation.id'",
        ),
        (
            {"model": "m", "conversation": {"id": "conv_1", "x": 1}},
            "unknown_parameter",
            "conversation.x",
            "Unknown parameter",
        ),
        (
            {"model": "m", "conversation": 5},
            "invalid_type",
            "conversation",
            "one of a string or an object",
        ),
        (
            {"model": "m", "background": True, "store": False},
            "invalid_value",
            "background",
            "requires 'store'",
        ),
        ({"model": "m", "text": "json"}, "invalid_type", "text", "expected an object"),
        (
            {"model": "m", "text": {"format": {"type": "xml"}}},
            "invalid_value",
            "text.format.type",
            "'text', 'json_schema', and 'json_object'",
        ),
        (
            {"model": "m", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "missing_required_parameter",
            "text.format.name",
            "'text.format.name'",
        ),
        (
            {"model": "m", "text": {"format": {"type": "json_schema", "name": "s"}}},
            "missing_required_parameter",
            "text.format.schema",
            "'text.format.schema'",
        ),
        (
            {
                "model": "m",
                "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}},
            },
            "invalid_value",
            "text.format.name",
            "pattern",
        ),
        (
            {"model": "m", "text": {"format": {"type": "json_schema", "name": "s", "schema": []}}},
            "invalid_type",
            "text.format.schema",
            "expected an object",
        ),
        (
            {"model": "m", "text": {"format": {"type": "text", "name": "s"}}},
            "unknown_parameter",
            "text.format.name",
            "Unknown parameter",
        ),
        (
            {"model": "m", "text": {"verbosity": "loud"}},
            "invalid_value",
            "text.verbosity",
            "'low', 'medium', and 'high'",
        ),
        (
            {"model": "m", "text": {"style": 1}},
            "unknown_parameter",
            "text.style",
            "Unknown parameter",
        ),
        (
            {"model": "m", "reasoning": {"effort": "extreme"}},
            "invalid_value",
            "reasoning.effort",
            "Invalid value: 'extreme'",
        ),
        (
            {"model": "m", "reasoning": {"summary": "long"}},
            "invalid_value",
            "reasoning.summary",
            "'auto', 'concise', and 'detailed'",
        ),
        (
            {"model": "m", "reasoning": {"depth": 1}},
            "unknown_parameter",
            "reasoning.depth",
            "Unknown parameter",
        ),
        (
            {"model": "m", "prompt": {"version": "1"}},
            "missing_required_parameter",
            "prompt.id",
            "'prompt.id'",
        ),
        (
            {"model": "m", "prompt": {"id": "p", "x": 1}},
            "unknown_parameter",
            "prompt.x",
            "Unknown parameter",
        ),
        (
            {"model": "m", "context_management": [{"compact_threshold": 3}]},
            "missing_required_parameter",
            "context_management[0].type",
            "'context_management[0].type'",
        ),
        ({"model": "m", "moderation": "on"}, "invalid_type", "moderation", "expected an object"),
        (
            {"model": "m", "moderation": {}},
            "missing_required_parameter",
            "moderation.model",
            "'moderation.model'",
        ),
        (
            {"model": "m", "access_programs": {"cyber": "red"}},
            "invalid_value",
            "access_programs.cyber",
            "'standard', 'daybreak_blue', and 'daybreak_red'",
        ),
        (
            {"model": "m", "image": {"context_compression": "max"}},
            "invalid_value",
            "image.context_compression",
            "Invalid value: 'max'",
        ),
        (
            {"model": "m", "prompt_cache_options": {"ttl": "1h"}},
            "invalid_value",
            "prompt_cache_options.ttl",
            "'30m' and '12h'",
        ),
        (
            {"model": "m", "prompt_cache_options": {"mode": "never"}},
            "invalid_value",
            "prompt_cache_options.mode",
            "'implicit' and 'explicit'",
        ),
        (
            {"model": "m", "prompt_cache_options": {"prewarm": "yes"}},
            "invalid_type",
            "prompt_cache_options.prewarm",
            "expected a boolean",
        ),
        (
            {"model": "m", "background_options": []},
            "invalid_type",
            "background_options",
            "expected an object",
        ),
        (
            {"model": "m", "background_options": {"completion_window": "1d"}},
            "invalid_value",
            "background_options.completion_window",
            "'soonest', '2h', and '8h'",
        ),
        (
            {"model": "m", "background_options": {"completion_window": "2h"}},
            "invalid_value",
            "background_options.completion_window",
            "requires 'background' to be true and 'stream' to be false",
        ),
        (
            {
                "model": "m",
                "background": True,
                "stream": True,
                "background_options": {"completion_window": "8h"},
            },
            "invalid_value",
            "background_options.completion_window",
            "requires 'background' to be true",
        ),
        (
            {"model": "m", "presence_penalty": 2.5},
            "decimal_above_max_value",
            "presence_penalty",
            "Expected a value <= 2",
        ),
        (
            {"model": "m", "frequency_penalty": -3},
            "decimal_below_min_value",
            "frequency_penalty",
            "Expected a value >= -2",
        ),
        (
            {"model": "m", "frequency_penalty": "high"},
            "invalid_type",
            "frequency_penalty",
            "expected a decimal",
        ),
        ({"model": "m", "seed": 1.5}, "invalid_type", "seed", "expected an integer"),
        ({"model": "m", "stop": 3}, "invalid_type", "stop", "a string or an array of strings"),
        ({"model": "m", "stop": ["a", 1]}, "invalid_type", "stop[1]", "expected a string"),
        ({"model": "m", "top_k": -2}, "integer_below_min_value", "top_k", ">= -1"),
        ({"model": "m", "min_p": 1.5}, "decimal_above_max_value", "min_p", "<= 1"),
        (
            {"model": "m", "repetition_penalty": -1},
            "decimal_below_min_value",
            "repetition_penalty",
            ">= 0",
        ),
        ({"model": "m", "logit_bias": [1]}, "invalid_type", "logit_bias", "expected an object"),
        (
            {"model": "m", "stop_token_ids": [1, "2"]},
            "invalid_type",
            "stop_token_ids[1]",
            "expected an integer",
        ),
        ({"model": "m", "ignore_eos": 1}, "invalid_type", "ignore_eos", "expected a boolean"),
        (
            {"model": "m", "chat_template_kwargs": "x"},
            "invalid_type",
            "chat_template_kwargs",
            "expected an object",
        ),
    ],
)
def test_invalid_fields(body: dict[str, Any], code: str, param: str, message: str) -> None:
    error = rejected(body)
    assert (error.code, error.param) == (code, param)
    assert message in error.message
    assert error.status == 400
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_every_hub_sampling_field_is_checked() -> None:
    assert set(validate._SAMPLING_CHECKS) == vocabulary.HUB_SAMPLING_FIELDS


def test_hub_sampling_fields_are_accepted() -> None:
    body = {
        "model": "m",
        "presence_penalty": -2,
        "frequency_penalty": 1.5,
        "seed": 7,
        "stop": ["END", "STOP"],
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "length_penalty": -0.5,
        "min_tokens": 1,
        "logit_bias": {"50256": -100},
        "stop_token_ids": [2],
        "ignore_eos": False,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
        "spaces_between_special_tokens": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert set(body) - {"model"} == vocabulary.HUB_SAMPLING_FIELDS
    body["input"] = "x"
    assert parse(body).body == body
    assert parse({"model": "m", "input": "x", "stop": "END", "top_k": -1}).body["stop"] == "END"


def ignored_count(name: str) -> float:
    value = REGISTRY.get_sample_value("respgw_router_ignored_parameters_total", {"param": name})
    return value or 0.0


def test_unknown_top_level_fields_are_ignored_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "client_metadata_" + new_id("x")[-8:]
    before = ignored_count(name)
    body = {"model": "m", "input": "hi", name: {"installation_id": "abc"}}
    with caplog.at_level(logging.WARNING, logger="router_svc.validate"):
        req = parse(body)
        parse(body)
    assert req.input_items[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert ignored_count(name) - before == 2
    logged = [r for r in caplog.records if getattr(r, "param", None) == name]
    assert len(logged) == 1, "one log line per name per process"


def test_unknown_fields_are_refused_in_strict_mode() -> None:
    error = rejected({"model": "m", "foo": 1}, strict_params=True)
    assert (error.code, error.param) == ("unknown_parameter", "foo")
    assert error.message == "Unknown parameter: 'foo'."
    # Known fields, and the hub's sampling fields, are not "unknown" in strict mode.
    parse({"model": "m", "input": "x", "background_options": {}, "seed": 1}, strict_params=True)


def test_ignored_parameter_labels_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(validate, "_ignored_names", set())
    monkeypatch.setattr(validate, "_other_logged", False)
    names = [f"bounded_{i}" for i in range(validate.MAX_IGNORED_NAMES)]
    other_before = ignored_count("other")
    with caplog.at_level(logging.WARNING, logger="router_svc.validate"):
        parse({"model": "m", "input": "x", **dict.fromkeys(names, 1)})
        parse({"model": "m", "input": "x", "one_too_many": 1, "not an identifier!": 1, "x" * 65: 1})
    assert validate._ignored_names == set(names)
    assert ignored_count("one_too_many") == 0
    assert ignored_count("other") - other_before == 3
    overflow = [r for r in caplog.records if "counted as 'other'" in r.getMessage()]
    assert len(overflow) == 1


def test_body_must_be_an_object() -> None:
    error = rejected(["model", "m"])
    assert error.code == "invalid_type"
    assert "expected an object, but got an array" in error.message


def test_default_model_fills_a_missing_or_empty_model() -> None:
    assert parse({"input": "x"}, default_model="d").model == "d"
    assert parse({"model": "", "input": "x"}, default_model="d").model == "d"
    assert parse({"model": "m", "input": "x"}, default_model="d").model == "m"


def test_conversation_id_forms() -> None:
    assert parse({"model": "m", "conversation": "conv_1"}).conversation_id == "conv_1"
    assert parse({"model": "m", "conversation": {"id": "conv_2"}}).conversation_id == "conv_2"


# --- metadata ----------------------------------------------------------------------------------


def test_metadata_at_the_limits_is_accepted() -> None:
    metadata = {f"{i:064d}": "v" * 512 for i in range(16)}
    assert parse({"model": "m", "input": "x", "metadata": metadata}).metadata == metadata


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        (
            {f"k{i}": "v" for i in range(17)},
            "object_above_max_properties",
            "at most 16 properties, but got an object with 17",
        ),
        ({"k" * 65: "v"}, "string_above_max_length", "length 65"),
        (
            {"k": "v" * 513},
            "string_above_max_length",
            "maximum length 512, but got a string with length 513",
        ),
        (
            {"k": 1},
            "invalid_type",
            "Invalid type for 'metadata.k': expected a string, but got an integer",
        ),
        ({"k": None}, "invalid_type", "got null instead"),
        ("k=v", "invalid_type", "expected an object"),
    ],
)
def test_metadata_limits(metadata: Any, code: str, message: str) -> None:
    error = rejected({"model": "m", "metadata": metadata})
    assert (error.code, error.param) == (code, "metadata")
    assert message in error.message


# --- tools and tool_choice -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "code", "param"),
    [
        ("f", "invalid_type", "tools"),
        (["f"], "invalid_type", "tools[0]"),
        ([{"name": "f"}], "missing_required_parameter", "tools[0].type"),
        ([{"type": "teleport"}], "invalid_value", "tools[0].type"),
        ([{"type": "function"}], "missing_required_parameter", "tools[0].name"),
        ([{"type": "function", "name": "bad name"}], "invalid_value", "tools[0].name"),
        (
            [{"type": "function", "name": "f", "parameters": "x"}],
            "invalid_type",
            "tools[0].parameters",
        ),
        ([{"type": "function", "name": "f", "strict": "yes"}], "invalid_type", "tools[0].strict"),
        (
            [{"type": "function", "name": "f", "description": 1}],
            "invalid_type",
            "tools[0].description",
        ),
        (
            [{"type": "function", "name": "f", "function": {}}],
            "unknown_parameter",
            "tools[0].function",
        ),
        ([{"type": "code_interpreter"}], "missing_required_parameter", "tools[0].container"),
        ([{"type": "code_interpreter", "container": 1}], "invalid_type", "tools[0].container"),
        ([{"type": "shell", "environment": "local"}], "invalid_type", "tools[0].environment"),
        (
            [{"type": "shell", "environment": {}}],
            "missing_required_parameter",
            "tools[0].environment.type",
        ),
        (
            [{"type": "shell", "environment": {"type": "remote"}}],
            "invalid_value",
            "tools[0].environment.type",
        ),
        ([{"type": "mcp"}], "missing_required_parameter", "tools[0].server_label"),
        ([{"type": "custom"}], "missing_required_parameter", "tools[0].name"),
        ([{"type": "namespace", "tools": []}], "missing_required_parameter", "tools[0].name"),
        ([{"type": "namespace", "name": "n"}], "missing_required_parameter", "tools[0].tools"),
        (
            [{"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}],
            "invalid_value",
            "tools[0].tools[0].type",
        ),
        (
            [{"type": "namespace", "name": "n", "tools": [{"type": "function", "name": "a b"}]}],
            "invalid_value",
            "tools[0].tools[0].name",
        ),
        (
            [{"type": "namespace", "name": "n", "tools": [], "server_label": "s"}],
            "unknown_parameter",
            "tools[0].server_label",
        ),
    ],
)
def test_invalid_tools(tools: Any, code: str, param: str) -> None:
    error = rejected({"model": "m", "tools": tools})
    assert (error.code, error.param) == (code, param)


_F = {"type": "function", "name": "f"}


@pytest.mark.parametrize(
    "choice",
    [
        "none",
        "auto",
        "required",
        {"type": "function", "name": "f"},
        {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "f"}]},
        {
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [
                {"type": "function", "name": "f"},
                {"type": "mcp", "server_label": "deepwiki"},
                {"type": "image_generation"},
            ],
        },
        {"type": "file_search"},
        {"type": "code_interpreter"},
        {"type": "mcp", "server_label": "s"},
        {"type": "shell"},
        {"type": "apply_patch"},
    ],
)
def test_valid_tool_choices(choice: Any) -> None:
    body = {"model": "m", "input": "x", "tools": [_F], "tool_choice": choice}
    assert parse(body).body["tool_choice"] == choice


@pytest.mark.parametrize(
    ("choice", "code", "param"),
    [
        ("sometimes", "invalid_value", "tool_choice"),
        (3, "invalid_type", "tool_choice"),
        ({"name": "f"}, "missing_required_parameter", "tool_choice.type"),
        ({"type": "function"}, "missing_required_parameter", "tool_choice.name"),
        ({"type": "function", "name": "g"}, "invalid_value", "tool_choice"),
        ({"type": "function", "name": "f", "x": 1}, "unknown_parameter", "tool_choice.x"),
        (
            {"type": "allowed_tools", "mode": "maybe", "tools": []},
            "invalid_value",
            "tool_choice.mode",
        ),
        (
            {"type": "allowed_tools", "mode": "auto"},
            "missing_required_parameter",
            "tool_choice.tools",
        ),
        ({"type": "mcp"}, "missing_required_parameter", "tool_choice.server_label"),
        ({"type": "mcp", "server_label": "s", "name": 5}, "invalid_type", "tool_choice.name"),
        ({"type": "telepathy"}, "invalid_value", "tool_choice.type"),
        *(
            (
                {"type": "allowed_tools", "mode": "auto", "tools": [_F, entry]},
                code,
                f"tool_choice.tools[1]{param}",
            )
            for entry, code, param in [
                ({"type": "function", "name": 5}, "invalid_type", ".name"),
                ({"type": "function", "name": ["f"]}, "invalid_type", ".name"),
                ({"type": "custom", "name": {"n": "f"}}, "invalid_type", ".name"),
                ({"type": "function"}, "missing_required_parameter", ".name"),
                ({"name": "f"}, "missing_required_parameter", ".type"),
                ({"type": 5, "name": "f"}, "invalid_type", ".type"),
                ({"type": ["function"]}, "invalid_type", ".type"),
                ({"type": "telepathy"}, "invalid_value", ".type"),
                ({"type": "mcp"}, "missing_required_parameter", ".server_label"),
                ({"type": "mcp", "server_label": 5}, "invalid_type", ".server_label"),
                ({"type": "image_generation", "name": 1.5}, "invalid_type", ".name"),
                ("f", "invalid_type", ""),
                (None, "invalid_type", ""),
            ]
        ),
    ],
)
def test_invalid_tool_choices(choice: Any, code: str, param: str) -> None:
    error = rejected({"model": "m", "tools": [_F], "tool_choice": choice})
    assert (error.code, error.param) == (code, param)


# --- the request as a whole (OpenAI's errors once every field is well-formed) --------------------


def test_a_turn_without_input_or_history_is_refused() -> None:
    error = rejected({"model": "m"})
    assert (error.message, error.param, error.code) == (
        "Missing required parameter: 'input'.",
        "input",
        "missing_required_parameter",
    )
    error = rejected({"model": "m", "input": []})
    assert (error.message, error.param, error.code) == (
        "Invalid 'input': empty array. Expected an array with minimum length 1, but got an empty "
        "array instead.",
        "input",
        "empty_array",
    )
    # Continuing a response or a conversation, the new input may be empty; a prompt template
    # may bring the input (on a Responses hub that resolves it; a chat hub's dialect refuses it).
    assert parse({"model": "m", "previous_response_id": "resp_1"}).input_items == []
    assert parse({"model": "m", "input": [], "conversation": "conv_1"}).input_items == []
    assert parse({"model": "m", "prompt": {"id": "pmpt_1"}}).input_items == []
    # A field error is reported first, as OpenAI does.
    assert rejected({"model": "m", "temperature": 9}).param == "temperature"


def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}


def output(call_id: str, kind: str = "function_call_output") -> dict[str, Any]:
    return {"type": kind, "call_id": call_id, "output": "42"}


def test_a_function_call_output_without_its_call_is_refused() -> None:
    error = rejected({"model": "m", "input": [call("call_1"), output("call_1"), output("call_9")]})
    assert (error.message, error.param, error.code) == (
        "No tool call found for function call output with call_id call_9.",
        "input",
        None,
    )
    assert error.body()["error"]["code"] is None
    custom = {"type": "custom_tool_call", "call_id": "call_2", "name": "c", "input": "x"}
    error = rejected(
        {"model": "m", "input": [call("call_3"), output("call_3", "custom_tool_call_output")]}
    )
    assert error.message == "No tool call found for custom tool call output with call_id call_3."
    parse({"model": "m", "input": [custom, output("call_2", "custom_tool_call_output")]})
    parse({"model": "m", "input": [call("call_1"), output("call_1")]})


@pytest.mark.parametrize(
    "history", [{"previous_response_id": "resp_1"}, {"conversation": "conv_1"}]
)
def test_a_call_output_may_answer_a_call_in_the_history(history: dict[str, str]) -> None:
    req = parse({"model": "m", "input": [output("call_1")], **history})
    # The turn checks the input against the history it loaded.
    validate.check_tool_outputs(req.input_items, [call("call_1")])
    with pytest.raises(errors.InvalidRequest) as info:
        validate.check_tool_outputs(req.input_items, [call("call_2")])
    assert info.value.message == "No tool call found for function call output with call_id call_1."


def test_tool_choice_required_needs_tools() -> None:
    nothing: tuple[dict[str, Any], ...] = ({}, {"tools": []}, {"tools": None})
    for tools in nothing:
        error = rejected({"model": "m", "input": "x", "tool_choice": "required", **tools})
        assert (error.message, error.param, error.code) == (
            "Tool choice 'required' must be specified with 'tools' parameter.",
            "tool_choice",
            None,
        )
    parse({"model": "m", "input": "x", "tool_choice": "auto"})
    parse(
        {"model": "m", "input": "x", "tool_choice": "required", "tools": [{"type": "web_search"}]}
    )


NAMESPACE = {
    "type": "namespace",
    "name": "crm",
    "description": "The CRM",
    "tools": [
        {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
        {"type": "custom", "name": "note"},
    ],
}


def test_namespace_tools_are_checked_and_their_members_can_be_chosen() -> None:
    req = parse({"model": "m", "input": "x", "tools": [NAMESPACE]})
    assert req.tools == [NAMESPACE]
    choice = {"type": "function", "name": "lookup"}
    assert parse({"model": "m", "input": "x", "tools": [NAMESPACE], "tool_choice": choice})


@pytest.mark.parametrize(
    ("check", "names"),
    [
        (validate._scalars, validate._SCALARS),
        (validate._other_objects, validate._OTHER_OBJECTS),
    ],
)
def test_a_check_skipped_for_a_body_without_its_fields_names_every_field_it_reads(
    check: Any, names: frozenset[str]
) -> None:
    # A body with none of ``names`` skips the check: a field it reads but does not name there
    # would go unchecked.
    source = inspect.getsource(check)
    read = set(
        re.findall(r'(?:body(?:\.get\(|\[)|present\(|_optional_enum\(body, )"(\w+)"', source)
    )
    assert read
    assert read <= names
    for name in names:
        # Each named field is checked when it comes alone.
        with pytest.raises(errors.InvalidRequest):
            check({name: ["not", "valid"]} if name != "context_management" else {name: "x"})
