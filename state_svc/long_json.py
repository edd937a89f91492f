"""A large response JSON checked, and its output items found in it, without parsing its long
strings (issue 13).

Parsing a turn's response JSON whole (to check it is an object and, with
``response_json_with_output_items``, to take its output items) holds the answer twice more for a
moment: orjson's copy of the input and the parsed text. Here each long string (a long answer's
text, :data:`LONG_BYTES` or more) is cut out instead: what is left (the skeleton, a few hundred
bytes) is parsed, and each long string is checked on its own, in place. An item's JSON is then
found in the request (a view of it, see state_svc.wire) exactly as ``orjson.dumps`` encodes the
item, its long strings compared by where they are, not by their bytes.

Only a JSON that is an object of its own (as PutTurnChunked receives it) takes this path, only
with few quotes (:data:`QUOTE_EVERY`), and only when each long string is as orjson writes it (each slice of it parsed and encoded again to the same bytes);
for anything else :func:`skeleton` answers None and the caller parses the JSON whole, as it
always did: either way the same JSON is accepted and the same bytes are stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
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
# A long string is checked this many bytes at a time. Each slice is copied and decoded for a
# moment (two copies of it or more): larger slices cost a short answer a good part of its size
# again (256 KB ones: 1x of a 0.5 MB answer); 64 KB ones take the same CPU (a 4 MB answer is
# checked in 26-27 ms either way).
_SLICE = 64 * 1024
# Strings are found a quote at a time in Python (about a microsecond each), where a whole parse
# runs in C: a JSON with more quotes than one in this many bytes (escaped ones in a long answer
# count too: code, quoted JSON) is parsed whole, so that its check never costs more CPU than the
# whole parse it replaces (330 ms for 4 MB with a quote every 10 bytes, against about 15 ms).
QUOTE_EVERY = 256


@dataclass(frozen=True)
class Skeleton:
    """A JSON object with each long string replaced by ``_PLACEHOLDER % n``; ``spans[n]`` is
    where the n-th long string's content is in the JSON (start, end: quotes excluded)."""

    value: dict[str, Any]
    spans: list[tuple[int, int]]
    source: memoryview


def skeleton(data: memoryview) -> Skeleton | None:
    """The skeleton of ``data`` (a view of a whole bytes or bytearray object, as PutTurnChunked
    receives it), when it is a JSON object with a long string that takes this path (see the
    module docstring); None otherwise (the caller parses it whole). Raises
    orjson.JSONDecodeError when ``data`` is no JSON."""
    raw = data.obj
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != len(data):
        return None
    if raw.find(_MARK_BYTES) >= 0 or raw.count(b'"') > len(raw) // QUOTE_EVERY + 256:
        return None
    spans: list[tuple[int, int]] = []
    parts: list[bytes | memoryview] = []
    at = 0
    for start, end in _strings(raw):
        if end - start < LONG_BYTES:
            continue
        if not _canonical(raw, start, end):
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


def _strings(raw: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """Where each string of the JSON ``raw`` is (its content, quotes excluded), as JSON lexes
    them: outside a string a quote opens one, inside one an unescaped quote ends it."""
    find = raw.find
    at = find(b'"')
    while at >= 0:
        end = find(b'"', at + 1)
        while end > 0 and _escaped(raw, end):
            end = find(b'"', end + 1)
        if end < 0:
            return  # unterminated: the parse of the skeleton refuses it
        yield at + 1, end
        at = find(b'"', end + 1)


def _escaped(raw: bytes | bytearray, at: int) -> bool:
    """Whether the character at ``at`` follows an odd run of backslashes."""
    run = 0
    while raw[at - 1 - run] == 0x5C:
        run += 1
    return run % 2 == 1


def _canonical(raw: bytes | bytearray, start: int, end: int) -> bool:
    """Whether ``raw[start:end]`` is the content of a JSON string as orjson writes it, checked a
    slice at a time (each cut where no escape or UTF-8 sequence is split): a slice without
    escapes must be UTF-8 without control characters; one with escapes must parse, and its text
    encode again to the same bytes."""
    view = memoryview(raw)
    at = start
    while at < end:
        cut = _cut(raw, min(at + _SLICE, end), end)
        if cut is None:
            return False
        piece = bytes(view[at:cut])
        if b"\\" not in piece:
            if _CONTROL.search(piece):
                return False
            try:
                piece.decode()
            except UnicodeDecodeError:
                return False
        else:
            try:
                text = orjson.loads(b'"' + piece + b'"')
            except orjson.JSONDecodeError:
                return False
            if orjson.dumps(text)[1:-1] != piece:
                return False
        at = cut
    return True


_CONTROL = re.compile(rb"[\x00-\x1f]")


def _cut(raw: bytes | bytearray, at: int, end: int) -> int | None:
    """A place at or after ``at`` (``end`` at the latest) where a string's content can be cut:
    before an ASCII character that no escape spans (an escape that would is the last backslash
    before it that starts one). None when none is found soon (a string of escapes)."""
    for cut in range(at, min(at + 64, end)):
        if raw[cut] >= 0x80:
            continue  # inside a UTF-8 sequence, or its first byte
        last = raw.rfind(b"\\", max(cut - 6, 0), cut)
        if last < 0:
            return cut
        run = 1
        while raw[last - run] == 0x5C:
            run += 1
        # An even run ends with an escaped backslash; an odd one starts an escape at ``last``.
        if run % 2 == 0 or last + (6 if raw[last + 1] == 0x75 else 2) <= cut:
            return cut
    return end if at + 64 >= end else None


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
