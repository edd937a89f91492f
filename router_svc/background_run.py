"""Running one background response: one attempt under one lease token.

A :class:`Run` renews its lease (and so learns of a cancel), calls the hub as a streamed
foreground turn would (the tool loop included), appends each batch of events to the log after the
previous one was stored, and writes the final turn with the terminal event, fenced by its lease
token (see :mod:`router_svc.background`). A write the state service refuses because the lease is
lost or the response gone stops the run (:class:`Stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import orjson
from prometheus_client import Counter, Gauge

from gateway import grpcerrors
from router_svc import compaction, errors, state_records, tool_loop, turn
from router_svc.background_log import Client, Event, Stitch
from router_svc.background_spec import prepare_again
from router_svc.dialects import StreamTranslator
from router_svc.response import error_object
from router_svc.services import Services
from router_svc.shapes import ResponseObject, StreamEvent
from router_svc.state_client import CallFailed

if TYPE_CHECKING:
    from google.protobuf.duration_pb2 import Duration

    from router_svc.state_client import StateStub

log = logging.getLogger(__name__)

RUNS = Counter(
    "respgw_router_background_runs_total",
    "Background response runs this router started, by how (new: it accepted the response; "
    "takeover: another router's lease ran out) and how they ended (completed, incomplete, "
    "failed, cancelled, lost: the lease was lost and the result dropped, stopped: the router "
    "stopped, gave_up: too many attempts).",
    ["start", "outcome"],
)
RUNNING = Gauge("respgw_router_background_running", "Background responses this router runs now.")
_STORED_TERMINALS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def remote_error(exc: BaseException) -> grpcerrors.RemoteError | None:
    """The state service's status behind an error the state client raised, if any."""
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return grpcerrors.error_info(cause)
    if isinstance(cause, CallFailed):
        return cause.info
    return None


def remote_reason(exc: BaseException) -> str:
    info = remote_error(exc)
    return info.reason if info is not None else ""


class Stop(Exception):
    """The run must stop: its lease was lost ("lost"), or the response was cancelled."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why

    @classmethod
    def of(cls, exc: errors.ApiError) -> Stop | None:
        """The stop a refused write means (LEASE_LOST, or the response deleted), if any."""
        info = remote_error(exc)
        if info is None:
            return None
        if info.reason == "LEASE_LOST":
            return cls("cancelled" if info.metadata.get("cancelled") == "true" else "lost")
        if info.reason == "RESPONSE_NOT_FOUND":
            return cls("lost")
        return None


class Holder(Protocol):
    """What a run reads of the worker that runs it (:class:`router_svc.background_worker.Worker`),
    named here so that this module needs not import the worker, which imports it."""

    svc: Services
    # The duration of the leases it holds.
    lease: Duration

    @property
    def stub(self) -> StateStub: ...


def stored_record(
    t: turn.Turn, response: ResponseObject, *, in_progress: bool, inputs: bool = True
) -> state_records.StoredResponse:
    """The turn's record with ``response`` (queued, or final), as a job stores it."""
    return state_records.turn_record(
        response_id=t.response_id,
        previous_response_id=t.req.previous_response_id or "",
        conversation_id=t.req.conversation_id or "",
        input_items=t.req.stored_inputs() if inputs else (),
        output_items=response.get("output", []),
        response=response,
        idempotency_key=t.idempotency_key,
        events=None,
        in_progress=in_progress,
    )


