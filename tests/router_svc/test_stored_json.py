"""router_svc.stored_json: a stored response's JSON parsed with its long strings made from the
JSON's bytes, to the same value as orjson.loads."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from router_svc import stored_json

LONG = " ".join(f"word{i}" for i in range(20_000))  # ~150 KB of ASCII, no escapes


def _same(value: Any, data: bytes | None = None) -> Any:
    """loads of ``value``'s JSON (or ``data``), checked equal to orjson's parse and re-encoded
    to the same bytes; from bytes and from a bytearray (as the state client reads it)."""
    data = orjson.dumps(value) if data is None else data
    for given in (data, bytearray(data)):
        got = stored_json.loads(given)
        assert got == orjson.loads(data)
        assert orjson.dumps(got) == orjson.dumps(orjson.loads(data))
    return stored_json.loads(data)


def test_long_strings_anywhere_come_back_whole() -> None:
    response = {
        "id": "resp_1",
        "output": [
            {"content": [{"type": "output_text", "text": LONG, "annotations": []}]},
            {"type": "function_call", "arguments": LONG + "x", "name": "f"},
        ],
        "instructions": LONG[:100],
        "list": [LONG, 1.5, None, True, {"k": [LONG]}],
        "short": 'a "quoted" \\ text',
    }
    got = _same(response)
    assert got["output"][0]["content"][0]["text"] == LONG


@pytest.mark.parametrize(
    "text",
    [
        LONG.replace("word1", 'print("x")\n\tq\\'),  # ASCII with escapes (an answer of code)
        LONG.replace("word1", "\x00\x1f\x7f"),  # control characters, \u00XX
        LONG.replace("word1", "é€😀\u2028"),  # non-ASCII without escapes
        LONG.replace("word1", "é\n"),  # non-ASCII with escapes
        LONG + "\\",  # ends with an escaped backslash
        '"' * 70_000,  # nothing but escaped quotes: too many quotes, parsed whole
    ],
)
def test_every_kind_of_long_text_is_the_same_value(text: str) -> None:
    got = _same({"output": [{"content": [{"text": text}]}], "id": "r"})
    assert got["output"][0]["content"][0]["text"] == text


def test_random_texts_are_the_same_value() -> None:
    rng = random.Random(13)
    alphabet = 'ab "\\\n\t/é€😀\x00\x1f'
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(70_000))
        assert _same({"text": text, "n": 1})["text"] == text


def test_what_another_writer_escaped_is_the_same_value() -> None:
    # "\/" and surrogate pairs (json.dumps with ensure_ascii, as a hub may write them) are JSON's
    # own escapes; a pair is never cut in two, wherever the slices fall.
    for text in (LONG + "/😀é", "😀" + LONG, "😀" * 40_000, "é\n/" * 30_000):
        data = json.dumps({"text": text}).replace("/", "\\/").encode()
        assert stored_json.loads(data)["text"] == text
        assert stored_json.loads(data) == orjson.loads(data)


@pytest.mark.parametrize("shift", range(13))
def test_a_slice_never_ends_inside_an_escape_or_a_character(
    monkeypatch: pytest.MonkeyPatch, shift: int
) -> None:
    # Slices of a few bytes, so that every kind of place to cut is met.
    monkeypatch.setattr(stored_json, "SLICE_BYTES", 7 + shift)
    text = ('a😀\n"é€' + "\u2028\x00" + "b" * shift) * 5_000
    data = orjson.dumps({"t": text})
    ensured = json.dumps({"t": text}).encode()  # every non-ASCII character a \uXXXX escape
    assert stored_json.loads(data)["t"] == text
    assert stored_json.loads(ensured)["t"] == text


def test_a_string_with_no_place_to_cut_is_parsed_whole() -> None:
    # Nothing but escapes: no 6 bytes without a backslash, so no slice can end; parsed whole.
    text = "\x01" * 20_000
    assert stored_json.loads(orjson.dumps({"t": text}))["t"] == text


def test_short_json_a_long_key_and_the_mark_itself() -> None:
    assert _same({"a": "b"}) == {"a": "b"}
    assert _same({LONG: "v"}) == {LONG: "v"}  # a long key: parsed whole
    mark = "\ue000respgw-long-0\ue000"
    assert _same({"x": mark, "y": LONG}) == {"x": mark, "y": LONG}
    assert _same([LONG, LONG]) == [LONG, LONG]
    assert _same(LONG) == LONG


def test_no_json_is_an_error() -> None:
    for data in (b'{"a": "' + LONG.encode(), b'{"a": "' + LONG.encode() + b'"', b"not json"):
        with pytest.raises(orjson.JSONDecodeError):
            stored_json.loads(data)


@pytest.mark.parametrize(
    ("text", "whole"),
    [
        (LONG, False),
        (LONG.replace("word1", "x\n\tq\\").replace("word99", '"x"'), False),
        (LONG.replace("word1", "é€😀"), False),
        (LONG.replace("word1", "é\n"), False),
        ('"' * 70_000, True),
    ],
)
def test_orjson_parses_only_the_skeleton_of_a_long_answer(
    monkeypatch: pytest.MonkeyPatch, text: str, whole: bool
) -> None:
    parsed: list[int] = []
    parse = orjson.loads

    def loads(data: bytes | bytearray) -> Any:
        parsed.append(len(data))
        return parse(data)

    monkeypatch.setattr(stored_json.orjson, "loads", loads)
    data = orjson.dumps({"id": "r", "output": [{"content": [{"text": text}]}]})
    assert stored_json.loads(bytearray(data))["output"][0]["content"][0]["text"] == text
    if whole:
        assert parsed == [len(data)]
    else:
        # The skeleton, and a long text with escapes a slice at a time: never the whole.
        assert min(parsed) < 200
        assert max(parsed) <= stored_json.SLICE_BYTES + 64
        assert len(parsed) == 1 or "\\" in data.decode()
