"""The router's ASGI application and its process entry point."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway import gctune, logs, tracing
from gateway.metrics import LATENCY_BUCKETS
from router_svc import auth, background, bootstrap, errors, execution, ids, sealing
from router_svc.config import RouterSettings
from router_svc.dialects import dialect_for
from router_svc.history_cache import HistoryCache
from router_svc.http import MAX_ID_CHARS, JSONResponse, KeyedLocks, StreamSlots
from router_svc.hub import HubClient
from router_svc.routes import containers, conversations, input_tokens, passthrough, responses
from router_svc.services import Services
from router_svc.state_client import StateClient

log = logging.getLogger(__name__)
access_log = logging.getLogger("respgw.access")

HTTP_REQUESTS = Counter(
    "respgw_router_requests_total",
    "HTTP requests answered, by route and status.",
    ["route", "status"],
)
HTTP_LATENCY = Histogram(
    "respgw_router_request_latency_seconds",
    "Time to the start of the HTTP response, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
API_ERRORS = Counter(
    "respgw_router_errors_total",
    "Error responses, by HTTP status and error code.",
    ["status", "code"],
)


# Settings for which 0 would refuse every request (or call), and settings where 0 means none.
_POSITIVE = (
    "max_body_bytes",
    "max_header_bytes",
    "max_headers",
    "header_timeout_s",
    "body_timeout_s",
    "state_timeout_s",
)
_NOT_NEGATIVE = (
    "hub_timeout_s",
    "hub_connect_timeout_s",
    "hub_first_byte_timeout_s",
    "hub_idle_timeout_s",
    "max_connections",
    "max_streams",
    "max_streams_per_tenant",
)


def check_settings(settings: RouterSettings) -> None:
    """Raises ValueError, with what to change, for settings the router cannot start with."""
    if not settings.hub_url:
        raise ValueError("the hub URL is required (--hub-url or RESPGW_HUB_URL)")
    if not settings.hub_url.startswith(("http://", "https://")):
        raise ValueError(f"--hub-url must start with http:// or https://, got {settings.hub_url!r}")
    dialect_for(settings.hub_api)  # the ValueError names the dialects
    if settings.tokenizer not in ("auto", "llamacpp", "off"):
        raise ValueError(f"--tokenizer must be auto, llamacpp or off, got {settings.tokenizer!r}")
    if settings.history_cache_mb < 0:
        raise ValueError(f"--history-cache-mb must be 0 or more, got {settings.history_cache_mb}")
    if settings.state_streams < 0:
        raise ValueError(f"--state-streams must be 0 or more, got {settings.state_streams}")
    if settings.running_stream_delay_s < 0:
        raise ValueError(
            f"--running-stream-delay-s must be 0 or more, got {settings.running_stream_delay_s}"
        )
    if settings.running_stream_lease_s <= 0:
        raise ValueError(
            f"--running-stream-lease-s must be > 0, got {settings.running_stream_lease_s}"
        )
    if not settings.state_address:
        raise ValueError("the state service address is required (--state-address)")
    for name in _POSITIVE:
        value = getattr(settings, name)
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be more than 0, got {value}")
    for name in _NOT_NEGATIVE:
        value = getattr(settings, name)
        if value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    auth.parse_api_keys(settings.api_keys)
    auth.parse_tenant_models(settings.tenant_models)
    sealing.parse_keys(settings.seal_keys)


def build_services(settings: RouterSettings) -> Services:
    check_settings(settings)
    return Services(
        settings=settings,
        state=StateClient(
            settings.state_address,
            timeout_s=settings.state_timeout_s,
            exchange_streams=settings.state_streams,
        ),
        hub=HubClient(
            settings.hub_url,
            api_key=settings.hub_api_key,
            timeout_s=settings.hub_timeout_s,
            connect_timeout_s=settings.hub_connect_timeout_s,
            first_byte_timeout_s=settings.hub_first_byte_timeout_s,
            idle_timeout_s=settings.hub_idle_timeout_s,
            session_header=settings.hub_session_header,
        ),
        bootstrapper=bootstrap.make_bootstrapper(settings),
        executor=execution.make_executor(settings.bootstrap_address, settings.bootstrap_timeout_s),
        auth=auth.Authenticator(
            auth.parse_api_keys(settings.api_keys), auth.parse_tenant_models(settings.tenant_models)
        ),
        sealer=sealing.Sealer.from_setting(settings.seal_keys),
        history_cache=(
            HistoryCache(settings.history_cache_mb * 1024 * 1024)
            if settings.history_cache_mb > 0
            else None
        ),
    )


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApiError)
    API_ERRORS.labels(str(exc.status), exc.code or "").inc()
    if exc.status >= 500:
        log.warning(
            "request failed", extra={"status": exc.status, "code": exc.code, "detail": exc.message}
        )
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = (
        "not_found"
        if exc.status_code == 404
        else "method_not_allowed"
        if exc.status_code == 405
        else None
    )
    message = (
        f"Invalid URL ({request.method} {request.url.path})"
        if exc.status_code in (404, 405)
        else str(exc.detail)
    )
    error = errors.ApiError(message, status=exc.status_code, code=code)
    error.type = errors.INVALID_REQUEST
    return await api_error(request, error)


def _internal_error() -> errors.ApiError:
    return errors.ApiError(
        "The gateway hit an unexpected error while processing your request.",
        code="internal_error",
        headers={"x-should-retry": "false"},
    )


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """The answer to an error raised outside :class:`RequestContext` (those inside it are
    answered there, with the request id)."""
    log.exception("unhandled error", exc_info=exc)
    return await api_error(request, _internal_error())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc: Services = request.app.state.services
    if await svc.state.ready():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "state service not ready"}, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class RequestContext:
    """Sets the request id (the client's ``x-request-id`` or a new one) for the logs and every
    downstream call, echoes it on the response, and counts and times requests.

    An unexpected error of the app before its answer started is answered here (500
    ``internal_error``) and logged with the request id: Starlette's own handler for it runs
    outside every middleware, after the id is gone."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.direct = direct_routes(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")
        # The id goes into logs, gRPC metadata and the hub's headers: only printable ASCII of a
        # sensible length is kept, anything else is replaced.
        if not (rid and len(rid) <= 128 and rid.isascii() and rid.isprintable()):
            rid = "req_" + ids.random_hex(16)
        token = logs.request_id_var.set(rid)
        traced = (
            _start_span(scope, rid) if tracing.enabled and scope["path"] not in _UNTRACED else None
        )
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                route = _route_name(scope)
                counted = _COUNTED.get((route, status))
                if counted is None:
                    counted = _COUNTED[(route, status)] = (
                        HTTP_LATENCY.labels(route),
                        HTTP_REQUESTS.labels(route, str(status)),
                    )
                counted[0].observe(time.perf_counter() - start)
                counted[1].inc()
                if traced is not None:
                    tracing.http_response(traced[0], route, status)
            await send(message)

        error: BaseException | None = None
        try:
            path = scope["path"]
            if len(path) > _MAX_PATH_CHARS or "\x00" in path:
                # No stored object has such an id; the state service is not asked.
                await _answer(send_with_id, _no_such_id())
                return
            route = None if scope.get("root_path") else self.direct.get((scope["method"], path))
            if route is None:
                await self.app(scope, receive, send_with_id)
            else:
                scope["route"] = route
                await _serve(route, scope, receive, send_with_id, lambda: started)
        except Exception as exc:
            error = exc
            if started:
                raise  # the answer is on its way: only the server can end it
            log.exception("unhandled error", exc_info=exc)
            await _answer(send_with_id, _internal_error())
        except BaseException as exc:
            error = exc
            raise
        finally:
            if traced is not None:
                tracing.end_server(*traced, error)
            if scope["path"] not in _UNTRACED:
                # One line per request, written when its last byte went out (a stream's end).
                access_log.info(
                    "request",
                    extra={
                        "method": scope.get("method", ""),
                        "path": scope["path"],
                        "status": status,
                        "ms": round((time.perf_counter() - start) * 1000, 2),
                    },
                )
            logs.request_id_var.reset(token)


