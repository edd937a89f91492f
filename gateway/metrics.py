"""Prometheus metrics shared by the gateway's services, and the gRPC server interceptor that
records them and carries the request id from gRPC metadata into the logs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from gateway.logs import REQUEST_ID_HEADER, request_id_var

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

GRPC_SERVER_REQUESTS = Counter(
    "respgw_grpc_server_requests_total",
    "gRPC calls served, by method and status code.",
    ["method", "code"],
)
GRPC_SERVER_LATENCY = Histogram(
    "respgw_grpc_server_latency_seconds",
    "Time to serve one gRPC call, by method.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serves /metrics on its own port from a daemon thread; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls by method and code, times them, and sets the request id for the logs."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        request_id = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str):
                request_id = value
        inner: Any = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = request_id_var.set(request_id)
            start = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                got = context.code()
                code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                GRPC_SERVER_LATENCY.labels(method).observe(time.perf_counter() - start)
                GRPC_SERVER_REQUESTS.labels(method, code).inc()
                request_id_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
