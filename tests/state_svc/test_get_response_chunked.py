"""GetResponseChunked on every backend: a stored response in pieces, put together exactly as
GetResponse returns its response_json and stream_events_json, with the same status codes."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.grpcerrors import RemoteError, error_info
from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import service
from tests.state_svc.conftest import TENANT, Client, assert_error, item, simple_turn
from tests.state_svc.test_put_turn_chunked import LONG, long_turn

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def _read(
    client: Client, response_id: str, tenant: str = TENANT
) -> tuple[pb.GetResponseChunkedHead, list[tuple[str, bytes]]]:
    """The head of the stream and its pieces, in order, as (field, piece)."""
    call = client.stub.GetResponseChunked(
        pb.GetResponseChunkedRequest(tenant=tenant, response_id=response_id), timeout=30
    )
    messages = [message async for message in call]
    assert messages and messages[0].WhichOneof("chunk") == "head"
    assert all(m.WhichOneof("chunk") != "head" for m in messages[1:])
    pieces = []
    for message in messages[1:]:
        which = message.WhichOneof("chunk")
        assert which is not None
        pieces.append((which, getattr(message, which)))
    return messages[0].head, pieces


async def _refused(client: Client, request: pb.GetResponseChunkedRequest) -> RemoteError:
    call: Any = client.stub.GetResponseChunked(request, timeout=30)
    try:
        async for _ in call:
            raise AssertionError("a refused call sent a message")
    except grpc.aio.AioRpcError as exc:
        return error_info(exc)
    raise AssertionError("the call did not fail")


def _joined(pieces: list[tuple[str, bytes]], field: str) -> bytes:
    return b"".join(piece for name, piece in pieces if name == field)


async def test_a_long_answer_comes_in_pieces_as_get_response_returns_it(client: Client) -> None:
    stored = long_turn("resp_long", LONG * 8, idempotency_key="key-1")
    stored.stream_events_json = b"[" + b'{"type":"x"},' * 40_000 + b'{"type":"y"}]'
    await client.put_chunked(stored, piece_bytes=100_000)
    whole = (await client.get("resp_long")).response
    head, pieces = await _read(client, "resp_long")
    # Byte for byte what GetResponse returns, the response's JSON first, no piece too large.
    assert _joined(pieces, "response_json") == whole.response_json
    assert _joined(pieces, "stream_events_json") == whole.stream_events_json
    names = [name for name, _ in pieces]
    assert names == sorted(names, key=["response_json", "stream_events_json"].index)
    assert len(pieces) > 3
    assert all(0 < len(piece) <= service.PIECE_BYTES for _, piece in pieces)
    assert head.response_json_size == len(whole.response_json)
    assert head.stream_events_json_size == len(whole.stream_events_json)
    # The head is the response without its items and large fields.
    expected = resources_pb2.StoredResponse()
    expected.CopyFrom(whole)
    for name in ("input_items", "output_items", "response_json", "stream_events_json"):
        expected.ClearField(name)
    assert head.response == expected
    assert head.response.idempotency_key == "key-1"


async def test_a_small_turn_is_one_piece_and_a_running_one_says_so(client: Client) -> None:
    conversation = await client.conversation([item("c-0")])
    stored = simple_turn("resp_small", conversation=conversation)
    stored.in_progress = True
    await client.put(stored, expected=1)
    head, pieces = await _read(client, "resp_small")
    assert pieces == [("response_json", stored.response_json)]
    assert (head.response_json_size, head.stream_events_json_size) == (
        len(stored.response_json),
        0,
    )
    assert head.response.in_progress
    assert head.response.conversation_id == conversation
    assert not head.response.input_items and not head.response.output_items


async def test_what_get_response_does_not_find_is_not_found(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    for tenant, response_id in (("other", "resp_1"), (TENANT, "resp_nope")):
        request = pb.GetResponseChunkedRequest(tenant=tenant, response_id=response_id)
        assert_error(await _refused(client, request), NOT_FOUND, "RESPONSE_NOT_FOUND")
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    request = pb.GetResponseChunkedRequest(tenant=TENANT, response_id="resp_1")
    assert_error(await _refused(client, request), NOT_FOUND, "RESPONSE_NOT_FOUND")


async def test_bad_requests_are_refused(client: Client) -> None:
    err = await _refused(client, pb.GetResponseChunkedRequest(response_id="resp_1"))
    assert_error(err, INVALID, "TENANT_REQUIRED", field="tenant")
    for response_id in ("", "r\x00", "r" * 5000):
        err = await _refused(
            client, pb.GetResponseChunkedRequest(tenant=TENANT, response_id=response_id)
        )
        assert_error(err, INVALID, "INVALID_ARGUMENT", field="response_id")
