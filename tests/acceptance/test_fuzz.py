"""Every client input is a 4xx with OpenAI's error body, on every route and backend (issue 13,
item 4): hypothesis fuzzes bodies, ids, headers and query strings against the in-process gateway
on the memory, SQLite and PostgreSQL state backends, and fails on any 5xx, any error not in
OpenAI's shape, or a hang. The budget is fixed and the examples derandomized, so CI runs the
same cases every time."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state_svc.config import StateSettings
from tests.acceptance.test_limits import GuardedStack
from tests.fakehub import FakeHub
from tests.support import POSTGRES_DSN, Stack

FUZZ = settings(
    max_examples=150,
    deadline=None,  # each example is an HTTP call; the client's timeout catches a hang
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

BACKENDS = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="module", params=BACKENDS)
def gateway(
    request: pytest.FixtureRequest, _hub_server: FakeHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    backend: str = request.param
    schema = "fuzz_" + secrets.token_hex(6)
    state = replace(
        StateSettings(),
        backend=backend,
        sqlite_path=str(Path(tmp_path_factory.mktemp("fuzz")) / "state.db"),
        postgres_dsn=POSTGRES_DSN,
        postgres_schema=schema,
        postgres_pool_size=4,
    )
    # Served as `respgw router` serves it (the guarded protocol).
    stack = GuardedStack(_hub_server.url, state=state, router={"default_model": "fake-model"})
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        if backend == "postgres":
            asyncio.run(_drop(schema))


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def http(gateway: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def known(gateway: Stack, http: httpx.Client) -> dict[str, str]:
    """Ids that exist: a response and a conversation with one item."""
    response = http.post("/responses", json={"model": "m", "input": "hello"}).json()
    conv = http.post("/conversations", json={"items": [{"role": "user", "content": "hi"}]}).json()
    items = http.get(f"/conversations/{conv['id']}/items").json()["data"]
    return {"response": response["id"], "conversation": conv["id"], "item": items[0]["id"]}


@dataclass
class Response:
    status_code: int
    content: bytes


def check(r: httpx.Response | Response) -> None:
    """Below 500, and a 4xx in OpenAI's shape."""
    assert r.status_code < 500, (r.status_code, r.content[:500])
    if r.status_code >= 400:
        body = orjson.loads(r.content)
        assert isinstance(body, dict) and set(body) == {"error"}, r.content[:500]
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "rate_limit_error"), error


# --- what clients send ------------------------------------------------------------------------


def _long(n: int) -> str:
    return "resp_" + "a" * n


# Text with what breaks storage and transports: NUL and other control characters, non-ASCII,
# lone surrogates excluded (JSON encoders refuse them), and now and then a very long run.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8),
    st.sampled_from(["", "\x00", "resp_\x00x", "conv_\t", "msg_\u00e9"]),
    st.sampled_from([300, 3000, 9000]).map(_long),
    st.builds(
        lambda p, s: p + s, st.sampled_from(["resp_", "conv_", "msg_"]), st.text(max_size=30)
    ),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    nasty_text,
)
json_value = st.recursive(
    json_scalar,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(nasty_text, children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "conversation",
    "tools",
    "tool_choice",
    "metadata",
    "max_output_tokens",
    "temperature",
    "text",
    "reasoning",
    "truncation",
    "store",
    "background",
    "include",
    "parallel_tool_calls",
    "prompt",
    "top_p",
    "user",
]
item = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["message", "function_call", "function_call_output", "reasoning", "item_reference"]
        )
        | nasty_text,
        "role": st.sampled_from(["user", "assistant", "system", "developer"]) | nasty_text,
        "content": json_value,
        "id": nasty_text,
        "call_id": nasty_text,
        "name": nasty_text,
        "arguments": nasty_text,
        "output": json_value,
    },
)
tool = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "custom", "namespace", "web_search"]) | nasty_text},
    optional={"name": json_value, "parameters": json_value, "tools": json_value},
)
tool_choice = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "allowed_tools", "custom", "mcp"])},
        optional={
            "name": json_value,
            "mode": json_value,
            "tools": st.lists(st.dictionaries(st.sampled_from(["type", "name"]), json_value)),
            "server_label": json_value,
        },
    ),
)
turn_body = st.fixed_dictionaries(
    {"model": st.just("m") | json_value},
    optional={
        "input": st.one_of(nasty_text, st.lists(item, max_size=3), json_value),
        "previous_response_id": nasty_text | json_value,
        "conversation": nasty_text | st.fixed_dictionaries({"id": nasty_text}) | json_value,
        "tools": st.lists(tool, max_size=2) | json_value,
        "tool_choice": tool_choice,
        **{name: json_value for name in FIELDS[5:]},
        "stream": st.booleans(),
    },
)
header_value = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0xFF, blacklist_characters="\r\n"), max_size=40),
    st.sampled_from(["a\tb", "\u00e9\u00ff", " ", "0", "-1", "99999999999"]),
    st.sampled_from([300, 5000]).map(_long),
)


def latin1(text: str) -> bytes:
    return text.encode("latin-1", "replace")


# --- the fuzzing ----------------------------------------------------------------------------------


@FUZZ
@given(body=turn_body)
def test_turn_bodies(http: httpx.Client, known: dict[str, str], body: dict[str, Any]) -> None:
    check(http.post("/responses", content=orjson.dumps(body), headers=JSON))


@FUZZ
@given(body=turn_body, personality=nasty_text | json_value)
def test_count_bodies(
    http: httpx.Client, known: dict[str, str], body: dict[str, Any], personality: Any
) -> None:
    counted = {**body, "personality": personality}
    check(http.post("/responses/input_tokens", content=orjson.dumps(counted), headers=JSON))


