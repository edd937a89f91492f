"""A streamed foreground turn is retrievable as ``in_progress`` while it runs, as at OpenAI.

A turn with ``stream: true`` and ``store: true`` (not background, not held until stored: a
conversation turn or an SDK retry) is stored in its running form (status ``in_progress``, no
output) beside the stream, never before it: :func:`announce` starts a task of its own right after
``response.created`` and ``response.in_progress`` were queued for the client, and nothing waits
for it. The final turn is stored as before, with PutTurn, which replaces a stored running turn;
whichever lands first, the final turn is never replaced (a running put that comes late is
refused as a conflict, which is fine), and a running put that fails changes nothing for the
stream.

So that a router that dies mid-stream does not leave the response running forever, the running
turn is stored with EnqueueBackgroundResponse as a job this router holds by a lease
(``--running-stream-lease-s``), renewed every third of it while the stream runs; its spec
(:data:`FOREGROUND_SPEC`) says it is a foreground stream. The model is never run again for it: a
router that claims such a job (its lease ran out: the router streaming it stopped) stores it as
failed (:func:`finish_abandoned`). The final PutTurn needs none of this: it finishes the job
(see PutTurn), which is then never claimed and no longer counts toward the background caps.

Off with ``--store-running-streams false``: a streamed turn is then stored only at its end. With
``--running-stream-delay-s`` the running form is stored only once the stream ran that long, so
that short streams cost no state call for it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Counter

from router_svc import errors, state_records
from router_svc.response import error_object
from router_svc.shapes import ResponseObject

if TYPE_CHECKING:
    from router_svc.services import Services
    from router_svc.validate import TurnRequest

log = logging.getLogger(__name__)

# The spec of a running foreground stream's job. A router that cannot read it as a background
# spec (one from before this existed) stores the response as failed too, never runs it.
FOREGROUND_SPEC = b'{"v":1,"foreground":true}'

ABANDONED_MESSAGE = (
    "The gateway stopped streaming this response before it finished (the router serving it "
    "stopped); send it again."
)

RUNNING_PUTS = Counter(
    "respgw_router_running_streams_total",
    "Streamed turns stored as in progress while they ran, by outcome (stored; skipped: the final "
    "turn or another response held the id or key first; failed: the state service refused or "
    "could not be reached, the stream went on).",
    ["outcome"],
)
ABANDONED = Counter(
    "respgw_router_abandoned_streams_total",
    "Running streamed turns this router stored as failed because the router streaming them "
    "stopped (their lease ran out).",
)


class Turn(Protocol):
    """What the running form reads of a turn (a :class:`router_svc.turn.Turn`): named here so
    that this module needs not import turn.py, which imports it."""

    req: TurnRequest
    tenant: str
    response_id: str
    idempotency_key: str


@dataclass(eq=False)
class Running:
    """The running form of one streamed turn: the task that stores it and holds its lease."""

    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """The stream ended: stop renewing (the final turn, or its failure, is stored)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


def announce(svc: Services, turn: Turn, response: ResponseObject | None) -> Running | None:
    """Starts storing ``response`` (the turn's in-progress snapshot) as the turn's running form,
    in a task of its own; None when the feature is off or the turn is not stored."""
    worker = svc.worker
    if (
        response is None
        or worker is None
        or not turn.req.store
        or turn.req.background
        or not svc.settings.store_running_streams
    ):
        return None
    running = Running()
    running.task = asyncio.create_task(_hold(svc, turn, response))
    return running


# Loop iterations the running form waits (with no delay set) for the stream to start.
_YIELDS = 3


