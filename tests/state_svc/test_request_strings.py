"""Every id, key, tenant and metadata string is checked before storage is touched: over 512
characters or with a NUL it is INVALID_ARGUMENT naming the field, on every backend (PostgreSQL
cannot store a NUL) and over Exchange too; and an error never echoes a huge id back (that made
the status RESOURCE_EXHAUSTED)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.grpcerrors import ServiceError
from respgw.state.v1 import state_service_pb2 as pb
from tests.state_svc.conftest import TENANT, Client, assert_error, fails, item, simple_turn

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG = "resp_" + "x" * 600


def bad_requests() -> list[tuple[str, Any, str]]:
    turn = simple_turn("r1")
    with_nul_item = simple_turn("r2")
    with_nul_item.output_items.append(item("bad\x00id"))
    return [
        ("PutTurn", pb.PutTurnRequest(tenant="t\x00", response=turn), "tenant"),
        ("PutTurn", pb.PutTurnRequest(tenant=TENANT, response=simple_turn(LONG)), "response.id"),
        (
            "PutTurn",
            pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r3", previous="p\x00")),
            "response.previous_response_id",
        ),
        (
            "PutTurn",
            pb.PutTurnRequest(tenant=TENANT, response=with_nul_item),
            "response.output_items[1].id",
        ),
        (
            "PutTurn",
            pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r4", key="k" * 600)),
            "response.idempotency_key",
        ),
        ("GetResponse", pb.GetResponseRequest(tenant=TENANT, response_id=LONG), "response_id"),
        ("GetHistory", pb.GetHistoryRequest(tenant=TENANT, response_id="r\x00"), "response_id"),
        ("GetItems", pb.GetItemsRequest(tenant=TENANT, item_ids=["a", "b", LONG]), "item_ids[2]"),
        ("GetItems", pb.GetItemsRequest(tenant=TENANT, item_ids=["i\x00"]), "item_ids[0]"),
        (
            "CreateConversation",
            pb.CreateConversationRequest(tenant=TENANT, metadata={"k": "v\x00"}),
            "metadata[k]",
        ),
        (
            "GetConversationItem",
            pb.GetConversationItemRequest(tenant=TENANT, conversation_id="c", item_id=LONG),
            "item_id",
        ),
    ]


@pytest.mark.parametrize(("rpc", "request_", "field"), bad_requests())
async def test_bad_strings_are_refused_before_storage(
    client: Client, rpc: str, request_: Any, field: str
) -> None:
    err = await fails(getattr(client.stub, rpc)(request_))
    assert_error(err, INVALID, "INVALID_ARGUMENT", field=field)


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_over_exchange_too(client: Client) -> None:
    stream: Any = client.stub.Exchange()
    bad = pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r\x00"))
    await stream.write(pb.ExchangeRequest(calls=[pb.ExchangeCall(call_id=1, put_turn=bad)]))
    reply = await stream.read()
    status = reply.results[0].status
    assert status.code == INVALID.value[0] and status.reason == "INVALID_ARGUMENT"
    assert status.metadata["field"] == "response.id"
    await stream.done_writing()


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_a_not_found_of_a_long_id_is_not_found(client: Client) -> None:
    """An id of 500 characters is legal and missing: NOT_FOUND, with the echo cut short."""
    missing = "resp_" + "y" * 495
    err = await fails(
        client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, response_id=missing))
    )
    assert_error(err, grpc.StatusCode.NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert len(err.metadata["response_id"]) <= 256


def test_an_error_never_echoes_more_than_it_may() -> None:
    error = ServiceError(
        grpc.StatusCode.NOT_FOUND, "RESPONSE_NOT_FOUND", "m" * 5000, {"id": "i" * 9000}
    )
    status = error.to_status()
    assert len(status.details) < 4096  # well inside gRPC's 8 KiB of trailers
