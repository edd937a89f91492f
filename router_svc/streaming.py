"""A streamed turn: steps 4 and 5 of router_svc.turn with ``stream: true``.

The hub is read by a task of its own (:func:`_pump`) that translates its chunks into events, holds
the terminal event until the turn is stored, and stores a failure when the turn is kept running
or in the background; the client takes the events from an outbox with a bounded backlog
(:class:`_Outbox`, :func:`_drain`) as SSE. A turn answered only once stored (a conversation turn,
whole or streamed into a buffer, and a streamed SDK retry) is run by :func:`settle`.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Final

from gateway import gctune
from router_svc import compaction, errors, include, running, tool_loop
from router_svc.dialects import StreamTranslator
from router_svc.event_log import EventLog
from router_svc.events import SSE_DONE, sse_pieces, sse_slices
from router_svc.idempotency import Identity
from router_svc.replay import replay_events
from router_svc.services import Services
from router_svc.shapes import ResponseError, ResponseObject, StreamEvent
from router_svc.turn import Turn, begin, complete, shut_down_snapshot, store, stream_translator
from router_svc.validate import TurnRequest

log = logging.getLogger(__name__)
# Back-off jitter from a generator of our own: the global one is the application's (and tests
# seed it).
_jitter = random.Random()


class _End(enum.Enum):
    """The end of a stream, last in its outbox."""

    END = 0


_END: Final = _End.END
# The terminal events of a turn that is stored; response.failed is not (nothing half-stored).
_STORED_TERMINALS = frozenset({"response.completed", "response.incomplete"})


async def open_stream(svc: Services, turn: Turn) -> AsyncIterator[bytes]:
    """Steps 4 and 5 with streaming; returns the SSE byte stream for the client.

    As at OpenAI, ``response.created`` and ``response.in_progress`` go out as soon as the turn is
    accepted, before the hub answers; a hub that fails then ends the stream with ``error`` and
    ``response.failed``. The hub is read by a task of its own: if the client goes away
    mid-stream, the task still reads the hub to the end and stores the turn (the turn is not
    lost). The terminal event (``response.completed``) is sent only after the turn was stored,
    so a request chained on it right away finds it; ``data: [DONE]`` follows it. Meanwhile the
    turn is retrievable as ``in_progress`` (router_svc.running), and a failure is stored then.
    """
    translator = stream_translator(svc, turn)
    queue = _Outbox(backlog=STREAM_BACKLOG)
    pump = _pump(svc, turn, translator, queue)
    if turn.req.background:
        svc.spawn_cancellable((turn.tenant, turn.response_id), pump)
    else:
        svc.spawn(pump)
    return _drain(queue)


# A conversation turn whose conversation changed after its history was read (VERSION_MISMATCH) is
# run again on the new history this many times in all before the client gets the 409.
CONVERSATION_ATTEMPTS = 6


async def settle(
    svc: Services,
    req: TurnRequest,
    *,
    tenant: str,
    ident: Identity,
    headers: Mapping[str, str] | None = None,
    lock: AbstractAsyncContextManager[Any] | None = None,
) -> tuple[Turn, ResponseObject | Iterator[bytes]]:
    """Steps 2 to 5 for a turn whose answer is held until it is stored: a conversation turn
    (whole, or streamed into a buffer) and a streamed SDK retry. Returns the turn and its answer
    (the response, or the stream's bytes).

    A conversation turn that loses the race for the conversation (another turn was appended
    after its history was read) is run again on the new history, up to CONVERSATION_ATTEMPTS
    times, with the same response id; only then is it a 409, before any byte was sent. ``lock``
    (held around all of it) serializes the turns of one conversation in this router, so that
    they do not call the hub only to lose the race.
    """
    response_id = ""
    async with lock or nullcontext():
        for attempt in range(CONVERSATION_ATTEMPTS):
            t = await begin(
                svc, req, tenant=tenant, headers=headers, ident=ident, response_id=response_id
            )
            response_id = t.response_id
            try:
                if not req.stream:
                    return t, await complete(svc, t)
                return t, await buffered_stream(svc, t)
            except errors.Conflict as exc:
                if exc.code != "conversation_locked" or attempt == CONVERSATION_ATTEMPTS - 1:
                    raise
            log.info("conversation changed under a turn; running it again on the new history")
            await asyncio.sleep(_jitter.uniform(0.0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")


async def buffered_stream(svc: Services, turn: Turn) -> Iterator[bytes]:
    """Steps 4 and 5 with streaming, nothing sent before the turn is stored: the stream's bytes,
    each event made and encoded as it is taken.

    The events are not kept while the hub streams: the stored log keeps them in its compact form
    (a byte per delta), and they are made from it and the response once the turn is stored
    (:meth:`EventLog.replay`), so that such a turn costs what a live one costs (holding a 0.5 MB
    answer of 4-byte deltas as events cost the router about 120x of it). A failure to store is
    raised (an HTTP error, before any byte: a conversation that changed meanwhile is a 409 the
    caller may run again); a turn that another response answers (the first attempt of an SDK
    call this one retries) is that response's stream."""
    queue = _Outbox(backlog=0)
    translator = stream_translator(svc, turn)
    outcome = await _pump(svc, turn, translator, queue, buffered=True)
    if outcome.store_error is not None:
        raise outcome.store_error
    if outcome.holder is not None:
        holder = outcome.holder
        held = replay_events(holder)
        return _held_bytes(include.events(held, holder, turn.req.include), long=False)
    sent = outcome.sent
    assert sent is not None
    # The events the log holds, but the terminal one (the queue has it, with the response
    # stored), then what the queue holds: that terminal event, or nothing after a failure.
    logged = sent.replay(translator.response)
    if logged is None:  # never: the deltas add up to the texts they built
        logged = iter(replay_events(translator.response))
    before = (e for e in logged if e["type"] not in _STORED_TERMINALS)
    after: list[StreamEvent] = []
    while True:
        item = queue.get_nowait()
        if isinstance(item, _Sliced):
            after.append(item.event)
        elif isinstance(item, dict):
            after.append(item)
        else:  # _END
            break
    return _held_bytes(itertools.chain(before, after), long=sent.long)


def _held_bytes(events: Iterable[StreamEvent], *, long: bool) -> Iterator[bytes]:
    """The SSE bytes of a held stream's events, ending with SSE_DONE: those that may hold a
    long answer (a long stream's .done and terminal events) a slice at a time, as _drain
    sends them."""
    for event in events:
        if long and not event["type"].endswith(".delta"):
            yield from sse_slices(event)
        else:
            yield from sse_pieces(event)
    yield SSE_DONE
    if long:
        gctune.give_back()  # what the long answer's copies took


@dataclass
class _Outcome:
    """How a buffered stream ended other than with its own events."""

    # Storing the turn failed (nothing was sent yet).
    store_error: errors.ApiError | None = None
    # Another response answers this request (see store).
    holder: ResponseObject | None = None
    # The events sent or held, as the stored log keeps them (a buffered stream's are made from
    # it once the turn is stored).
    sent: EventLog | None = None


async def _pump(
    svc: Services,
    turn: Turn,
    translator: StreamTranslator | tool_loop.StreamLoop,
    queue: _Outbox,
    *,
    buffered: bool = False,
) -> _Outcome:
    sent = EventLog()  # what the client was sent, for the stored log
    outcome = _Outcome(sent=sent)
    held: list[StreamEvent] = []

    def push(events: list[StreamEvent]) -> None:
        for event in events:
            if event["type"] in _STORED_TERMINALS:
                held.append(event)  # goes out only once the turn is stored
                continue
            sent.add(event)
            if buffered:
                continue  # made again from the log once the turn is stored (buffered_stream)
            # Encoded when the client takes it (see _drain); in slices when it may hold a long
            # answer (a .done or terminal event of a long stream).
            if sent.long and not event["type"].endswith(".delta"):
                queue.put_nowait(_Sliced(event))
            else:
                queue.put_event(event)

    started = translator.start()
    push(started)
    if not buffered:
        _announce_running(svc, turn, started)
        # response.created goes out before the hub request is made and sent (about 0.2 ms of
        # this loop's time): the client's first byte does not wait for it.
        await asyncio.sleep(0)
    chunks: AsyncIterator[dict[str, Any]] | None = None
    try:
        # Inside the try: a request the translation refuses ends the stream like a hub failure.
        if isinstance(translator, tool_loop.StreamLoop):
            chunks = translator.rounds()  # each hub call of the loop, and the calls it runs
        else:
            if compaction.compact_threshold(turn.req) is not None:
                await compaction.stream_lead(svc, turn, translator, push)
            path, body = turn.upstream(svc.dialect, stream=True)
            chunks = svc.hub.stream(path, body)
        async for chunk in chunks:
            push(translator.feed(chunk))
            await queue.room()
        push(translator.finish())
        if turn.running_put is not None:
            # The hub is done: a running form not sent yet never will be, and one in flight is
            # abandoned (the final turn replaces it, or refuses it if it comes late).
            turn.running_put.stop()
        if not held:
            # The hub's own response.failed (a Responses-API hub): a background turn is kept
            # as failed, never left in progress.
            await _store_failed(svc, turn, translator.response)
        if held:
            terminal = held[0]
            try:
                sent.add(terminal)
                answered = await store(svc, turn, translator.response, sent)
            except errors.ApiError as exc:
                log.error(
                    "streamed turn could not be stored",
                    extra={"code": exc.code, "detail": exc.message},
                )
                if buffered:
                    outcome.store_error = exc
                elif exc.outcome_unknown:
                    push([_unknown_outcome(terminal, turn, exc)])
                else:
                    push(_failed_after(terminal, translator.response, exc))
                return outcome
            if answered is not translator.response:
                if answered.get("id") != turn.response_id:
                    # What is stored for this request is another response (the first attempt of
                    # the SDK call this one retries, or the retry of this one).
                    if buffered:
                        outcome.holder = answered
                    else:
                        push(_failed_after(terminal, translator.response, _superseded(answered)))
                    return outcome
                terminal = {**terminal, "response": include.response(answered, turn.req.include)}
            queue.put_nowait(_Sliced(terminal) if sent.long else terminal)
    except errors.ApiError as exc:
        push(translator.fail(exc.code or "server_error", exc.message))
        await _store_failed(svc, turn, translator.response)
    except Exception:
        log.exception("streamed turn failed")
        push(translator.fail("server_error", "The gateway failed while streaming the response."))
        await _store_failed(svc, turn, translator.response)
    except asyncio.CancelledError:
        if svc.shutting_down:
            await _store_failed(svc, turn, shut_down_snapshot(turn))
        raise
    finally:
        queue.put_nowait(_END)
        if turn.running_put is not None:
            turn.running_put.stop()
        if chunks is not None:
            await _close(chunks)
    return outcome


def _announce_running(svc: Services, turn: Turn, started: list[StreamEvent]) -> None:
    """Stores the turn as in progress beside the stream, from its response.created."""
    if started and started[0]["type"] == "response.created" and svc.settings.store_running_streams:
        turn.running_put = running.announce(svc, turn, started[0]["response"])


async def _store_failed(svc: Services, turn: Turn, response: ResponseObject) -> None:
    """The failure of a background turn, or of a streamed turn stored as running, is kept (it is
    retrievable as failed, never left in progress); any other failed turn stores nothing. The
    partial output of a failed foreground stream is shown but not stored as output items, so no
    later turn builds on it."""
    if not turn.req.background and turn.running_put is None:
        return
    try:
        await store(svc, turn, response, keep_output=turn.req.background)
    except errors.ApiError as exc:
        log.error("failed response could not be stored", extra={"code": exc.code})


async def _close(chunks: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _failed_after(
    terminal: StreamEvent, response: ResponseObject, exc: errors.ApiError
) -> list[StreamEvent]:
    """The error events that replace ``response.completed`` when storing the turn failed."""
    seq = int(terminal.get("sequence_number", 0))
    error: ResponseError = {"code": exc.code or "server_error", "message": exc.message}
    failed: ResponseObject = {**response, "status": "failed", "error": error}
    return [
        {
            "type": "error",
            "sequence_number": seq,
            "code": error["code"],
            "message": exc.message,
            "param": None,
        },
        {"type": "response.failed", "sequence_number": seq + 1, "response": failed},
    ]


def _unknown_outcome(terminal: StreamEvent, turn: Turn, exc: errors.ApiError) -> StreamEvent:
    """The terminal event of a stream whose turn may or may not have been stored: an ``error``
    that says so, and no response.failed (which could contradict a stored turn)."""
    return {
        "type": "error",
        "sequence_number": int(terminal.get("sequence_number", 0)),
        "code": "store_outcome_unknown",
        "message": (
            f"The response was answered, but whether it was stored is unknown ({exc.code}): "
            f"GET /v1/responses/{turn.response_id} tells."
        ),
        "param": None,
    }


def _superseded(answered: ResponseObject) -> errors.ApiError:
    return errors.ApiError(
        f"This request was answered and stored as response '{answered.get('id')}' by another "
        "attempt of the same call; this response was not stored.",
        code="superseded",
        status=409,
    )


# Events a streamed turn holds for a client that reads slower than the hub answers, and
# characters of their deltas; past either the hub is read no faster than the client reads (see
# _Outbox).
STREAM_BACKLOG = 256
STREAM_BACKLOG_CHARS = 256 * 1024
# A client that took nothing for this long is not waited for any more.
STREAM_STALL_S = 30.0


class _Outbox(asyncio.Queue["StreamEvent | _Sliced | _End"]):
    """The events of a streamed turn on their way to the client. The pump waits in
    :meth:`room` while more than ``backlog`` are waiting, or their deltas hold more than
    STREAM_BACKLOG_CHARS characters (a hub's large chunks), so that the hub is read no faster than
    the client reads and a slow client does not make the router hold the whole answer as
    events; except once the client is gone (:meth:`close`) or took nothing for
    STREAM_STALL_S: the turn is then read to its end and stored all the same. A backlog of 0
    never waits (a buffered stream, read once it is whole)."""

    def __init__(self, *, backlog: int) -> None:
        super().__init__()
        self.backlog = backlog
        self.chars = 0  # of the deltas waiting (a hub's large chunks are large deltas)
        self._room = asyncio.Event()

    def put_event(self, event: StreamEvent) -> None:
        delta = event.get("delta")
        if type(delta) is str:
            self.chars += len(delta)
        self.put_nowait(event)

    def _full(self) -> bool:
        return self.qsize() > self.backlog or self.chars > STREAM_BACKLOG_CHARS

    async def room(self) -> None:
        while self.backlog and self._full():
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), STREAM_STALL_S)
            except TimeoutError:
                self.close()

    def taken(self, item: object) -> None:
        if type(item) is dict:
            delta = item.get("delta")
            if type(delta) is str:
                self.chars -= len(delta)
        if self.qsize() <= self.backlog // 2 and self.chars <= STREAM_BACKLOG_CHARS // 2:
            self._room.set()

    def close(self) -> None:
        """Nobody reads any more: the pump never waits again."""
        self.backlog = 0
        self._room.set()


class _Sliced:
    """An event of the outbox sent with :func:`sse_slices` (see _pump)."""

    __slots__ = ("event",)

    def __init__(self, event: StreamEvent) -> None:
        self.event = event


async def _drain(queue: _Outbox) -> AsyncIterator[bytes]:
    long = False
    try:
        while True:
            item = await queue.get()
            queue.taken(item)
            if item is _END:
                yield SSE_DONE
                return
            # Encoded only now: the texts of the last events (each holding the answer) are
            # encoded one at a time, those of a long stream a slice at a time.
            if isinstance(item, _Sliced):
                long = True
                for piece in sse_slices(item.event):
                    yield piece
                continue
            assert isinstance(item, dict)
            for piece in sse_pieces(item):
                yield piece
    finally:
        queue.close()
        if long:
            gctune.give_back()  # what the long answer's copies took