def direct_routes(routes: Sequence[BaseRoute]) -> dict[tuple[str, str], Route]:
    """The routes :class:`RequestContext` serves itself, by method and path: those of a fixed
    path (no parameters) with an async endpoint that the router would pick first for that method
    and path anyway. The hot ones (POST /v1/responses) thus skip Starlette's routing and
    exception layers, about 30 µs a request; every other request goes through Starlette."""
    direct: dict[tuple[str, str], Route] = {}
    for route in routes:
        if not isinstance(route, Route) or route.param_convertors or route.methods is None:
            continue
        if not inspect.iscoroutinefunction(route.endpoint):
            continue
        for method in route.methods:
            key = (method, route.path)
            if key in direct:
                continue
            probe = {"type": "http", "method": method, "path": route.path}
            first = next((r for r in routes if r.matches(probe)[0] == Match.FULL), None)
            if first is route:
                direct[key] = route
    return direct


async def _serve(
    route: Route, scope: Scope, receive: Receive, send: Send, started: Callable[[], bool]
) -> None:
    """Serves ``route`` as Starlette would (its endpoint, then the answer; an API or HTTP error
    before the answer started is answered with the app's handler for it)."""
    request = Request(scope, receive, send)
    try:
        response = await route.endpoint(request)
        await response(scope, receive, send)
    except (errors.ApiError, HTTPException) as exc:
        if started():
            raise
        handler = api_error if isinstance(exc, errors.ApiError) else http_error
        answer = await handler(request, exc)
        await answer(scope, receive, send)


