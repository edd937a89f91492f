"""PutTurnChunked on every backend: a turn sent in pieces is stored exactly as PutTurn stores it
(same checks, same idempotency and ordering), and a stream that ends before it is complete
stores nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import orjson
import pytest

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import long_json
from tests.state_svc.conftest import (
    TENANT,
    Client,
    assert_error,
    chunked,
    fails,
    item,
    simple_turn,
    turn,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# Long enough for the long-string path of state_svc.long_json, with what orjson escapes in it.
LONG = ('héllo "wörld"\n\tand\\on ' * (2 * long_json.LONG_BYTES // 25 + 1))[
    : 2 * long_json.LONG_BYTES
]


def long_turn(response_id: str, text: str = LONG, **kwargs: str) -> resources_pb2.StoredResponse:
    """A turn whose output item (a message with ``text``) is in its response JSON
    (response_json_with_output_items), with an event log."""
    out = {
        "id": f"{response_id}-out",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "text": text}],
    }
    response = {"id": response_id, "object": "response", "output": [out], "status": "completed"}
    stored = resources_pb2.StoredResponse(
        id=response_id,
        input_items=[item(f"{response_id}-in")],
        response_json_with_output_items=orjson.dumps(response),
        stream_events_json=b'[{"type":"response.created","sequence_number":0}]',
        **kwargs,
    )
    return stored


async def test_a_turn_in_pieces_is_stored_as_put_turn_stores_it(client: Client) -> None:
    stored = simple_turn("resp_1")
    stored.stream_events_json = b'[{"type": "response.created", "sequence_number": 0}]'
    put = await client.put_chunked(stored)
    assert not put.replayed
    got = (await client.get("resp_1")).response
    assert got.response_json == stored.response_json
    assert got.stream_events_json == stored.stream_events_json
    assert [i.json for i in got.input_items] == [i.json for i in stored.input_items]
    assert [i.json for i in got.output_items] == [i.json for i in stored.output_items]
    # The same idempotency as PutTurn, either way round.
    assert (await client.put(stored)).replayed
    assert (await client.put_chunked(stored, piece_bytes=1)).replayed
    other = simple_turn("resp_1", body="other")
    assert_error(
        await fails(client.put_chunked(other)),
        grpc.StatusCode.ALREADY_EXISTS,
        "RESPONSE_ID_CONFLICT",
    )


async def test_a_long_answer_is_stored_byte_for_byte_with_its_items(client: Client) -> None:
    stored = long_turn("resp_long")
    await client.put_chunked(stored, piece_bytes=100_000)
    got = (await client.get("resp_long")).response
    sent = orjson.loads(stored.response_json_with_output_items)
    # Stored as given; its output item as orjson encodes it.
    assert got.response_json == stored.response_json_with_output_items
    assert [i.json for i in got.output_items] == [orjson.dumps(sent["output"][0])]
    assert orjson.loads(got.output_items[0].json)["content"][0]["text"] == LONG
    assert got.stream_events_json == stored.stream_events_json
    assert (await client.put_chunked(stored, piece_bytes=50_000)).replayed


@pytest.mark.parametrize(
    "text",
    [
        LONG.replace("and", "\u00e9\u2028/"),  # raw non-ASCII, as orjson writes it
        LONG + long_json._MARK + "0\ue000",  # holds the skeleton's placeholder: parsed whole
    ],
    ids=["unicode", "placeholder"],
)
async def test_other_long_answers_are_stored_the_same(client: Client, text: str) -> None:
    stored = long_turn("resp_odd", text)
    await client.put_chunked(stored, piece_bytes=100_000)
    got = (await client.get("resp_odd")).response
    assert got.response_json == stored.response_json_with_output_items
    sent = orjson.loads(stored.response_json_with_output_items)["output"][0]
    assert [i.json for i in got.output_items] == [orjson.dumps(sent)]


async def test_escapes_orjson_does_not_write_are_stored_as_orjson_encodes_the_item(
    client: Client,
) -> None:
    # "\/" and "\u00e9" are JSON, but not how orjson writes them: the item is encoded here.
    body = orjson.dumps(orjson.loads(long_turn("resp_esc").response_json_with_output_items))
    body = body.replace(b"and", b"\\/\\u00e9", 3)
    stored = long_turn("resp_esc")
    stored.response_json_with_output_items = body
    await client.put_chunked(stored, piece_bytes=100_000)
    got = (await client.get("resp_esc")).response
    assert got.response_json == body
    assert [i.json for i in got.output_items] == [orjson.dumps(orjson.loads(body)["output"][0])]


@pytest.mark.parametrize(
    "bad",
    [b"\\x", b"\xff", b"\x01"],
    ids=["escape", "utf-8", "control"],
)
async def test_a_long_string_that_is_no_json_is_refused(client: Client, bad: bytes) -> None:
    stored = long_turn("resp_bad")
    stored.response_json_with_output_items = stored.response_json_with_output_items.replace(
        b"and", bad, 1
    )
    err = await fails(client.put_chunked(stored, piece_bytes=100_000))
    assert_error(err, INVALID, "INVALID_ARGUMENT", field="response.response_json")
    assert_error(await fails(client.get("resp_bad")), NOT_FOUND, "RESPONSE_NOT_FOUND")


async def test_a_conversation_turn_in_pieces_keeps_order_and_versions(client: Client) -> None:
    conversation = await client.conversation([item("c-0")])
    first = await client.put_chunked(
        long_turn("resp_a", conversation_id=conversation), expected=1, piece_bytes=50_000
    )
    assert first.conversation_version == 3
    err = await fails(
        client.put_chunked(
            long_turn("resp_b", conversation_id=conversation), expected=1, piece_bytes=50_000
        )
    )
    assert_error(err, grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
    assert_error(await fails(client.get("resp_b")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    await client.put_chunked(turn("resp_c", conversation=conversation, inputs=[item("c-c")]))
    items = await client.conversation_items(conversation)
    assert [i.id for i in items] == ["c-0", "resp_a-in", "resp_a-out", "c-c"]
    assert [i.sequence for i in items] == [1, 2, 3, 4]


def _messages(stored: resources_pb2.StoredResponse) -> list[pb.PutTurnChunkedRequest]:
    return chunked(pb.PutTurnRequest(tenant=TENANT, response=stored), piece_bytes=32_000)


async def _refused(client: Client, messages: list[pb.PutTurnChunkedRequest], field: str) -> None:
    err = await fails(client.stub.PutTurnChunked(iter(messages), timeout=30))
    assert_error(err, INVALID, "INVALID_ARGUMENT", field=field)


async def test_a_stream_that_ends_short_or_malformed_stores_nothing(client: Client) -> None:
    messages = _messages(long_turn("resp_x"))
    await _refused(client, messages[:-1], "response_json_with_output_items")  # ends short
    await _refused(client, messages[1:], "head")  # no head first
    await _refused(client, [messages[0], messages[0], *messages[1:]], "chunk")  # two heads
    await _refused(client, [*messages, messages[-1]], "response_json_with_output_items")  # longer
    empty: list[pb.PutTurnChunkedRequest] = []
    await _refused(client, empty, "head")
    with_field = pb.PutTurnChunkedRequest()
    with_field.CopyFrom(messages[0])
    with_field.head.request.response.stream_events_json = b"[]"
    await _refused(client, [with_field, *messages[1:]], "head.request.response.stream_events_json")
    too_large = pb.PutTurnChunkedRequest()
    too_large.CopyFrom(messages[0])
    too_large.head.response_json_with_output_items_size = 1 << 40
    await _refused(client, [too_large], "head")
    assert_error(await fails(client.get("resp_x")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    # The same turn, whole, is stored: nothing was left behind.
    assert not (await client.put_chunked(long_turn("resp_x"), piece_bytes=50_000)).replayed


async def test_a_cancelled_stream_stores_nothing(client: Client) -> None:
    messages = _messages(long_turn("resp_cut"))
    sent = asyncio.Event()

    async def half() -> AsyncIterator[pb.PutTurnChunkedRequest]:
        for message in messages[: len(messages) // 2]:
            yield message
        sent.set()
        await asyncio.Event().wait()  # never done: the caller goes away mid-stream

    call = client.stub.PutTurnChunked(half(), timeout=30)
    await sent.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert_error(await fails(client.get("resp_cut")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert not (await client.put_chunked(long_turn("resp_cut"), piece_bytes=50_000)).replayed
