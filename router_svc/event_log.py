"""The stored event log of a streamed turn: the events as they were sent, in a compact form.

:class:`EventLog` keeps the events of a live stream as the turn sends them
(router_svc.streaming) and dumps them with the response they built
(StoredResponse.stream_events_json); :func:`expand_log` turns a stored log back into exactly those
events (:func:`router_svc.replay.stored_stream`, what GET /v1/responses/{id}?stream=true sends).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, cast

import orjson

from router_svc.shapes import ResponseObject, StreamEvent

# The stored event log (StoredResponse.stream_events_json) of a streamed turn is a JSON array of
# the events as they were sent, in a compact form that :func:`expand_log` turns back into exactly
# those events, given the response stored with them:
#
# - a run of consecutive deltas of one text (same type, item, part; no logprobs) is one record: the
#   first delta with its "delta" emptied and LOG_DELTAS, the length of each delta in characters
#   (unsigned LEB128 varints, base64-encoded: a byte per delta of up to 127 characters); their
#   text is the stored response's (output_text, refusal and reasoning text, a summary's text, a
#   function call's arguments), in order;
# - an event whose text or object is in the stored response as it was sent (the ``.done`` events,
#   the terminal event's response) has that member nulled and named by LOG_FROM.
#
# Any other event is stored as it was. A few-byte delta costs about 150 bytes as an event, so a log
# of every event as sent cost tens of times the answer (issue 13); this one costs about a byte per
# delta. An older log (every event whole) is read unchanged.
LOG_DELTAS = "respgw_deltas"
LOG_FROM = "respgw_from"

# Where the text of a delta or done event is in the response: the member of the event, and the
# path of the value in response["output"][output_index].
_TEXT_OF: dict[str, tuple[str, tuple[str, ...]]] = {
    "response.output_text.delta": ("delta", ("content", "content_index", "text")),
    "response.output_text.done": ("text", ("content", "content_index", "text")),
    "response.refusal.delta": ("delta", ("content", "content_index", "refusal")),
    "response.refusal.done": ("refusal", ("content", "content_index", "refusal")),
    "response.reasoning_text.delta": ("delta", ("content", "content_index", "text")),
    "response.reasoning_text.done": ("text", ("content", "content_index", "text")),
    "response.reasoning_summary_text.delta": ("delta", ("summary", "summary_index", "text")),
    "response.reasoning_summary_text.done": ("text", ("summary", "summary_index", "text")),
    "response.function_call_arguments.delta": ("delta", ("arguments",)),
    "response.function_call_arguments.done": ("arguments", ("arguments",)),
    "response.content_part.done": ("part", ("content", "content_index")),
    "response.reasoning_summary_part.done": ("part", ("summary", "summary_index")),
    "response.output_item.done": ("item", ()),
}
# The members a delta of a run may have (any other, such as a hub's "obfuscation", differs from
# delta to delta: such deltas are stored whole).
_RUN_KEYS = frozenset(
    {
        "type",
        "sequence_number",
        "item_id",
        "output_index",
        "content_index",
        "summary_index",
        "delta",
        "logprobs",
    }
)
_WHOLE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _in_response(response: Mapping[str, Any], event: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The member of ``event`` the response holds, and its value there; None when it has none."""
    kind = event["type"]
    if kind in _WHOLE:
        return "response", response
    where = _TEXT_OF.get(kind)
    if where is None:
        return None
    member, path = where
    try:
        value: Any = response["output"][event["output_index"]]
        i = 0
        while i < len(path):
            if i + 1 < len(path) and path[i + 1].endswith("_index"):
                value = value[path[i]][event[path[i + 1]]]
                i += 2
            else:
                value = value[path[i]]
                i += 1
    except (KeyError, IndexError, TypeError):
        return None
    return member, value


class _Run:
    """Consecutive deltas of one text: the first event, each length, and a CRC of the text."""

    __slots__ = ("chars", "crc", "first", "lengths", "next")

    def __init__(self, first: StreamEvent) -> None:
        self.first = first
        self.lengths = bytearray()
        self.chars = 0
        self.crc = 0
        self.next = int(first["sequence_number"])
        self.add(first["delta"])

    def extends(self, event: StreamEvent) -> bool:
        first = self.first
        # The first delta's members are all in _RUN_KEYS: the same members, the same values but
        # the number and the text.
        return (
            event["sequence_number"] == self.next
            and event["type"] == first["type"]
            and event.keys() == first.keys()
            and event.get("output_index") == first.get("output_index")
            and event.get("content_index") == first.get("content_index")
            and event.get("summary_index") == first.get("summary_index")
            and event.get("item_id") == first.get("item_id")
            and event.get("logprobs") == first.get("logprobs")
        )

    def add(self, delta: str) -> None:
        n = len(delta)
        self.chars += n
        if n < 0x80:
            self.lengths.append(n)
            self.crc = zlib.crc32(delta.encode(), self.crc)
            self.next += 1
            return
        while n > 0x7F:
            self.lengths.append(0x80 | (n & 0x7F))
            n >>= 7
        self.lengths.append(n)
        self.crc = zlib.crc32(delta.encode(), self.crc)
        self.next += 1