# The metric children of each (route, status) answered, made once: ``labels()`` costs about a
# microsecond a call. Bounded: routes are the app's patterns (or "unmatched"), statuses few.
_COUNTED: dict[tuple[str, int], tuple[Histogram, Counter]] = {}

# Probes and scrapes come every few seconds: spans of them would only bury the real traffic.
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
# A path with two ids of MAX_ID_CHARS, and room to spare.
_MAX_PATH_CHARS = 4 * MAX_ID_CHARS


def _no_such_id() -> errors.ApiError:
    return errors.NotFound(
        f"No object has this id: ids are at most {MAX_ID_CHARS} printable characters.",
        code="not_found",
    )


async def _answer(send: Send, error: errors.ApiError) -> None:
    API_ERRORS.labels(str(error.status), error.code or "").inc()
    body = orjson.dumps(error.body())
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.encode(), v.encode()) for k, v in error.headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _start_span(scope: Scope, rid: str) -> tuple[tracing.Span, tracing.Token]:
    """The SERVER span of one request (renamed after its route once routing is done)."""
    carrier = {
        key.decode("latin-1"): value.decode("latin-1")
        for key, value in scope["headers"]
        if key.decode("latin-1") in tracing.TRACE_HEADERS
    }
    method = scope.get("method", "")
    attributes = {
        "http.request.method": method,
        "url.path": scope["path"],
        "respgw.request_id": rid,
    }
    return tracing.start_server(method, carrier, attributes)


