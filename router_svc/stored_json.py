"""A stored response's JSON parsed without orjson's copy of it (issue 13).

``orjson.loads`` copies its whole input before it parses it: for a long answer's JSON, read whole
from the state service (GET /v1/responses/{id}), that is the answer once more for a moment, on
top of the JSON read and the text parsed from it. :func:`loads` cuts each long string (a long
answer's text, :data:`LONG_BYTES` or more) out instead: what is left (the skeleton, a few
hundred bytes) is parsed, and each long string is made straight from the JSON's bytes (one copy,
the text itself). Only a long string without escapes, or an ASCII one whose escapes are those
orjson writes, is made so; for anything else :func:`loads` parses the JSON whole, as orjson
does: either way the value is the same.
"""

from __future__ import annotations

import codecs
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
    ascii_only = data.isascii()
    view = memoryview(data)
    texts: list[str] = []
    for start, end in spans:
        text = _text(data, view, start, end, ascii_only=ascii_only)
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


def _text(
    data: bytes | bytearray, view: memoryview, start: int, end: int, *, ascii_only: bool
) -> str | None:
    """The string whose JSON content is ``data[start:end]``, made from it in one copy; None when
    it is not one this module makes (the caller parses the JSON whole)."""
    if data.find(b"\\", start, end) < 0:
        try:
            return str(view[start:end], "utf-8")
        except UnicodeDecodeError:
            return None
    # JSON's escapes are Python's but "\/" and the surrogate pairs of "\uXXXX" (orjson writes
    # neither); an ASCII text's other bytes are the same in either.
    if not ascii_only or data.find(b"\\/", start, end) >= 0:
        return None
    if data.find(b"\\ud", start, end) >= 0 or data.find(b"\\uD", start, end) >= 0:
        return None
    try:
        text, _ = codecs.unicode_escape_decode(view[start:end])
    except UnicodeDecodeError:
        return None
    return str(text)


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
