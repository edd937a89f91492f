"""The router's access log, as `respgw router` writes it: each request's line arrives within
--access-log-flush-s, and the last batch is written when the router stops (SIGTERM)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.fakehub import FakeHub
from tests.support import ROUTER_READY, STATE_READY, Process, state_process


def access_lines(router: Process) -> list[str]:
    return [line for line in list(router.lines) if "respgw.access" in line]


@contextmanager
def router(hub: FakeHub, flush_s: float) -> Iterator[tuple[Process, httpx.Client]]:
    state = state_process("--backend", "memory")
    state_port = state.start(STATE_READY)
    proc = Process(
        [
            "router",
            "--port",
            "0",
            "--hub-url",
            hub.url,
            "--state-address",
            f"127.0.0.1:{state_port}",
            "--default-model",
            "fake-model",
            "--access-log-flush-s",
            str(flush_s),
        ]
    )
    try:
        port = proc.start(ROUTER_READY)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield proc, client
    finally:
        proc.stop()
        state.stop()


def test_access_lines_arrive_within_the_flush_delay(hub: FakeHub) -> None:
    with router(hub, 0.3) as (proc, client):
        for i in range(3):
            answer = client.post("/v1/responses", json={"input": f"hi {i}", "store": False})
            assert answer.status_code == 200
        deadline = time.monotonic() + 5
        while len(access_lines(proc)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = access_lines(proc)
        assert len(lines) == 3 and all("path=/v1/responses" in line for line in lines)


def test_the_last_batch_is_written_when_the_router_stops(hub: FakeHub) -> None:
    with router(hub, 3600) as (proc, client):
        assert client.post("/v1/responses", json={"input": "hi", "store": False}).status_code == 200
        assert client.get("/v1/responses/resp_missing").status_code == 404
        time.sleep(0.5)
        assert access_lines(proc) == []  # an hour's batch: nothing written yet
        assert proc.stopped_gracefully()
        lines = access_lines(proc)
        assert len(lines) == 2 and "status=200" in lines[0] and "status=404" in lines[1]