async def _hold(svc: Services, turn: Turn, response: ResponseObject) -> None:
    """Stores the running turn, then renews its lease until cancelled (the stream's end)."""
    delay = svc.settings.running_stream_delay_s
    if delay > 0:
        await asyncio.sleep(delay)  # a stream that ends first is never stored as running
    else:
        # Built and sent once the stream's first events went out and its hub call started:
        # what it costs is not the client's wait for the first byte.
        for _ in range(_YIELDS):
            await asyncio.sleep(0)
    worker = svc.worker
    assert worker is not None
    request = state_records.enqueue_background(
        turn.tenant,
        state_records.turn_record(
            response_id=turn.response_id,
            previous_response_id=turn.req.previous_response_id or "",
            conversation_id=turn.req.conversation_id or "",
            input_items=turn.req.stored_inputs(),
            output_items=(),
            response=response,
            idempotency_key=turn.idempotency_key,
            events=None,
            in_progress=True,
        ),
        spec=FOREGROUND_SPEC,
        owner=worker.owner,
        lease_duration=state_records.lease(svc.settings.running_stream_lease_s),
    )
    try:
        reply = await svc.state.enqueue_background_response(request)
    except errors.ApiError as exc:
        # ALREADY_EXISTS: the final turn is stored already. Anything else (the previous response
        # is gone, the state service is down) the final PutTurn meets and reports itself.
        RUNNING_PUTS.labels("skipped" if exc.status == 409 else "failed").inc()
        log.debug("running turn not stored", extra={"code": exc.code})
        return
    if reply.replayed or not reply.HasField("job"):
        RUNNING_PUTS.labels("skipped").inc()
        return  # another response holds the key (or this id is another router's to renew)
    RUNNING_PUTS.labels("stored").inc()
    renew = state_records.renew_lease(
        request.tenant, request.response.id, reply.job.lease_token, request.lease_duration
    )
    period = svc.settings.running_stream_lease_s / 3
    while True:
        await asyncio.sleep(period)
        try:
            renewal = await svc.state.renew_background_lease(renew)
        except errors.ApiError as exc:
            if exc.status < 500:
                return  # lease lost (another router stored it as failed) or the response is gone
            continue  # the state service is unwell: try again at the next period
        if renewal.cancel_requested:
            return


# The longest a request waits for the streamed first attempt it retries (stored as running) to
# end, before it runs on its own.
RETRY_WAIT_S = 300.0


def unfinished_stream(response: ResponseObject) -> bool:
    """True for a streamed foreground turn stored as running, or as failed (its hub or its router
    failed): the first attempt of a request that a retry must not simply be answered with."""
    return not response.get("background") and response.get("status") in ("in_progress", "failed")


async def when_done(
    svc: Services, tenant: str, response: ResponseObject, *, timeout_s: float = RETRY_WAIT_S
) -> ResponseObject:
    """``response`` once it is no longer running (read again and again, less often as time goes
    by: a stream whose router stopped is stored as failed within its lease), or as it is after
    ``timeout_s`` or once deleted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.05
    while response.get("status") == "in_progress" and loop.time() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
        found = await svc.state.find(
            svc.state.get_response(
                state_records.get_response(tenant, response_id=str(response["id"]))
            )
        )
        if found is None:
            break
        response = state_records.response_of(found.response)
    return response


def is_foreground(job: state_records.BackgroundJob) -> bool:
    """True for the job of a running foreground stream (never run again, only finished)."""
    return job.spec == FOREGROUND_SPEC


async def finish_abandoned(svc: Services, job: state_records.BackgroundJob) -> None:
    """Stores a running foreground stream whose router stopped as failed, with the claimed
    job's lease; a stream that finished meanwhile is left as it is."""
    found = await svc.state.find(
        svc.state.get_response(state_records.get_response(job.tenant, response_id=job.response_id))
    )
    if found is None or not found.response.in_progress:
        return
    stored = found.response
    response = state_records.response_of(stored)
    failed = {
        **response,
        "status": "failed",
        "error": error_object("server_error", ABANDONED_MESSAGE),
    }
    final = state_records.ended(stored, failed)
    try:
        await svc.state.finish_background_response(
            state_records.finish_background(job.tenant, job.lease_token, final),
        )
    except errors.ApiError as exc:
        # The stream's own final turn landed first (it finished the job: LEASE_LOST), or the
        # response was deleted: nothing to finish.
        log.info(
            "abandoned stream not stored as failed",
            extra={"response_id": job.response_id, "code": exc.code},
        )
        return
    ABANDONED.inc()
    log.warning(
        "a streamed response whose router stopped was stored as failed",
        extra={"response_id": job.response_id},
    )
