"""Background responses (``background: true``): durable jobs of the state service, run by
whichever router holds their lease, with live events any router can stream.

A background response is owned by a lease, not by a process (see "Background responses" in
``state_service.proto``):

- The router that accepts it stores the queued turn and its job in one call
  (EnqueueBackgroundResponse, capped per tenant and in all: 429 past the caps) and claims it at
  once; :class:`Worker` runs it in a task of its own.
- While the model runs, the holder renews its lease every third of ``--background-lease-s``. A
  renewal is also how it learns of a cancel made through any router: it stops the model call.
- Every streaming event of the run is appended to the response's event log, each batch only
  after the previous one was stored; a client streaming the response from this router is sent an
  event only once it is in the log, so what it saw is always a prefix of the log.
- The final turn and the terminal event are written together by FinishBackgroundResponse, fenced
  by the lease token: a holder that lost its lease (it stalled, or the state service could not
  be reached long enough) has its result dropped, and no response is finalized twice.
- Every router scans for queued jobs and expired leases (every ``--background-scan-interval-s``,
  jittered) and takes them over. The model call then runs again from the start (at least once):
  the new run's events continue the log after the old run's, whose unfinished output items are
  closed as ``incomplete`` first, so a client that follows the stream sees one sequence, gapless,
  with one terminal event. After ``--background-max-attempts`` starts the response is stored as
  failed.
- ``GET /v1/responses/{id}?stream=true`` on a running response follows the log
  (WatchResponseEvents) through whichever router it reaches, from ``starting_after``, to its
  terminal event.

Nothing here runs on the path of a foreground turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
import orjson
from prometheus_client import Counter, Gauge

from gateway import grpcclient, grpcerrors
from gateway.grpcserver import channel_options
from gateway.logs import REQUEST_ID_HEADER, request_id_var
from router_svc import (
    bootstrap,
    compaction,
    errors,
    idempotency,
    running,
    state_records,
    tool_loop,
    turn,
    validate,
)
from router_svc import include as included
from router_svc.dialects import StreamTranslator
from router_svc.events import SSE_DONE, sse_encode
from router_svc.replay import stored_stream
from router_svc.response import error_object
from router_svc.services import Services
from router_svc.state_client import CallFailed, state_stub

if TYPE_CHECKING:
    from router_svc.state_client import StateStub

log = logging.getLogger(__name__)
# Back-off jitter from a generator of our own: the global one is the application's (and tests
# seed it).
_jitter = random.Random()

RUNS = Counter(
    "respgw_router_background_runs_total",
    "Background response runs this router started, by how (new: it accepted the response; "
    "takeover: another router's lease ran out) and how they ended (completed, incomplete, "
    "failed, cancelled, lost: the lease was lost and the result dropped, stopped: the router "
    "stopped, gave_up: too many attempts).",
    ["start", "outcome"],
)
RUNNING = Gauge("respgw_router_background_running", "Background responses this router runs now.")

# The events that end a stream; the stream of a background response ends with one of them.
TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "response.cancelled"}
)
_STORED_TERMINALS = frozenset({"response.completed", "response.incomplete", "response.failed"})


# A claim is retried on UNAVAILABLE (IDEMPOTENT with its request_id).
_CLAIM_RETRY = grpcclient.RetryPolicy(frozenset({grpc.StatusCode.UNAVAILABLE}), (0.2, 0.4))


def _remote(exc: BaseException) -> grpcerrors.RemoteError | None:
    """The state service's status behind an error the state client raised, if any."""
    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return grpcerrors.error_info(cause)
    if isinstance(cause, CallFailed):
        return cause.info
    return None


def _reason(exc: BaseException) -> str:
    info = _remote(exc)
    return info.reason if info is not None else ""


