"""Exchange: the request path's RPCs over one stream, answered as their unary RPCs are, on every
backend; and the router's client of it (answers by call id, statuses, broken streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from gateway.grpcerrors import RemoteError
from respgw.state.v1 import state_service_pb2 as pb
from router_svc import errors
from router_svc.state_client import StateClient
from state_svc import server
from tests.state_svc.conftest import TENANT, Client, Start, assert_error, simple_turn

NOT_FOUND = grpc.StatusCode.NOT_FOUND


class Stream:
    """One Exchange stream opened by hand, calls written and answers read in order of arrival."""

    def __init__(self, client: Client) -> None:
        self.call: Any = client.stub.Exchange()

        self.answers: list[pb.ExchangeResult] = []

    async def send(self, call_id: int, **call: Any) -> None:
        exchange_call = pb.ExchangeCall(call_id=call_id, request_id="req_x", **call)
        await self.call.write(pb.ExchangeRequest(calls=[exchange_call]))

    async def read(self) -> pb.ExchangeResult:
        """The next answer (a message may carry several)."""
        if not self.answers:
            reply = await self.call.read()
            assert reply is not grpc.aio.EOF
            assert isinstance(reply, pb.ExchangeResponse) and reply.results
            self.answers.extend(reply.results)
        return self.answers.pop(0)


def status_error(status: pb.CallStatus) -> RemoteError:
    return RemoteError(
        code=next(c for c in grpc.StatusCode if c.value[0] == status.code),
        reason=status.reason,
        message=status.message,
        metadata=dict(status.metadata),
        domain=status.domain,
    )


async def test_calls_are_answered_as_their_unary_rpcs(client: Client) -> None:
    stream = Stream(client)
    await stream.send(7, put_turn=pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r1")))
    put = await stream.read()
    assert put.call_id == 7 and put.status.code == 0 and put.WhichOneof("result") == "put_turn"
    assert put.put_turn.response.id == "r1" and not put.put_turn.replayed

    await stream.send(8, put_turn=pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r1")))
    assert (await stream.read()).put_turn.replayed  # idempotent, as the unary PutTurn

    await stream.send(9, get_history=pb.GetHistoryRequest(tenant=TENANT, response_id="r1"))
    history = await stream.read()
    unary = await client.stub.GetHistory(pb.GetHistoryRequest(tenant=TENANT, response_id="r1"))
    assert history.call_id == 9 and history.get_history == unary

    await stream.send(10, get_response=pb.GetResponseRequest(tenant=TENANT, response_id="r1"))
    got = await stream.read()
    assert got.get_response.response.id == "r1"
    await stream.call.done_writing()
    assert await stream.call.read() is grpc.aio.EOF
    assert await stream.call.code() == grpc.StatusCode.OK


async def test_a_failed_call_carries_its_status_and_the_stream_stays_open(client: Client) -> None:
    stream = Stream(client)
    await stream.send(1, get_history=pb.GetHistoryRequest(tenant=TENANT, response_id="nope"))
    failed = await stream.read()
    assert failed.call_id == 1 and failed.WhichOneof("result") is None
    assert_error(status_error(failed.status), NOT_FOUND, "RESPONSE_NOT_FOUND", response_id="nope")

    await stream.send(2, put_turn=pb.PutTurnRequest(response=simple_turn("r1")))
    invalid = await stream.read()
    assert_error(status_error(invalid.status), grpc.StatusCode.INVALID_ARGUMENT, "TENANT_REQUIRED")

    await stream.send(3, put_turn=pb.PutTurnRequest(tenant=TENANT, response=simple_turn("r1")))
    assert (await stream.read()).status.code == 0
    await stream.call.done_writing()


async def test_concurrent_calls_are_matched_by_call_id(client: Client) -> None:
    stream = Stream(client)
    for n in range(40):
        turn = simple_turn(f"r{n}")
        await stream.send(1000 + n, put_turn=pb.PutTurnRequest(tenant=TENANT, response=turn))
    answers = {}
    for _ in range(40):
        reply = await stream.read()
        answers[reply.call_id] = reply.put_turn.response.id
    assert answers == {1000 + n: f"r{n}" for n in range(40)}
    # One message may carry many calls, too.
    many = pb.ExchangeRequest(
        calls=[
            pb.ExchangeCall(
                call_id=n, get_response=pb.GetResponseRequest(tenant=TENANT, response_id="r3")
            )
            for n in range(5)
        ]
    )
    await stream.call.write(many)
    for _ in range(5):
        assert (await stream.read()).get_response.response.id == "r3"
    await stream.call.done_writing()


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_an_empty_batch_ends_the_stream(client: Client) -> None:
    stream = Stream(client)
    await stream.call.write(pb.ExchangeRequest())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_a_call_without_a_request_ends_the_stream(client: Client) -> None:
    stream = Stream(client)
    await stream.call.write(pb.ExchangeRequest(calls=[pb.ExchangeCall(call_id=1)]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream.call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_calls_are_counted_by_their_rpc(client: Client) -> None:
    def count(method: str, code: str) -> float:
        labels = {"method": method, "code": code}
        return REGISTRY.get_sample_value("respgw_grpc_server_requests_total", labels) or 0.0

    before = count("GetHistory", "NOT_FOUND")
    stream = Stream(client)
    await stream.send(1, get_history=pb.GetHistoryRequest(tenant=TENANT, response_id="nope"))
    await stream.read()
    assert count("GetHistory", "NOT_FOUND") == before + 1
    await stream.call.done_writing()


# --- the router's client over Exchange ------------------------------------------------------


@pytest.fixture
async def state(running: server.Running) -> AsyncIterator[StateClient]:
    client = StateClient(f"127.0.0.1:{running.port}", timeout_s=5)
    yield client
    await client.close()


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_the_router_client_matches_concurrent_answers(state: StateClient) -> None:
    async def put(n: int) -> str:
        request = pb.PutTurnRequest(tenant=TENANT, response=simple_turn(f"c{n}"))
        reply = await state.put_turn(request)
        assert isinstance(reply, pb.PutTurnResponse)
        return reply.response.id

    ids = await asyncio.gather(*(put(n) for n in range(64)))
    assert ids == [f"c{n}" for n in range(64)]
    history = await state.get_history(pb.GetHistoryRequest(tenant=TENANT, response_id="c5"))
    assert [i.id for i in history.items] == ["c5-in", "c5-out"]


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_the_router_client_maps_statuses_from_the_stream(state: StateClient) -> None:
    request = pb.GetHistoryRequest(tenant=TENANT, response_id="missing")
    assert await state.find(state.get_history(request)) is None
    with pytest.raises(errors.ApiError) as info:
        await state.get_history(request, not_found=lambda err: errors.NotFound(err.reason))
    assert info.value.status == 404 and info.value.message == "RESPONSE_NOT_FOUND"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_calls_go_on_after_the_state_service_restarted(
    start: Start, unused_tcp_port: int
) -> None:
    """A stream that ended (here: the service stopped and started again on the same port) is
    never used again: once the service is back, calls go over a new stream."""
    address = f"127.0.0.1:{unused_tcp_port}"
    first = await start(listen=address)
    state = StateClient(address, timeout_s=5, exchange_streams=1)
    try:
        put = pb.PutTurnRequest(tenant=TENANT, response=simple_turn("a1"))
        await state.put_turn(put)
        await first.stop(0)
        await start(listen=address)
        for _ in range(100):
            if await state.ready():
                break
            await asyncio.sleep(0.05)
        reply = await state.get_history(pb.GetHistoryRequest(tenant=TENANT, response_id="a1"))
        assert [i.id for i in reply.items] == ["a1-in", "a1-out"]
    finally:
        await state.close()


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_streams_are_replaced_when_old_without_failing_a_call(
    running: server.Running,
) -> None:
    state = StateClient(f"127.0.0.1:{running.port}", timeout_s=5, exchange_streams=2)
    assert state._exchange is not None
    state._exchange._max_age_s = 0.02
    try:

        async def put(n: int) -> None:
            await asyncio.sleep(0.001 * n)
            request = pb.PutTurnRequest(tenant=TENANT, response=simple_turn(f"s{n}"))
            await state.put_turn(request)

        await asyncio.gather(*(put(n) for n in range(200)))
        history = await state.get_history(pb.GetHistoryRequest(tenant=TENANT, response_id="s199"))
        assert len(history.items) == 2
    finally:
        await state.close()
