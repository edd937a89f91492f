"""A large response JSON read without parsing its long strings (state_svc.long_json): the same
object as orjson parses, and each output item the bytes orjson makes, found in the JSON."""

from __future__ import annotations

import orjson
import pytest

from state_svc import long_json

TEXT = ('a "quoted"\nline\twith\\ ünïcode ' + "x" * 600) * (3 * long_json.LONG_BYTES // 630)


def _response(*texts: str) -> bytes:
    output = [
        {"id": f"msg_{n}", "type": "message", "content": [{"type": "output_text", "text": t}]}
        for n, t in enumerate(texts)
    ]
    return orjson.dumps({"id": "resp_1", "output": output, "note": "short"})


def test_the_skeleton_is_the_object_with_long_strings_marked() -> None:
    data = _response(TEXT, "short", TEXT[::-1])
    shape = long_json.skeleton(memoryview(data))
    assert shape is not None
    assert len(shape.spans) == 2
    parsed = orjson.loads(data)
    texts = [o["content"][0]["text"] for o in shape.value["output"]]
    assert texts[1] == "short" and all(t.startswith(long_json._MARK) for t in texts[::2])
    assert {k: v for k, v in shape.value.items() if k != "output"} == {
        k: v for k, v in parsed.items() if k != "output"
    }
    for n, item in enumerate(shape.value["output"]):
        found = long_json.encoded_item(shape, item)
        assert bytes(found) == orjson.dumps(parsed["output"][n])
        if n != 1:
            assert isinstance(found, memoryview) and found.obj is data  # a view, not a copy


@pytest.mark.parametrize(
    "data",
    [
        orjson.dumps({"id": "r", "text": "short"}),  # no long string
        orjson.dumps([TEXT]),  # not an object
        orjson.dumps({"t": TEXT}).replace(
            b"line", b"\\u00e9", 1
        ),  # an escape orjson does not write
    ],
    ids=["short", "array", "escape"],
)
def test_anything_else_is_left_to_the_whole_parse(data: bytes) -> None:
    assert long_json.skeleton(memoryview(data)) is None


def test_broken_json_around_a_long_string_is_refused() -> None:
    data = orjson.dumps({"t": TEXT})[:-1] + b",}"
    with pytest.raises(orjson.JSONDecodeError):
        long_json.skeleton(memoryview(data))


def test_a_json_of_many_quotes_is_left_to_the_whole_parse() -> None:
    """Finding strings costs Python time per quote: past one quote in QUOTE_EVERY bytes the whole
    parse (in C) is cheaper."""
    quoted = 'say "hi" ' * (2 * long_json.LONG_BYTES // 9)
    assert long_json.skeleton(memoryview(_response(quoted))) is None
    assert long_json.skeleton(memoryview(_response(TEXT))) is not None
