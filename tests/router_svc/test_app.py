"""The router's application and server: the settings it refuses, what it builds, the request-id
middleware (id, access log line, metrics), its error handlers, and the HTTP protocol guard's
limits through a real uvicorn server on 127.0.0.1:0, served as ``server_config`` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.logs import request_id_var
from router_svc import app as router_app
from router_svc import errors, http
from router_svc.config import RouterSettings
from tests.support import Stack

BASE = replace(RouterSettings(), hub_url="http://127.0.0.1:9/v1", state_address="127.0.0.1:9")


# --- settings and what is built from them -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"hub_url": ""}, "the hub URL is required"),
        ({"hub_url": "127.0.0.1:8000/v1"}, "--hub-url must start with http:// or https://"),
        ({"hub_api": "completions"}, "--hub-api must be chat or responses"),
        ({"tokenizer": "tiktoken"}, "--tokenizer must be auto, llamacpp or off"),
        ({"history_cache_mb": -1}, "--history-cache-mb must be 0 or more"),
        ({"state_streams": -1}, "--state-streams must be 0 or more"),
        ({"state_address": ""}, "the state service address is required"),
        ({"api_keys": "k1=t1,no-tenant"}, "API key entry must be KEY=TENANT"),
        ({"seal_keys": "not-a-key"}, "--seal-keys takes comma-separated ID=BASE64 pairs"),
    ],
)
def test_settings_the_router_cannot_start_with_are_refused(
    change: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        router_app.check_settings(replace(BASE, **change))


def with_value(name: str, value: float) -> RouterSettings:
    changed: dict[str, Any] = {name: value}
    return replace(BASE, **changed)


@pytest.mark.parametrize(
    "name",
    ["max_body_bytes", "max_header_bytes", "max_headers", "header_timeout_s", "body_timeout_s"],
)
def test_a_guard_limit_of_zero_is_refused(name: str) -> None:
    # Every request or connection would be refused: 0 is not "no limit" here.
    flag = "--" + name.replace("_", "-")
    for value in (0, -1):
        with pytest.raises(ValueError, match=f"{flag} must be more than 0, got {value}"):
            router_app.check_settings(with_value(name, value))


@pytest.mark.parametrize(
    "name",
    [
        "hub_timeout_s",
        "hub_connect_timeout_s",
        "hub_first_byte_timeout_s",
        "hub_idle_timeout_s",
        "max_connections",
        "max_streams",
        "max_streams_per_tenant",
    ],
)
def test_a_negative_bound_is_refused_and_zero_is_none(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} must be 0 or more, got -1"):
        router_app.check_settings(with_value(name, -1))
    router_app.check_settings(with_value(name, 0))


def test_a_state_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--state-timeout-s must be more than 0, got 0"):
        router_app.check_settings(replace(BASE, state_timeout_s=0))


def test_good_settings_pass() -> None:
    router_app.check_settings(BASE)
    router_app.check_settings(replace(BASE, hub_url="https://hub/v1", hub_api="responses"))


async def test_services_are_built_from_the_settings() -> None:
    settings = replace(
        BASE,
        history_cache_mb=2,
        hub_first_byte_timeout_s=7.0,
        hub_idle_timeout_s=3.0,
        hub_session_header="x-affinity",
        bootstrap_address="",
    )
    svc = router_app.build_services(settings)
    try:
        assert svc.history_cache is not None and svc.history_cache._max_bytes == 2 * 1024 * 1024
        assert svc.hub._first_byte_s == 7.0 and svc.hub._idle_s == 3.0
        assert svc.hub._session_header == "x-affinity"
        assert svc.executor is None
    finally:
        await svc.hub.close()
        await svc.state.close()
        await svc.bootstrapper.close()
    off = router_app.build_services(replace(BASE, history_cache_mb=0))
    assert off.history_cache is None
    await off.state.close()
    await off.bootstrapper.close()
    with pytest.raises(ValueError):
        router_app.build_services(replace(BASE, hub_api="x"))


def test_the_server_config_serves_the_guarded_protocol_with_the_settings_limits() -> None:
    settings = replace(
        BASE,
        host="127.0.0.1",
        port=8123,
        max_header_bytes=4096,
        max_headers=12,
        header_timeout_s=3.0,
        body_timeout_s=4.0,
        max_connections=5,
        keep_alive_s=9,
    )
    config = router_app.server_config(Starlette(), settings, loop="none")
    assert (config.host, config.port, config.loop) == ("127.0.0.1", 8123, "none")
    assert config.timeout_keep_alive == 9 and config.access_log is False
    assert config.log_config is None and config.proxy_headers is False
    protocol = config.http
    assert isinstance(protocol, type) and issubclass(protocol, router_app.GuardedProtocol)
    assert protocol.limits == router_app.ConnectionLimits(4096, 12, 3.0, 4.0, 5)
    assert router_app.server_config(Starlette(), settings).loop == "uvloop"


# --- the error handlers -------------------------------------------------------------------------


def plain_request(method: str = "GET", path: str = "/v1/nope") -> Request:
    return Request({"type": "http", "method": method, "path": path, "headers": []})


async def test_error_handlers_answer_in_openais_shape() -> None:
    resp = await router_app.api_error(
        plain_request(), errors.RateLimited("slow down", headers={"retry-after": "1"})
    )
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert orjson.loads(resp.body) == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    missing = await router_app.http_error(plain_request(), HTTPException(404))
    assert missing.status_code == 404
    assert orjson.loads(missing.body)["error"] == {
        "message": "Invalid URL (GET /v1/nope)",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    wrong = await router_app.http_error(plain_request("PUT"), HTTPException(405))
    assert orjson.loads(wrong.body)["error"]["code"] == "method_not_allowed"
    other = await router_app.http_error(plain_request(), HTTPException(400, "bad range"))
    assert orjson.loads(other.body)["error"]["message"] == "bad range"


async def test_an_unexpected_error_is_a_500_not_to_retry(caplog: pytest.LogCaptureFixture) -> None:
    resp = await router_app.unexpected_error(plain_request(), KeyError("secret detail"))
    assert resp.status_code == 500 and resp.headers["x-should-retry"] == "false"
    error = orjson.loads(resp.body)["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "secret detail" not in error["message"]  # logged, never shown
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


# --- the request-id middleware ------------------------------------------------------------------


def context_app(direct: bool = True) -> Starlette:
    """As create_app builds it: the fixed-path routes served by RequestContext itself unless
    ``direct`` is False (then Starlette routes every request)."""

    async def show(request: Request) -> Response:
        return http.JSONResponse({"rid": request_id_var.get()})

    async def gone(request: Request) -> Response:
        raise HTTPException(410, "gone for good")

    async def fail(request: Request) -> Response:
        raise errors.InvalidRequest("nope")

    async def crash(request: Request) -> Response:
        raise RuntimeError("a bug")

    # As create_app registers them.
    app = Starlette(
        routes=[
            Route("/v1/items/{item_id}", show),
            Route("/v1/fail", fail, methods=["POST"]),
            Route("/v1/crash", crash),
            Route("/v1/gone", gone),
        ],
        exception_handlers={
            errors.ApiError: router_app.api_error,
            HTTPException: router_app.http_error,
            Exception: router_app.unexpected_error,
        },
    )
    app.add_middleware(router_app.RequestContext, routes=app.routes if direct else ())
    return app


@asynccontextmanager
async def context_client(direct: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=context_app(direct), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_the_request_id_is_the_clients_or_a_new_one() -> None:
    async with context_client() as c:
        given = await c.get("/v1/items/a", headers={"x-request-id": "abc-123"})
        new = await c.get("/v1/items/a")
        other = await c.get("/v1/items/a")
        for bad in ("x" * 129, "tab\there", ""):
            replaced = await c.get("/v1/items/a", headers={"x-request-id": bad})
            assert re.fullmatch(r"req_[0-9a-f]{32}", replaced.headers["x-request-id"]), bad
    assert given.headers["x-request-id"] == "abc-123" == given.json()["rid"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", new.headers["x-request-id"])
    assert new.json()["rid"] == new.headers["x-request-id"] != other.headers["x-request-id"]
    assert request_id_var.get() == ""  # reset after each request


async def test_a_path_no_id_can_be_in_is_a_404_without_routing() -> None:
    async with context_client() as c:
        long = await c.get("/v1/items/" + "a" * (4 * http.MAX_ID_CHARS))
        nul = await c.get("/v1/items/a%00b")
        fine = await c.get("/v1/items/" + "a" * http.MAX_ID_CHARS)
    for resp in (long, nul):
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"
        assert resp.headers["x-request-id"].startswith("req_")
    assert fine.status_code == 200


async def test_each_request_writes_one_access_line_and_is_counted_by_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def count(route: str, status: str) -> float:
        value = REGISTRY.get_sample_value(
            "respgw_router_requests_total", {"route": route, "status": status}
        )
        return value or 0.0

    before_ok = count("GET /v1/items/{item_id}", "200")
    before_failed = count("POST /v1/fail", "400")
    before_unmatched = count("unmatched", "404")
    caplog.set_level(logging.INFO, logger="respgw.access")
    async with context_client() as c:
        await c.get("/v1/items/x1")
        await c.post("/v1/fail")
        await c.get("/nowhere")
    lines = [r for r in caplog.records if r.name == "respgw.access"]
    assert [(r.__dict__["method"], r.__dict__["path"], r.__dict__["status"]) for r in lines] == [
        ("GET", "/v1/items/x1", 200),
        ("POST", "/v1/fail", 400),
        ("GET", "/nowhere", 404),
    ]
    assert all(isinstance(r.__dict__["ms"], float) for r in lines)
    assert count("GET /v1/items/{item_id}", "200") == before_ok + 1
    assert count("POST /v1/fail", "400") == before_failed + 1
    assert count("unmatched", "404") == before_unmatched + 1
    # Probes and scrapes write none.
    caplog.clear()
    async with context_client() as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            await c.get(path)
    assert not [r for r in caplog.records if r.name == "respgw.access"]


class WithRequestId(logging.Handler):
    """Keeps each record with the request id current when it was written (as the formatters
    of gateway.logs read it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), request_id_var.get()))


