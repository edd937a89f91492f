"""The client side of gRPC calls: retries only as the policy allows (and within a budget), the
request id in the metadata, and the call's metrics; against a real server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway import grpcclient
from gateway.logs import REQUEST_ID_HEADER, request_id_var
from respgw.state.v1 import state_service_pb2 as state_pb

UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class Flaky:
    """A unary method that fails with ``codes`` in turn, then echoes; it records each call's
    request id."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []
        self.request_ids: list[str] = []

    async def handle(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        self.request_ids.append(str(metadata.get(REQUEST_ID_HEADER, "")))
        if self.codes:
            await context.abort(self.codes.pop(0), "not now")
        return request


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]]]:
    servicer = Flaky()
    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        servicer.handle
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Flaky", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, channel.unary_unary("/test.Flaky/Echo")
    await channel.close()
    await server.stop(None)


def test_a_policy_retries_its_codes_a_bounded_number_of_times() -> None:
    policy = grpcclient.RetryPolicy(UNAVAILABLE, (0.05, 0.2))
    assert [policy.pause(grpc.StatusCode.UNAVAILABLE, n) for n in range(3)] == [0.05, 0.2, None]
    assert policy.pause(grpc.StatusCode.INTERNAL, 0) is None
    assert grpcclient.NO_RETRY.pause(grpc.StatusCode.UNAVAILABLE, 0) is None
    jittered = grpcclient.RetryPolicy(UNAVAILABLE, (0.1,), jitter=True)
    pauses = {jittered.pause(grpc.StatusCode.UNAVAILABLE, 0) for _ in range(50)}
    assert all(p is not None and 0.05 <= p <= 0.15 for p in pauses) and len(pauses) > 1


def test_the_state_contract_says_what_is_safe_to_retry() -> None:
    service = state_pb.DESCRIPTOR.services_by_name["StateService"]
    safe = grpcclient.safe_to_retry(service)
    assert {"PutTurn", "GetResponse", "CreateConversation"} <= safe
    assert "Exchange" not in safe  # declares no idempotency_level


async def test_retries_then_answers_with_the_same_request_id(flaky: Any) -> None:
    servicer, echo = flaky
    servicer.codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    request_id_var.set("req-1")
    out = grpcclient.Outgoing("test.Flaky", "Echo")
    retried: list[tuple[grpc.StatusCode, int]] = []
    reply = await grpcclient.retrying(
        lambda timeout: echo(b"hi", timeout=timeout, metadata=out.metadata),
        grpcclient.RetryPolicy(UNAVAILABLE, (0.01, 0.01)),
        timeout_s=2.0,
        on_retry=lambda code, n: retried.append((code, n)),
    )
    assert reply == b"hi"
    assert servicer.request_ids == ["req-1"] * 3
    assert retried == [(grpc.StatusCode.UNAVAILABLE, 1), (grpc.StatusCode.UNAVAILABLE, 2)]


async def test_other_codes_and_spent_retries_fail_as_they_came(flaky: Any) -> None:
    servicer, echo = flaky
    policy = grpcclient.RetryPolicy(UNAVAILABLE, (0.01,))
    servicer.codes = [grpc.StatusCode.INTERNAL]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpcclient.retrying(lambda t: echo(b"x", timeout=t), policy, timeout_s=2.0)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert len(servicer.request_ids) == 1
    servicer.codes = [grpc.StatusCode.UNAVAILABLE] * 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpcclient.retrying(lambda t: echo(b"x", timeout=t), policy, timeout_s=2.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.request_ids) == 3  # one call, one retry


async def test_no_retry_starts_past_the_budget(flaky: Any) -> None:
    servicer, echo = flaky
    servicer.codes = [grpc.StatusCode.UNAVAILABLE] * 3
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError):
        await grpcclient.retrying(
            lambda t: echo(b"x", timeout=t),
            grpcclient.RetryPolicy(UNAVAILABLE, (0.5, 0.5)),
            timeout_s=2.0,
            budget_s=0.3,
        )
    assert len(servicer.request_ids) == 1
    assert time.monotonic() - start < 0.3


async def test_an_outgoing_call_records_its_metrics() -> None:
    registry = CollectorRegistry()
    latency = Histogram("t_latency_seconds", "t", ["method"], registry=registry)
    failures = Counter("t_failures_total", "t", ["method", "code"], registry=registry)
    request_id_var.set("req-2")
    out = grpcclient.Outgoing("test.Flaky", "Echo")
    assert out.metadata == ((REQUEST_ID_HEADER, "req-2"),) and out.span is None
    await asyncio.sleep(0)
    out.end("OK", latency=latency, failures=failures)
    grpcclient.Outgoing("test.Flaky", "Echo", "given").end(
        "UNAVAILABLE", latency=latency, failures=failures
    )
    assert registry.get_sample_value("t_latency_seconds_count", {"method": "Echo"}) == 2
    assert registry.get_sample_value("t_failures_total", {"method": "Echo", "code": "OK"}) is None
    failed = {"method": "Echo", "code": "UNAVAILABLE"}
    assert registry.get_sample_value("t_failures_total", failed) == 1
