"""The state service as a gRPC server: every RPC implemented, request validation, health,
reflection, graceful stop, message size limits, and errors that never crash it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from respgw.state.v1 import resources_pb2, state_service_pb2_grpc
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import server, service
from tests.state_svc.conftest import (
    TENANT,
    Client,
    Start,
    assert_error,
    fails,
    item,
    simple_turn,
    turn,
)

SERVICE = pb.DESCRIPTOR.services_by_name["StateService"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT

memory_only = pytest.mark.parametrize("backend", ["memory"], indirect=True)
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@memory_only
async def test_every_rpc_in_the_descriptor_is_implemented(running: server.Running) -> None:
    assert len(SERVICE.methods) == 25
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        for method in SERVICE.methods:
            assert getattr(service.StateServicer, method.name) is not getattr(
                state_service_pb2_grpc.StateServiceServicer, method.name
            ), method.name
            if method.name == "Exchange":
                continue  # tests/state_svc/test_exchange.py
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            if method.client_streaming:  # PutTurnChunked: a head with an empty request
                pieces: Any = channel.stream_unary(
                    f"/{SERVICE.full_name}/{method.name}",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=response_class.FromString,
                )
                err = await fails(pieces(iter([request_class(head={})])))
                assert_error(err, INVALID, "TENANT_REQUIRED", field="tenant")
                continue
            call: Any = channel.unary_unary(
                f"/{SERVICE.full_name}/{method.name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_class.FromString,
            )
            err = await fails(call(request_class()))
            # Not UNIMPLEMENTED: the empty request reaches the servicer and is rejected.
            assert_error(err, INVALID, "TENANT_REQUIRED", field="tenant")


def _bad_requests() -> list[tuple[str, Any, str]]:
    """(RPC, request, offending field) for each INVALID_ARGUMENT case the proto lists."""
    t = TENANT
    no_json = resources_pb2.Item(id="msg_1")
    not_object = resources_pb2.Item(id="msg_1", json=b"[1, 2]")
    not_json = resources_pb2.Item(id="msg_1", json=b"{nope")
    no_id = resources_pb2.Item(json=b"{}")
    too_many = {f"k{n}": "v" for n in range(17)}
    put = pb.PutTurnRequest
    return [
        ("PutTurn", put(tenant=t), "response.id"),
        ("PutTurn", put(tenant=t, response=resources_pb2.StoredResponse(id="r")), "response.response_json"),
        ("PutTurn", put(tenant=t, response=resources_pb2.StoredResponse(id="r", response_json=b"[]")), "response.response_json"),
        ("PutTurn", put(tenant=t, response=turn("r", inputs=[no_id])), "response.input_items[0].id"),
        ("PutTurn", put(tenant=t, response=turn("r", inputs=[item("a"), no_json])), "response.input_items[1].json"),
        ("PutTurn", put(tenant=t, response=turn("r", outputs=[not_object])), "response.output_items[0].json"),
        ("PutTurn", put(tenant=t, response=turn("r", outputs=[not_json])), "response.output_items[0].json"),
        ("PutTurn", put(tenant=t, response=turn("r", previous="p", conversation="c")), "response.conversation_id"),
        ("PutTurn", put(tenant=t, response=turn("r", conversation="c", inputs=[item("a")], outputs=[item("a")])), "response.output_items[0].id"),
        ("GetResponse", pb.GetResponseRequest(tenant=t), "selector"),
        ("GetResponse", pb.GetResponseRequest(tenant=t, response_id=""), "selector"),
        ("GetHistory", pb.GetHistoryRequest(tenant=t), "anchor"),
        ("GetHistory", pb.GetHistoryRequest(tenant=t, response_id="r", max_items=-1), "max_items"),
        ("DeleteResponse", pb.DeleteResponseRequest(tenant=t), "response_id"),
        ("GetItems", pb.GetItemsRequest(tenant=t), "item_ids"),
        ("GetItems", pb.GetItemsRequest(tenant=t, item_ids=["a", ""]), "item_ids[1]"),
        ("GetItems", pb.GetItemsRequest(tenant=t, item_ids=[f"i{n}" for n in range(101)]), "item_ids"),
        ("CreateConversation", pb.CreateConversationRequest(tenant=t, metadata=too_many), "metadata"),
        ("CreateConversation", pb.CreateConversationRequest(tenant=t, items=[no_id]), "items[0].id"),
        ("CreateConversation", pb.CreateConversationRequest(tenant=t, items=[item("a"), item("a")]), "items[1].id"),
        ("GetConversation", pb.GetConversationRequest(tenant=t), "conversation_id"),
        ("UpdateConversation", pb.UpdateConversationRequest(tenant=t, conversation_id="c", metadata=too_many), "metadata"),
        ("DeleteConversation", pb.DeleteConversationRequest(tenant=t), "conversation_id"),
        ("CreateConversationItems", pb.CreateConversationItemsRequest(tenant=t, conversation_id="c"), "items"),
        ("CreateConversationItems", pb.CreateConversationItemsRequest(tenant=t, conversation_id="c", items=[no_json]), "items[0].json"),
        ("ListConversationItems", pb.ListConversationItemsRequest(tenant=t, conversation_id="c"), "order"),
        ("ListConversationItems", pb.ListConversationItemsRequest(tenant=t, conversation_id="c", order=pb.ORDER_ASC, page_size=-1), "page_size"),
        ("GetConversationItem", pb.GetConversationItemRequest(tenant=t, conversation_id="c"), "item_id"),
        ("DeleteConversationItem", pb.DeleteConversationItemRequest(tenant=t, item_id="i"), "conversation_id"),
    ]  # fmt: skip


@memory_only
async def test_bad_requests_name_the_field(client: Client) -> None:
    for rpc, request, field in _bad_requests():
        err = await fails(getattr(client.stub, rpc)(request))
        assert (err.code, err.reason, err.metadata.get("field")) == (
            INVALID,
            "INVALID_ARGUMENT",
            field,
        ), (rpc, request)
    # Sixteen pairs are fine.
    sixteen = {f"k{n}": "v" for n in range(16)}
    conv = await client.conversation([], **sixteen)
    assert conv.startswith("conv_")


@memory_only
async def test_health_and_reflection(running: server.Running) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        # The stubs' type hints know only sync channels; these are the generated stubs.
        health: Any = health_pb2_grpc.HealthStub(channel)
        for name in ("", "respgw.state.v1.StateService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert "respgw.state.v1.StateService" in names


@sqlite_only
async def test_graceful_stop_finishes_in_flight_calls(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start()
    client = connect(running.port)
    await client.put(simple_turn("resp_1"))
    watcher = connect(running.port)
    health: Any = health_pb2_grpc.HealthStub(watcher.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="respgw.state.v1.StateService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    # Another writer holds the store's lock, so this call stays in flight until released.
    holder = sqlite3.connect(running.settings.sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    in_flight = asyncio.ensure_future(client.put(simple_turn("resp_2", previous="resp_1")))
    await asyncio.sleep(0.3)
    assert not in_flight.done()
    stopping = asyncio.ensure_future(running.stop(10))
    try:
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        err = await fails(connect(running.port).get("resp_1"))
        assert err.code == grpc.StatusCode.UNAVAILABLE
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    reply = await in_flight
    assert not reply.replayed and reply.response.id == "resp_2"
    await stopping

    again = await start()
    history = await connect(again.port).history(response_id="resp_2")
    assert list(history.response_ids) == ["resp_1", "resp_2"]


@memory_only
async def test_message_size_limit_both_ways(start: Start, connect: Callable[..., Client]) -> None:
    running = await start(max_message_bytes=64 * 1024)
    client = connect(running.port)
    big = item("msg_big", "x" * 100_000)
    err = await fails(client.put(turn("resp_big", inputs=[big])))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    half = "y" * 40_000
    await client.put(turn("resp_1", inputs=[item("a", half)]))
    await client.put(turn("resp_2", previous="resp_1", inputs=[item("b", half)]))
    # The reply would be larger than the server may send.
    err = await fails(client.history(response_id="resp_2"))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len((await client.history(response_id="resp_2", max_items=1)).items) == 1


@sqlite_only
async def test_unexpected_failure_is_internal_and_the_server_lives(
    running: server.Running, client: Client
) -> None:
    conv = await client.conversation([item("a")])
    # Break the store behind the service's back.
    with sqlite3.connect(running.settings.sqlite_path) as db:
        db.execute("DROP TABLE response_items")
    err = await fails(client.put(simple_turn("resp_1")))
    assert_error(err, grpc.StatusCode.INTERNAL, "INTERNAL")
    assert [i.id for i in await client.conversation_items(conv)] == ["a"]


@memory_only
async def test_backend_latency_is_measured(client: Client) -> None:
    labels = {"backend": "memory", "op": "put_turn"}
    before = REGISTRY.get_sample_value("respgw_state_backend_latency_seconds_count", labels) or 0
    await client.put(simple_turn("resp_1"))
    await client.put(simple_turn("resp_1"))
    after = REGISTRY.get_sample_value("respgw_state_backend_latency_seconds_count", labels)
    assert after == before + 2
