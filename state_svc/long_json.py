"""A large response JSON checked, and its output items found in it, without parsing its long
strings (issue 13).

Parsing a turn's response JSON whole (to check it is an object and, with
``response_json_with_output_items``, to take its output items) holds the answer twice more for a
moment: orjson's copy of the input and the parsed text. Here each long string (a long answer's
text, :data:`LONG_BYTES` or more) is cut out instead: what is left (the skeleton, a few hundred
bytes) is parsed, and each long string is checked on its own, in place. An item's JSON is then
found in the request (a view of it, see state_svc.wire) exactly as ``orjson.dumps`` encodes the
item, its long strings compared by where they are, not by their bytes.

Only the strings orjson writes take this path (valid UTF-8, no control character, no escape but
``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\b`` and ``\\f``); for anything else
:func:`skeleton` answers None and the caller parses the JSON whole, as it always did: either way
the same JSON is accepted and the same bytes are stored.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Any

import orjson

# A string this long (its bytes in the JSON, quotes excluded) is cut out of the skeleton.
LONG_BYTES = 64 * 1024
# What a long string becomes in the skeleton: a private-use character no JSON of the router holds
# (a JSON that holds it is parsed whole).
_MARK = "\ue000respgw-long-"
_MARK_BYTES = _MARK.encode()
_PLACEHOLDER = _MARK + "%d\ue000"
# A JSON string: its content between the quotes.
_STRING = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)
# In a long string: a control character, or an escape orjson does not write (a backslash that
# starts an escape: preceded by an even run of them).
_UNUSUAL = re.compile(rb'[\x00-\x1f]|(?<!\\)(?:\\\\)*\\[^"\\nrtbf]')
# Strings are checked as UTF-8 this many bytes at a time.
_UTF8_SLICE = 256 * 1024


@dataclass(frozen=True)
class Skeleton:
    """A JSON object with each long string replaced by ``_PLACEHOLDER % n``; ``spans[n]`` is
    where the n-th long string's content is in the JSON (start, end: quotes excluded)."""

    value: dict[str, Any]
    spans: list[tuple[int, int]]
    source: memoryview


def skeleton(data: memoryview) -> Skeleton | None:
    """The skeleton of ``data``, when it is a JSON object with a long string that takes this
    path (see the module docstring); None otherwise (the caller parses it whole). Raises
    orjson.JSONDecodeError when ``data`` is no JSON."""
    if re.search(re.escape(_MARK_BYTES), data):
        return None
    spans: list[tuple[int, int]] = []
    parts: list[bytes | memoryview] = []
    at = 0
    for match in _STRING.finditer(data):
        start, end = match.span(1)
        if end - start < LONG_BYTES:
            continue
        if _UNUSUAL.search(data, start, end) or not _utf8(data[start:end]):
            return None
        parts += (data[at:start], _PLACEHOLDER.encode() % len(spans))
        spans.append((start, end))
        at = end
    if not spans:
        return None
    parts.append(data[at:])
    value = orjson.loads(b"".join(parts))
    if not isinstance(value, dict):
        return None
    return Skeleton(value, spans, data)


def _utf8(data: memoryview) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, len(data), _UTF8_SLICE):
            decoder.decode(data[start : start + _UTF8_SLICE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def encoded_item(shape: Skeleton, item: Any) -> memoryview | bytes:
    """``orjson.dumps(item)`` for ``item``, a value in ``shape.value``: a view of the JSON when it
    holds those bytes (as the router's does), else the bytes made here."""
    encoded = orjson.dumps(item)
    pieces = re.split(re.escape(b'"' + _MARK_BYTES) + rb"(\d+)\xee\x80\x80\"", encoded)
    if len(pieces) == 1:
        return encoded  # no long string in it
    found = _find(shape, pieces)
    if found is not None:
        return found
    # Not in the JSON as orjson encodes it: made here, long strings and all.
    out = bytearray(pieces[0])
    for n in range(1, len(pieces), 2):
        start, end = shape.spans[int(pieces[n])]
        out += b'"' + shape.source[start:end] + b'"' + pieces[n + 1]
    return bytes(out)


def _find(shape: Skeleton, pieces: list[bytes]) -> memoryview | None:
    """Where the JSON holds the item ``pieces`` stand for (its own bytes between long strings,
    each long string's index), as a view; None when it does not."""
    source = shape.source
    head = re.compile(re.escape(pieces[0]))
    for match in head.finditer(source):
        at = match.end()
        for n in range(1, len(pieces), 2):
            start, end = shape.spans[int(pieces[n])]
            after = pieces[n + 1]
            if at + 1 != start or source[end : end + 1 + len(after)] != b'"' + after:
                break
            at = end + 1 + len(after)
        else:
            return source[match.start() : at]
    return None
