"""The router's state client: one typed method per RPC of the contract, which calls it retries
comes from the contract itself, and NOT_FOUND is mapped by its reason in one place."""

from __future__ import annotations

import inspect
import re
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import grpc
import orjson
import pytest

from gateway.grpcerrors import RemoteError
from respgw.state.v1 import error_reason_pb2 as reasons
from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from router_svc import errors, state_client, state_records
from state_svc import server as state_server
from state_svc.config import StateSettings


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# The RPCs without a method of their own: Exchange is the transport that PutTurn, GetHistory and
# GetResponse ride (state_client.Exchange), never called by name.
TRANSPORT_ONLY = {"Exchange"}
# The RPCs whose method also takes its request encoded already (a large turn, sent as is).
ENCODED_TOO = {"PutTurn"}


def test_every_rpc_has_one_typed_method() -> None:
    service = pb.DESCRIPTOR.services_by_name["StateService"]
    client = state_client.StateClient
    rpcs = {m.name: m for m in service.methods}
    assert TRANSPORT_ONLY <= set(rpcs)
    assert all(rpcs[name].client_streaming for name in TRANSPORT_ONLY)
    public = {
        name
        for name, member in inspect.getmembers(client, inspect.isfunction)
        if not name.startswith("_")
    }
    rpc_methods = {_snake(name) for name in rpcs if name not in TRANSPORT_ONLY}
    # Exactly one method per RPC; the others are the client's own (not named like an RPC).
    assert rpc_methods <= public, sorted(rpc_methods - public)
    assert not any(_snake(name) in public for name in TRANSPORT_ONLY)
    for name, method in rpcs.items():
        if name in TRANSPORT_ONLY:
            continue
        function = getattr(client, _snake(name))
        hints = typing.get_type_hints(function, vars(state_client))
        params = list(inspect.signature(function).parameters.values())
        # self, then the request, positional; everything else keyword-only.
        assert [p.kind for p in params[:2]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
        assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params[2:]), name
        request = getattr(pb, method.input_type.name)
        if name in ENCODED_TOO:
            assert hints[params[1].name] == request | bytes, name
        elif method.client_streaming:
            # Its messages, made anew for each attempt (see state_records.put_turn_chunks).
            assert hints[params[1].name] == Callable[[], Iterator[request]], name
        else:
            assert hints[params[1].name] is request, name
        returned = hints["return"]
        if method.server_streaming:
            # The call, to iterate: typed by its request and message.
            assert typing.get_origin(returned) is grpc.aio.UnaryStreamCall, name
            assert typing.get_args(returned) == (request, getattr(pb, method.output_type.name))
            assert not inspect.iscoroutinefunction(function)
        else:
            assert returned is getattr(pb, method.output_type.name), name
            assert inspect.iscoroutinefunction(function), name
    # The untyped door is closed: no public method dispatches by name.
    assert "call" not in public


def _missing(reason: reasons.ErrorReason.ValueType, **metadata: str) -> RemoteError:
    return RemoteError(
        code=grpc.StatusCode.NOT_FOUND,
        reason=reasons.ErrorReason.Name(reason).removeprefix("ERROR_REASON_"),
        message="not found",
        metadata=metadata,
        domain="state.respgw.dev",
    )


def test_not_found_is_mapped_by_its_reason() -> None:
    response = state_client.map_error(
        _missing(reasons.ERROR_REASON_RESPONSE_NOT_FOUND, response_id="resp_1")
    )
    assert (response.status, response.code, response.param) == (404, "not_found", None)
    assert response.message == "Response with id 'resp_1' not found."
    previous = state_client.map_error(
        _missing(reasons.ERROR_REASON_PREVIOUS_RESPONSE_NOT_FOUND, previous_response_id="resp_0")
    )
    assert (previous.status, previous.code, previous.param) == (
        400,
        "previous_response_not_found",
        "previous_response_id",
    )
    assert "'resp_0'" in previous.message
    conversation = _missing(reasons.ERROR_REASON_CONVERSATION_NOT_FOUND, conversation_id="conv_1")
    routed = state_client.map_error(conversation)
    assert (routed.status, routed.param) == (404, None)
    assert routed.message == "Conversation with id 'conv_1' not found."
    in_turn = state_client.map_error(conversation, conversation_param="conversation")
    assert (in_turn.status, in_turn.param) == (404, "conversation")
    item = state_client.map_error(
        _missing(reasons.ERROR_REASON_ITEM_NOT_FOUND, conversation_id="conv_1", item_id="msg_1")
    )
    assert (item.status, item.code) == (404, "not_found")
    assert item.message == "Item with id 'msg_1' not found."
    # Every mapped NOT_FOUND is one ``find`` answers None for; other codes are not.
    assert all(e.state_not_found for e in (response, previous, routed, item))
    unknown = state_client.map_error(_missing(reasons.ERROR_REASON_UNSPECIFIED))
    assert unknown.status == 404 and unknown.state_not_found
    other = state_client.map_error(
        RemoteError(code=grpc.StatusCode.UNAVAILABLE, reason="", message="", metadata={}, domain="")
    )
    assert other.status == 503 and not other.state_not_found


