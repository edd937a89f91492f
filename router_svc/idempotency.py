"""Retries of POST /v1/responses: what tells a request apart from a retry of an earlier one.

An explicit ``Idempotency-Key`` or an official SDK's retry (README, "Retries") gives a request an
:class:`Identity`: the key it is stored under, the response id it gets, and the keys a first
attempt may already be stored under (:func:`find_first`). The turn (router_svc.turn) stores
itself under the key, and a replay of it answers with the first response.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from router_svc import errors, running, state_records
from router_svc.ids import new_id
from router_svc.services import Services
from router_svc.shapes import ResponseObject

# A retry of an SDK call finds a first attempt that started in the same window of this many
# seconds or the one before (so at least this long ago): the SDK's default timeout (600 s) and
# back-off included.
RETRY_WINDOW_S = 900
_AUTO_PREFIX = "sdk-retry:"


@dataclass(frozen=True)
class Identity:
    """What tells a POST /v1/responses apart from a retry of an earlier one (README, "Retries").

    ``kind`` is "explicit" (an Idempotency-Key), "first" (the first attempt of an official SDK's
    call: stored under ``idempotency_key`` so that its retries find it), "retry" (a later attempt
    of one: ``lookup`` holds the keys its first attempt may be stored under) or "" (neither).
    """

    kind: str = ""
    idempotency_key: str = ""
    response_id: str = ""
    lookup: tuple[str, ...] = ()
    # With an Idempotency-Key: the response ids a first request with the same body has.
    accepted_ids: frozenset[str] = field(default_factory=frozenset)


NO_IDENTITY = Identity()


def identify(
    tenant: str,
    raw: bytes,
    body: Mapping[str, Any],
    key: str,
    attempt: int | None,
    *,
    store: bool,
    now: float | None = None,
) -> Identity:
    """The identity of a request with body ``raw`` (``body`` parsed), Idempotency-Key ``key``
    (empty for none) and SDK attempt ``attempt`` (None for other clients)."""
    if key:
        # The body's digest is part of the response id, so that the same key with another body
        # is told apart (a 400) from a retry; the body is compared as JSON, not as bytes.
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        response_id = _digest_id(f"{tenant}\x00{key}\x00{digest}")
        return Identity(
            kind="explicit",
            idempotency_key=key,
            response_id=response_id,
            lookup=(key,) if store else (),
            accepted_ids=frozenset({response_id, keyed_response_id(tenant, key)}),
        )
    if attempt is None or not store:
        return NO_IDENTITY
    # An official SDK sends a retry with the same body bytes and no id of its call, so the
    # tenant, the body and the time tell it apart.
    body_hash = hashlib.sha256(tenant.encode() + b"\x00" + raw).hexdigest()[:40]
    window = int((time.time() if now is None else now) // RETRY_WINDOW_S)
    auto_key = f"{_AUTO_PREFIX}{body_hash}:{window}"
    if attempt == 0:
        return Identity(kind="first", idempotency_key=auto_key)
    return Identity(
        kind="retry",
        idempotency_key=auto_key,
        response_id=retry_id(auto_key),
        lookup=(auto_key, f"{_AUTO_PREFIX}{body_hash}:{window - 1}"),
    )


def _digest_id(text: str) -> str:
    return "resp_" + hashlib.sha256(text.encode()).hexdigest()[:48]


def retry_id(auto_key: str) -> str:
    """The response id of every retry of the calls whose first attempt has ``auto_key``: two
    retries running at once store one turn."""
    return _digest_id(f"retry\x00{auto_key}")


def idempotency_key_reused() -> errors.InvalidRequest:
    return errors.InvalidRequest(
        "This Idempotency-Key was already used for a request with other content.",
        code="idempotency_key_reused",
    )


async def find_first(svc: Services, tenant: str, ident: Identity) -> ResponseObject | None:
    """The response a first request of this one already stored (an Idempotency-Key's, or the
    first attempt of an SDK call), if any; a 400 for an Idempotency-Key used with another body."""
    for key in ident.lookup:
        first = await find_idempotent(svc, tenant, key)
        if first is not None and running.unfinished_stream(first):
            # A first attempt still streaming answers this one once it ended; one that failed
            # does not answer an SDK's retry, which runs on its own.
            first = await running.when_done(svc, tenant, first)
            status = first.get("status")
            if status == "in_progress" or (status == "failed" and ident.kind == "retry"):
                continue
        if first is None:
            continue
        if ident.kind == "explicit" and first.get("id") not in ident.accepted_ids:
            raise idempotency_key_reused()
        return first
    return None


async def find_idempotent(svc: Services, tenant: str, key: str) -> ResponseObject | None:
    """The response already stored for this Idempotency-Key, if any."""
    reply = await svc.state.find(
        svc.state.get_response(state_records.get_response(tenant, idempotency_key=key))
    )
    if reply is None:
        return None
    return state_records.response_of(reply.response)


def keyed_response_id(tenant: str, idempotency_key: str) -> str:
    """A new response id; with an Idempotency-Key, the same one on every retry. (Turns stored
    with an Idempotency-Key before the body's digest was part of the id have this id.)"""
    if idempotency_key:
        digest = hashlib.sha256(f"{tenant}\x00{idempotency_key}".encode()).hexdigest()[:48]
        return f"resp_{digest}"
    return new_id("resp")