async def test_an_unexpected_error_is_answered_with_the_request_id() -> None:
    handler = WithRequestId()
    logging.getLogger("router_svc.app").addHandler(handler)
    before = (
        REGISTRY.get_sample_value(
            "respgw_router_requests_total", {"route": "GET /v1/crash", "status": "500"}
        )
        or 0.0
    )
    try:
        async with context_client() as c:
            resp = await c.get("/v1/crash", headers={"x-request-id": "rid-crash"})
    finally:
        logging.getLogger("router_svc.app").removeHandler(handler)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert resp.headers["x-should-retry"] == "false"
    # The id a client quotes when it reports the failure, and the traceback logged under it.
    assert resp.headers["x-request-id"] == "rid-crash"
    assert ("unhandled error", "rid-crash") in handler.seen
    after = REGISTRY.get_sample_value(
        "respgw_router_requests_total", {"route": "GET /v1/crash", "status": "500"}
    )
    assert after == before + 1


def test_the_direct_routes_are_fixed_paths_the_router_would_pick_first() -> None:
    async def a(request: Request) -> Response:
        return Response()

    def sync(request: Request) -> Response:
        return Response()

    param = Route("/v1/x/{name}", a, methods=["POST"])
    fixed = Route("/v1/x/fixed", a, methods=["POST", "GET"])
    plain = Route("/v1/z", a)
    direct = router_app.direct_routes([param, fixed, Route("/v1/y", sync), plain])
    # POST /v1/x/fixed is the parameter route's (listed first); a sync endpoint runs in a
    # thread pool, which only Starlette does.
    assert direct == {
        ("GET", "/v1/x/fixed"): fixed,
        ("HEAD", "/v1/x/fixed"): fixed,
        ("GET", "/v1/z"): plain,
        ("HEAD", "/v1/z"): plain,
    }
    created = router_app.create_app(BASE)
    built = router_app.RequestContext(created, created.routes)
    assert built.direct[("POST", "/v1/responses")].path == "/v1/responses"
    assert ("GET", "/v1/responses/{response_id}") not in built.direct


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/items/a"), ("POST", "/v1/fail"), ("GET", "/v1/crash"), ("GET", "/v1/gone")],
)
async def test_a_route_is_answered_the_same_served_directly_or_by_starlette(
    method: str, path: str
) -> None:
    got = []
    for direct in (True, False):
        async with context_client(direct) as c:
            resp = await c.request(method, path, headers={"x-request-id": "same"})
        got.append((resp.status_code, resp.json(), resp.headers.get("x-should-retry")))
    assert got[0] == got[1]
    assert got[0][0] != 200 or got[0][1] == {"rid": "same"}


