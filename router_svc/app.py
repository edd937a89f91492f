"""The router's ASGI application and its process entry point."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import gctune, logs, tracing
from gateway.metrics import LATENCY_BUCKETS
from router_svc import auth, bootstrap, errors
from router_svc.config import RouterSettings
from router_svc.history_cache import HistoryCache
from router_svc.http import JSONResponse
from router_svc.hub import HubClient
from router_svc.routes import conversations, passthrough, responses
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


def check_settings(settings: RouterSettings) -> None:
    """Raises ValueError, with what to change, for settings the router cannot start with."""
    if not settings.hub_url:
        raise ValueError("the hub URL is required (--hub-url or RESPGW_HUB_URL)")
    if not settings.hub_url.startswith(("http://", "https://")):
        raise ValueError(f"--hub-url must start with http:// or https://, got {settings.hub_url!r}")
    if settings.hub_api not in ("chat", "responses"):
        raise ValueError(f"--hub-api must be chat or responses, got {settings.hub_api!r}")
    if settings.history_cache_mb < 0:
        raise ValueError(f"--history-cache-mb must be 0 or more, got {settings.history_cache_mb}")
    if settings.state_streams < 0:
        raise ValueError(f"--state-streams must be 0 or more, got {settings.state_streams}")
    if not settings.state_address:
        raise ValueError("the state service address is required (--state-address)")
    auth.parse_api_keys(settings.api_keys)


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
        ),
        bootstrapper=bootstrap.make_bootstrapper(settings),
        auth=auth.Authenticator(auth.parse_api_keys(settings.api_keys)),
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


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    error = errors.ApiError(
        "The gateway hit an unexpected error while processing your request.",
        code="internal_error",
        headers={"x-should-retry": "false"},
    )
    return await api_error(request, error)


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
    downstream call, echoes it on the response, and counts and times requests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")[:128]
        rid = rid or "req_" + secrets.token_hex(16)
        token = logs.request_id_var.set(rid)
        traced = (
            _start_span(scope, rid) if tracing.enabled and scope["path"] not in _UNTRACED else None
        )
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                route = _route_name(scope)
                HTTP_LATENCY.labels(route).observe(time.perf_counter() - start)
                HTTP_REQUESTS.labels(route, str(status)).inc()
                if traced is not None:
                    tracing.http_response(traced[0], route, status)
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_id)
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


# Probes and scrapes come every few seconds: spans of them would only bury the real traffic.
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


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
            await svc.drain(settings.drain_timeout_s)
            await svc.hub.close()
            await svc.state.close()
            await svc.bootstrapper.close()

    handlers: dict[Any, Any] = {
        errors.ApiError: api_error,
        HTTPException: http_error,
        Exception: unexpected_error,
    }
    app = Starlette(
        routes=[
            *responses.routes,
            *conversations.routes,
            *passthrough.routes,
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.add_middleware(RequestContext)
    return app


def run(settings: RouterSettings) -> None:
    """Serves the router until SIGTERM/SIGINT (uvicorn handles both and drains connections)."""
    check_settings(settings)
    tracing.setup("respgw-router", settings.otel_endpoint)
    gctune.tune()
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()
