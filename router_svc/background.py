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

The routes' side is here: accepting one (:func:`start`, :func:`open_stream`), cancelling one
(:func:`cancel`) and following one (:func:`follow`). The worker and its claims:
:mod:`router_svc.background_worker`; running one: :mod:`router_svc.background_run`; the event
log: :mod:`router_svc.background_log`; the job's spec: :mod:`router_svc.background_spec`.

Nothing here runs on the path of a foreground turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import orjson

from router_svc import errors, idempotency, state_records, turn
from router_svc.background_log import Client
from router_svc.background_log import follow as follow
from router_svc.background_run import remote_error, remote_reason, stored_record
from router_svc.background_spec import spec_of
from router_svc.background_worker import start_worker as start_worker
from router_svc.background_worker import worker
from router_svc.services import Services
from router_svc.shapes import ResponseObject

# --- accepting a background response ----------------------------------------------------------

EMPTY_HEADERS: Mapping[str, str] = {}


async def _enqueue(
    svc: Services, t: turn.Turn, headers: Mapping[str, str]
) -> tuple[ResponseObject, state_records.BackgroundJob | None]:
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
        stored_record(t, queued, in_progress=True),
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
        info = remote_error(exc)
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
) -> ResponseObject:
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
    client = Client()
    if not worker(svc).run(t, job, client):
        return follow(svc, t.tenant, response_id, -1, include=t.req.include)
    return client.stream(svc, t.tenant, t.response_id)


# --- cancel -----------------------------------------------------------------------------------


async def cancel(
    svc: Services, tenant: str, stored: state_records.StoredResponse
) -> ResponseObject:
    """POST /v1/responses/{id}/cancel on a running background response, through any router:
    stored as cancelled at once (the router running it stops at its next renewal, or now when
    it is this one); a response that finished meanwhile is returned unchanged."""
    response = state_records.response_of(stored)
    cancelled: ResponseObject = {**response, "status": "cancelled", "completed_at": None}
    final = state_records.ended(stored, cancelled, keep_output=False)
    event = {"type": "response.cancelled", "sequence_number": 0, "response": cancelled}
    try:
        reply = await svc.state.cancel_background_response(
            state_records.cancel_background(tenant, final, orjson.dumps(event)),
        )
    except errors.ApiError as exc:
        if remote_reason(exc) != "NOT_BACKGROUND":
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
    cancelled: ResponseObject,
) -> ResponseObject:
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