class _Stop(Exception):
    """The run must stop: its lease was lost ("lost"), or the response was cancelled."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why

    @classmethod
    def of(cls, exc: errors.ApiError) -> _Stop | None:
        """The stop a refused write means (LEASE_LOST, or the response deleted), if any."""
        info = _remote(exc)
        if info is None:
            return None
        if info.reason == "LEASE_LOST":
            return cls("cancelled" if info.metadata.get("cancelled") == "true" else "lost")
        if info.reason == "RESPONSE_NOT_FOUND":
            return cls("lost")
        return None


# --- the worker -------------------------------------------------------------------------------

_UNSAMPLED = (("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),)


class Worker:
    """The background responses this router runs, and the scanner that takes over others'."""

    def __init__(self, svc: Services) -> None:
        s = svc.settings
        if s.background_lease_s <= 0 or s.background_scan_interval_s <= 0:
            raise ValueError("--background-lease-s and --background-scan-interval-s must be > 0")
        if s.background_max_attempts < 1 or s.background_max_running < 1:
            raise ValueError("--background-max-attempts and --background-max-running must be >= 1")
        self.svc = svc
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self.lease = state_records.lease(s.background_lease_s)
        self.runs: dict[tuple[str, str], _Run] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: StateStub | None = None

    def start(self) -> None:
        self._scanner = asyncio.create_task(self._scan_forever())

    def stop_scanning(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()

    async def close(self) -> None:
        self.stop_scanning()
        if self._channel is not None:
            await self._channel.close()

    @property
    def stub(self) -> StateStub:
        """A channel of its own for WatchResponseEvents, the one streaming call (the state
        client's unary calls and Exchange streams stay as they are)."""
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.svc.settings.state_address, options=channel_options()
            )
            self._stub = state_stub(self._channel)
        return self._stub

    async def _scan_forever(self) -> None:
        interval = self.svc.settings.background_scan_interval_s
        while True:
            await asyncio.sleep(interval * _jitter.uniform(0.5, 1.5))
            try:
                await self.scan()
            except grpc.aio.AioRpcError as exc:
                log.warning("background scan failed", extra={"code": exc.code().name})
            except errors.ApiError as exc:
                log.warning("background scan failed", extra={"code": exc.code})
            except Exception:
                log.exception("background scan failed")

    async def scan(self) -> int:
        """Claims queued and expired jobs while this router has room; returns how many."""
        taken = 0
        while len(self.runs) < self.svc.settings.background_max_running:
            job = await self._claim()
            if job is None:
                break
            if running.is_foreground(job):
                # A streamed foreground turn whose router stopped: stored as failed, not run.
                await running.finish_abandoned(self.svc, job)
                taken += 1
                continue
            log.info(
                "taking over a background response",
                extra={"response_id": job.response_id, "attempt": job.lease_token},
            )
            headers: dict[str, str] | None = None
            try:
                t, headers = turn_of(self.svc, job)
            except Exception:
                log.exception("background job has a spec this router cannot read")
                t = await _turn_of_stored(self.svc, job)
            self.run(t, job, start="takeover", bootstrap_headers=headers)
            taken += 1
        return taken

    # A W3C traceparent whose sampled flag is off: a traced state service records no span of a
    # scan (scans come every few seconds whatever the traffic, like health checks, which are
    # not traced either).
    async def _claim(self) -> state_records.BackgroundJob | None:
        """One claim, on the worker's own channel: scans run every few seconds whatever the
        traffic, so they stay out of the request path's traces and metrics."""
        # A claim whose answer was lost is retried with the same id and gets the same job.
        request = state_records.claim_any_background(self.owner, self.lease, secrets.token_hex(12))
        reply = await grpcclient.retrying(
            lambda timeout: self.stub.ClaimBackgroundResponse(
                request, timeout=timeout, metadata=_UNSAMPLED
            ),
            _CLAIM_RETRY,
            timeout_s=self.svc.settings.state_timeout_s,
        )
        return reply.job if reply.HasField("job") else None

    def run(
        self,
        t: turn.Turn,
        job: state_records.BackgroundJob,
        client: _Client | None = None,
        *,
        start: str = "new",
        bootstrap_headers: dict[str, str] | None = None,
    ) -> bool:
        """Runs the job; False when this router runs it under that lease already (a retried
        request that found the job it had just enqueued)."""
        key = (t.tenant, t.response_id)
        running = self.runs.get(key)
        if running is not None and running.token == job.lease_token:
            return False
        run = _Run(self, t, job.lease_token, job.last_sequence_number, client, start)
        run.bootstrap_headers = bootstrap_headers
        self.runs[key] = run
        task = self.svc.spawn_cancellable(key, run.execute())
        run.task = task

        def forget(_: asyncio.Task[Any]) -> None:
            if self.runs.get(key) is run:
                del self.runs[key]

        task.add_done_callback(forget)
        return True