def test_every_not_found_reason_has_its_error() -> None:
    # The reasons error_reason.proto documents as NOT_FOUND.
    documented = {
        name.removeprefix("ERROR_REASON_")
        for name in reasons.ErrorReason.keys()
        if name.endswith("_NOT_FOUND")
    }
    assert set(state_client.NOT_FOUND_BY_REASON) == documented


async def test_find_answers_none_for_not_found_only() -> None:
    async def missing() -> int:
        raise state_client.map_error(
            _missing(reasons.ERROR_REASON_RESPONSE_NOT_FOUND, response_id="r")
        )

    async def broken() -> int:
        raise errors.StateUnavailable("down")

    async def found() -> int:
        return 7

    assert await state_client.StateClient.find(missing()) is None
    assert await state_client.StateClient.find(found()) == 7
    with pytest.raises(errors.StateUnavailable):
        await state_client.StateClient.find(broken())


def test_retryable_calls_are_those_the_proto_marks_safe() -> None:
    service = pb.DESCRIPTOR.services_by_name["StateService"]
    levels = {m.name: m.GetOptions().idempotency_level for m in service.methods}
    # Every RPC of the v1 contract but Exchange declares itself safe to replay (Exchange is a
    # stream whose calls are retried by the rules of the RPCs they carry; PutTurnChunked's
    # messages are made anew for each attempt)...
    assert state_client.RETRYABLE == set(levels) - {"Exchange"}
    assert set(state_client._EXCHANGED) <= state_client.RETRYABLE
    # ...and the reads are marked as having no side effects at all.
    reads = {
        "GetResponse",
        "GetResponseChunked",
        "GetHistory",
        "GetConversation",
        "ListConversationItems",
        "GetConversationItem",
        "GetItems",
    }
    assert all(levels[name] == levels["GetResponse"] for name in reads)


