"""A large PutTurn request is read without copying its large fields (state_svc.wire): what it
stands for is exactly what protobuf parses from the same bytes."""

from __future__ import annotations

import orjson
import pytest
from google.protobuf.message import DecodeError

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from router_svc import state_records
from state_svc import wire
from tests.state_svc.conftest import TENANT, simple_turn

BIG = wire.LARGE_REQUEST_BYTES


def as_parsed(got: pb.PutTurnRequest | wire.LargePutTurn) -> pb.PutTurnRequest:
    """The message ``got`` stands for: its large fields put back."""
    if isinstance(got, pb.PutTurnRequest):
        return got
    out = pb.PutTurnRequest()
    out.CopyFrom(got.request)
    for name, view in got.large.items():
        assert isinstance(view, memoryview)
        assert not getattr(out.response, name), name  # taken out of the message
        setattr(out.response, name, bytes(view))
    return out


def big_turn(response_id: str = "r1", size: int = BIG) -> resources_pb2.StoredResponse:
    stored = simple_turn(response_id)
    stored.response_json = orjson.dumps({"id": response_id, "text": "x" * size})
    stored.stream_events_json = b'[{"type":"response.created"}]'
    return stored


def test_a_small_request_is_parsed_as_a_message() -> None:
    request = pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r1"))
    got = wire.put_turn_request(request.SerializeToString())
    assert isinstance(got, pb.PutTurnRequest)
    assert got == request


def test_a_large_request_is_its_small_fields_and_views_of_its_large_ones() -> None:
    request = pb.PutTurnRequest(tenant=TENANT, response=big_turn(), omit_stored_content=True)
    request.expected_conversation_version = 3
    raw = request.SerializeToString()
    got = wire.put_turn_request(raw)
    assert isinstance(got, wire.LargePutTurn)
    assert set(got.large) == {"response_json", "stream_events_json"}
    assert got.large["response_json"].obj is raw  # a view, not a copy
    assert as_parsed(got) == pb.PutTurnRequest.FromString(raw) == request


def test_the_routers_encoded_form_reads_as_protobuf_reads_it() -> None:
    # The router sends a large turn's large fields as a second occurrence of ``response``.
    for combined in (False, True):
        put = pb.PutTurnRequest(tenant=TENANT, require_intact_chain=True)
        put.response.id = "r1"
        put.response.input_items.add(id="r1-in", json=b'{"type":"message"}')
        response_json = orjson.dumps({"id": "r1", "output": [], "text": "y" * BIG})
        output = [] if combined else [{"id": "r1-out"}]
        raw = state_records.encoded_put_turn(
            put,
            output,
            [orjson.dumps(i) for i in output],
            response_json,
            b"[]",
            combined=combined,
        )
        got = wire.put_turn_request(raw)
        assert isinstance(got, wire.LargePutTurn)
        assert as_parsed(got) == pb.PutTurnRequest.FromString(raw)


def test_a_field_given_twice_is_the_last_one() -> None:
    first = pb.PutTurnRequest(tenant=TENANT, response=big_turn("r1"))
    second = pb.PutTurnRequest(
        response=resources_pb2.StoredResponse(response_json=b'{"id":"r1"}', in_progress=True)
    )
    for raw in (
        first.SerializeToString() + second.SerializeToString(),
        second.SerializeToString() + first.SerializeToString(),
    ):
        got = wire.put_turn_request(raw)
        assert as_parsed(got) == pb.PutTurnRequest.FromString(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\xff\xff\x7f" + b"x" * BIG,  # a length past the end
        b"\x13" + b"x" * BIG,  # a group
        b"\x00" + b"x" * BIG,  # field number 0
    ],
)
def test_bytes_that_are_no_request_are_refused_as_protobuf_refuses_them(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.PutTurnRequest.FromString(raw)
    with pytest.raises(DecodeError):
        wire.put_turn_request(raw)


# --- PutTurnChunked's messages -------------------------------------------------------------


def chunk_as_parsed(got: pb.PutTurnChunkedRequest | wire.Piece) -> pb.PutTurnChunkedRequest:
    """The message ``got`` stands for."""
    if isinstance(got, pb.PutTurnChunkedRequest):
        return got
    assert isinstance(got.data, memoryview)
    out = pb.PutTurnChunkedRequest()
    setattr(out, got.name, bytes(got.data))
    return out


@pytest.mark.parametrize("name", wire.CHUNKED_FIELDS)
@pytest.mark.parametrize("size", [0, 1, 127, 128, 300_000])
def test_a_piece_is_a_view_of_the_message_received(name: str, size: int) -> None:
    message = pb.PutTurnChunkedRequest()
    setattr(message, name, bytes(range(256)) * (size // 256) + b"p" * (size % 256))
    raw = message.SerializeToString()
    got = wire.put_turn_chunk(raw)
    assert isinstance(got, wire.Piece)
    assert got.name == name and got.data.obj is raw  # no copy
    assert chunk_as_parsed(got) == pb.PutTurnChunkedRequest.FromString(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # The head.
        pb.PutTurnChunkedRequest(
            head=pb.PutTurnChunkedHead(request=pb.PutTurnRequest(tenant=TENANT))
        ).SerializeToString(),
        # A piece field given twice (the last one is the piece), or with another field after.
        pb.PutTurnChunkedRequest(response_json=b"first").SerializeToString()
        + pb.PutTurnChunkedRequest(stream_events_json=b"second").SerializeToString(),
        pb.PutTurnChunkedRequest(response_json=b"piece").SerializeToString() + b"\x08\x01",
        # Nothing at all.
        b"",
    ],
    ids=["head", "twice", "extra-field", "empty"],
)
def test_any_other_message_is_parsed_as_protobuf_parses_it(raw: bytes) -> None:
    got = wire.put_turn_chunk(raw)
    assert isinstance(got, pb.PutTurnChunkedRequest)
    assert got == pb.PutTurnChunkedRequest.FromString(raw)


@pytest.mark.parametrize(
    "raw", [b"\x12\x05abc", b"\x12", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]
)
def test_a_piece_cut_short_is_refused_as_protobuf_refuses_it(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.PutTurnChunkedRequest.FromString(raw)
    with pytest.raises(DecodeError):
        wire.put_turn_chunk(raw)