def _route_name(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return f"{scope.get('method', '')} {path}" if path else "unmatched"


def create_app(settings: RouterSettings, services: Services | None = None) -> Starlette:
    """The router app; ``services`` may be given (tests), otherwise they are built from settings."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        svc = services or build_services(settings)
        app.state.services = svc
        background.start_worker(svc)  # runs and takes over background responses
        log.info(
            "router ready",
            extra={
                "hub": settings.hub_url,
                "hub_api": settings.hub_api,
                "state": settings.state_address,
            },
        )
        try:
            yield
        finally:
            try:
                await svc.drain(settings.drain_timeout_s)
                await svc.hub.close()
                await svc.state.close()
                await svc.bootstrapper.close()
                if svc.executor is not None:
                    await svc.executor.close()
            finally:
                # The access log's last batch, whatever else is logged at the end (uvicorn
                # ends a SIGTERM'd process by raising the signal again, which skips atexit).
                logs.flush()

    handlers: dict[Any, Any] = {
        errors.ApiError: api_error,
        HTTPException: http_error,
        Exception: unexpected_error,
    }
    app = Starlette(
        routes=[
            *responses.routes,
            *conversations.routes,
            *containers.routes,
            *passthrough.routes,
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            # Last: every other route is matched as before, without trying one more pattern.
            *input_tokens.routes,
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.add_middleware(RequestContext, routes=app.routes)
    app.state.stream_slots = StreamSlots(settings.max_streams, settings.max_streams_per_tenant)
    app.state.conversation_locks = KeyedLocks()
    return app


# --- the HTTP protocol guard ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionLimits:
    """What a client may send before the app sees its request (see :class:`GuardedProtocol`)."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 0

    @classmethod
    def of(cls, settings: RouterSettings) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


# Where the guard is in a request: before its first byte, in its line and headers, in its body, or
# past its end (the app answers; the next request may be pipelined behind it).
_IDLE, _HEAD, _BODY, _DONE = range(4)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request the guard refuses."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits it lacks (httptools buffers a header line of
    any length, uvicorn has no timeout before a request is complete, and answers its own errors in
    text/plain):

    - the request line and headers: at most ``max_header_bytes`` (counted as the bytes arrive,
      so an unfinished header is refused as soon as it is too long) and ``max_headers`` fields,
      else 431 (414 for the URL alone);
    - time: a connection's first request must have its headers within ``header_timeout_s`` of
      the connection's start, every later one within ``header_timeout_s`` of its first byte, and
      a body must be complete within ``body_timeout_s`` of its headers, else 408 (time the app
      takes to read a body it has not asked for yet is not counted); between requests, uvicorn's
      keep-alive timeout applies;
    - more than ``max_connections`` open connections: the request of the one over it is answered
      503 and the connection closed;
    - every answer of its own, and uvicorn's 400 for a request that does not parse, is JSON in
      OpenAI's error shape, and closes the connection.

    The body's size is checked as it is read (:func:`router_svc.http.read_body`). The checks
    cost a counter per header and a comparison per read; a timer only runs while a request is
    incomplete after a read (a request that arrives in one piece arms none).
    """

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = _IDLE
        self._raw_head = 0  # bytes received while in a request's line and headers
        self._head_size = 0  # the current request's URL, header names and values
        self._header_count = 0
        self._refusal: tuple[int, str, str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_phase = _IDLE
        limits = self.limits
        if limits.max_connections and len(self.connections) > limits.max_connections:
            self.app = _over_capacity
        self._arm(_HEAD, limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase != _BODY:
            self._raw_head += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm()
            return
        phase = self._phase
        if phase == _HEAD or (phase == _IDLE and self._raw_head):
            if self._raw_head > self.limits.max_header_bytes:
                self._refuse(431, "request_header_fields_too_large", self._too_large_head())
            elif self._timer_phase != _HEAD:
                self._arm(_HEAD, self.limits.header_timeout_s)
        elif phase == _BODY:
            if self._timer_phase != _BODY:
                self._arm(_BODY, self.limits.body_timeout_s)
        elif self._timer is not None:
            self._disarm()

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD
        self._head_size = 0
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.limits.max_header_bytes:
            self._stop(414, "uri_too_long", "The request URL is too long.")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._stop(
                431,
                "request_header_fields_too_large",
                f"The request has more than {self.limits.max_headers} header fields.",
            )
        if self._head_size > self.limits.max_header_bytes:
            self._stop(431, "request_header_fields_too_large", self._too_large_head())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._raw_head = 0
        existing = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not existing:
            cycle.transport = _AnswerWrites(self.transport, cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._phase = _DONE
        super().on_message_complete()

    # Refusals

    def _too_large_head(self) -> str:
        return (
            f"The request's line and headers are larger than {self.limits.max_header_bytes} bytes."
        )

    def _stop(self, status: int, code: str, message: str) -> None:
        """Refuses the request from inside a parser callback: the parser stops, and uvicorn's
        answer to a request that does not parse (send_400_response) sends this refusal."""
        self._refusal = (status, code, message)
        raise _Refused(message)

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            refusal = (400, "invalid_request", "The request is not valid HTTP/1.1.")
        self._refuse(*refusal)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answers ``status`` in OpenAI's error shape and closes the connection. A request whose
        app has started its answer already only has its connection closed."""
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started or self._phase in (_IDLE, _HEAD):
                # An answer (or the answer to a pipelined request before this one) is on its way.
                self.transport.close()
                return
            # The app is waiting for the body: it now sees the client as gone.
            cycle.disconnected = True
            cycle.message_event.set()
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        if status >= 500:
            error["type"] = "server_error"
        body = orjson.dumps({"error": error})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # Timers

    def _arm(self, phase: int, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_phase = phase
        self._timer = self.loop.call_later(delay_s, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_phase = _IDLE

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        phase = self._phase
        if phase == _BODY:
            if self.flow.read_paused:
                # The app has not read what arrived yet (or a pipelined request waits): the delay
                # is the router's, not the client's.
                self._arm(_BODY, self.limits.body_timeout_s)
                return
            self._refuse(408, "request_timeout", "The request body did not arrive in time.")
        elif phase == _HEAD or (phase == _IDLE and self._raw_head):
            self._refuse(408, "request_timeout", "The request headers did not arrive in time.")
        elif phase == _IDLE:
            self.transport.close()  # a connection that never sent a byte
        else:
            self._timer_phase = _IDLE


class _AnswerWrites:
    """The transport of one request's answer, as uvicorn's cycle writes it, with fewer writes:

    - an answer of known length (``content-length``, to anything but HEAD): its status line
      and headers are held until its body, and both go out in one write;
    - a streamed (chunked) answer: its head goes out at the end of the loop turn that wrote it,
      or with its first piece if that comes sooner, and its first piece at once; after that,
      what it writes during one turn of the event loop goes out in one write at the end of
      that turn (or at once, from ANSWER_GATHER_BYTES), and all of it before the answer counts
      as complete.

    uvicorn writes an answer's head and each piece of its body separately: a send(2) call and a
    segment each, every one waking the client; a streamed turn's events come several at a time
    (a hub chunk often makes three), and a short answer fits in one segment. Nothing waits
    for more than the current loop turn. Closing the transport writes what waits first, as
    uvicorn would have written it."""

    __slots__ = ("_cycle", "_gathered", "_gathered_bytes", "_head", "_mode", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._mode = _BEFORE_HEAD
        self._gathered: list[bytes] = []
        self._gathered_bytes = 0
        answered = cycle.on_response

        def on_response() -> None:
            self.flush()
            answered()

        cycle.on_response = on_response

    def write(self, data: bytes) -> None:
        mode = self._mode
        if mode == _THROUGH:
            self._transport.write(data)
        elif mode == _GATHER:
            if not self._gathered:
                asyncio.get_running_loop().call_soon(self.flush)
            self._gathered.append(data)
            self._gathered_bytes += len(data)
            if self._gathered_bytes >= ANSWER_GATHER_BYTES:
                self.flush()
        elif mode == _FIRST_PIECE:
            # The streamed answer's first piece goes out at once (with its head, if that still
            # waits): the time to its first byte waits for nothing else the loop runs.
            self._mode = _GATHER
            self._gathered.append(data)
            self.flush()
        elif self._head is not None:
            head, self._head = self._head, None
            self._mode = _THROUGH
            self._transport.write(head + data)
        elif self._cycle.response_started:
            # The answer's first write is its head (uvicorn writes it in one piece, once it has
            # decided the framing; a "100 Continue" is written before the answer starts).
            cycle = self._cycle
            if cycle.scope["method"] == "HEAD":
                self._mode = _THROUGH
                self._transport.write(data)
            elif cycle.chunked_encoding:
                self._mode = _GATHER
                self.write(data)
                self._mode = _FIRST_PIECE
            else:
                self._head = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Writes what waits (the end of a loop turn, a full gathering, the answer's end)."""
        if self._gathered:
            data = b"".join(self._gathered) if len(self._gathered) > 1 else self._gathered[0]
            self._gathered = []
            self._gathered_bytes = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# _AnswerWrites's modes.
_BEFORE_HEAD, _GATHER, _THROUGH, _FIRST_PIECE = 0, 1, 2, 3
# A streamed answer's writes gathered in one loop turn are written at once from this size (the
# transport's own flow control then applies, as for any write).
ANSWER_GATHER_BYTES = 64 * 1024


async def _over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    error = errors.ApiError(
        "The gateway has as many connections open as it can; please try again shortly.",
        status=503,
        code="server_overloaded",
        headers={"connection": "close", "x-should-retry": "true"},
    )
    await _answer(send, error)


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The protocol class uvicorn serves with, holding ``limits``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


def server_config(app: ASGIApp, settings: RouterSettings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration the router is served with (the guarded protocol on uvloop);
    ``overrides`` are passed to uvicorn.Config (tests and ``respgw local`` run it in their own
    event loop with ``loop="none"``)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": guarded_protocol(ConnectionLimits.of(settings)),
        "log_config": None,
        "access_log": False,
        # Nothing of the router reads the client's address or scheme, so uvicorn's rewrite of
        # them from X-Forwarded-* (one more ASGI layer a request) is left out.
        "proxy_headers": False,
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": 30,
        **overrides,
    }
    return uvicorn.Config(app, **options)


def run(settings: RouterSettings) -> None:
    """Serves the router until SIGTERM/SIGINT (uvicorn handles both and drains connections)."""
    check_settings(settings)
    tracing.setup("respgw-router", settings.otel_endpoint)
    gctune.tune()
    gctune.place_large_blocks()
    uvicorn.Server(server_config(create_app(settings), settings)).run()