class Run:
    """One attempt at a background response, under one lease token."""

    def __init__(
        self,
        w: Holder,
        t: turn.Turn,
        token: int,
        last_sequence: int,
        client: Client | None,
        start: str,
    ) -> None:
        self.w = w
        self.svc = w.svc
        self.turn = t
        self.token = token
        self.last_sequence = last_sequence
        self.client = client
        self.start = start
        self.task: asyncio.Task[Any] | None = None
        # Set for a run that took the response over and must ask the bootstrap service again.
        self.bootstrap_headers: dict[str, str] | None = None
        self.stopped = ""  # why the run was stopped from outside: "cancelled" or "lost"
        self.finishing = False
        self.pending: list[Event] = []
        self._wake = asyncio.Event()
        self._write = asyncio.Lock()

    def stop(self, why: str) -> None:
        """Stops the run at once (a cancel, or a lost lease): it writes nothing more."""
        if not self.stopped and not self.finishing and self.task is not None:
            self.stopped = why
            self.task.cancel()

    # -- the lease

    async def _renew_forever(self) -> None:
        settings = self.svc.settings
        interval = settings.background_lease_s / 3
        held_until = time.monotonic() + settings.background_lease_s
        request = state_records.renew_lease(
            self.turn.tenant, self.turn.response_id, self.token, self.w.lease
        )
        while True:
            await asyncio.sleep(interval)
            asked = time.monotonic()
            try:
                reply = await self.svc.state.renew_background_lease(request)
            except errors.ApiError as exc:
                stop = Stop.of(exc)
                if stop is not None:
                    self.stop(stop.why)
                    return
                # The state service cannot be reached: the lease holds until it runs out, and
                # the run stops before that (another router may then take it over).
                if time.monotonic() + interval >= held_until:
                    log.warning("background lease could not be renewed in time; stopping")
                    self.stop("lost")
                    return
                continue
            if reply.cancel_requested:
                self.stop("cancelled")
                return
            held_until = asked + settings.background_lease_s

    # -- the event log

    def _push(self, events: Sequence[Event]) -> None:
        self.pending.extend(events)
        self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Stop as stop:
                self.stop(stop.why)
                return
            except errors.ApiError:
                await asyncio.sleep(0.2)  # the renewer decides when to give up
                self._wake.set()

    async def _flush(self) -> None:
        """Appends what is pending (one call at a time, so the log stays in order)."""
        async with self._write:
            batch = list(self.pending)
            if not batch:
                return
            try:
                await self.svc.state.append_response_events(
                    state_records.append_events(
                        self.turn.tenant,
                        self.turn.response_id,
                        self.token,
                        [e.pb() for e in batch],
                    ),
                )
            except errors.ApiError as exc:
                stop = Stop.of(exc)
                if stop is not None:
                    raise stop from exc
                raise
            del self.pending[: len(batch)]
            if self.client is not None:
                self.client.deliver(batch)

    async def _finish(
        self, response: ResponseObject, terminal: Sequence[Event], *, inputs: bool = True
    ) -> str:
        """Writes the final turn with the rest of the log; returns the outcome."""
        self.finishing = True
        final = stored_record(self.turn, response, in_progress=False, inputs=inputs)
        async with self._write:
            events = [*self.pending, *terminal]
            try:
                await self.svc.state.finish_background_response(
                    state_records.finish_background(
                        self.turn.tenant, self.token, final, [e.pb() for e in events]
                    ),
                )
            except errors.ApiError as exc:
                stop = Stop.of(exc)
                if stop is None:
                    raise
                log.info(
                    "background response was cancelled, deleted or taken over; its result is "
                    "dropped",
                    extra={"response_id": self.turn.response_id},
                )
                return stop.why
            self.pending.clear()
            if self.client is not None:
                self.client.deliver(events)
        return str(response.get("status", "completed"))

    async def _read_log(self) -> list[dict[str, Any]]:
        """The events earlier runs left in the log (this run holds the lease: nobody adds any)."""
        events: list[dict[str, Any]] = []
        if self.last_sequence < 0:
            return events
        call = self.w.stub.WatchResponseEvents(
            state_records.watch_events(self.turn.tenant, self.turn.response_id, -1),
            timeout=self.svc.settings.state_timeout_s * 4,
        )
        try:
            async for reply in call:
                events += [orjson.loads(e.json) for e in reply.events]
                if reply.events and reply.events[-1].sequence_number >= self.last_sequence:
                    break
        finally:
            call.cancel()
        return events

    # -- the run

    async def execute(self) -> None:
        """Runs the turn to its final form; see the module docstring."""
        RUNNING.inc()
        outcome = "lost"
        renewer = asyncio.create_task(self._renew_forever())
        flusher = asyncio.create_task(self._flush_forever())
        status: asyncio.Task[Any] | None = None
        t = self.turn
        translator = _translator(self.svc, t)
        stitch = Stitch([], self.last_sequence)
        held: list[Event] = []

        def push(events: list[StreamEvent]) -> None:
            mapped = stitch.map(events)
            held.extend(e for e in mapped if e.type in _STORED_TERMINALS)
            self._push([e for e in mapped if e.type not in _STORED_TERMINALS])

        try:
            stitch = Stitch(await self._read_log(), self.last_sequence)
            gave_up = self.token > self.svc.settings.background_max_attempts
            failed: errors.ApiError | None = None
            if self.bootstrap_headers is not None and not gave_up:
                try:
                    await prepare_again(self.svc, t, self.bootstrap_headers)
                except errors.ApiError as exc:
                    failed = exc
                # Echoes the tools' resources (the container id) as the first run did.
                translator = _translator(self.svc, t)
            push(translator.start())
            if gave_up:
                push(translator.fail("server_error", _gave_up(self.token - 1)))
            elif failed is not None:
                push(translator.fail(failed.code or "server_error", failed.message))
            else:
                # Retrievable as in progress (a write that fails once the turn is final).
                status = asyncio.create_task(
                    turn.store(self.svc, t, turn.snapshot(t, "in_progress"), in_progress=True)
                )
                await self._call_hub(translator, push)
                with contextlib.suppress(errors.ApiError):
                    await status
            if not held:  # every translator ends with a terminal event; this is a safety net
                push(translator.fail("server_error", "The model server's answer did not end."))
            try:
                outcome = await self._finish(translator.response, held[:1])
            except errors.ApiError as exc:
                if exc.status >= 500:
                    raise  # the lease runs out and another attempt stores it
                # The turn cannot be stored as it is (an item of it reached its conversation
                # meanwhile): it is stored as failed without items, saying why, instead of
                # being left running.
                unstorable, events = _unstorable(translator.response, held[0], exc)
                outcome = await self._finish(unstorable, events, inputs=False)
            if gave_up and outcome != "lost":
                outcome = "gave_up"
        except asyncio.CancelledError:
            if self.stopped:
                outcome = self.stopped
            elif self.svc.shutting_down:
                # The router stops before the run ended: stored as failed, never left running.
                outcome = "stopped"
                push(translator.fail("server_error", turn.SHUT_DOWN_MESSAGE))
                with contextlib.suppress(errors.ApiError):
                    await self._finish(translator.response, held[:1])
            raise
        except errors.ApiError as exc:
            log.error(
                "background response could not be stored",
                extra={"response_id": t.response_id, "code": exc.code, "detail": exc.message},
            )
        except Exception:
            # The lease runs out and another attempt (or the give-up) follows.
            log.exception("background response failed", extra={"response_id": t.response_id})
        finally:
            renewer.cancel()
            flusher.cancel()
            if status is not None and not status.done():
                status.cancel()
            RUNNING.dec()
            RUNS.labels(self.start, outcome).inc()
            if self.client is not None:
                self.client.close()

    async def _call_hub(
        self, translator: _Translator, push: Callable[[list[StreamEvent]], None]
    ) -> None:
        chunks: AsyncIterator[dict[str, Any]] | None = None
        try:
            if isinstance(translator, tool_loop.StreamLoop):
                chunks = translator.rounds()  # each hub call of the loop, and the calls it runs
            else:
                if compaction.compact_threshold(self.turn.req) is not None:
                    await compaction.stream_lead(self.svc, self.turn, translator, push)
                path, body = self.turn.upstream(self.svc.dialect, stream=True)
                chunks = self.svc.hub.stream(path, body)
            async for chunk in chunks:
                push(translator.feed(chunk))
            push(translator.finish())
        except errors.ApiError as exc:
            push(translator.fail(exc.code or "server_error", exc.message))
        except Exception:
            log.exception("background response failed")
            push(translator.fail("server_error", "The gateway failed while running the response."))
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


_Translator = StreamTranslator | tool_loop.StreamLoop


def _translator(svc: Services, t: turn.Turn) -> _Translator:
    """What a streamed foreground turn uses (the tool loop when code_interpreter or shell run)."""
    return turn.stream_translator(svc, t)


def _unstorable(
    response: ResponseObject, terminal: Event, exc: errors.ApiError
) -> tuple[ResponseObject, list[Event]]:
    """The failed form of a turn whose final form the state service refused, and its terminal
    event (in the place of the refused one)."""
    error = error_object(
        exc.code or "server_error", f"The response could not be stored: {exc.message}"
    )
    failed: ResponseObject = {**response, "status": "failed", "output": [], "error": error}
    return failed, [
        Event.of(
            {"type": "response.failed", "sequence_number": terminal.sequence, "response": failed}
        )
    ]


def _gave_up(attempts: int) -> str:
    return (
        f"The gateway started this background response {attempts} times and each time lost it "
        "(the router running it stopped or could not reach the state service); send it again."
    )
