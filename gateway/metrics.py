"""Prometheus metrics shared by the gateway's services, and the gRPC server interceptor that
records them, carries the request id from gRPC metadata into the logs and, when tracing is on,
continues the caller's trace."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from gateway import tracing
from gateway.logs import REQUEST_ID_HEADER, request_id_var

log = logging.getLogger(__name__)

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
_SERVED: dict[tuple[str, str], tuple[Any, Any]] = {}


def observe_served(method: str, code: str, elapsed: float) -> None:
    """Counts one gRPC call served and its time, through children looked up once per method and
    code (``labels`` costs more than the observation itself)."""
    children = _SERVED.get((method, code))
    if children is None:
        children = _SERVED[(method, code)] = (
            GRPC_SERVER_LATENCY.labels(method),
            GRPC_SERVER_REQUESTS.labels(method, code),
        )
    children[0].observe(elapsed)
    children[1].inc()


def serve_metrics(port: int, host: str = "0.0.0.0") -> WSGIServer | None:
    """Serves /metrics on ``host:port`` from a daemon thread; port 0 disables it. Returns the
    server (``shutdown()`` stops it), None when disabled."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server


class ServiceSettings(Protocol):
    """The settings of a gRPC service that serves /metrics on a port of its own."""

    @property
    def listen(self) -> str: ...
    @property
    def metrics_port(self) -> int: ...
    @property
    def metrics_host(self) -> str: ...


def listen_host(listen: str) -> str:
    """The host of a ``host:port`` listen address, as a bind address (``[::]:50051`` is ``::``).

    Raises ValueError for an address without a host (gRPC refuses those too).
    """
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ValueError(f"cannot tell the host of listen address {listen!r}: set the metrics host")
    return host


def metrics_host(settings: ServiceSettings) -> str:
    """Where a service's /metrics binds: its own metrics host setting, else the host it listens
    on, so a service kept on loopback keeps its metrics there too."""
    return settings.metrics_host or listen_host(settings.listen)


def serve_service_metrics(settings: ServiceSettings) -> WSGIServer | None:
    """Serves a gRPC service's /metrics on ``metrics_host(settings):settings.metrics_port``;
    metrics port 0 disables it."""
    if not settings.metrics_port:
        return None
    return serve_metrics(settings.metrics_port, metrics_host(settings))


# Health checks come every few seconds from probes: spans of them would bury the real traffic.
_UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls by method and code, times them, sets the request id for the logs, logs each
    call at debug level, and starts a SERVER span per call when tracing is on."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        # Every call with one request or one reply (a client-streaming call, PutTurnChunked, and a
        # server-streaming one, GetResponseChunked or WatchResponseEvents, each count as one call,
        # timed to its end); bidirectional streams (Exchange) are measured by what they carry.
        if handler is None or handler.stream_stream is not None:
            return handler
        full_method = handler_call_details.method
        method = full_method.rsplit("/", 1)[-1]
        request_id = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str):
                request_id = value
        traced = tracing.enabled and not full_method.startswith(_UNTRACED_PREFIXES)
        inner: Any = handler.unary_unary or handler.stream_unary or handler.unary_stream

        @contextlib.contextmanager
        def observing(context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
            token = request_id_var.set(request_id)
            if traced:
                span, span_token = _start_span(full_method, handler_call_details, request_id)
            start = time.perf_counter()
            code = "OK"
            error: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                got = context.code()
                code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
                if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) and code == "UNKNOWN":
                    code = "CANCELLED"
                error = exc
                raise
            finally:
                elapsed = time.perf_counter() - start
                observe_served(method, code, elapsed)
                if traced:
                    tracing.end_grpc(span, code, server=True, error=error)
                    tracing.detach(span_token)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "gRPC call served",
                        extra={"rpc": full_method, "code": code, "ms": round(elapsed * 1000, 3)},
                    )
                request_id_var.reset(token)

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with observing(context):
                return await inner(request, context)

        async def observed_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            with observing(context):
                async for reply in inner(request, context):
                    yield reply

        if handler.unary_stream is not None:
            wrap: Any = grpc.unary_stream_rpc_method_handler
            served: Any = observed_stream if inspect.isasyncgenfunction(inner) else observed
        else:
            served = observed
            wrap = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
        return wrap(  # type: ignore[no-any-return]
            served,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _start_span(
    full_method: str, details: grpc.HandlerCallDetails, request_id: str
) -> tuple[tracing.Span, tracing.Token]:
    """The SERVER span of one call, child of the caller's span named in its metadata."""
    carrier = {
        key: value
        for key, value in details.invocation_metadata or ()
        if key in tracing.TRACE_HEADERS and isinstance(value, str)
    }
    attributes = {**tracing.grpc_attributes(full_method), "respgw.request_id": request_id}
    return tracing.start_server(full_method.lstrip("/"), carrier, attributes)
