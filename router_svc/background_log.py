"""A background response's event log, as its runs write it and its readers follow it.

A run's events are numbered after those earlier runs left in the log (:class:`Stitch`: a run that
takes over continues the log), go into it in order (:class:`Event`, appended by
:mod:`router_svc.background_run`), and reach a client only once they are in it: the client of the
streamed POST this router runs (:class:`Client`), or any client on any router that follows the
log with ``GET /v1/responses/{id}?stream=true`` (:func:`follow`, WatchResponseEvents on the
background worker's own channel).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import orjson

from gateway.logs import REQUEST_ID_HEADER, request_id_var
from router_svc import include as included
from router_svc import state_records
from router_svc.events import SSE_DONE, sse_encode
from router_svc.replay import stored_stream
from router_svc.services import Services
from router_svc.shapes import Item, StreamEvent

if TYPE_CHECKING:
    from router_svc.state_client import StateStub

log = logging.getLogger(__name__)

# The events that end a stream; the stream of a background response ends with one of them.
TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "response.cancelled"}
)


def watch_stub(svc: Services) -> StateStub:
    """The background worker's own stub, for WatchResponseEvents (the one streaming call)."""
    if svc.worker is None:
        raise RuntimeError("the background worker was not started")
    return svc.worker.stub


@dataclasses.dataclass(eq=False)
class Event:
    """One event of the run as it goes into the log: its number, type and JSON."""

    sequence: int
    type: str
    json: bytes

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> Event:
        return cls(int(event["sequence_number"]), str(event["type"]), orjson.dumps(event))

    def pb(self) -> state_records.ResponseEvent:
        return state_records.response_event(self.sequence, self.json)

    def sse(self) -> bytes:
        return b"event: " + self.type.encode() + b"\ndata: " + self.json + b"\n\n"


class Client:
    """The client of a streamed POST that this router runs: it gets each event once it is in the
    log, and after the run's end whatever the log holds beyond (a cancel, a takeover)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.last = -1
        self.ended = False

    def deliver(self, events: Sequence[Event]) -> None:
        for event in events:
            self.queue.put_nowait(event.sse())
            self.last = event.sequence
            self.ended = self.ended or event.type in TERMINAL_EVENTS

    def close(self) -> None:
        self.queue.put_nowait(None)

    async def stream(self, svc: Services, tenant: str, response_id: str) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk
        if not self.ended:
            async for chunk in _follow(svc, tenant, response_id, self.last):
                yield chunk
        yield SSE_DONE


class Stitch:
    """Numbers a run's events after those earlier runs left in the log. A run that takes over
    continues the log: the earlier run's output items still open are closed as incomplete, its
    own response.created and response.in_progress are left out (the log has them), and its
    output indexes come after the earlier ones."""

    def __init__(self, prior: Sequence[dict[str, Any]], last_sequence: int) -> None:
        self.next = last_sequence + 1
        self.resumed = last_sequence >= 0
        self.offset = 0
        open_items: dict[int, Item] = {}
        for event in prior:
            index = event.get("output_index")
            if not isinstance(index, int):
                continue
            self.offset = max(self.offset, index + 1)
            if event["type"] == "response.output_item.added":
                open_items[index] = event.get("item") or {}
            elif event["type"] == "response.output_item.done":
                open_items.pop(index, None)
        self.closing: list[StreamEvent] = [
            {
                "type": "response.output_item.done",
                "output_index": index,
                "item": {**item, "status": "incomplete"},
            }
            for index, item in sorted(open_items.items())
        ]

    def map(self, events: Sequence[StreamEvent]) -> list[Event]:
        out = [self._numbered(event) for event in self.closing]
        self.closing = []
        for event in events:
            if self.resumed:
                if event["type"] in ("response.created", "response.in_progress"):
                    continue
                if "output_index" in event:
                    event = {**event, "output_index": event["output_index"] + self.offset}
            out.append(self._numbered(event))
        return out

    def _numbered(self, event: StreamEvent) -> Event:
        numbered = Event.of({**event, "sequence_number": self.next})
        self.next += 1
        return numbered


def follow(
    svc: Services,
    tenant: str,
    response_id: str,
    after: int,
    *,
    include: Collection[str] | None = None,
) -> AsyncIterator[bytes]:
    """GET /v1/responses/{id}?stream=true on a running response: the events after ``after``,
    stored then live, to the terminal event, then ``data: [DONE]``. With ``include`` (the
    reader's), a code_interpreter_call's outputs are shown only if it asks (router_svc.include);
    without, the events go as logged."""

    async def body() -> AsyncIterator[bytes]:
        async for chunk in _follow(svc, tenant, response_id, after, include):
            yield chunk
        yield SSE_DONE

    return body()


# Calls again after a broken stream (a state replica that stopped) this many times in a row.
_WATCH_RETRIES = 5


# A logged event that may hold a code_interpreter_call has this in its JSON.
_CALL_JSON = b'"code_interpreter_call"'


async def _follow(
    svc: Services,
    tenant: str,
    response_id: str,
    after: int,
    include: Collection[str] | None = None,
) -> AsyncIterator[bytes]:
    last, ended, failures = after, False, 0
    opened_ended = False
    metadata = ((REQUEST_ID_HEADER, request_id_var.get()),)
    while not ended:
        request = state_records.watch_events(tenant, response_id, last)
        try:
            watch = watch_stub(svc).WatchResponseEvents(request, metadata=metadata)
            async for reply in watch:
                for e in reply.events:
                    kind = orjson.loads(e.json).get("type", "")
                    if e.sequence_number == 0 and kind in TERMINAL_EVENTS:
                        # Ended before it ever ran (cancelled while queued): the log holds only
                        # its end. It is told as stored below, from response.created on.
                        opened_ended = True
                        break
                    data = e.json
                    if include is not None and _CALL_JSON in data:
                        data = orjson.dumps(included.hidden(orjson.loads(data), include))
                    yield b"event: " + str(kind).encode() + b"\ndata: " + data + b"\n\n"
                    last = e.sequence_number
                    ended = ended or kind in TERMINAL_EVENTS
                if opened_ended:
                    watch.cancel()
                    break
                failures = 0
            break
        except grpc.aio.AioRpcError as exc:
            retry = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
            if not retry or failures >= _WATCH_RETRIES:
                if exc.code() not in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    log.warning(
                        "following a background response failed", extra={"code": exc.code().name}
                    )
                break
            failures += 1
            await asyncio.sleep(0.1 * 2**failures)
    if ended:
        return
    # The log ended without a terminal event (a turn finished without one, or the stream could
    # not be followed): the rest as stored.
    found = await svc.state.find(
        svc.state.get_response(state_records.get_response(tenant, response_id=response_id))
    )
    if found is None:
        return
    response = state_records.response_of(found.response)
    stored = found.response.stream_events_json
    events = stored_stream(response, orjson.loads(stored) if stored else None)
    if include is not None:
        events = list(included.events(events, response, include))
    for event in events:
        if int(event["sequence_number"]) > last:
            yield sse_encode(event)
