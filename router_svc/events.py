"""Responses streaming events: their numbering, their SSE encoding, and what every stream shares.

Every sequence starts with ``response.created`` and ``response.in_progress``; ``sequence_number``
starts at 0 and grows by one per event. Each output item is opened with
``response.output_item.added`` and closed with ``response.output_item.done`` before the next one
opens, keeps its id and ``output_index`` throughout, and is followed by the terminal event:
``response.completed``, ``response.incomplete`` (the hub hit max tokens or its content filter),
or ``error`` then ``response.failed``. Items still open when a stream fails are not closed: the
failed response carries them with status ``incomplete``. The SSE stream the client gets ends with
:data:`SSE_DONE` after that, as OpenAI's does.

A hub's stream is finished only when the hub said so: a chat stream by a ``finish_reason`` in its
choice, a Responses stream by its terminal event. A stream that ends without it (a model server
that stopped or was restarted mid-answer and closed the connection cleanly, with or without
``[DONE]``) is an early end: ``finish()`` raises :class:`errors.UpstreamError` with code
:data:`STREAM_INCOMPLETE`, the caller answers ``response.failed`` (:meth:`fail`), and the partial
answer is never stored as ``completed`` (nor as ``incomplete``, whose reasons say the model stopped
on purpose), so no later turn builds on it.

:mod:`router_svc.replay` rebuilds that sequence from a stored response. Each dialect
(:mod:`router_svc.dialects`) translates its hub's stream into these events on the
:class:`Translator` base.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator, Mapping
from typing import Any, Unpack

import orjson

from router_svc import errors
from router_svc.response import NO_RESOURCES, response_object
from router_svc.shapes import EventFields, ResponseObject, StreamEvent
from router_svc.validate import TurnRequest

# The error code of a hub stream that ended before the hub said it had finished.
STREAM_INCOMPLETE = "upstream_stream_incomplete"

# The last bytes of every SSE stream the router sends, after its terminal event (as OpenAI ends its
# streams); the openai SDK stops reading there.
SSE_DONE = b"data: [DONE]\n\n"


def sse_encode(event: StreamEvent) -> bytes:
    """One server-sent event whose ``event:`` line is the event's type."""
    # One copy of the event's JSON, not one per concatenation: a terminal event holds the answer.
    return b"".join(
        (b"event: ", str(event["type"]).encode(), b"\ndata: ", orjson.dumps(event), b"\n\n")
    )


def sse_pieces(event: StreamEvent) -> tuple[bytes, ...]:
    """The bytes of :func:`sse_encode`, in three pieces when the event is large (a ``.done`` or
    terminal event of a long answer), so that its JSON is not copied once more to join them."""
    data = orjson.dumps(event)
    if len(data) < _LARGE_EVENT:
        return (b"".join((b"event: ", str(event["type"]).encode(), b"\ndata: ", data, b"\n\n")),)
    return (b"event: " + str(event["type"]).encode() + b"\ndata: ", data, b"\n\n")


_LARGE_EVENT = 64 * 1024


def sse_slices(event: StreamEvent) -> Iterator[bytes]:
    """The bytes of :func:`sse_encode` in pieces of about SSE_SLICE bytes, the event's JSON never
    whole (see :func:`json_slices`). For the ``.done`` and terminal events of a long answer, each
    of which holds the answer: sent while the turn is stored, they would otherwise each cost a
    copy of it."""
    pieces = json_slices(event)
    if pieces is None:
        yield from sse_pieces(event)
        return
    yield b"event: " + str(event["type"]).encode() + b"\ndata: "
    yield from pieces
    yield b"\n\n"


def json_slices(value: Any) -> Iterator[bytes] | None:
    """``orjson.dumps(value)`` in pieces of about SSE_SLICE bytes, never whole: each string of
    SSE_SLICE characters or more is encoded a slice at a time (JSON escapes each character
    alone, so the slices add up to the string's encoding). None when ``value`` holds no such
    string (its JSON is small enough to make whole)."""
    large: list[str] = []
    token = secrets.token_hex(8)
    hollow = _hollow(value, large, token)
    if not large:
        return None
    # Each large string is a marker in the skeleton's JSON, where its slices go.
    markers = [orjson.dumps(_marker(token, n)) for n in range(len(large))]
    data = orjson.dumps(hollow)
    if any(data.count(marker) != 1 for marker in markers):  # never, but then whole
        return None
    return _slices(data, large, markers)


def _slices(data: bytes, large: list[str], markers: list[bytes]) -> Iterator[bytes]:
    at = 0
    for text, marker in zip(large, markers, strict=True):
        where = data.index(marker, at)
        yield data[at:where] + b'"'
        for i in range(0, len(text), SSE_SLICE):
            yield orjson.dumps(text[i : i + SSE_SLICE])[1:-1]
        at = where + len(marker) - 1  # the marker's closing quote is the string's
    yield data[at:]


# The characters of a string :func:`sse_slices` encodes a slice at a time, and the slice.
SSE_SLICE = 64 * 1024


def _marker(token: str, n: int) -> str:
    return f"\x00respgw-slices-{token}-{n}"


def _hollow(value: Any, large: list[str], token: str) -> Any:
    """A copy of ``value`` (JSON) with each string of SSE_SLICE characters or more replaced by a
    marker (see :func:`sse_slices`) and appended to ``large``."""
    if isinstance(value, str):
        if len(value) < SSE_SLICE:
            return value
        large.append(value)
        return _marker(token, len(large) - 1)
    if isinstance(value, dict):
        return {k: _hollow(v, large, token) for k, v in value.items()}
    if isinstance(value, list):
        return [_hollow(v, large, token) for v in value]
    return value


def ended_early(detail: str) -> errors.UpstreamError:
    return errors.UpstreamError(
        f"The model server ended the stream before the answer was finished ({detail}).",
        code=STREAM_INCOMPLETE,
    )


class Events:
    """Numbers the events of one stream."""

    def __init__(self) -> None:
        self.next = 0

    def make(self, kind: str, **fields: Unpack[EventFields]) -> StreamEvent:
        event: StreamEvent = {"type": kind, "sequence_number": self.next, **fields}
        self.next += 1
        return event


class Translator:
    """What both translators share: the request, the response's identity and echo, the event
    numbering, and the two events every stream opens with."""

    def __init__(
        self,
        req: TurnRequest,
        *,
        response_id: str,
        created_at: int,
        tool_resources: Mapping[str, str] = NO_RESOURCES,
    ) -> None:
        self._req = req
        self._id = response_id
        self._created_at = created_at
        self._resources = dict(tool_resources)
        self._events = Events()
        self._started = False
        self._final: ResponseObject | None = None

    def start(self) -> list[StreamEvent]:
        """``response.created`` and ``response.in_progress``."""
        if self._started:
            return []
        self._started = True
        snapshot = response_object(
            self._req,
            response_id=self._id,
            created_at=self._created_at,
            status="in_progress",
            output=[],
            tool_resources=self._resources,
        )
        return [
            self._events.make("response.created", response=snapshot),
            self._events.make("response.in_progress", response=copy.copy(snapshot)),
        ]