@FUZZ
@given(
    raw=st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | st.sampled_from(
        [
            b'{"model": "m", "input": "x", "max_output_tokens": 1' + b"0" * 40 + b"}",
            b'{"model": "m", "input": "\\ud800"}',
            b'{"model": "m", "input": "x", "temperature": 1e999}',
            b'{"items": [{"role": "user", "content": "x", "id": 123456789012345678901234567890}]}',
            b"[" * 5000 + b"]" * 5000,
        ]
    )
)
def test_raw_bodies(http: httpx.Client, raw: bytes) -> None:
    for path in ("/responses", "/responses/input_tokens", "/conversations", "/chat/completions"):
        check(http.post(path, content=raw, headers=JSON))


@FUZZ
@given(
    items=st.lists(item, max_size=3) | json_value,
    metadata=json_value,
    extra=st.dictionaries(nasty_text, json_value, max_size=2),
)
def test_conversation_bodies(
    http: httpx.Client, known: dict[str, str], items: Any, metadata: Any, extra: dict[str, Any]
) -> None:
    body = {"items": items, "metadata": metadata}
    check(http.post("/conversations", content=orjson.dumps(body), headers=JSON))
    check(
        http.post(
            f"/conversations/{known['conversation']}/items",
            content=orjson.dumps({**extra, "items": items}),
            headers=JSON,
        )
    )
    check(
        http.post(
            f"/conversations/{known['conversation']}",
            content=orjson.dumps({"metadata": metadata}),
            headers=JSON,
        )
    )


@FUZZ
@given(rid=nasty_text, which=st.sampled_from(["response", "conversation", "item"]))
def test_ids_in_paths(http: httpx.Client, known: dict[str, str], rid: str, which: str) -> None:
    quoted = quote(rid, safe="")
    conv, item_id = known["conversation"], known["item"]
    paths = {
        "response": [
            ("GET", f"/responses/{quoted}"),
            ("GET", f"/responses/{quoted}/input_items"),
            ("POST", f"/responses/{quoted}/cancel"),
            ("DELETE", f"/responses/{quoted}"),
        ],
        "conversation": [
            ("GET", f"/conversations/{quoted}"),
            ("GET", f"/conversations/{quoted}/items"),
            ("DELETE", f"/conversations/{quoted}"),
            ("GET", f"/conversations/{quoted}/items/{item_id}"),
        ],
        "item": [
            ("GET", f"/conversations/{conv}/items/{quoted}"),
            ("DELETE", f"/conversations/{conv}/items/{quoted}"),
        ],
    }[which]
    for method, path in paths:
        check(http.request(method, path))
    body: dict[str, Any] = {"model": "m", "input": "x"}
    if which == "response":
        body["previous_response_id"] = rid
    elif which == "conversation":
        body["conversation"] = rid
    else:
        body["input"] = [{"type": "message", "role": "user", "content": "x", "id": rid}]
    check(http.post("/responses", json=body))


not_a_string = json_value.filter(lambda v: v is not None and not isinstance(v, str))


@settings(FUZZ, max_examples=60)
@given(
    before=st.lists(st.just({"type": "function", "name": "f"}), max_size=2),
    kind=st.sampled_from(["function", "custom"]),
    name=not_a_string,
    stream=st.booleans(),
)
def test_allowed_tools_with_a_name_that_is_not_a_string(
    http: httpx.Client, before: list[dict[str, Any]], kind: str, name: Any, stream: bool
) -> None:
    # Not merely below 500: a 400 naming the entry's name.
    choice = {
        "type": "allowed_tools",
        "mode": "auto",
        "tools": [*before, {"type": kind, "name": name}],
    }
    body = {
        "model": "m",
        "input": "x",
        "tools": [{"type": "function", "name": "f"}],
        "tool_choice": choice,
        "stream": stream,
    }
    r = http.post("/responses", content=orjson.dumps(body), headers=JSON)
    check(r)
    assert r.status_code == 400, r.content[:300]
    assert r.json()["error"]["param"] == f"tool_choice.tools[{len(before)}].name"


def raw_post(stack: Stack, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    """A POST with headers exactly as given (httpx refuses some of these bytes)."""
    head = b"POST /v1%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % path.encode()
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    head_part, _, payload = rest.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head_part.split(b"\r\n") if b": " in line)
    if fields.get(b"transfer-encoding") == b"chunked":
        payload = _unchunk(payload)
    return Response(int(status_line.split()[1]), payload)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2 :]
    return out


@FUZZ
@given(
    name=st.sampled_from(
        [
            b"x-request-id",
            b"idempotency-key",
            b"content-type",
            b"authorization",
            b"x-stainless-retry-count",
        ]
    ),
    value=header_value.map(latin1),
    stream=st.booleans(),
)
def test_headers(gateway: Stack, name: bytes, value: bytes, stream: bool) -> None:
    headers = [(b"content-type", b"application/json"), (name, value)]
    body = orjson.dumps({"model": "m", "input": "x", "stream": stream})
    check(raw_post(gateway, "/responses", headers, body))
    check(raw_post(gateway, "/conversations", headers, b"{}"))


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["limit", "order", "after", "starting_after", "stream", "include"]),
        nasty_text,
        max_size=4,
    )
)
def test_query_strings(http: httpx.Client, known: dict[str, str], params: dict[str, str]) -> None:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    for path in (
        f"/responses/{known['response']}",
        f"/responses/{known['response']}/input_items",
        f"/conversations/{known['conversation']}/items",
        "/models",
    ):
        check(http.get(f"{path}?{query}"))


JSON = {"content-type": "application/json"}
