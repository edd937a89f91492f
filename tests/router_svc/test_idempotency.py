"""How a POST /v1/responses is told apart from a retry of an earlier one: the identity an
Idempotency-Key or an official SDK's attempt gives it (its stored key, response id and lookups).
Finding the first attempt in a real state service is tested with the turn (test_turn.py)."""

from __future__ import annotations

import orjson

from router_svc import idempotency

TENANT = "t1"


def test_an_idempotency_key_fixes_the_response_id_by_tenant_key_and_body() -> None:
    body = {"model": "m", "input": "hi", "temperature": 0.5}
    same = {"temperature": 0.5, "input": "hi", "model": "m"}  # other key order, same JSON
    first = idempotency.identify(TENANT, b"", body, "k1", None, store=True)
    assert first.kind == "explicit" and first.idempotency_key == "k1"
    assert first.lookup == ("k1",)
    assert first.response_id.startswith("resp_") and len(first.response_id) == 53
    assert idempotency.identify(TENANT, b"", same, "k1", 3, store=True) == first
    others = [
        idempotency.identify(TENANT, b"", {**body, "input": "ho"}, "k1", None, store=True),
        idempotency.identify("t2", b"", body, "k1", None, store=True),
        idempotency.identify(TENANT, b"", body, "k2", None, store=True),
    ]
    assert len({first.response_id, *(o.response_id for o in others)}) == 4
    assert first.response_id in first.accepted_ids and len(first.accepted_ids) == 2
    # Not stored: nothing to look up, the id is still fixed.
    unstored = idempotency.identify(TENANT, b"", body, "k1", None, store=False)
    assert unstored.lookup == () and unstored.response_id == first.response_id


def test_an_sdk_call_is_told_from_its_retries_by_body_and_time() -> None:
    raw = b'{"model":"m","input":"hi"}'
    body = orjson.loads(raw)
    now = 1_000_000 * idempotency.RETRY_WINDOW_S + 10
    assert idempotency.identify(TENANT, raw, body, "", None, store=True) is idempotency.NO_IDENTITY
    assert idempotency.identify(TENANT, raw, body, "", 0, store=False) is idempotency.NO_IDENTITY
    first = idempotency.identify(TENANT, raw, body, "", 0, store=True, now=now)
    assert first.kind == "first" and first.response_id == "" and first.lookup == ()
    retry = idempotency.identify(TENANT, raw, body, "", 2, store=True, now=now)
    assert retry.kind == "retry" and retry.idempotency_key == first.idempotency_key
    assert retry.lookup[0] == first.idempotency_key
    # Two retries of one call get one id; a retry in the next window still finds the first.
    assert idempotency.identify(TENANT, raw, body, "", 1, store=True, now=now).response_id == (
        retry.response_id
    )
    later = idempotency.identify(
        TENANT, raw, body, "", 1, store=True, now=now + idempotency.RETRY_WINDOW_S
    )
    assert later.lookup[1] == first.idempotency_key
    other = idempotency.identify(TENANT, raw + b" ", body, "", 0, store=True, now=now)
    assert other.idempotency_key != first.idempotency_key
