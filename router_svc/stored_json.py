"""A long answer's JSON parsed without orjson's copy of it (issue 13).

``orjson.loads`` copies its whole input before it parses it: for a long answer's JSON (a stored
response read whole from the state service for GET /v1/responses/{id}, or a hub's answer to a
turn not streamed), that is the answer once more for a moment, on top of the JSON read and the
text parsed from it. :func:`loads` cuts each long string (a long answer's text,
:data:`LONG_BYTES` or more) out instead: what is left (the skeleton, a few hundred bytes) is
parsed, and each long string is made straight from the JSON's bytes: in one copy when it has no
escapes, else parsed by orjson a slice at a time onto the text. A JSON with too many strings for
that to be cheap is parsed whole, as orjson does: either way the value is the same.
"""

from __future__ import annotations

from typing import Any

import orjson

# A string this long (its bytes in the JSON, quotes excluded) is cut out of the skeleton.
LONG_BYTES = 64 * 1024
# Strings are found a quote at a time in Python (about a microsecond each), where a whole parse
# runs in C: a JSON with more quotes than one in this many bytes (escaped ones in a long answer
# count too) is parsed whole, so that cutting never costs much more CPU than the parse.
QUOTE_EVERY = 256
# What a long string becomes in the skeleton: a private-use character no JSON of the router holds
# (a JSON that holds it is parsed whole).
_MARK = "\ue000respgw-long-"
_MARK_BYTES = _MARK.encode()
_BACKSLASH = 0x5C


def loads(data: bytes | bytearray) -> Any:
    """``orjson.loads(data)``, each long string made from ``data`` itself (see the module
    docstring). Raises orjson.JSONDecodeError when ``data`` is no JSON."""
    if len(data) < LONG_BYTES or data.find(_MARK_BYTES) >= 0:
        return orjson.loads(data)
    spans = _long_strings(data)
    if not spans:
        return orjson.loads(data)
    view = memoryview(data)
    texts: list[str] = []
    for start, end in spans:
        text = _text(data, view, start, end)
        if text is None:
            return orjson.loads(data)
        texts.append(text)
    pieces: list[bytes] = []
    at = 0
    for n, (start, end) in enumerate(spans):
        pieces.append(bytes(view[at:start]))
        pieces.append(f"{_MARK}{n}\ue000".encode())
        at = end
    pieces.append(bytes(view[at:]))
    del view
    value = orjson.loads(b"".join(pieces))
    found = _fill(value, texts)
    if found != len(texts):  # a long string that was a key: never from the router
        return orjson.loads(data)
    return value


def _long_strings(data: bytes | bytearray) -> list[tuple[int, int]] | None:
    """Where each long string's content is in ``data`` (start, end: quotes excluded), in order;
    None for a JSON with too many quotes or an unterminated string."""
    spans: list[tuple[int, int]] = []
    limit = len(data) // QUOTE_EVERY + 64
    quotes = 0
    at = 0
    find = data.find
    while True:
        start = find(b'"', at)
        if start < 0:
            return spans
        end = start
        while True:
            end = find(b'"', end + 1)
            quotes += 1
            if end < 0 or quotes > limit:
                return None
            k = end - 1
            while data[k] == _BACKSLASH:
                k -= 1
            if (end - 1 - k) % 2 == 0:  # not escaped
                break
        if end - start - 1 >= LONG_BYTES:
            spans.append((start + 1, end))
        at = end + 1


def _text(data: bytes | bytearray, view: memoryview, start: int, end: int) -> str | None:
    """The string whose JSON content is ``data[start:end]``, made from it without a copy of
    the whole: in one copy when it has no escapes, else a slice at a time (:func:`_unescaped`).
    None when it is no JSON string (the caller parses the JSON whole, to orjson's error)."""
    if data.find(b"\\", start, end) < 0:
        try:
            return str(view[start:end], "utf-8")
        except UnicodeDecodeError:
            return None
    return _unescaped(data, start, end)


# The bytes of a long string with escapes parsed at once (by orjson, a slice at a time).
SLICE_BYTES = 64 * 1024
# How far past a slice's end a place to cut it is looked for (any text has one within a few bytes).
_CUT_SEARCH = 4096


def _unescaped(data: bytes | bytearray, start: int, end: int) -> str | None:
    """The string whose JSON content (escapes and all) is ``data[start:end]``: each slice of it
    parsed as a JSON string by orjson, appended in place to the text made so far (CPython grows
    a str nothing else holds; glibc remaps a large one), so that the text is made once, never
    held twice. A slice ends before an ASCII byte (never inside a UTF-8 character) with no
    backslash in the 6 bytes before it (never inside an escape such as ``\\uXXXX``, nor
    between the halves of a surrogate pair)."""
    text = ""
    at = start
    while at < end:
        cut = _cut(data, at + SLICE_BYTES, end)
        if cut is None:
            return None
        try:
            text += orjson.loads(b'"' + data[at:cut] + b'"')
        except orjson.JSONDecodeError:
            return None
        at = cut
    return text


def _cut(data: bytes | bytearray, target: int, end: int) -> int | None:
    """Where a slice that should end at ``target`` ends (see :func:`_unescaped`); None when no
    place is found near it (the JSON is then parsed whole)."""
    if target >= end:
        return end
    for cut in range(target, min(end, target + _CUT_SEARCH)):
        if data[cut] < 0x80 and data.find(b"\\", cut - 6, cut) < 0:
            return cut
    return None


def _fill(value: Any, texts: list[str]) -> int:
    """Puts each long string back where its mark is in ``value``; how many it put back."""
    found = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            entries: Any = node.items()
        elif isinstance(node, list):
            entries = enumerate(node)
        else:
            continue
        for key, item in list(entries):
            if isinstance(item, str):
                if item.startswith(_MARK) and item.endswith("\ue000"):
                    node[key] = texts[int(item[len(_MARK) : -1])]
                    found += 1
            elif isinstance(item, (dict, list)):
                stack.append(item)
    return found