def worker(svc: Services) -> Worker:
    if svc.worker is None:
        raise RuntimeError("the background worker was not started")
    return cast(Worker, svc.worker)  # start_worker sets it to one


def start_worker(svc: Services) -> Worker:
    """Starts the background worker of a router (from the app's lifespan)."""
    svc.worker = w = Worker(svc)
    w.start()
    return w


# --- the job's spec: what another router needs to run the turn ------------------------------


def spec_of(svc: Services, t: turn.Turn, headers: Mapping[str, str]) -> bytes:
    """The turn as the job's spec: the validated request and the history it was read with,
    everything a router needs to run it without the original request. What the bootstrap service
    prepared is not in it (that is never stored): a router that takes the response over asks the
    bootstrap service again with the same request (idempotent on its request id, the response
    id), so the spec keeps the forwarded headers of a turn with stateful tools (never
    ``authorization``)."""
    declared = bool(bootstrap.stateful_tools(t.req.tools))
    spec = {
        "v": 1,
        "req": {f.name: getattr(t.req, f.name) for f in dataclasses.fields(t.req)},
        "created_at": t.created_at,
        "history": t.history,
        "conversation_version": t.conversation_version,
        "idempotency_key": t.idempotency_key,
        "omitted": t.omitted_history_items,
        "bootstrap_headers": forwarded_headers(svc, headers) if declared else None,
    }
    try:
        return orjson.dumps(spec)
    except TypeError:  # an integer beyond 64 bits in the body
        return json.dumps(spec).encode()