async def test_under_a_root_path_starlette_routes_every_request() -> None:
    # Served under a prefix, the path holds it and only Starlette's routing strips it.
    transport = httpx.ASGITransport(app=context_app(), root_path="/gw")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        resp = await c.post("/gw/v1/fail")
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "nope"


# --- the app as create_app builds it ------------------------------------------------------------


def test_the_app_serves_probes_metrics_and_json_errors(stack: Stack) -> None:
    root = stack.url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=10) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        c.get("/v1/models")  # one counted request of a route
        metrics = c.get("/metrics")
        missing = c.get("/v1/nope")
        wrong = c.delete("/healthz")
        form = c.post("/v1/responses", content=b"model=m", headers={"content-type": "text/plain"})
        stack.stop_state()
        down = c.get("/readyz")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'respgw_router_requests_total{route="GET /v1/models",status="200"}' in metrics.text
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
    assert (form.status_code, form.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert down.status_code == 503


# --- the protocol guard, through a real server --------------------------------------------------

GUARDED = replace(
    BASE,
    max_body_bytes=1000,
    max_header_bytes=2048,
    max_headers=20,
    header_timeout_s=0.5,
    body_timeout_s=0.5,
)


def echo_app(settings: RouterSettings) -> Starlette:
    async def echo(request: Request) -> Response:
        return http.JSONResponse(await http.read_json(request))

    app = Starlette(
        routes=[Route("/echo", echo, methods=["POST"])],
        exception_handlers={errors.ApiError: router_app.api_error},
    )
    app.state.services = SimpleNamespace(settings=settings)
    return app


@asynccontextmanager
async def guarded(settings: RouterSettings = GUARDED) -> AsyncIterator[int]:
    """A real uvicorn server, as the router is served, on a port of its own; yields the port."""
    settings = replace(settings, host="127.0.0.1", port=0)
    config = router_app.server_config(
        echo_app(settings), settings, loop="none", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])
        }

    def error(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/json"
        error: dict[str, Any] = orjson.loads(self.body)["error"]
        return error


async def exchange(port: int, *parts: bytes, pause_s: float = 0.0) -> bytes:
    """Sends ``parts`` (``pause_s`` apart) on a new connection and returns what came back until
    the server closed it (reading all along, so an answer before the end is kept)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received: list[bytes] = []

    async def read() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.append(chunk)

    reading = asyncio.create_task(read())
    try:
        for part in parts:
            if reading.done():
                break  # answered and closed before all was sent
            writer.write(part)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        async with asyncio.timeout(20):
            await reading
    finally:
        reading.cancel()
        writer.close()
    return b"".join(received)


def post(body: bytes, *headers: str) -> bytes:
    head = [
        "POST /echo HTTP/1.1",
        "host: t",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *headers,
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


async def test_a_complete_request_passes_and_the_connection_is_kept() -> None:
    async with guarded() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for n in range(2):
            writer.write(post(b'{"n": %d}' % n))
            raw = await reader.readuntil(b"\r\n\r\n")
            answer = Answer(raw)
            answer.body = await reader.readexactly(int(answer.headers["content-length"]))
            answers.append(answer)
        writer.close()
    assert [(a.status, orjson.loads(a.body)) for a in answers] == [(200, {"n": 0}), (200, {"n": 1})]


async def test_headers_over_the_byte_limit_are_a_431() -> None:
    async with guarded() as port:
        whole = await exchange(port, post(b"{}", "x-big: " + "a" * 3000))
        # An unfinished head is refused as soon as it is too long, not when it ends.
        unfinished = await exchange(port, b"GET / HTTP/1.1\r\nx-big: " + b"a" * 3000)
    for raw in (whole, unfinished):
        answer = Answer(raw)
        assert answer.status == 431 and answer.headers["connection"] == "close"
        error = answer.error()
        assert error["code"] == "request_header_fields_too_large"
        assert "larger than 2048 bytes" in error["message"]


async def test_more_header_fields_than_the_limit_are_a_431() -> None:
    # post() sends host, content-type and content-length: with "connection", 20 and 21 fields.
    async with guarded() as port:
        fine = await exchange(
            port, post(b"{}", *[f"x-h{n}: v" for n in range(16)], "connection: close")
        )
        over = await exchange(
            port, post(b"{}", *[f"x-h{n}: v" for n in range(17)], "connection: close")
        )
    assert Answer(fine).status == 200
    answer = Answer(over)
    assert answer.status == 431
    assert answer.error()["message"] == "The request has more than 20 header fields."


async def test_a_url_over_the_limit_is_a_414() -> None:
    async with guarded() as port:
        raw = await exchange(port, b"GET /" + b"a" * 2100 + b" HTTP/1.1\r\nhost: t\r\n\r\n")
    answer = Answer(raw)
    assert (answer.status, answer.error()["code"]) == (414, "uri_too_long")


async def test_a_request_that_is_not_http_is_a_json_400() -> None:
    async with guarded() as port:
        raw = await exchange(port, b"HELLO THERE\r\n\r\n")
    answer = Answer(raw)
    assert answer.status == 400
    assert answer.error() == {
        "message": "The request is not valid HTTP/1.1.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request",
    }


async def test_slow_headers_and_slow_bodies_are_a_408() -> None:
    async with guarded() as port:
        head = await exchange(port, b"POST /echo HTTP/1.1\r\nhost: t\r\n")
        body = await exchange(port, post(b'{"a": 1}')[:-3])
        silent = await exchange(port)
    assert Answer(head).status == 408
    assert Answer(head).error()["message"] == "The request headers did not arrive in time."
    assert Answer(body).status == 408
    assert Answer(body).error() == {
        "message": "The request body did not arrive in time.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }
    assert silent == b""  # a connection that never sent a byte is closed without an answer


async def test_the_body_bound_counts_from_the_headers_not_between_pieces() -> None:
    body = b'{"text": "' + b"x" * 48 + b'"}'
    raw = post(body, "connection: close")
    split = len(raw) - len(body)
    pieces = [raw[:split]] + [body[i : i + 5] for i in range(0, len(body), 5)]
    # A piece every 0.25 s: never quiet for long, but 3 s in all against a bound of 1 s (a
    # client trickling its body holds a connection no longer than the bound).
    slow = replace(GUARDED, body_timeout_s=1.0)
    async with guarded(slow) as port:
        trickled = Answer(await exchange(port, *pieces, pause_s=0.25))
    async with guarded(replace(GUARDED, body_timeout_s=30.0)) as port:
        patient = Answer(await exchange(port, *pieces, pause_s=0.25))
    assert trickled.status == 408
    assert trickled.error()["message"] == "The request body did not arrive in time."
    assert patient.status == 200 and orjson.loads(patient.body) == {"text": "x" * 48}


async def test_a_body_over_the_limit_is_a_413_while_it_is_read() -> None:
    chunked_head = (
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"190\r\n" + b" " * 400 + b"\r\n"
    async with guarded() as port:
        declared = await exchange(port, post(b" " * 1001))
        # Chunked, and never finished: refused once 1,000 bytes are passed.
        chunked = await exchange(port, chunked_head, chunk, chunk, chunk, pause_s=0.05)
        wrong_type = await exchange(
            port, post(b"{}", "connection: close").replace(b"application/json", b"text/plain")
        )
    for raw in (declared, chunked):
        answer = Answer(raw)
        assert answer.status == 413 and answer.headers["connection"] == "close"
        assert answer.error()["code"] == "request_too_large"
    assert Answer(wrong_type).status == 415


async def test_connections_over_the_cap_are_a_503() -> None:
    async with guarded(replace(GUARDED, max_connections=1, header_timeout_s=30)) as port:
        _, first = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        over = await exchange(port, post(b"{}"))
        first.close()
        await first.wait_closed()
        await asyncio.sleep(0.2)
        after = await exchange(port, post(b"{}", "connection: close"))
    answer = Answer(over)
    assert answer.status == 503 and answer.headers["connection"] == "close"
    assert answer.headers["x-should-retry"] == "true"
    assert answer.error()["code"] == "server_overloaded"
    assert Answer(after).status == 200


async def test_pipelined_requests_are_each_answered() -> None:
    async with guarded() as port:
        raw = await exchange(
            port, post(b'{"n": 1}') + post(b'{"n": 2}') + post(b'{"n": 3}', "connection: close")
        )
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert raw.endswith(b'{"n":3}')


async def test_a_later_requests_head_is_timed_from_its_own_first_byte() -> None:
    second = post(b'{"n": 2}', "connection: close")
    async with guarded(replace(GUARDED, header_timeout_s=1.5, keep_alive_s=10)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(b'{"n": 1}'))
        first = await reader.readuntil(b'{"n":1}')
        # Idle longer than the head bound, then a head that takes a while (within the bound).
        await asyncio.sleep(2.0)
        writer.write(second[:20])
        await asyncio.sleep(0.3)
        writer.write(second[20:])
        async with asyncio.timeout(10):
            rest = await reader.read(-1)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b'{"n":2}')
