"""The servicer boundary of ``gateway/grpcerrors.py`` on a real grpc.aio server: a ServiceError
becomes its status with ErrorInfo in unary, server-streaming and client-streaming RPCs (after the
messages already sent), any other exception becomes the service's INTERNAL error (or gRPC's
UNKNOWN when it names none), and the RPC's own abort passes untouched."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from gateway import grpcerrors
from gateway.grpcerrors import ServiceError
from respgw.bootstrap.v1 import execution_service_pb2 as pb
from respgw.bootstrap.v1 import execution_service_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["ExecutionService"]
log = logging.getLogger(__name__)

REFUSAL = ServiceError(
    grpc.StatusCode.FAILED_PRECONDITION, "SANDBOX_UNAVAILABLE", "no sandbox", {"field": "x"}
)
INTERNAL = ServiceError(grpc.StatusCode.INTERNAL, "EXECUTION_FAILED", "internal error")


def _fail(mode: str, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    if mode == "refuse":
        raise REFUSAL
    if mode == "crash":
        raise RuntimeError("boom")
    return context.abort(grpc.StatusCode.PERMISSION_DENIED, "its own abort")


def _servicer(mode: str, internal: Callable[[], ServiceError] | None) -> Any:
    """A servicer of every ExecutionService RPC that fails as ``mode`` says; Execute and
    DownloadFile send one message first."""

    async def unary(self: Any, request: Any, context: Any) -> Any:
        await _fail(mode, context)

    async def client_stream(self: Any, requests: Any, context: Any) -> Any:
        async for _ in requests:
            pass
        await _fail(mode, context)

    async def server_stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        yield pb.ExecuteResponse(started=pb.ExecutionStarted())
        await _fail(mode, context)

    methods: dict[str, Any] = {}
    for method in SERVICE.methods:
        handler = (
            server_stream
            if method.server_streaming
            else client_stream
            if method.client_streaming
            else unary
        )
        methods[method.name] = handler
    cls = type("Servicer", (execution_service_pb2_grpc.ExecutionServiceServicer,), methods)
    return grpcerrors.servicer(SERVICE, log=log, internal=internal)(cls)()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(mode: str, internal: Callable[[], ServiceError] | None = None) -> Any:
        server = grpc.aio.server()
        execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(
            _servicer(mode, internal), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return execution_service_pb2_grpc.ExecutionServiceStub(channel)

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


async def _three_kinds(stub: Any) -> list[tuple[grpcerrors.RemoteError, int]]:
    """The error of a unary, a server-streaming and a client-streaming call, with how many
    messages came before it."""
    out = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetSession(pb.GetSessionRequest(), timeout=10)
    out.append((grpcerrors.error_info(info.value), 0))
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Execute(pb.ExecuteRequest(), timeout=10):
            received += 1
    out.append((grpcerrors.error_info(info.value), received))

    async def parts() -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(data=b"x")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.UploadFile(parts(), timeout=10)
    out.append((grpcerrors.error_info(info.value), 0))
    return out


async def test_a_service_error_is_its_status_with_error_info(serve: Callable[..., Any]) -> None:
    stub = await serve("refuse")
    for err, _ in await _three_kinds(stub):
        assert (err.code, err.reason, err.message, dict(err.metadata)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SANDBOX_UNAVAILABLE",
            "no sandbox",
            {"field": "x"},
        )
        assert err.domain == grpcerrors.STATE_DOMAIN  # ServiceError's default domain
    assert [received for _, received in await _three_kinds(stub)] == [0, 1, 0]


async def test_any_other_exception_is_the_services_internal_error(
    serve: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    stub = await serve("crash", lambda: INTERNAL)
    for err, _ in await _three_kinds(stub):
        assert (err.code, err.reason, err.message) == (
            grpc.StatusCode.INTERNAL,
            "EXECUTION_FAILED",
            "internal error",
        )
    # The cause goes to the log, never to the caller.
    assert any("boom" in (r.exc_text or "") for r in caplog.records if r.name == __name__)


async def test_without_an_internal_error_another_exception_is_grpcs_unknown(
    serve: Callable[..., Any],
) -> None:
    stub = await serve("crash")
    for err, _ in await _three_kinds(stub):
        assert (err.code, err.reason) == (grpc.StatusCode.UNKNOWN, "")


async def test_the_rpcs_own_abort_passes_untouched(
    serve: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    stub = await serve("abort", lambda: INTERNAL)
    for err, _ in await _three_kinds(stub):
        assert (err.code, err.message, err.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "its own abort",
            "",
        )
    # Not taken for a failure: nothing is logged.
    assert [r.getMessage() for r in caplog.records if r.name == __name__] == []
