"""state_records: a turn's PutTurn request, as a message and encoded already (a large turn)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from respgw.state.v1 import state_service_pb2 as pb
from router_svc import state_records

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
