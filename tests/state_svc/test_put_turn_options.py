"""PutTurn's options: omit_stored_content (a new turn is answered with its server-set fields only; a
replay is always answered whole) and StoredResponse.response_json_with_output_items (the output
items taken from the response JSON)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import orjson
import pytest

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import wire
from tests.state_svc.conftest import TENANT, Client, fails, simple_turn


async def test_a_new_turn_is_answered_with_its_server_set_fields_only(client: Client) -> None:
    turn = simple_turn("r1")
    reply = await client.stub.PutTurn(
        pb.PutTurnRequest(tenant=TENANT, response=turn, omit_stored_content=True)
    )
    assert not reply.replayed
    assert reply.response.id == "r1"
    assert reply.response.create_time.ToMicroseconds() > 0
    assert not reply.response.input_items and not reply.response.output_items
    assert not reply.response.response_json
    # The turn itself was stored whole.
    got = await client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, response_id="r1"))
    assert got.response.response_json == turn.response_json
    assert [i.id for i in got.response.input_items] == ["r1-in"]


async def test_a_replay_is_answered_whole(client: Client) -> None:
    turn = simple_turn("r1", key="k1")
    await client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=turn))
    again = simple_turn("r2", key="k1")
    reply = await client.stub.PutTurn(
        pb.PutTurnRequest(tenant=TENANT, response=again, omit_stored_content=True)
    )
    assert reply.replayed and reply.response.id == "r1"
    assert reply.response.response_json == turn.response_json
    assert [i.id for i in reply.response.output_items] == ["r1-out"]


# --- response_json_with_output_items ----------------------------------------------------------


def from_response(response_id: str, output: Any, **kwargs: Any) -> resources_pb2.StoredResponse:
    """A turn whose output items are to be taken from its response JSON's ``output``."""
    stored = simple_turn(response_id, **kwargs)
    del stored.output_items[:]
    stored.ClearField("response_json")
    body = {"id": response_id, "object": "response", "output": output}
    stored.response_json_with_output_items = orjson.dumps(body)
    return stored


async def test_the_output_items_are_taken_from_the_response(client: Client) -> None:
    output: list[dict[str, Any]] = [
        {"id": "msg_1", "type": "message", "content": [{"type": "output_text", "text": "é 🌧"}]},
        {"id": "fc_1", "type": "function_call", "arguments": "{}", "name": "f", "call_id": "c"},
    ]
    reply = await client.stub.PutTurn(
        pb.PutTurnRequest(tenant=TENANT, response=from_response("r1", output))
    )
    assert reply.response_json_with_output_items
    got = await client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, response_id="r1"))
    assert [(i.id, orjson.loads(i.json)) for i in got.response.output_items] == [
        (o["id"], o) for o in output
    ]
    assert [i.json for i in got.response.output_items] == [orjson.dumps(o) for o in output]
    assert orjson.loads(got.response.response_json)["output"] == output
    assert not got.response.response_json_with_output_items
    history = await client.history(response_id="r1")
    assert [i.id for i in history.items] == ["r1-in", "msg_1", "fc_1"]


async def test_a_turn_sent_both_ways_is_the_same_turn(client: Client) -> None:
    # A retry may go either way: it is a replay of the first, not a conflict.
    output = [{"id": "msg_1", "type": "message", "content": []}]
    first = from_response("r1", output)
    await client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=first))
    again = resources_pb2.StoredResponse()
    again.CopyFrom(first)
    again.response_json = first.response_json_with_output_items
    again.ClearField("response_json_with_output_items")
    again.output_items.add(id="msg_1", json=orjson.dumps(output[0]))
    reply = await client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=again))
    assert reply.replayed and reply.response.id == "r1"


@pytest.mark.parametrize(
    "output",
    [None, "x", [{"type": "message"}], [{"id": ""}], [{"id": 3}], ["msg_1"]],
    ids=["missing", "not an array", "no id", "empty id", "id not a string", "not an object"],
)
async def test_output_that_gives_no_items_is_invalid(client: Client, output: Any) -> None:
    stored = from_response("r1", output)
    if output is None:
        stored.response_json_with_output_items = b'{"id": "r1"}'
    err = await fails(client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=stored)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.metadata["field"] == "response.response_json_with_output_items"
    missing = await fails(
        client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, response_id="r1"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("also", ["output_items", "response_json"])
async def test_the_fields_it_replaces_sent_as_well_are_invalid(client: Client, also: str) -> None:
    stored = from_response("r1", [{"id": "msg_1"}])
    if also == "output_items":
        stored.output_items.add(id="msg_1", json=b'{"id": "msg_1"}')
    else:
        stored.response_json = stored.response_json_with_output_items
    err = await fails(client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=stored)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_conversation_turn_may_not_repeat_an_item_id(client: Client) -> None:
    conversation = await client.conversation()
    output = [{"id": "msg_1"}, {"id": "msg_1"}]
    stored = from_response("r1", output, conversation=conversation)
    err = await fails(client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=stored)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


# --- a large request (read without copying its large fields, see state_svc.wire) --------------

LONG = "long answer " * (wire.LARGE_REQUEST_BYTES // 12 + 1)


@pytest.mark.parametrize("running_first", [False, True], ids=["new", "replacing running"])
@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced JSON"])
async def test_a_large_turn_is_stored_as_sent(
    client: Client, running_first: bool, spaced: bool
) -> None:
    output = [{"id": "msg_1", "type": "message", "content": [{"text": LONG}]}]
    stored = from_response("r1", output)
    if spaced:  # its items' encodings are not in the request: encoded anew
        body = {"id": "r1", "object": "response", "output": output}
        stored.response_json_with_output_items = json.dumps(body, indent=1).encode()
    stored.stream_events_json = orjson.dumps([{"type": "response.created", "delta": LONG}])
    if running_first:
        running = simple_turn("r1")
        running.in_progress = True
        del running.output_items[:]
        await client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=running))
    request = pb.PutTurnRequest(tenant=TENANT, response=stored)
    assert request.ByteSize() > wire.LARGE_REQUEST_BYTES
    reply = await client.stub.PutTurn(request)
    assert not reply.replayed
    assert reply.response.response_json == stored.response_json_with_output_items
    assert reply.response.stream_events_json == stored.stream_events_json
    got = await client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, response_id="r1"))
    assert got.response.response_json == stored.response_json_with_output_items
    assert got.response.stream_events_json == stored.stream_events_json
    assert [i.json for i in got.response.output_items] == [orjson.dumps(output[0])]
    # The same turn again is a replay (the same digest), another one a conflict.
    again = await client.stub.PutTurn(request)
    assert again.replayed
    other = from_response("r1", [{"id": "msg_1", "text": LONG + "!"}])
    err = await fails(client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=other)))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS


async def test_a_large_conversation_turn_adds_its_items(client: Client) -> None:
    conversation = await client.conversation()
    output = [{"id": "msg_1", "type": "message", "content": [{"text": LONG}]}]
    stored = from_response("r1", output, conversation=conversation)
    await client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=stored))
    history = await client.history(conversation_id=conversation)
    assert [(i.id, i.json) for i in history.items][-1] == ("msg_1", orjson.dumps(output[0]))


async def test_a_large_turn_that_sends_both_forms_is_invalid(client: Client) -> None:
    stored = from_response("r1", [{"id": "msg_1", "text": LONG}])
    stored.response_json = stored.response_json_with_output_items
    err = await fails(client.stub.PutTurn(pb.PutTurnRequest(tenant=TENANT, response=stored)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.metadata["field"] == "response.response_json_with_output_items"