def forwarded_headers(svc: Services, headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers the bootstrap service is sent (``--bootstrap-headers``), as
    turn.begin picks them."""
    wanted = [h.strip().lower() for h in svc.settings.bootstrap_headers.split(",") if h.strip()]
    return {name: headers[name] for name in wanted if name != "authorization" and name in headers}


def turn_of(
    svc: Services, job: state_records.BackgroundJob
) -> tuple[turn.Turn, dict[str, str] | None]:
    """The turn a job's spec describes (without what the bootstrap service prepared), and the
    headers to prepare its stateful tools with (None: it declares none)."""
    spec = orjson.loads(job.spec)
    fields = spec["req"]
    names = {f.name for f in dataclasses.fields(validate.TurnRequest)}
    try:
        req = validate.TurnRequest(**{k: v for k, v in fields.items() if k in names})
    except TypeError:
        # Written by a router whose TurnRequest had other fields: validate the body again.
        req = validate.parse_turn_request(
            {**fields["body"], "model": fields["model"]}, default_model=fields["model"]
        )
        req.input_items = fields["input_items"]
    t = turn.Turn(
        req=req,
        tenant=job.tenant,
        response_id=job.response_id,
        created_at=spec["created_at"],
        history=spec["history"],
        prepared=bootstrap.Prepared.EMPTY,
        conversation_version=spec["conversation_version"],
        idempotency_key=spec["idempotency_key"],
        omitted_history_items=spec["omitted"],
    )
    return t, spec.get("bootstrap_headers")


async def prepare_again(svc: Services, t: turn.Turn, headers: dict[str, str]) -> None:
    """Asks the bootstrap service for what it prepared for the turn, as turn.begin asked it
    (the same request id, so the same answer)."""
    t.prepared = await svc.bootstrapper.prepare(
        request_id=t.response_id,
        tenant=t.tenant,
        tools=bootstrap.stateful_tools(t.req.tools),
        response_id=t.response_id,
        conversation_id=t.req.conversation_id or "",
        previous_response_id=t.req.previous_response_id or "",
        headers=headers,
        metadata=t.req.metadata,
    )


async def _turn_of_stored(svc: Services, job: state_records.BackgroundJob) -> turn.Turn:
    """A turn rebuilt from the stored running response alone, for a job whose spec cannot be
    read: it is stored as failed (attempt past the limit), never run."""
    reply = await svc.state.get_response(
        state_records.get_response(job.tenant, response_id=job.response_id),
    )
    stored = reply.response
    body = state_records.response_of(stored)
    req = validate.TurnRequest(
        body={},
        model=str(body.get("model") or "unknown"),
        input_items=state_records.items_from_proto(stored.input_items),
        instructions=None,
        store=True,
        stream=False,
        background=True,
        previous_response_id=stored.previous_response_id or None,
        conversation_id=stored.conversation_id or None,
        metadata={},
        tools=[],
        include=[],
    )
    job.lease_token = max(job.lease_token, svc.settings.background_max_attempts + 1)
    return turn.Turn(
        req=req,
        tenant=job.tenant,
        response_id=job.response_id,
        created_at=int(body.get("created_at") or time.time()),
        history=[],
        prepared=bootstrap.Prepared.EMPTY,
        conversation_version=None,
        idempotency_key=stored.idempotency_key,
    )


# --- accepting a background response ----------------------------------------------------------

EMPTY_HEADERS: Mapping[str, str] = {}


def _stored(
    t: turn.Turn, response: dict[str, Any], *, in_progress: bool, inputs: bool = True
) -> state_records.StoredResponse:
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


async def _enqueue(
    svc: Services, t: turn.Turn, headers: Mapping[str, str]
) -> tuple[dict[str, Any], state_records.BackgroundJob | None]:
    """Stores the queued turn and its job, claimed by this router; returns the response to
    answer and the job (None on a replay whose lease another router holds)."""
    w = worker(svc)
    if getattr(t, "key_kind", "") == "first":
        # The key the router derives for the first attempt of an SDK call (so that its retries
        # find it) would make identical background requests one response: only a client's own
        # Idempotency-Key makes a background request idempotent.
        t.idempotency_key = ""
    queued = turn.snapshot(t, "queued")
    settings = svc.settings
    request = state_records.enqueue_background(
        t.tenant,
        _stored(t, queued, in_progress=True),
        spec=spec_of(svc, t, headers),
        owner=w.owner,
        lease_duration=w.lease,
        require_intact_chain=t.parent_chain is not None,
        max_pending_per_tenant=settings.background_max_pending_per_tenant,
        max_pending_total=settings.background_max_pending,
    )
    try:
        reply = await svc.state.enqueue_background_response(
            request,
            param="previous_response_id" if t.req.previous_response_id else None,
        )
    except errors.Conflict:
        if t.idempotency_key:
            # A concurrent request with the same Idempotency-Key stored its turn first.
            winner = await idempotency.find_idempotent(svc, t.tenant, t.idempotency_key)
            if winner is not None:
                return winner, None
        raise
    except errors.ApiError as exc:
        info = _remote(exc)
        if info is not None and info.reason == "BACKGROUND_QUEUE_FULL":
            scope = "this organization" if info.metadata.get("scope") == "tenant" else "the gateway"
            raise errors.RateLimited(
                f"Too many background responses are queued or running for {scope} "
                f"(limit {info.metadata.get('limit', '?')}). Try again once some have finished.",
                code="rate_limit_exceeded",
            ) from exc
        raise
    if reply.replayed:
        answered = state_records.response_of(reply.response)
        return answered, reply.job if reply.HasField("job") else None
    return queued, reply.job


async def start(
    svc: Services, t: turn.Turn, headers: Mapping[str, str] = EMPTY_HEADERS
) -> dict[str, Any]:
    """POST /v1/responses with background: true: stores the response as queued and runs it
    here; returns the queued response at once. ``headers`` are the request's (those forwarded
    to the bootstrap service are kept for a takeover)."""
    answered, job = await _enqueue(svc, t, headers)
    if job is not None:
        worker(svc).run(t, job)
    return answered


async def open_stream(
    svc: Services, t: turn.Turn, headers: Mapping[str, str] = EMPTY_HEADERS
) -> AsyncIterator[bytes]:
    """POST /v1/responses with background and stream: as :func:`start`, and the client is sent
    the response's events as they reach its log."""
    answered, job = await _enqueue(svc, t, headers)
    response_id = str(answered.get("id", t.response_id))
    if job is None:
        # The same request was accepted before (Idempotency-Key): follow that one's log.
        return follow(svc, t.tenant, response_id, -1, include=t.req.include)
    client = _Client()
    if not worker(svc).run(t, job, client):
        return follow(svc, t.tenant, response_id, -1, include=t.req.include)
    return client.stream(svc, t.tenant, t.response_id)


