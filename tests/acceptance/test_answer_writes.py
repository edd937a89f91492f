"""The router writes a fixed-length answer's head and body in one write (one TCP segment), a
streamed answer's head at once, and answers HEAD and pipelined requests as before. The segments
are counted by the client's kernel (``tcpi_data_segs_in`` of TCP_INFO), on real sockets."""

from __future__ import annotations

import socket
import struct

import orjson

from tests.support import Stack

# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, a __u32 at byte 152 (Linux 4.6 and later).
_DATA_SEGS_IN = 152


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, _DATA_SEGS_IN)[0])


def read_answer(sock: socket.socket, *, head_only: bool = False) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if head_only:
        return head, body
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head, body


def post(path: str, body: dict[str, object]) -> bytes:
    payload = orjson.dumps(body)
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def test_a_stored_turn_is_answered_in_one_segment(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        for n in range(1, 4):  # every answer on a kept-alive connection, not only the first
            sock.sendall(post("/v1/responses", {"input": f"hello {n}", "store": True}))
            head, body = read_answer(sock)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert orjson.loads(body)["status"] == "completed"
            assert data_segments_in(sock) == n


def test_an_error_and_a_probe_are_one_segment_each(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/responses/resp_missing HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 404 ")
        assert orjson.loads(body)["error"]["code"]
        assert data_segments_in(sock) == 1
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert data_segments_in(sock) == 2


def test_head_and_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        # HEAD: a head without its body (none is written): nothing may be held back.
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, rest = read_answer(sock, head_only=True)
        assert head.split(b" ")[1] in (b"200", b"405")
        assert rest == b""
        # Two requests in one send: two whole answers, in order.
        sock.sendall(
            post("/v1/responses", {"input": "first", "store": False})
            + b"GET /v1/responses/resp_missing HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        first, second = data.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"200 ") and b'"completed"' in first
        assert second.startswith(b"404 ")


def test_a_streamed_answer_is_not_held(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(post("/v1/responses", {"input": "stream it", "stream": True}))
        data = b""
        while b"event: response.completed" not in data or not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding: chunked" in data.lower()
        assert b"event: response.created" in data


def test_a_streamed_answer_takes_fewer_segments_than_events(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(post("/v1/responses", {"input": "stream it", "stream": True}))
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        events = data.count(b"event: ")
        segments = data_segments_in(sock)
        # What one loop turn wrote went out in one write: at the least, the events one hub
        # chunk makes together (output_item.added, content_part.added and the first delta; the
        # .done events of the last one). Written one by one, each event and the head would be a
        # segment of its own (events + 1); how many more turns share a write depends on timing.
        assert events >= 8
        assert segments <= events - 3
