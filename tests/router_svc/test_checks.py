"""The JSON checker (router_svc/checks.py): OpenAI's codes, params and messages, each check on its
own (test_validate.py and test_inputs.py see them through whole requests)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from router_svc import checks, errors


def refused(check: Callable[[], object]) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as info:
        check()
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "null"),
        (True, "a boolean"),
        (3, "an integer"),
        (1.5, "a decimal"),
        ("x", "a string"),
        ([], "an array"),
        ({}, "an object"),
        (b"x", "bytes"),
    ],
)
def test_kind_names_a_value_as_openai_does(value: object, words: str) -> None:
    assert checks.kind(value) == words


def test_typed_getters_return_the_value_or_refuse_it_in_openai_words() -> None:
    assert checks.string("x", "p") == "x"
    assert checks.integer(3, "p", minimum=3, maximum=3) == 3
    assert checks.decimal(2, "p", minimum=0, maximum=math.inf) == 2.0
    assert checks.enum("b", "p", ("a", "b")) == "b"
    error = refused(lambda: checks.boolean(1, "a.b[0]"))
    assert (error.code, error.param, error.message) == (
        "invalid_type",
        "a.b[0]",
        "Invalid type for 'a.b[0]': expected a boolean, but got an integer instead.",
    )
    error = refused(lambda: checks.integer(True, "n"))
    assert error.message == "Invalid type for 'n': expected an integer, but got a boolean instead."
    error = refused(lambda: checks.integer(2, "n", maximum=1))
    assert (error.code, error.message) == (
        "integer_above_max_value",
        "Invalid 'n': integer above maximum value. Expected a value <= 1, but got 2 instead.",
    )
    error = refused(lambda: checks.decimal(-0.5, "t", minimum=0, maximum=2))
    assert error.code == "decimal_below_min_value"
    error = refused(lambda: checks.string("abc", "s", max_length=2))
    assert error.code == "string_above_max_length"
    assert refused(lambda: checks.nonempty("", "s")).code == "empty_string"


def test_enum_lists_the_supported_values() -> None:
    error = refused(lambda: checks.enum("c", "p", ("a", "b")))
    assert (error.code, error.message) == (
        "invalid_value",
        "Invalid value: 'c'. Supported values are: 'a' and 'b'.",
    )
    error = refused(lambda: checks.enum("d", "p", ("a", "b", "c")))
    assert error.message.endswith("Supported values are: 'a', 'b', and 'c'.")


def test_keys_and_required_values() -> None:
    checks.check_keys({"a": 1}, {"a"}, "obj")
    error = refused(lambda: checks.check_keys({"a": 1, "b": 2}, {"a"}, "obj"))
    assert (error.code, error.param, error.message) == (
        "unknown_parameter",
        "obj.b",
        "Unknown parameter: 'obj.b'.",
    )
    assert refused(lambda: checks.check_keys({"b": 2}, {"a"}, "")).param == "b"
    assert checks.required({"a": 0}, "a", "obj") == 0
    error = refused(lambda: checks.required({"a": None}, "a", "obj"))
    assert (error.code, error.param) == ("missing_required_parameter", "obj.a")


def test_prefixed_ids_and_names() -> None:
    assert checks.prefixed_id("resp_1", "p", "resp") == "resp_1"
    error = refused(lambda: checks.prefixed_id("msg_1", "p", "resp"))
    assert error.message == "Invalid 'p': 'msg_1'. Expected an ID that begins with 'resp'."
    assert checks.name("get-weather_2", "n") == "get-weather_2"
    for bad in ("has space", "x" * 65, ""):
        with pytest.raises(errors.InvalidRequest) as info:
            checks.name(bad, "n")
        assert (info.value.code, info.value.param) == ("invalid_value", "n")


def test_parse_metadata_with_another_param() -> None:
    assert checks.metadata(None) == {}
    with pytest.raises(errors.InvalidRequest) as error:
        checks.metadata([], param="body.metadata")
    assert error.value.param == "body.metadata"


def test_copy_json_copies_deeply_even_what_orjson_cannot_encode() -> None:
    value: dict[str, Any] = {"a": [1, {"b": None}], "big": 2**70}
    copied = checks.copy_json(value)
    assert copied == value
    copied["a"][1]["b"] = 1
    assert value["a"][1]["b"] is None
