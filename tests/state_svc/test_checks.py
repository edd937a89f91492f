"""state_svc.checks, records and page_tokens on their own: what a request must be, the messages
a reply is built from, and page tokens (the RPCs that use them are tested in test_backends.py and
test_request_strings.py)."""

from __future__ import annotations

import grpc
import pytest

from gateway.grpcerrors import ServiceError
from respgw.state.v1 import resources_pb2, state_service_pb2
from state_svc import checks, page_tokens, records
from state_svc.backends import base


def refused(exc: pytest.ExceptionInfo[ServiceError]) -> tuple[grpc.StatusCode, str]:
    return exc.value.code, exc.value.message


def stored(**fields: object) -> resources_pb2.StoredResponse:
    return resources_pb2.StoredResponse(
        id="resp_1",
        response_json=b'{"object": "response"}',
        input_items=[resources_pb2.Item(id="msg_1", json=b'{"type": "message"}')],
        **fields,  # type: ignore[arg-type]
    )


def test_a_turn_is_converted_once_checked() -> None:
    turn = checks.turn(stored(previous_response_id="resp_0", idempotency_key="k"))
    assert (turn.id, turn.previous_response_id, turn.idempotency_key) == ("resp_1", "resp_0", "k")
    assert [(i.id, bytes(i.json)) for i in turn.input_items] == [("msg_1", b'{"type": "message"}')]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"response_json": b"[1]"}, "response_json must be a JSON object"),
        ({"previous_response_id": "a", "conversation_id": "b"}, "cannot have both"),
        (
            {"input_items": [resources_pb2.Item(id="x", json=b"1")]},
            "item JSON must be a JSON object",
        ),
    ],
)
def test_a_bad_turn_is_invalid_argument_naming_why(fields: dict[str, object], message: str) -> None:
    msg = stored()
    for name, value in fields.items():
        if name == "input_items":
            del msg.input_items[:]
            msg.input_items.extend(value)  # type: ignore[arg-type]
        else:
            setattr(msg, name, value)
    with pytest.raises(ServiceError) as exc:
        checks.turn(msg)
    code, text = refused(exc)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in text


def test_strings_are_checked_in_nested_messages_and_maps() -> None:
    checks.check_strings(state_service_pb2.PutTurnRequest(tenant="t", response=stored()))
    long_id = stored()
    long_id.input_items[0].id = "x" * (checks.MAX_ID_CHARS + 1)
    with pytest.raises(ServiceError) as exc:
        checks.check_strings(state_service_pb2.PutTurnRequest(tenant="t", response=long_id))
    assert "response.input_items[0].id" in exc.value.message
    with pytest.raises(ServiceError) as exc:
        checks.check_strings(
            state_service_pb2.CreateConversationRequest(tenant="t", metadata={"k": "a\x00b"})
        )
    assert "metadata[k]" in exc.value.message


def test_events_must_be_consecutive_json_objects() -> None:
    ok = checks.events([resources_pb2.ResponseEvent(sequence_number=n, json=b"{}") for n in (3, 4)])
    assert [e.sequence for e in ok] == [3, 4]
    with pytest.raises(ServiceError):
        checks.events([resources_pb2.ResponseEvent(sequence_number=n, json=b"{}") for n in (3, 5)])
    with pytest.raises(ServiceError):
        checks.events([resources_pb2.ResponseEvent(sequence_number=0, json=b"[]")])


def test_a_stored_turn_becomes_its_message_and_its_header() -> None:
    turn = base.Turn(
        id="resp_1",
        response_json=b"{}",
        input_items=(base.Item(id="msg_1", json=b"{}", sequence=1, create_time_us=5_000_000),),
        create_time_us=5_000_000,
        expire_time_us=None,
    )
    msg = records.turn_pb(turn)
    assert (msg.id, msg.input_items[0].id, msg.input_items[0].sequence) == ("resp_1", "msg_1", 1)
    assert msg.create_time.ToMicroseconds() == 5_000_000 and not msg.HasField("expire_time")
    header = records.turn_header_pb(turn)
    assert header.id == "resp_1" and not header.input_items and not header.response_json


def test_a_page_token_is_valid_only_where_it_was_issued() -> None:
    token = page_tokens.encode_page_token("conv_1", 1, 42)
    assert page_tokens.decode_page_token(token, "conv_1", 1) == 42
    for conversation, order in (("conv_2", 1), ("conv_1", 2)):
        with pytest.raises(ServiceError):
            page_tokens.decode_page_token(token, conversation, order)
    with pytest.raises(ServiceError):
        page_tokens.decode_page_token(token[:-2] + "AA", "conv_1", 1)
