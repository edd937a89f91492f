"""A background job's spec: what another router needs to run the turn.

The router that accepts a background response stores the validated request and the history it
was read with as its job's spec (:func:`spec_of`); a router that claims the job rebuilds the turn
from it (:func:`turn_of`, or from the stored response alone when the spec cannot be read) and asks
the bootstrap service again for what it had prepared (:func:`prepare_again`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping

import orjson

from router_svc import bootstrap, state_records, turn, validate
from router_svc.services import Services


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


async def turn_of_stored(svc: Services, job: state_records.BackgroundJob) -> turn.Turn:
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