# --- running one ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Event:
    """One event of the run as it goes into the log: its number, type and JSON."""

    sequence: int
    type: str
    json: bytes

    @classmethod
    def of(cls, event: dict[str, Any]) -> _Event:
        return cls(int(event["sequence_number"]), str(event["type"]), orjson.dumps(event))

    def pb(self) -> state_records.ResponseEvent:
        return state_records.response_event(self.sequence, self.json)

    def sse(self) -> bytes:
        return b"event: " + self.type.encode() + b"\ndata: " + self.json + b"\n\n"


class _Client:
    """The client of a streamed POST that this router runs: it gets each event once it is in the
    log, and after the run's end whatever the log holds beyond (a cancel, a takeover)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.last = -1
        self.ended = False

    def deliver(self, events: Sequence[_Event]) -> None:
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


class _Stitch:
    """Numbers a run's events after those earlier runs left in the log. A run that takes over
    continues the log: the earlier run's output items still open are closed as incomplete, its
    own response.created and response.in_progress are left out (the log has them), and its
    output indexes come after the earlier ones."""

    def __init__(self, prior: Sequence[dict[str, Any]], last_sequence: int) -> None:
        self.next = last_sequence + 1
        self.resumed = last_sequence >= 0
        self.offset = 0
        open_items: dict[int, dict[str, Any]] = {}
        for event in prior:
            index = event.get("output_index")
            if not isinstance(index, int):
                continue
            self.offset = max(self.offset, index + 1)
            if event["type"] == "response.output_item.added":
                open_items[index] = event.get("item") or {}
            elif event["type"] == "response.output_item.done":
                open_items.pop(index, None)
        self.closing = [
            {
                "type": "response.output_item.done",
                "output_index": index,
                "item": {**item, "status": "incomplete"},
            }
            for index, item in sorted(open_items.items())
        ]

    def map(self, events: Sequence[dict[str, Any]]) -> list[_Event]:
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

    def _numbered(self, event: dict[str, Any]) -> _Event:
        numbered = _Event.of({**event, "sequence_number": self.next})
        self.next += 1
        return numbered


class _Run:
    """One attempt at a background response, under one lease token."""

    def __init__(
        self,
        w: Worker,
        t: turn.Turn,
        token: int,
        last_sequence: int,
        client: _Client | None,
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
        self.pending: list[_Event] = []
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
                stop = _Stop.of(exc)
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

    def _push(self, events: Sequence[_Event]) -> None:
        self.pending.extend(events)
        self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except _Stop as stop:
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
                stop = _Stop.of(exc)
                if stop is not None:
                    raise stop from exc
                raise
            del self.pending[: len(batch)]
            if self.client is not None:
                self.client.deliver(batch)

    async def _finish(
        self, response: dict[str, Any], terminal: Sequence[_Event], *, inputs: bool = True
    ) -> str:
        """Writes the final turn with the rest of the log; returns the outcome."""
        self.finishing = True
        final = _stored(self.turn, response, in_progress=False, inputs=inputs)
        async with self._write:
            events = [*self.pending, *terminal]
            try:
                await self.svc.state.finish_background_response(
                    state_records.finish_background(
                        self.turn.tenant, self.token, final, [e.pb() for e in events]
                    ),
                )
            except errors.ApiError as exc:
                stop = _Stop.of(exc)
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
        stitch = _Stitch([], self.last_sequence)
        held: list[_Event] = []

        def push(events: list[dict[str, Any]]) -> None:
            mapped = stitch.map(events)
            held.extend(e for e in mapped if e.type in _STORED_TERMINALS)
            self._push([e for e in mapped if e.type not in _STORED_TERMINALS])

        try:
            stitch = _Stitch(await self._read_log(), self.last_sequence)
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
                message = turn.shut_down_snapshot(t)["error"]["message"]
                push(translator.fail("server_error", message))
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
        self, translator: _Translator, push: Callable[[list[dict[str, Any]]], None]
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
    response: dict[str, Any], terminal: _Event, exc: errors.ApiError
) -> tuple[dict[str, Any], list[_Event]]:
    """The failed form of a turn whose final form the state service refused, and its terminal
    event (in the place of the refused one)."""
    error = error_object(
        exc.code or "server_error", f"The response could not be stored: {exc.message}"
    )
    failed = {**response, "status": "failed", "output": [], "error": error}
    return failed, [
        _Event.of(
            {"type": "response.failed", "sequence_number": terminal.sequence, "response": failed}
        )
    ]


def _gave_up(attempts: int) -> str:
    return (
        f"The gateway started this background response {attempts} times and each time lost it "
        "(the router running it stopped or could not reach the state service); send it again."
    )


# --- cancel -----------------------------------------------------------------------------------


async def cancel(
    svc: Services, tenant: str, stored: state_records.StoredResponse
) -> dict[str, Any]:
    """POST /v1/responses/{id}/cancel on a running background response, through any router:
    stored as cancelled at once (the router running it stops at its next renewal, or now when
    it is this one); a response that finished meanwhile is returned unchanged."""
    response = state_records.response_of(stored)
    cancelled = {**response, "status": "cancelled", "completed_at": None}
    final = state_records.ended(stored, cancelled, keep_output=False)
    event = {"type": "response.cancelled", "sequence_number": 0, "response": cancelled}
    try:
        reply = await svc.state.cancel_background_response(
            state_records.cancel_background(tenant, final, orjson.dumps(event)),
        )
    except errors.ApiError as exc:
        if _reason(exc) != "NOT_BACKGROUND":
            raise
        return await _cancel_without_job(svc, tenant, final, cancelled)
    run = worker(svc).runs.get((tenant, stored.id))
    if run is not None:
        run.stop("cancelled")
    return state_records.response_of(reply.response)


async def _cancel_without_job(
    svc: Services,
    tenant: str,
    final: state_records.StoredResponse,
    cancelled: dict[str, Any],
) -> dict[str, Any]:
    """A running response stored before background jobs existed: finished with PutTurn."""
    try:
        await svc.state.put_turn(
            state_records.put_turn(tenant, final),
            # The record being ended is what the client named (POST .../cancel): whatever the
            # reason (its previous response may have gone since), it is that response's 404.
            not_found=lambda err: errors.response_not_found(final.id),
        )
    except errors.Conflict:
        # It finished before the cancel landed: that result stands.
        reply = await svc.state.get_response(
            state_records.get_response(tenant, response_id=final.id)
        )
        return state_records.response_of(reply.response)
    return cancelled


# --- following a running response's events ----------------------------------------------------


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
            watch = worker(svc).stub.WatchResponseEvents(request, metadata=metadata)
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
