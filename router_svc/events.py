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
from collections.abc import Mapping
from typing import Any

import orjson

from router_svc import errors
from router_svc.response import NO_RESOURCES, response_object
from router_svc.validate import TurnRequest

# The error code of a hub stream that ended before the hub said it had finished.
STREAM_INCOMPLETE = "upstream_stream_incomplete"

# The last bytes of every SSE stream the router sends, after its terminal event (as OpenAI ends its
# streams); the openai SDK stops reading there.
SSE_DONE = b"data: [DONE]\n\n"


def sse_encode(event: dict[str, Any]) -> bytes:
    """One server-sent event whose ``event:`` line is the event's type."""
    # One copy of the event's JSON, not one per concatenation: a terminal event holds the answer.
    return b"".join(
        (b"event: ", str(event["type"]).encode(), b"\ndata: ", orjson.dumps(event), b"\n\n")
    )


def sse_pieces(event: dict[str, Any]) -> tuple[bytes, ...]:
    """The bytes of :func:`sse_encode`, in three pieces when the event is large (a ``.done`` or
    terminal event of a long answer), so that its JSON is not copied once more to join them."""
    data = orjson.dumps(event)
    if len(data) < _LARGE_EVENT:
        return (b"".join((b"event: ", str(event["type"]).encode(), b"\ndata: ", data, b"\n\n")),)
    return (b"event: " + str(event["type"]).encode() + b"\ndata: ", data, b"\n\n")


_LARGE_EVENT = 64 * 1024


def ended_early(detail: str) -> errors.UpstreamError:
    return errors.UpstreamError(
        f"The model server ended the stream before the answer was finished ({detail}).",
        code=STREAM_INCOMPLETE,
    )


class Events:
    """Numbers the events of one stream."""

    def __init__(self) -> None:
        self.next = 0

    def make(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.next, **fields}
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
        self._final: dict[str, Any] | None = None

    def start(self) -> list[dict[str, Any]]:
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
