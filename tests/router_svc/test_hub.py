"""The router's hub client: what it sends, what it makes of each answer, and its four time bounds.

Against the fake hub where a well-behaved model server will do, and against a small aiohttp
server of this module's own that misbehaves on purpose (refuses, stalls, breaks off, answers
nonsense)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from gateway.logs import request_id_var
from router_svc import errors
from router_svc import hub as hubmod
from router_svc.hub import HubClient
from tests.fakehub import FakeHub, Reply

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handler: Handler, client_max_size: int = 1 << 20) -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 answering every request with ``handler``; yields its base
    URL (with ``/v1``)."""
    app = web.Application(client_max_size=client_max_size)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(base_url: str, **options: Any) -> AsyncIterator[HubClient]:
    c = HubClient(base_url, **options)
    try:
        yield c
    finally:
        await c.close()


def answering(status: int, body: bytes, content_type: str = "application/json") -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=status, body=body, content_type=content_type)

    return handle


def sse(*frames: bytes, pause_s: float = 0.0, then_sleep_s: float = 0.0) -> Handler:
    """A handler streaming ``frames`` as they are (each its own write), ``pause_s`` apart, then
    sleeping ``then_sleep_s`` before it ends the stream."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
            if pause_s:
                await asyncio.sleep(pause_s)
        if then_sleep_s:
            await asyncio.sleep(then_sleep_s)
        await resp.write_eof()
        return resp

    return handle


async def collect(c: HubClient, path: str = "/chat/completions") -> list[dict[str, Any]]:
    return [event async for event in c.stream(path, {"stream": True})]


def free_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- what is sent -------------------------------------------------------------------------------


async def test_a_post_sends_json_with_the_key_the_request_id_and_no_session_unless_asked(
    hub: FakeHub,
) -> None:
    token = request_id_var.set("req_test_1")
    session = hubmod.session_var.set("rg-abc")
    try:
        async with client(hub.url, api_key="sk-hub") as c:
            answer = await c.post("/chat/completions", {"model": "m", "messages": []})
    finally:
        hubmod.session_var.reset(session)
        request_id_var.reset(token)
    assert answer["object"] == "chat.completion"
    sent = hub.headers[-1]
    assert sent["content-type"] == "application/json"
    assert sent["authorization"] == "Bearer sk-hub"
    assert sent["x-request-id"] == "req_test_1"
    # A session key is set, but no session header is configured: nothing is sent.
    assert "rg-abc" not in sent.values()
    assert hub.requests[-1] == {"model": "m", "messages": []}


async def test_the_session_key_goes_in_the_configured_header(hub: FakeHub) -> None:
    token = hubmod.session_var.set("rg-0123")
    try:
        async with client(hub.url, session_header="X-Session-Affinity") as c:
            await c.post("/chat/completions", {"model": "m", "messages": []})
            hubmod.session_var.set("")
            await c.post("/chat/completions", {"model": "m", "messages": []})
    finally:
        hubmod.session_var.reset(token)
    assert hub.headers[0]["x-session-affinity"] == "rg-0123"
    assert "x-session-affinity" not in hub.headers[1]
    # Without a key or request id, no authorization and no request id either.
    assert "authorization" not in hub.headers[0]
    assert "x-request-id" not in hub.headers[0]


async def test_a_get_sends_no_content_type_and_returns_the_object(hub: FakeHub) -> None:
    async with client(hub.url + "/") as c:  # a trailing slash is dropped
        models = await c.get_json("/models")
    assert [m["id"] for m in models["data"]] == ["fake-model", "org/other-model"]
    assert hub.paths[-1] == "/v1/models"
    assert "content-type" not in hub.headers[-1]


async def test_forwarded_bodies_pass_through_unchanged(hub: FakeHub) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],  "stream":false}'
    raw_stream = raw.replace(b"false", b"true")
    async with client(hub.url) as c:
        answer = await c.forward("/chat/completions", raw)
        hub.enqueue(Reply(text="a b"))
        streamed = b"".join(
            [chunk async for chunk in c.forward_stream("/chat/completions", raw_stream)]
        )
    assert orjson.loads(answer)["choices"][0]["message"]["content"] == "echo: hi"
    assert streamed.startswith(b"data: {") and streamed.endswith(b"data: [DONE]\n\n")


def test_the_root_is_the_base_url_without_v1() -> None:
    assert HubClient("http://h:8000/v1").root == "http://h:8000"
    assert HubClient("http://h:8000/v1/").root == "http://h:8000"
    assert HubClient("http://h:8000/api").root == "http://h:8000/api"


async def test_post_raw_returns_any_status_unraised(hub: FakeHub) -> None:
    hub.tokenizer = False
    async with client(hub.url) as c:
        status, raw = await c.post_raw("/tokenize", {"messages": []}, root=True)
        assert (status, orjson.loads(raw)) == (404, {"detail": "Not Found"})
        hub.tokenizer = True
        status, raw = await c.post_raw("/tokenize", {"messages": []}, root=True)
    assert status == 200 and "count" in orjson.loads(raw)
    assert hub.paths[-1] == "/tokenize"


async def test_a_closed_client_opens_a_new_session(hub: FakeHub) -> None:
    c = HubClient(hub.url)
    await c.get_json("/models")
    await c.close()
    await c.close()  # twice is harmless
    assert (await c.get_json("/models"))["object"] == "list"
    await c.close()


# --- failures: each an ApiError with a code -----------------------------------------------------


async def test_a_refused_connection_is_a_502_unreachable() -> None:
    async with client(f"http://127.0.0.1:{free_port()}/v1") as c:
        with pytest.raises(errors.UpstreamError) as info:
            await c.post("/chat/completions", {})
        with pytest.raises(errors.UpstreamError) as raw_info:
            await c.post_raw("/tokenize", {}, root=True)
    assert (info.value.status, info.value.code) == (502, "upstream_unreachable")
    assert "could not be reached" in info.value.message
    assert raw_info.value.code == "upstream_unreachable"


@pytest.mark.parametrize(
    ("status", "body", "kind", "shown", "code"),
    [
        (
            500,
            b'{"error": {"message": "engine died"}}',
            errors.UpstreamError,
            502,
            "upstream_error",
        ),
        (503, b"<html>busy</html>", errors.UpstreamError, 502, "upstream_error"),
        (504, b'{"detail": "gateway timeout"}', errors.UpstreamError, 504, "upstream_timeout"),
        (408, b"{}", errors.UpstreamError, 504, "upstream_timeout"),
        (429, b'{"error": "slow down"}', errors.RateLimited, 429, "upstream_rate_limited"),
        (404, b'{"detail": "Not Found"}', errors.UpstreamError, 502, "upstream_rejected"),
        (
            400,
            b'{"error": {"message": "bad tool"}}',
            errors.UpstreamError,
            502,
            "upstream_rejected",
        ),
    ],
)
async def test_a_failed_status_maps_to_a_code(
    status: int, body: bytes, kind: type[errors.ApiError], shown: int, code: str
) -> None:
    async with serving(answering(status, body)) as url, client(url) as c:
        with pytest.raises(kind) as info:
            await c.post("/chat/completions", {})
    assert (info.value.status, info.value.code) == (shown, code)
    assert f"({status})" in info.value.message


async def test_the_hubs_message_is_quoted_from_json_or_text() -> None:
    async with serving(answering(500, b'{"error": {"message": "engine died"}}')) as url:
        async with client(url) as c:
            with pytest.raises(errors.UpstreamError) as info:
                await c.post("/chat/completions", {})
    assert info.value.message.endswith("engine died")
    assert hubmod.status_error(502, b"x" * 2000).message.endswith("x" * 500)
    assert "x" * 501 not in hubmod.status_error(502, b"x" * 2000).message
    assert hubmod.status_error(400, b'{"detail": "no such model"}').message.endswith(
        "no such model"
    )


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 4096 tokens",
        "Input is longer than the context_length",
        "Too many tokens in the prompt",
        # llama.cpp's server (type exceed_context_size_error), and vLLM's engine check.
        "the request exceeds the available context size, try increasing it",
        "request (5000 tokens) exceeds the available context size (4096 tokens)",
        "The decoder prompt (length 5000) is longer than the maximum model length of 4096.",
    ],
)
async def test_a_context_length_400_is_the_clients_400(message: str) -> None:
    body = orjson.dumps({"error": {"message": message, "type": "BadRequestError"}})
    async with serving(answering(400, body)) as url, client(url) as c:
        with pytest.raises(errors.InvalidRequest) as info:
            await c.post("/chat/completions", {})
    err = info.value
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "input")
    assert message in err.message
    # The same words in a 500 are the hub's failure, not the client's.
    assert hubmod.status_error(500, body).code == "upstream_error"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"choices": [', "malformed JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"", "malformed"),
        # Long answers, whose long strings are parsed apart (stored_json): the same errors.
        (b'{"choices": ["' + b"x" * 70_000, "malformed JSON"),
        (b'{"a": "' + b"x" * 70_000 + b'\\q"}', "malformed JSON"),
        (b'{"a": "' + b"x" * 70_000 + b'"', "malformed JSON"),
        (b'["' + b"x" * 70_000 + b'"]', "not a JSON object"),
    ],
)
async def test_a_malformed_answer_is_a_502(raw: bytes, says: str) -> None:
    async with serving(answering(200, raw)) as url, client(url) as c:
        with pytest.raises(errors.UpstreamError) as info:
            await c.post("/chat/completions", {})
        with pytest.raises(errors.UpstreamError) as get_info:
            await c.get_json("/models")
    assert (info.value.status, info.value.code) == (502, "upstream_malformed_response")
    assert says in info.value.message
    assert get_info.value.code == "upstream_malformed_response"


async def test_a_long_answer_is_parsed_to_the_same_value() -> None:
    # Escapes, non-ASCII text, escaped surrogate pairs: what orjson would parse.
    text = 'é "q" \\ \n 😀 /' * 20_000
    for raw in (
        orjson.dumps({"choices": [{"message": {"content": text}}], "n": 1}),
        json.dumps({"choices": [{"message": {"content": text}}], "n": 1}).encode(),
    ):
        async with serving(answering(200, raw)) as url, client(url) as c:
            assert await c.post("/chat/completions", {}) == orjson.loads(raw)


async def test_a_body_over_a_mebibyte_is_sent_whole_without_a_warning() -> None:
    # A long history makes a request body of megabytes: aiohttp warns (ResourceWarning) about
    # raw bytes that large, which a process run with warnings as errors (as these tests are)
    # turned into a failed turn. The hub gets the same body, its JSON content type and length.
    got: list[tuple[bytes, str, int | None]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        got.append((await request.read(), request.content_type, request.content_length))
        return web.json_response({"ok": True})

    body = {"messages": [{"role": "user", "content": "é" * (1 << 20)}]}
    async with serving(handle, client_max_size=8 << 20) as url, client(url) as c:
        assert await c.post("/chat/completions", body) == {"ok": True}
        async for _ in c.stream("/chat/completions", body):
            pass
    sent = orjson.dumps(body)
    assert got == [(sent, "application/json", len(sent))] * 2


async def test_a_cookie_the_hub_set_is_never_sent_back() -> None:
    # One session calls the hub for every tenant: what one answer set goes out with no other.
    cookies: list[str | None] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        cookies.append(request.headers.get("Cookie"))
        response = web.json_response({"ok": True})
        response.set_cookie("session", "tenant-a")
        return response

    # By name: aiohttp's default jar keeps no cookie of an IP address's.
    async with serving(handle) as url, client(url.replace("127.0.0.1", "localhost")) as c:
        for _ in range(3):
            assert await c.post("/chat/completions", {}) == {"ok": True}
    assert cookies == [None, None, None]


async def test_a_long_stream_hands_back_what_it_freed_as_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Once per GIVE_BACK_EVERY bytes of the hub's stream, not per event, and not for a short one.
    calls: list[int] = []
    monkeypatch.setattr(hubmod.gctune, "give_back_now", lambda: calls.append(1))
    event = b'data: {"choices": [{"delta": {"content": "abcd"}}]}\n\n'
    many = event * (3 * hubmod.GIVE_BACK_EVERY // len(event) + 10)
    async with serving(sse(many, b"data: [DONE]\n\n")) as url, client(url) as c:
        got = await collect(c)
        assert len(got) == many.count(b"data:")
        assert len(calls) == 3
        calls.clear()
        async with serving(sse(event * 100, b"data: [DONE]\n\n")) as short, client(short) as d:
            assert len(await collect(d)) == 100
        assert calls == []


def test_malformed_is_a_502_with_the_message() -> None:
    err = hubmod.malformed("no choices")
    assert (err.status, err.code, err.message) == (502, "upstream_malformed_response", "no choices")


async def test_failures_are_counted_by_code() -> None:
    def count() -> float:
        value = REGISTRY.get_sample_value(
            "respgw_router_hub_errors_total", {"code": "upstream_rejected"}
        )
        return value or 0.0

    before = count()
    async with serving(answering(422, b"{}")) as url, client(url) as c:
        with pytest.raises(errors.UpstreamError):
            await c.post("/chat/completions", {})
    assert count() == before + 1


# --- the event stream ---------------------------------------------------------------------------


async def test_stream_events_are_parsed_across_the_edge_cases() -> None:
    frames = (
        b": a comment, then a keep-alive\n\n",
        b'event: chunk\r\ndata: {"n": 1}\r\n\r\n',  # CRLF line ends, an event: line
        b'data:{"n": 2}\n\n',  # no space after the colon
        b'data: {"n":\ndata: 3}\n\n',  # one event over two data lines, joined by a newline
        b"\n\n",  # blank lines between events
        b'data: {"n": 4, ',  # one event split over two writes
        b'"error": null, "choices": [1]}\n\n',  # an error key with choices is a normal chunk
        b"data: [DONE]\n\n",
        b'data: {"n": 5}\n\n',  # after [DONE]: never read
    )
    async with serving(sse(*frames)) as url, client(url) as c:
        events = await collect(c)
    assert [e["n"] for e in events] == [1, 2, 3, 4]


def test_events_are_the_same_wherever_the_blocks_are_cut() -> None:
    # The stream is read a block at a time (whatever arrived): a line, a CRLF or an event may
    # be cut anywhere, and a block may hold many events.
    stream = (
        b": comment\r\n\r\n"
        b'event: x\r\ndata: {"n": 1}\r\n\r\n'
        b'data:{"n":\ndata:  2}\n\n'
        b"\n\r\n"
        b"id: 7\ndata:\r\r\ndata: tail\n\n"
        b'data: {"n": 3}'
    )
    expected = [b'{"n": 1}', b'{"n":\n2}', b"\ntail"]

    def read(blocks: list[bytes]) -> tuple[list[bytes], bytes | None]:
        parser = hubmod.SseEvents()
        got = [payload for block in blocks for payload in parser.feed(block)]
        return got, parser.end()

    assert read([stream]) == (expected, b'{"n": 3}')
    assert read([stream[i : i + 1] for i in range(len(stream))]) == (expected, b'{"n": 3}')
    for cut in range(len(stream) + 1):
        for second in range(cut, len(stream) + 1, 7):
            blocks = [stream[:cut], stream[cut:second], stream[second:]]
            assert read([b for b in blocks if b]) == (expected, b'{"n": 3}')
    # A stream that ends on its empty line leaves nothing; one that ends on a bare CR ends
    # its event there.
    assert read([b"data: a\n\n"]) == ([b"a"], None)
    assert read([b"data: a\n\r"]) == ([], b"a")


async def test_a_stream_without_done_ends_with_its_last_event() -> None:
    # The last event has no blank line after it, and the stream ends without [DONE].
    async with serving(sse(b'data: {"n": 1}\n\n', b'data: {"n": 2}')) as url, client(url) as c:
        assert [e["n"] for e in await collect(c)] == [1, 2]
    async with serving(sse(b'data: {"n": 1}\n\ndata: [DONE]')) as url, client(url) as c:
        assert [e["n"] for e in await collect(c)] == [1]


@pytest.mark.parametrize(
    ("frame", "code", "says"),
    [
        (b"data: {not json\n\n", "upstream_malformed_response", "malformed stream event"),
        (b"data: [1]\n\n", "upstream_malformed_response", "not a JSON object"),
        (b'data: {"error": {"message": "oom"}}\n\n', "upstream_error", "oom"),
        (b'data: {"error": "plain words"}\n\n', "upstream_error", "plain words"),
        (b'data: {"error": {}}\n\n', "upstream_error", "reported an error mid-stream"),
    ],
)
async def test_a_bad_event_ends_the_stream_with_a_502(frame: bytes, code: str, says: str) -> None:
    got: list[dict[str, Any]] = []
    async with serving(sse(b'data: {"n": 1}\n\n', frame)) as url, client(url) as c:
        with pytest.raises(errors.UpstreamError) as info:
            async for event in c.stream("/chat/completions", {}):
                got.append(event)
    assert got == [{"n": 1}]
    assert (info.value.status, info.value.code) == (502, code)
    assert says in info.value.message


async def test_a_stream_that_breaks_off_is_a_502() -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # as a crashing server: no end of the chunked body
        return resp

    got: list[dict[str, Any]] = []
    async with serving(handle) as url, client(url) as c:
        with pytest.raises(errors.UpstreamError) as info:
            async for event in c.stream("/chat/completions", {}):
                got.append(event)
    assert got == [{"n": 1}]
    assert (info.value.status, info.value.code) == (502, "upstream_stream_broken")


async def test_a_failed_status_on_a_stream_is_raised_before_any_event() -> None:
    async with serving(answering(503, b'{"error": {"message": "loading"}}')) as url:
        async with client(url) as c:
            with pytest.raises(errors.UpstreamError) as info:
                await collect(c)
            with pytest.raises(errors.UpstreamError) as fwd:
                _ = [chunk async for chunk in c.forward_stream("/chat/completions", b"{}")]
    assert info.value.code == fwd.value.code == "upstream_error"
    assert "loading" in info.value.message


# --- the four time bounds -----------------------------------------------------------------------


async def test_the_connect_bound_is_its_own() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    with closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.2)
        try:
            start = time.monotonic()
            async with client(
                f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.5, first_byte_timeout_s=60
            ) as c:
                with pytest.raises(errors.UpstreamError) as info:
                    await c.post("/chat/completions", {})
            elapsed = time.monotonic() - start
        finally:
            for s in fillers:
                s.close()
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert elapsed < 30  # the connect bound, not the first-byte one


async def test_the_first_byte_bound_is_a_504_saying_so() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(body=b"{}")

    async with serving(slow) as url, client(url, first_byte_timeout_s=0.3) as c:
        with pytest.raises(errors.UpstreamError) as info:
            await c.post("/chat/completions", {})
        with pytest.raises(errors.UpstreamError) as raw_info:
            await c.post_raw("/tokenize", {}, root=True)
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert "did not start answering in time" in info.value.message
    assert (raw_info.value.status, raw_info.value.code) == (504, "upstream_timeout")


async def test_the_idle_bound_cuts_a_quiet_answer() -> None:
    quiet_stream = sse(b'data: {"n": 1}\n\n', then_sleep_s=5)

    async def quiet_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"half": ')
        await asyncio.sleep(5)
        return resp

    got: list[dict[str, Any]] = []
    async with serving(quiet_stream) as url, client(url, idle_timeout_s=0.3) as c:
        with pytest.raises(errors.UpstreamError) as info:
            async for event in c.stream("/chat/completions", {}):
                got.append(event)
    assert got == [{"n": 1}]
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert "sent nothing for 0.3 s" in info.value.message
    async with serving(quiet_body) as url, client(url, idle_timeout_s=0.3) as c:
        with pytest.raises(errors.UpstreamError) as body_info:
            await c.post("/chat/completions", {})
    assert body_info.value.code == "upstream_timeout"
    assert "sent nothing" in body_info.value.message


async def test_a_stream_that_keeps_sending_outlives_the_first_byte_and_idle_bounds() -> None:
    frames = [b'data: {"n": %d}\n\n' % n for n in range(6)]
    handler = sse(*frames, pause_s=0.25)
    async with serving(handler) as url:
        async with client(url, first_byte_timeout_s=0.8, idle_timeout_s=3) as c:
            events = await collect(c)
    # 1.5 s in all: past the first-byte bound, which no longer applies once the answer started.
    assert [e["n"] for e in events] == list(range(6))


async def test_the_total_bound_cuts_a_live_stream() -> None:
    frames = [b'data: {"n": %d}\n\n' % n for n in range(100)]
    got: list[dict[str, Any]] = []
    async with serving(sse(*frames, pause_s=0.1)) as url:
        async with client(url, timeout_s=0.8, idle_timeout_s=5) as c:
            with pytest.raises(errors.UpstreamError) as info:
                async for event in c.stream("/chat/completions", {}):
                    got.append(event)
    assert 0 < len(got) < 100
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert "did not finish in time" in info.value.message


async def test_zero_means_no_bound() -> None:
    c = HubClient("http://h/v1", timeout_s=0, connect_timeout_s=0, idle_timeout_s=0)
    assert c._timeout.total is None and c._timeout.sock_connect is None
    assert c._idle_deadline() is None
    await c.close()


async def test_a_long_event_is_read_whole() -> None:
    # A Responses hub's response.completed carries the whole answer on one data line.
    big = b"data: " + orjson.dumps({"n": "x" * 300_000}) + b"\n\n"
    async with serving(sse(big, b"data: [DONE]\n\n")) as url, client(url) as c:
        events = await collect(c)
    assert len(events) == 1 and len(events[0]["n"]) == 300_000


async def test_a_forwarded_stream_that_breaks_off_is_a_502() -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    got: list[bytes] = []
    async with serving(handle) as url, client(url) as c:
        with pytest.raises(errors.UpstreamError) as info:
            async for chunk in c.forward_stream("/chat/completions", b"{}"):
                got.append(chunk)
    assert b"".join(got) == b'data: {"n": 1}\n\n'
    assert info.value.code == "upstream_stream_broken"


async def test_the_idle_bound_cuts_a_quiet_pass_through_answer() -> None:
    async def quiet_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"half": ')
        await asyncio.sleep(5)
        return resp

    got: list[bytes] = []
    quiet_stream = sse(b'data: {"n": 1}\n\n', then_sleep_s=5)
    async with serving(quiet_stream) as url, client(url, idle_timeout_s=0.3) as c:
        with pytest.raises(errors.UpstreamError) as info:
            async for chunk in c.forward_stream("/chat/completions", b"{}"):
                got.append(chunk)
    assert got == [b'data: {"n": 1}\n\n']
    assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    assert "sent nothing for 0.3 s" in info.value.message
    async with serving(quiet_body) as url, client(url, idle_timeout_s=0.3) as c:
        with pytest.raises(errors.UpstreamError) as body_info:
            await c.forward("/chat/completions", b"{}")
        with pytest.raises(errors.UpstreamError) as get_info:
            await c.get_json("/models")
    assert body_info.value.code == get_info.value.code == "upstream_timeout"