def _lengths(encoded: str) -> Iterator[int]:
    """The lengths of a run's deltas, decoded a slice of ``encoded`` at a time (a replay of a
    long answer's run holds a few KB of them, not a byte per delta)."""
    n = shift = 0
    for at in range(0, len(encoded), _LENGTHS_SLICE):
        for byte in base64.b64decode(encoded[at : at + _LENGTHS_SLICE]):
            n |= (byte & 0x7F) << shift
            if byte & 0x80:
                shift += 7
            else:
                yield n
                n = shift = 0


def _varints(data: bytes | bytearray) -> Iterator[int]:
    """The lengths of a run's deltas (unsigned LEB128 varints)."""
    n = shift = 0
    for byte in data:
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            yield n
            n = shift = 0


# The characters of a run's base64 lengths decoded at once: a multiple of 4, so that each slice
# decodes on its own (base64 encodes 3 bytes as 4 characters; only the last slice is padded).
_LENGTHS_SLICE = 16 * 1024


# A stream of fewer events, with fewer characters of deltas, is stored as its events.
PLAIN_EVENTS = 256
PLAIN_CHARS = 64 * 1024


class EventLog:
    """The events of a streamed turn as they are sent, kept for its stored log (see LOG_DELTAS):
    deltas as their lengths and a checksum, other events as they are (their texts are shared
    with the response being built, not copied)."""

    def __init__(self, *, compact: bool = False) -> None:
        # A short stream is kept as its events, stored as they are (what it costs is little,
        # and the compact form costs CPU per event); past PLAIN_EVENTS events or PLAIN_CHARS
        # characters of deltas (or from the start, with ``compact``), in the compact form.
        self._plain: list[StreamEvent] | None = None if compact else []
        # Whether the stream is past PLAIN_EVENTS events or PLAIN_CHARS characters of deltas
        # (kept in the compact form): an attribute, read for every event (router_svc.streaming).
        self.long = compact
        self._chars = 0
        self._records: list[StreamEvent | _Run] = []
        self._run: _Run | None = None

    def add(self, event: StreamEvent) -> None:
        plain = self._plain
        if plain is None:
            self._add(event)
            return
        plain.append(event)
        delta = event.get("delta")
        if isinstance(delta, str):
            self._chars += len(delta)
        if len(plain) >= PLAIN_EVENTS or self._chars >= PLAIN_CHARS:
            self._plain = None
            self.long = True
            for earlier in plain:
                self._add(earlier)

    def _add(self, event: StreamEvent) -> None:
        kind = event["type"]
        run = self._run
        if run is not None and run.extends(event):
            run.add(event["delta"])
            return
        if (
            kind.endswith(".delta")
            and kind in _TEXT_OF
            and isinstance(event.get("delta"), str)
            and not event.get("logprobs")
            and _RUN_KEYS.issuperset(event)
        ):
            self._run = _Run(event)
            self._records.append(self._run)
            return
        self._run = None
        self._records.append(event)

    def replay(self, response: ResponseObject) -> Iterator[StreamEvent] | None:
        """The events added, in order, each made as it is taken (a run's deltas cut from the
        texts of ``response``, the response these events built): what :meth:`dump` stores,
        expanded as :func:`iter_log` would, without encoding it. For a stream held until its
        turn is stored (router_svc.streaming.buffered_stream), which then costs what the log
        costs, not its events. None when the deltas do not add up to the response's texts (as
        :meth:`dump`)."""
        if self._plain is not None:
            return iter(self._plain)
        offsets: dict[tuple[Any, ...], int] = {}
        for record in self._records:
            if isinstance(record, _Run):
                first = record.first
                found = _in_response(response, first)
                key = _text_key(first)
                start = offsets.get(key, 0)
                end = start + record.chars
                if (
                    found is None
                    or not isinstance(found[1], str)
                    or _crc(found[1], start, end) != record.crc
                ):
                    return None
                offsets[key] = end
            else:
                _advance(offsets, record)
        return self._expanded(response)

    def _expanded(self, response: ResponseObject) -> Iterator[StreamEvent]:
        offsets: dict[tuple[Any, ...], int] = {}
        for record in self._records:
            if not isinstance(record, _Run):
                _advance(offsets, record)
                yield record
                continue
            first = record.first
            found = _in_response(response, first)
            text = found[1] if found is not None and isinstance(found[1], str) else ""
            key = _text_key(first)
            at = offsets.get(key, 0)
            seq = int(first["sequence_number"])
            for n in _varints(record.lengths):
                yield cast(
                    StreamEvent, {**first, "sequence_number": seq, "delta": text[at : at + n]}
                )
                at += n
                seq += 1
            offsets[key] = at

    def dump(self, response: ResponseObject) -> bytes:
        """The log as stored with ``response``, the response these events built. Empty (a replay
        is then rebuilt from the response alone) in the unlikely case that the deltas do not add
        up to the response's texts."""
        if self._plain is not None:
            return orjson.dumps(self._plain)
        records: list[Mapping[str, Any]] = []
        offsets: dict[tuple[Any, ...], int] = {}  # where the next delta of each text starts
        for record in self._records:
            if isinstance(record, _Run):
                first = record.first
                found = _in_response(response, first)
                key = _text_key(first)
                start = offsets.get(key, 0)
                end = start + record.chars
                if (
                    found is None
                    or not isinstance(found[1], str)
                    or _crc(found[1], start, end) != record.crc
                ):
                    return b""
                offsets[key] = end
                lengths = base64.b64encode(record.lengths).decode()
                records.append({**first, "delta": "", LOG_DELTAS: lengths})
                continue
            _advance(offsets, record)
            found = _in_response(response, record)
            if found is not None and _same(record.get(found[0]), found[1]):
                records.append({**record, found[0]: None, LOG_FROM: found[0]})
            else:
                records.append(record)
        return orjson.dumps(records)


