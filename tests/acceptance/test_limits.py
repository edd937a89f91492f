"""Limits before any work (issue 13): header size and count, the body's size while it is read,
timeouts for idle, slow-header and slow-body connections, caps on connections and streams, each
answered in OpenAI's error shape. Raw sockets against the router as ``respgw router`` serves it
(the guarded protocol), every wait bounded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.fakehub import FakeHub, Reply
from tests.support import Stack

LIMITS = {
    "default_model": "fake-model",
    "max_header_bytes": 8 * 1024,
    "max_headers": 20,
    "header_timeout_s": 0.5,
    "body_timeout_s": 0.5,
    "max_body_bytes": 256 * 1024,
    "max_connections": 8,
    "max_streams": 2,
    "max_streams_per_tenant": 1,
    "api_keys": "key-a=tenant-a,key-b=tenant-b,key-c=tenant-c,key-d=tenant-d",
}


# The in-process Stack serves the router as `respgw router` does (the guarded protocol).
GuardedStack = Stack


@pytest.fixture(scope="module")
def guarded(_hub_server: FakeHub) -> Iterator[GuardedStack]:
    s = GuardedStack(_hub_server.url, router=LIMITS)
    s.start()
    yield s
    s.stop()


def connect(stack: Stack) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    sock.settimeout(5)
    return sock


def read_answer(sock: socket.socket, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Reads one answer (with a Content-Length) and checks that the connection is then closed."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, headers, body[:length]


def closed(sock: socket.socket, timeout: float = 5) -> bool:
    """True once the peer has closed the connection (reads give EOF or a reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def openai_error(body: bytes) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


HEAD = b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n"


def test_an_unfinished_header_over_the_limit_is_a_431(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEAD + b"X-Big: ")
        try:
            for _ in range(4):
                sock.sendall(b"a" * 4096)  # never finished: no CRLF
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while still sending
        status, headers, body = read_answer(sock)
        assert status == 431
        assert openai_error(body)["code"] == "request_header_fields_too_large"
        assert headers["connection"] == "close"
        assert closed(sock)


def test_too_many_headers_is_a_431(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        try:
            sock.sendall(HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(30)) + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_answer(sock)
        assert status == 431
        assert "header fields" in openai_error(body)["message"]


def test_a_url_over_the_limit_is_a_414(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /v1/responses/" + b"r" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_answer(sock)
        assert status == 414
        assert openai_error(body)["code"] == "uri_too_long"


def test_slow_headers_are_a_408(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        start = time.monotonic()
        sock.sendall(HEAD)  # never ends the headers
        status, _, body = read_answer(sock)
        assert status == 408
        assert openai_error(body)["code"] == "request_timeout"
        assert time.monotonic() - start < 3
        assert closed(sock)


def test_a_connection_that_sends_nothing_is_closed(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        start = time.monotonic()
        assert closed(sock, timeout=5)
        assert time.monotonic() - start < 3


def test_an_idle_keep_alive_connection_is_closed(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = read_answer(sock)
        assert status == 200
        # uvicorn's keep-alive timeout (--keep-alive-s, 5 s by default) closes it.
        assert closed(sock, timeout=10)


def test_a_slow_body_is_a_408(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEAD + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        status, _, body = read_answer(sock)
        assert status == 408
        assert openai_error(body)["code"] == "request_timeout"
        assert closed(sock)


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(
    guarded: GuardedStack, hub: FakeHub
) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEAD + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        sent = 0
        try:
            for _ in range(64):  # 4 MiB offered, 256 KiB allowed
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = read_answer(sock)
        assert status == 413
        error = openai_error(body)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "request_too_large"
        assert headers["connection"] == "close"
    assert hub.chat_requests() == []


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    guarded: GuardedStack,
) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEAD + b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
        status, _, body = read_answer(sock)
        assert status == 413
        assert openai_error(body)["type"] == "invalid_request_error"


def test_a_request_that_does_not_parse_is_an_openai_400(guarded: GuardedStack) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
        status, headers, body = read_answer(sock)
        assert status == 400
        assert headers["content-type"] == "application/json"
        openai_error(body)


def test_connections_over_the_cap_are_a_503(guarded: GuardedStack) -> None:
    held = [connect(guarded) for _ in range(LIMITS["max_connections"])]
    try:
        time.sleep(0.1)
        with connect(guarded) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_answer(sock)
            assert status == 503
            assert openai_error(body)["code"] == "server_overloaded"
            assert headers["x-should-retry"] == "true"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with httpx.Client(timeout=5) as http:
        assert http.get(f"http://127.0.0.1:{guarded.port}/healthz").status_code == 200


def _stream(stack: Stack, key: str, results: list[int]) -> None:
    with httpx.Client(timeout=10) as http:
        r = http.post(
            f"{stack.url}/responses",
            json={"model": "m", "input": "x", "stream": True},
            headers={"authorization": f"Bearer {key}"},
        )
        results.append(r.status_code)


def test_streams_are_capped_per_tenant_and_in_all(guarded: GuardedStack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="slow one", delay_s=1.0), Reply(text="slow two", delay_s=1.0))
    results: list[int] = []
    threads = [
        threading.Thread(target=_stream, args=(guarded, key, results)) for key in ("key-a", "key-b")
    ]
    for t in threads:
        t.start()
    time.sleep(0.4)  # both streams are open, waiting for the hub
    with httpx.Client(timeout=10) as http:
        url = f"{guarded.url}/responses"
        body = {"model": "m", "input": "x", "stream": True}
        again = http.post(url, json=body, headers={"authorization": "Bearer key-a"})
        assert again.status_code == 429
        assert openai_error(again.content)["type"] == "rate_limit_error"
        third = http.post(url, json=body, headers={"authorization": "Bearer key-c"})
        assert third.status_code == 503
        assert openai_error(third.content)["code"] == "server_overloaded"
    for t in threads:
        t.join(10)
    assert results == [200, 200]
    with httpx.Client(timeout=10) as http:
        ok = http.post(
            f"{guarded.url}/responses",
            json={"model": "m", "input": "x", "stream": True},
            headers={"authorization": "Bearer key-c"},
        )
        assert ok.status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_stream_at_once(
    guarded: GuardedStack, hub: FakeHub
) -> None:
    # key-d has one stream at most; its first stream's hub answers for about 3 s more.
    hub.enqueue(Reply(text=" ".join(f"w{i}" for i in range(30)), chunk_delay_s=0.1))
    hub.enqueue(Reply(text="second"))
    url = f"{guarded.url}/responses"
    body = {"model": "m", "input": "x", "stream": True}
    auth = {"authorization": "Bearer key-d"}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", url, json=body, headers=auth) as first:
            assert first.status_code == 200
            for line in first.iter_lines():
                if line.startswith("event: response.output_text.delta"):
                    break  # the stream runs; the client leaves
        left = time.monotonic()
        while True:
            again = http.post(url, json=body, headers=auth)
            if again.status_code == 200:
                break
            assert again.status_code == 429
            assert time.monotonic() - left < 1.5, "the stream was held after its client left"
            time.sleep(0.05)
        assert "event: response.completed" in again.text


@pytest.mark.parametrize("rid", [b"has\ttab", "caf\u00e9".encode("latin-1"), b"x" * 200])
def test_a_request_id_that_cannot_travel_is_replaced(guarded: GuardedStack, rid: bytes) -> None:
    with connect(guarded) as sock:
        body = b'{"model": "m", "input": "x"}'
        sock.sendall(
            HEAD
            + b"Content-Type: application/json\r\nX-Request-Id: "
            + rid
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        status, headers, _ = read_answer(sock, timeout=10)
        assert status == 200
        assert headers["x-request-id"].startswith("req_")


def test_a_good_request_id_is_kept(guarded: GuardedStack) -> None:
    with httpx.Client(timeout=10) as http:
        r = http.post(
            f"{guarded.url}/responses",
            json={"model": "m", "input": "x"},
            headers={"authorization": "Bearer key-a", "x-request-id": "my-id 42"},
        )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-id 42"
