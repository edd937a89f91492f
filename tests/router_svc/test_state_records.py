"""state_records: a turn's PutTurn request, as a message and encoded already (a large turn)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from respgw.state.v1 import state_service_pb2 as pb
from router_svc import events, state_records

INPUT = [{"id": "msg_in", "type": "message", "role": "user", "content": "hi"}]
OUTPUT = [
    {
        "id": f"msg_{n}",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "é" * (n * 300)}],
    }
    for n in range(1, 4)
]
RESPONSE = {"id": "resp_1", "object": "response", "output": OUTPUT}


def _request(*, encoded: bool, combined: bool = False, version: int | None = 7) -> Any:
    return state_records.put_turn_request(
        "tenant",
        response_id="resp_1",
        previous_response_id="resp_0",
        conversation_id="",
        input_items=INPUT,
        idempotency_key="key",
        in_progress=False,
        output=OUTPUT,
        output_json=[orjson.dumps(i) for i in OUTPUT],
        response_json=orjson.dumps(RESPONSE),
        events_json=b'[{"type":"response.created"}]',
        encoded=encoded,
        combined=combined,
        require_intact_chain=True,
        omit_stored_content=True,
        expected_conversation_version=version,
    )


def test_an_encoded_turn_parses_as_the_same_request() -> None:
    message, record = _request(encoded=False)
    encoded, encoded_record = _request(encoded=True)
    assert isinstance(message, pb.PutTurnRequest) and isinstance(encoded, bytes)
    assert pb.PutTurnRequest.FromString(encoded) == message
    assert message.expected_conversation_version == 7
    assert [orjson.loads(i.json) for i in record.output_items] == OUTPUT
    # The record of an encoded turn holds only what the history cache reads: the input items.
    assert [orjson.loads(i.json) for i in encoded_record.input_items] == INPUT
    assert not encoded_record.output_items and not encoded_record.response_json


def test_a_combined_turn_sends_its_items_inside_the_response_json() -> None:
    encoded, _ = _request(encoded=True, combined=True, version=None)
    assert isinstance(encoded, bytes)
    parsed = pb.PutTurnRequest.FromString(encoded)
    assert not parsed.response.output_items and not parsed.response.response_json
    assert orjson.loads(parsed.response.response_json_with_output_items) == RESPONSE
    assert not parsed.HasField("expected_conversation_version")


@pytest.mark.parametrize(
    ("response_json", "events_json", "large"),
    [(b"x" * (256 * 1024 - 1), b"", False), (b"x" * (128 * 1024), b"y" * (128 * 1024), True)],
)
def test_large_turn_counts_the_event_log(
    response_json: bytes, events_json: bytes, large: bool
) -> None:
    assert state_records.large_turn(response_json, events_json) is large


# --- background jobs ---------------------------------------------------------------------------


def test_a_lease_keeps_its_fraction_of_a_second() -> None:
    lease = state_records.lease(1.5)
    assert (lease.seconds, lease.nanos) == (1, 500_000_000)
    assert state_records.lease(0.25).ToMicroseconds() == 250_000


def test_a_watch_from_the_log_start_or_from_event_zero_says_so() -> None:
    # starting_after is optional in the contract: 0 (after the first event) is sent, not dropped.
    for after in (-1, 0, 41):
        request = state_records.watch_events("tenant", "resp_1", after)
        assert request.HasField("starting_after") and request.starting_after == after


def test_the_job_requests_carry_the_lease_and_the_record() -> None:
    record = state_records.turn_record(
        response_id="resp_1",
        previous_response_id="",
        conversation_id="",
        input_items=INPUT,
        output_items=(),
        response=RESPONSE,
        idempotency_key="",
        events=None,
        in_progress=True,
    )
    lease = state_records.lease(30)
    enqueue = state_records.enqueue_background(
        "tenant", record, spec=b"{}", owner="router-1", lease_duration=lease
    )
    assert enqueue.response == record and enqueue.lease_duration.seconds == 30
    assert (enqueue.max_pending_per_tenant, enqueue.max_pending_total) == (0, 0)  # no caps
    claim = state_records.claim_any_background("router-1", lease, "req-1")
    assert claim.any_tenant and claim.request_id == "req-1" and claim.lease_duration == lease
    renew = state_records.renew_lease("tenant", "resp_1", 3, lease)
    assert (renew.response_id, renew.lease_token, renew.lease_duration) == ("resp_1", 3, lease)
    events = [state_records.response_event(n, b'{"n":%d}' % n) for n in (4, 5)]
    append = state_records.append_events("tenant", "resp_1", 3, events)
    assert [e.sequence_number for e in append.events] == [4, 5] and append.lease_token == 3
    finish = state_records.finish_background("tenant", 3, record)
    assert finish.response == record and not finish.events
    cancel = state_records.cancel_background("tenant", record, b'{"type":"response.cancelled"}')
    assert cancel.response.id == "resp_1" and cancel.cancel_event_json.startswith(b"{")


@pytest.mark.parametrize("sliced", [False, True], ids=["bytes", "made in pieces"])
def test_put_turn_chunks_carry_the_turn_in_pieces(sliced: bool) -> None:
    text = 'ünïcode "quoted"\n' * (state_records.CHUNK_BYTES // 8)
    response = {"id": "resp_1", "output": [{"id": "msg_1", "content": [{"text": text}]}]}
    whole = orjson.dumps(response)
    pieces = events.json_slices(response)
    assert pieces is not None
    json: bytes | state_records.SlicedJson = (
        (len(whole), lambda: events.json_slices(response) or iter(())) if sliced else whole
    )
    put = pb.PutTurnRequest(tenant="t")
    put.response.id = "resp_1"
    make = state_records.put_turn_chunks(put, json, b"[1]", combined=True)
    for _ in range(2):  # made anew for each attempt
        head, *rest = make()
        assert head.head.request == put
        assert head.head.response_json_with_output_items_size == len(whole)
        assert head.head.stream_events_json_size == 3
        assert all(len(m.SerializeToString()) <= state_records.CHUNK_BYTES + 16 for m in rest)
        got = b"".join(m.response_json_with_output_items for m in rest)
        assert got == whole
        assert b"".join(m.stream_events_json for m in rest) == b"[1]"
