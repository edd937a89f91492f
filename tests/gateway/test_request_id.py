"""One request id follows a turn through every service: the router (its response header), the
hub (an HTTP header) and the state and bootstrap services (their JSON log lines), each service
running as its own process."""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson

from tests.fakehub import FakeHub, text_of
from tests.gateway.conftest import CODE_INTERPRETER, Processes
from tests.support import Process


def records(process: Process) -> list[dict[str, Any]]:
    """The JSON log records a service wrote so far."""
    out: list[dict[str, Any]] = []
    for line in list(process.lines):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line of a library that writes to stderr itself
        if isinstance(record, dict):
            out.append(record)
    return out


def logged_with(process: Process, request_id: str, msg: str) -> list[dict[str, Any]]:
    """The records carrying ``request_id`` with message ``msg``, waited for a little: a service
    logs a call as it ends, a moment after the caller may have its answer."""
    deadline = time.monotonic() + 5
    while True:
        found = [
            r for r in records(process) if r.get("request_id") == request_id and r["msg"] == msg
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def post_turn(
    processes: Processes, http: httpx.Client, headers: dict[str, str], *, stream: bool = False
) -> httpx.Response:
    resp = http.post(
        f"{processes.base}/v1/responses",
        json={"input": "who am I?", "tools": [CODE_INTERPRETER], "stream": stream},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text
    return resp


def test_a_client_request_id_reaches_every_service(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    rid = "client-" + secrets.token_hex(8)
    resp = post_turn(processes, http, {"x-request-id": rid})

    assert resp.headers["x-request-id"] == rid
    assert [h["x-request-id"] for h in hub.headers] == [rid]

    # The state service stored the turn under this id (one debug line per served call) ...
    stored = logged_with(processes.state, rid, "gRPC call served")
    assert [r["rpc"] for r in stored] == ["/respgw.state.v1.StateService/PutTurn"]
    assert stored[0]["code"] == "OK"
    # ... and the bootstrap service prepared the tools under it, in its own log line too.
    # (The router also asks the execution service what it runs, once, under the first request's
    # id.)
    served = [r["rpc"] for r in logged_with(processes.bootstrap, rid, "gRPC call served")]
    assert "/respgw.bootstrap.v1.BootstrapService/PrepareTools" in served
    assert set(served) <= {
        "/respgw.bootstrap.v1.BootstrapService/PrepareTools",
        "/respgw.bootstrap.v1.ExecutionService/GetExecutionCapabilities",
    }
    assert logged_with(processes.bootstrap, rid, "prepared tools")


def assert_stored_under(processes: Processes, rid: str) -> None:
    """The turn of request ``rid`` was stored by one PutTurn carrying its id; a streamed turn's
    running form (EnqueueBackgroundResponse, sent beside the stream unless the stream ended
    first) carries it too."""
    served = [r["rpc"] for r in logged_with(processes.state, rid, "gRPC call served")]
    deadline = time.monotonic() + 5
    while "/respgw.state.v1.StateService/PutTurn" not in served and time.monotonic() < deadline:
        time.sleep(0.02)
        served = [r["rpc"] for r in logged_with(processes.state, rid, "gRPC call served")]
    assert served.count("/respgw.state.v1.StateService/PutTurn") == 1, served
    assert set(served) <= {
        "/respgw.state.v1.StateService/PutTurn",
        "/respgw.state.v1.StateService/EnqueueBackgroundResponse",
    }, served


def test_the_router_makes_an_id_when_the_client_sends_none(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    resp = post_turn(processes, http, {}, stream=True)
    rid = resp.headers["x-request-id"]
    assert rid.startswith("req_")
    assert [h["x-request-id"] for h in hub.headers] == [rid]
    # Stored from the streaming task that outlives the handler: the id went along (to its
    # running form too, when that was sent before the stream ended).
    assert_stored_under(processes, rid)
    assert logged_with(processes.bootstrap, rid, "prepared tools")


def test_concurrent_requests_keep_their_own_ids(
    processes: Processes, hub: FakeHub, http: httpx.Client
) -> None:
    ids = [f"conc-{i}-" + secrets.token_hex(4) for i in range(8)]

    def send(rid: str) -> str:
        resp = http.post(
            f"{processes.base}/v1/responses",
            json={"input": f"I am {rid}", "stream": rid.startswith(("conc-1", "conc-3"))},
            headers={"x-request-id": rid},
        )
        assert resp.status_code == 200, resp.text
        return resp.headers["x-request-id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(send, ids)) == ids
    # Each hub call carries the id of the request whose input it carries.
    for body, headers in zip(hub.requests, hub.headers, strict=True):
        assert text_of(body["messages"][-1]) == f"I am {headers['x-request-id']}"
    assert sorted(h["x-request-id"] for h in hub.headers) == sorted(ids)
    for rid in ids:
        assert_stored_under(processes, rid)
