"""PutTurn's omit_stored_content: a new turn is answered with its server-set fields only; a
replay is always answered whole."""

from __future__ import annotations

from respgw.state.v1 import state_service_pb2 as pb
from tests.state_svc.conftest import TENANT, Client, simple_turn


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