# The characters of a text encoded at once for its checksum (a long answer is not encoded whole).
_CRC_SLICE = 64 * 1024


def _crc(text: str, start: int, end: int) -> int:
    """The CRC-32 of the UTF-8 of ``text[start:end]``, a slice at a time."""
    crc = 0
    for at in range(start, end, _CRC_SLICE):
        crc = zlib.crc32(text[at : min(at + _CRC_SLICE, end)].encode(), crc)
    return crc


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b


def _text_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """Which text a delta adds to."""
    return (
        event["type"],
        event.get("output_index"),
        event.get("content_index"),
        event.get("summary_index"),
    )


def _advance(offsets: dict[tuple[Any, ...], int], event: Mapping[str, Any]) -> None:
    """Counts the text of a delta stored whole (with logprobs, say) among its text's deltas."""
    delta = event.get("delta")
    if isinstance(delta, str) and event["type"].endswith(".delta") and event["type"] in _TEXT_OF:
        key = _text_key(event)
        offsets[key] = offsets.get(key, 0) + len(delta)


def expand_log(events: list[dict[str, Any]], response: ResponseObject) -> list[StreamEvent]:
    """The events a stored log (see LOG_DELTAS) stands for, with ``response`` stored with it."""
    return list(iter_log(events, response))


def iter_log(events: list[dict[str, Any]], response: ResponseObject) -> Iterator[StreamEvent]:
    """:func:`expand_log` one event at a time (a long answer's log stands for a hundred thousand
    events: a replay sends them as they are made)."""
    offsets: dict[tuple[Any, ...], int] = {}
    for record in events:
        if LOG_DELTAS in record:
            found = _in_response(response, record)
            text = found[1] if found is not None and isinstance(found[1], str) else ""
            key = _text_key(record)
            at = offsets.get(key, 0)
            base = {k: v for k, v in record.items() if k != LOG_DELTAS}
            seq = int(record["sequence_number"])
            for n in _lengths(record[LOG_DELTAS]):
                yield _event({**base, "sequence_number": seq, "delta": text[at : at + n]})
                at += n
                seq += 1
            offsets[key] = at
        elif LOG_FROM in record:
            member = record[LOG_FROM]
            found = _in_response(response, record)
            value = found[1] if found is not None else None
            event = {k: (value if k == member else v) for k, v in record.items() if k != LOG_FROM}
            _advance(offsets, event)
            yield _event(event)
        else:
            _advance(offsets, record)
            yield _event(record)


def _event(record: dict[str, Any]) -> StreamEvent:
    # A stored log is parsed JSON, not checked: a record without the log's own keys is the
    # event as it was sent.
    return cast(StreamEvent, record)
