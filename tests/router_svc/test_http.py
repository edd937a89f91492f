"""The routes' HTTP helpers: JSON in and out, client ids and keys, query parameters, stream slots,
per-key locks, and the body read as it arrives (refused at the limit, chunked or not)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Scope

from router_svc import app as router_app
from router_svc import errors, http


def request(headers: dict[str, str] | None = None, query: str = "", app: Any = None) -> Request:
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/responses",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "query_string": query.encode(),
    }
    if app is not None:
        scope["app"] = app
    return Request(scope)


# --- JSON out and in ----------------------------------------------------------------------------


def test_json_responses_are_compact_utf8_json() -> None:
    resp = http.JSONResponse({"text": "héllo ✓", "n": [1, None]}, status_code=201)
    assert resp.body == '{"text":"héllo ✓","n":[1,null]}'.encode()
    assert resp.status_code == 201
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["content-length"] == str(len(resp.body))


def test_parse_json_takes_an_object_only() -> None:
    assert http.parse_json(b' {"a": 1} ') == {"a": 1}
    with pytest.raises(errors.InvalidRequest) as info:
        http.parse_json(b'{"a": ')
    assert info.value.status == 400 and "could not parse the JSON body" in info.value.message
    for raw in (b"[]", b"1", b'"s"', b"null"):
        with pytest.raises(errors.InvalidRequest) as info:
            http.parse_json(raw)
        assert info.value.message == "The request body must be a JSON object."


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON ;x=y"],
)
def test_a_json_content_type_is_accepted(content_type: str) -> None:
    http.require_json_content_type(request({"content-type": content_type}))


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/plain", "'text/plain'"),
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        ("multipart/form-data; boundary=x", "'multipart/form-data; boundary=x'"),
        ("application/jsonx", "'application/jsonx'"),
        (None, "missing"),
    ],
)
def test_any_other_content_type_is_a_415(content_type: str | None, shown: str) -> None:
    headers = {"content-type": content_type} if content_type is not None else {}
    with pytest.raises(errors.InvalidRequest) as info:
        http.require_json_content_type(request(headers))
    err = info.value
    assert (err.status, err.code, err.type) == (
        415,
        "unsupported_media_type",
        errors.INVALID_REQUEST,
    )
    assert f"Unsupported Content-Type ({shown})" in err.message


# --- ids and keys from clients ------------------------------------------------------------------


def test_valid_ids_are_short_and_printable() -> None:
    assert http.valid_id("resp_" + "a" * (http.MAX_ID_CHARS - 5))
    assert http.valid_id("ünïcödé-ids are printable")
    assert not http.valid_id("a" * (http.MAX_ID_CHARS + 1))
    for bad in ("resp_\x00", "a\nb", "tab\there", "\x7f", "esc\x1b[0m"):
        assert not http.valid_id(bad), bad


def test_shown_ids_are_cut_and_cleaned() -> None:
    assert http.shown_id("resp_1") == "resp_1"
    assert http.shown_id("a" * 64) == "a" * 64
    assert http.shown_id("a" * 65) == "a" * 64 + "..."
    assert http.shown_id("x\x00y\nz") == "x?y?z"
    assert http.shown_id("\x01" * 100) == "?" * 64 + "..."


def test_the_first_invalid_item_id_is_named() -> None:
    http.check_item_ids([{"id": "msg_1"}, {"type": "message"}, {"id": 7}], "input")
    items = [{"id": "msg_1"}, {"id": "ok"}, {"id": "x" * 300}, {"id": "\x00"}]
    with pytest.raises(errors.InvalidRequest) as info:
        http.check_item_ids(items, "items")
    assert (info.value.param, info.value.code) == ("items[2].id", "invalid_value")
    assert str(http.MAX_ID_CHARS) in info.value.message


def test_an_idempotency_key_is_printable_ascii_of_bounded_length() -> None:
    assert http.idempotency_key(request()) == ""
    assert http.idempotency_key(request({"idempotency-key": "  k-1  "})) == "k-1"
    assert http.idempotency_key(request({"idempotency-key": "k" * 256})) == "k" * 256
    for bad in ("k" * 257, "clé".encode().decode("latin-1"), "a\x7fb"):
        with pytest.raises(errors.InvalidRequest) as info:
            http.idempotency_key(request({"idempotency-key": bad}))
        assert info.value.code == "invalid_idempotency_key"


def test_the_sdk_attempt_comes_from_the_retry_count_header() -> None:
    def attempt(value: str | None) -> int | None:
        headers = {} if value is None else {http.RETRY_COUNT_HEADER: value}
        return http.sdk_attempt(request(headers))

    assert attempt(None) is None
    assert (attempt("0"), attempt(" 2 "), attempt("99999")) == (0, 2, 99999)
    # Anything an SDK does not send counts as a first attempt, never a crash.
    assert (attempt("-1"), attempt("x"), attempt("123456"), attempt("")) == (0, 0, 0, 0)


# --- query parameters ---------------------------------------------------------------------------


def test_query_parameters_are_checked_in_openais_words() -> None:
    assert http.query_int(request(query="after=5"), "after", 0) == 5
    assert http.query_int(request(), "after", 7) == 7
    with pytest.raises(errors.InvalidRequest) as info:
        http.query_int(request(query="after=five"), "after", 0)
    assert (info.value.param, info.value.code) == ("after", "invalid_type")
    # Past int64 it fits no field of the state contract: a 400, not a 500 from protobuf.
    assert http.query_int(request(query=f"after={2**63 - 1}"), "after", 0) == 2**63 - 1
    for huge in (str(2**63), str(-(2**63) - 1), "9" * 400):
        with pytest.raises(errors.InvalidRequest) as info:
            http.query_int(request(query=f"after={huge}"), "after", 0)
        assert (info.value.param, info.value.code) == ("after", "integer_out_of_range")
    assert http.query_limit(request()) == 20
    assert http.query_limit(request(query="limit=100")) == 100
    for bad in ("0", "101", "-3"):
        with pytest.raises(errors.InvalidRequest) as info:
            http.query_limit(request(query=f"limit={bad}"))
        assert (info.value.param, info.value.code) == ("limit", "integer_out_of_range")
    assert http.query_order(request()) == "desc"
    assert http.query_order(request(query="order=asc"), "desc") == "asc"
    with pytest.raises(errors.InvalidRequest) as info:
        http.query_order(request(query="order=ASC"))
    assert (info.value.param, info.value.code) == ("order", "invalid_value")


def test_a_list_page_names_its_first_and_last_ids() -> None:
    assert http.list_page([], False) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    page = http.list_page([{"id": "a"}, {"id": "b"}, {"id": "c"}], True)
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("a", "c", True)


# --- stream slots, releasing, per-key locks -----------------------------------------------------


def test_stream_slots_cap_each_tenant_and_the_router() -> None:
    slots = http.StreamSlots(total=3, per_tenant=2)
    slots.take("a")
    slots.take("a")
    with pytest.raises(errors.RateLimited) as info:
        slots.take("a")
    assert (info.value.status, info.value.code) == (429, "rate_limit_exceeded")
    slots.take("b")
    with pytest.raises(errors.ApiError) as full:
        slots.take("c")
    assert (full.value.status, full.value.code) == (503, "server_overloaded")
    assert full.value.headers == {"x-should-retry": "true"}
    assert (slots.open, slots.by_tenant) == (3, {"a": 2, "b": 1})
    slots.give("b")
    slots.give("a")
    assert (slots.open, slots.by_tenant) == (1, {"a": 1})
    slots.take("c")
    slots.give("c")
    slots.give("a")
    assert (slots.open, slots.by_tenant) == (0, {})


def test_zero_means_no_cap() -> None:
    slots = http.StreamSlots(total=0, per_tenant=0)
    for _ in range(1000):
        slots.take("a")
    assert slots.open == 1000


async def test_releasing_releases_however_the_sending_ends() -> None:
    released: list[str] = []
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    ok = http.Releasing(Response(b"hi", status_code=202), lambda: released.append("ok"))
    assert ok.status_code == 202
    await ok(scope, receive, send)
    assert released == ["ok"] and sent[-1]["body"] == b"hi"

    async def gone(message: Message) -> None:
        raise OSError("client went away")

    failing = http.Releasing(Response(b"hi"), lambda: released.append("failed"))
    with pytest.raises(OSError):
        await failing(scope, receive, gone)
    assert released == ["ok", "failed"]


async def test_keyed_locks_serialize_one_key_and_forget_it_after() -> None:
    locks = http.KeyedLocks()
    order: list[str] = []

    async def hold(key: str, name: str, pause: float) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(pause)
            order.append(f"{name}-")

    await asyncio.gather(hold("k", "a", 0.05), hold("k", "b", 0), hold("other", "c", 0))
    # b waited for a; c, on another key, did not.
    assert order.index("a-") < order.index("b+")
    assert order.index("c+") < order.index("a-")
    assert locks._locks == {}

    with pytest.raises(RuntimeError):
        async with locks.hold("k"):
            raise RuntimeError("a failing holder")
    assert locks._locks == {}


# --- the body, read as it arrives ---------------------------------------------------------------

LIMIT = 1000


def body_app() -> Starlette:
    """A Starlette app with one route reading its body with read_json, and the router's error
    handler."""

    async def echo(request: Request) -> Response:
        body = await http.read_json(request)
        again = await request.body()  # read_body keeps what it read
        return http.JSONResponse({"body": body, "same": again == orjson.dumps(body)})

    app = Starlette(
        routes=[Route("/echo", echo, methods=["POST"])],
        exception_handlers={errors.ApiError: router_app.api_error},
    )
    app.state.services = SimpleNamespace(settings=SimpleNamespace(max_body_bytes=LIMIT))
    return app


async def post(content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=body_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await c.post(
            "/echo",
            content=content,
            headers={"content-type": "application/json", **(headers or {})},
        )


async def test_a_body_of_the_limit_is_read_whole_and_kept_and_one_byte_more_is_not() -> None:
    raw = orjson.dumps({"text": "x" * (LIMIT - 11)})
    assert len(raw) == LIMIT
    resp = await post(raw)
    assert resp.status_code == 200
    assert resp.json() == {"body": {"text": "x" * (LIMIT - 11)}, "same": True}

    async def halves() -> AsyncIterator[bytes]:
        yield raw[:500]
        yield raw[500:]

    assert (await post(halves())).status_code == 200

    async def one_byte_over() -> AsyncIterator[bytes]:
        yield raw[:500]
        yield raw[500:] + b" "

    assert (await post(one_byte_over())).status_code == 413
    assert (await post(raw + b" ")).status_code == 413


async def test_a_chunked_body_is_joined() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"a"', b": ", b"[1, 2", b"]}"):
            yield piece

    resp = await post(pieces())
    assert resp.status_code == 200 and resp.json()["body"] == {"a": [1, 2]}


async def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    # Called directly: a receive that fails if called shows nothing of the body was read.
    async def receive() -> Message:
        raise AssertionError("the body was read")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/echo",
        "raw_path": b"/echo",
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(LIMIT + 1).encode()),
        ],
    }
    await body_app()(scope, receive, send)
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]
    error = orjson.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]


async def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives() -> None:
    pulled: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        for n in range(1000):
            pulled.append(n)
            yield b" " * 300

    resp = await post(endless())
    assert resp.status_code == 413
    assert resp.headers["connection"] == "close"
    assert resp.json()["error"]["code"] == "request_too_large"
    # Refused at the chunk that went over (the fourth of 300 bytes), not at the end.
    assert len(pulled) < 10


async def test_a_body_the_client_gave_up_on_is_an_incomplete_body() -> None:
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"a": ', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        pass

    req = Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/echo",
            "headers": [(b"content-type", b"application/json")],
            "app": body_app(),
        },
        receive,
    )
    with pytest.raises(errors.InvalidRequest) as info:
        await http.read_body(req)
    assert info.value.code == "incomplete_body"


async def test_the_content_type_is_checked_before_the_body_is_read() -> None:
    resp = await post(b'{"a": 1}', headers={"content-type": "text/plain"})
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == "unsupported_media_type"


def test_services_and_tenant_come_from_the_app_state() -> None:
    class Auth:
        def tenant(self, authorization: str | None) -> str:
            return f"tenant-of:{authorization}"

    app = Starlette()
    app.state.services = SimpleNamespace(auth=Auth())
    app.state.stream_slots = slots = http.StreamSlots(1, 1)
    app.state.conversation_locks = locks = http.KeyedLocks()
    req = request({"authorization": "Bearer k"}, app=app)
    assert http.services(req) is app.state.services
    assert http.tenant(req) == "tenant-of:Bearer k"
    assert http.stream_slots(req) is slots
    assert http.conversation_locks(req) is locks