async def test_an_unreachable_state_service_is_a_bounded_503() -> None:
    client = state_client.StateClient("127.0.0.1:9", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(errors.StateUnavailable) as info:
        await client.get_response(pb.GetResponseRequest(tenant="t", response_id="resp_x"))
    elapsed = time.monotonic() - start
    await client.close()
    assert info.value.status == 503
    assert info.value.code == "state_unavailable"
    # Three attempts with their back-off, each bounded by the deadline: never a hang.
    assert elapsed < 3 * 1.0 + 0.5
    probe = state_client.StateClient("127.0.0.1:9", timeout_s=0.2)
    assert await probe.ready() is False
    await probe.close()


# --- against a real state service ---------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[state_client.StateClient]:
    settings = replace(StateSettings(), backend="memory", listen="127.0.0.1:0", metrics_port=0)
    running = await state_server.start(settings)
    c = state_client.StateClient(f"127.0.0.1:{running.port}", timeout_s=5.0)
    yield c
    await c.close()
    await running.stop(0.5)


async def test_typed_calls_against_the_state_service(client: state_client.StateClient) -> None:
    created = await client.create_conversation(
        state_records.create_conversation("t", {"k": "v"}, [{"id": "msg_1", "type": "x"}], "r1")
    )
    cid = created.conversation.id
    listed = await client.list_conversation_items(
        state_records.list_conversation_items(
            "t", cid, ascending=True, page_size=10, after_item_id=""
        )
    )
    assert state_records.items_from_proto(listed.items) == [{"id": "msg_1", "type": "x"}]
    # NOT_FOUND by its reason, with the ids the reason names; ``find`` answers None for it.
    with pytest.raises(errors.NotFound) as info:
        await client.get_conversation_item(state_records.get_conversation_item("t", cid, "msg_9"))
    assert info.value.message == "Item with id 'msg_9' not found."
    with pytest.raises(errors.NotFound) as info:
        await client.get_conversation(state_records.get_conversation("t", conversation_id="c_9"))
    assert (info.value.message, info.value.param) == ("Conversation with id 'c_9' not found.", None)
    with pytest.raises(errors.NotFound) as info:
        await client.delete_response(state_records.delete_response("t", "resp_9"))
    assert info.value.message == "Response with id 'resp_9' not found."
    missing = client.get_response(state_records.get_response("t", idempotency_key="nope"))
    assert await client.find(missing) is None
    # PutTurn over the Exchange stream: the previous response named is not stored (a 400
    # naming the field), then a first turn that is.
    record = state_records.turn_record(
        response_id="resp_1",
        previous_response_id="resp_0",
        conversation_id="",
        input_items=[{"id": "msg_2", "type": "message"}],
        output_items=[],
        response={"id": "resp_1", "status": "completed"},
        idempotency_key="",
        events=None,
        in_progress=False,
    )
    with pytest.raises(errors.InvalidRequest) as bad:
        await client.put_turn(state_records.put_turn("t", record))
    assert (bad.value.code, bad.value.param) == (
        "previous_response_not_found",
        "previous_response_id",
    )
    record.previous_response_id = ""
    await client.put_turn(state_records.put_turn("t", record))
    found = await client.get_response(state_records.get_response("t", response_id="resp_1"))
    assert state_records.response_of(found.response) == {"id": "resp_1", "status": "completed"}
    history = await client.get_history(state_records.get_history("t", response_id="resp_1"))
    assert [i.id for i in history.items] == ["msg_2"]
    assert await client.get_items_by_id("t", ["msg_2", "msg_x"]) == {
        "msg_2": orjson.dumps({"id": "msg_2", "type": "message"})
    }
    # The record a cancel stores: no times, no stream events, not running, no output if asked.
    ended = state_records.ended(found.response, {"id": "resp_1", "status": "cancelled"})
    assert not ended.HasField("create_time") and not ended.in_progress
    assert state_records.response_of(ended)["status"] == "cancelled"
    assert [i.id for i in ended.input_items] == ["msg_2"]


async def test_read_response_puts_the_pieces_together(client: state_client.StateClient) -> None:
    text = "é\u2028x" * 200_000  # over 256 KiB of response JSON: several pieces
    out = {"id": "msg_1", "type": "message", "content": [{"type": "output_text", "text": text}]}
    response = {"id": "resp_big", "object": "response", "status": "completed", "output": [out]}
    log = orjson.dumps([{"type": "response.created", "sequence_number": 0}] * 20_000)
    stored = resources_pb2.StoredResponse(
        id="resp_big",
        response_json=orjson.dumps(response),
        output_items=[resources_pb2.Item(id="msg_1", json=orjson.dumps(out))],
        stream_events_json=log,
        idempotency_key="key-1",
    )
    await client.put_turn(pb.PutTurnRequest(tenant="t", response=stored))
    read = await client.read_response("t", "resp_big")
    assert read.response_json == stored.response_json
    assert read.stream_events_json == log
    assert read.response.idempotency_key == "key-1" and read.response.id == "resp_big"
    assert not read.response.output_items and not read.response.response_json
    assert client.get_response_chunked_served
    # A plain GET's read: the log's pieces read to the end but not kept.
    plain = await client.read_response("t", "resp_big", events=False)
    assert plain.response_json == stored.response_json and plain.stream_events_json == b""
    assert plain.response == read.response
    with pytest.raises(errors.NotFound) as info:
        await client.read_response("t", "resp_9")
    assert info.value.message == "Response with id 'resp_9' not found."
    # From a service that predates GetResponseChunked: GetResponse, the same answer.
    client.get_response_chunked_served = False
    again = await client.read_response("t", "resp_big")
    assert (again.response_json, again.stream_events_json) == (stored.response_json, log)
    assert again.response == read.response


def test_a_chunked_read_message_is_read_without_being_parsed() -> None:
    """The pieces of GetResponseChunked are taken from its messages as gRPC received them: each
    message's field and bytes are those protobuf parses, unknown fields skipped."""
    head = pb.GetResponseChunkedResponse(
        head=pb.GetResponseChunkedHead(response_json_size=300_000, stream_events_json_size=7)
    )
    field, value = state_client._chunk_field(head.SerializeToString())
    assert field == pb.GetResponseChunkedResponse.HEAD_FIELD_NUMBER
    assert pb.GetResponseChunkedHead.FromString(value) == head.head
    for name in ("response_json", "stream_events_json"):
        for piece in (b"", b"x", bytes(range(256)) * 1024):
            data = pb.GetResponseChunkedResponse(**{name: piece}).SerializeToString()
            field, value = state_client._chunk_field(data)
            assert field == pb.GetResponseChunkedResponse.DESCRIPTOR.fields_by_name[name].number
            assert bytes(value) == piece
    # A newer service's fields (varint 9, fixed64 10, fixed32 11, bytes 12) are skipped.
    newer = b"\x48\x96\x01" + b"\x51" + bytes(8) + b"\x5d" + bytes(4) + b"\x62\x02ab"
    piece = pb.GetResponseChunkedResponse(response_json=b"abc").SerializeToString()
    assert pb.GetResponseChunkedResponse.FromString(newer + piece).response_json == b"abc"
    field, value = state_client._chunk_field(newer + piece)
    assert (field, bytes(value)) == (2, b"abc")
    for broken in (b"\x12\x05abc", b"\x12", b"\x12\xff", b"\x0f", b"\x48\xff\xff"):
        with pytest.raises(state_client.CallFailed) as info:
            state_client._chunk_field(broken)
        assert info.value.info.code == grpc.StatusCode.INTERNAL
