"""Background responses that survive any router, with real processes: two routers over two state
services on PostgreSQL (or one on SQLite, the single-node setup), the running router killed with
SIGKILL, cancels and resumed streams through the other router, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai.types.responses import Response

from bootstrap_svc import server as bootstrap_server
from bootstrap_svc.config import BootstrapSettings
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import (
    POSTGRES_DSN,
    ROUTER_READY,
    STATE_READY,
    Process,
    ThreadLoop,
    state_process,
)

pytestmark = [pytest.mark.slow]

LEASE_S = 1.5
SCAN_S = 0.3
# A slow answer: 24 words, one chunk each 0.1 s.
SLOW = " ".join(f"w{n}" for n in range(24))


class Cluster:
    """State services and two routers, each its own process."""

    def __init__(self, hub: FakeHub, states: list[Process], router_args: list[str]) -> None:
        self.hub = hub
        self.states = states
        self.routers: list[Process] = []
        self.ports: list[int] = []
        self.clients: list[openai.OpenAI] = []
        self.router_args = router_args

    def start(self) -> Cluster:
        state_ports = [s.start(STATE_READY) for s in self.states]
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in state_ports)
        for _ in range(2):
            router = Process(
                [
                    "router",
                    "--port",
                    "0",
                    "--hub-url",
                    self.hub.url,
                    "--state-address",
                    target,
                    "--background-lease-s",
                    str(LEASE_S),
                    "--background-scan-interval-s",
                    str(SCAN_S),
                    *self.router_args,
                ]
            )
            self.routers.append(router)
            self.ports.append(router.start(ROUTER_READY))
        self.clients = [
            openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="unused", max_retries=0)
            for p in self.ports
        ]
        return self

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for router in self.routers:
            router.stop()
        for state in self.states:
            state.stop()

    def metric(self, router: int, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.ports[router]}/metrics").text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"respgw_bg_{uuid.uuid4().hex[:10]}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def make_cluster(
    kind: str, hub: FakeHub, tmp_path: Path, schema: str, *router_args: str
) -> Cluster:
    if kind == "postgres":
        states = [
            state_process(
                "--backend",
                "postgres",
                "--postgres-dsn",
                POSTGRES_DSN,
                "--postgres-schema",
                schema,
                "--watch-poll-interval-s",
                "0.1",
            )
            for _ in range(2)
        ]
    else:
        states = [state_process("--backend", "sqlite", "--sqlite-path", str(tmp_path / "state.db"))]
    return Cluster(hub, states, list(router_args)).start()


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def cluster(
    request: pytest.FixtureRequest, hub: FakeHub, tmp_path: Path, schema: str
) -> Iterator[Cluster]:
    c = make_cluster(request.param, hub, tmp_path, schema)
    yield c
    c.stop()


@pytest.fixture
def pg_cluster(hub: FakeHub, tmp_path: Path, schema: str) -> Iterator[Cluster]:
    c = make_cluster("postgres", hub, tmp_path, schema)
    yield c
    c.stop()


def wait_for(
    client: openai.OpenAI, response_id: str, until: set[str], timeout: float = 30
) -> Response:
    deadline = time.monotonic() + timeout
    while True:
        got = client.responses.retrieve(response_id)
        if got.status in until:
            return got
        assert time.monotonic() < deadline, f"{response_id} still {got.status}"
        time.sleep(0.05)


def events_of(client: openai.OpenAI, response_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The response's whole stream through the SDK's own retrieve(stream=True)."""
    with client.responses.retrieve(response_id, stream=True, **kwargs) as events:
        return [e.model_dump() for e in events]


def wait_for_events(client: openai.OpenAI, response_id: str, count: int) -> None:
    """Reads the live stream until ``count`` events arrived (the model is running)."""
    with client.responses.retrieve(response_id, stream=True) as events:
        for n, _ in enumerate(events, 1):
            if n >= count:
                return
    raise AssertionError(f"the stream of {response_id} ended before {count} events")


def check_one_sequence(events: list[dict[str, Any]], terminal: str) -> None:
    """One stream: response.created first, numbers 0, 1, 2, ... and one terminal event, last."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    ends = [e["type"] for e in events if e["type"] in TERMINALS]
    assert ends == [terminal], ends
    assert events[-1]["type"] == terminal


TERMINALS = {"response.completed", "response.failed", "response.incomplete", "response.cancelled"}


def test_sigkill_of_the_running_router_hands_the_response_to_the_other(
    cluster: Cluster, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.1), Reply(text="second run", chunk_delay_s=0.1))
    a, b = cluster.clients
    started = a.responses.create(model="m", input="survive", background=True)
    assert started.status == "queued"
    wait_for_events(b, started.id, 6)  # the first run streams, read through the other router
    killed_at = time.monotonic()
    cluster.routers[0].stop(signal.SIGKILL)
    done = wait_for(b, started.id, {"completed", "failed"})
    took = time.monotonic() - killed_at
    assert done.status == "completed", done.error
    assert done.output_text == "second run"
    # Taken over within the lease and a scan, then the second run's few chunks.
    assert took < LEASE_S + 3 * SCAN_S + 3, took
    assert [text_of(r["messages"][-1]) for r in hub.chat_requests()] == ["survive", "survive"]
    events = events_of(b, started.id)
    check_one_sequence(events, "response.completed")
    # The first run's open message is closed as incomplete before the second run's items.
    done_items = [e for e in events if e["type"] == "response.output_item.done"]
    assert done_items[0]["item"]["status"] == "incomplete"
    assert done_items[-1]["item"]["status"] == "completed"
    # The SDK's own stream helper accepts the stitched stream whole.
    with b.responses.stream(response_id=started.id) as s:
        for _ in s:
            pass
        assert s.get_final_response().output_text == "second run"


def test_a_response_lost_too_often_is_stored_failed(
    hub: FakeHub, tmp_path: Path, schema: str
) -> None:
    c = make_cluster("sqlite", hub, tmp_path, schema, "--background-max-attempts", "1")
    try:
        hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.1))
        a, b = c.clients
        started = a.responses.create(model="m", input="once only", background=True)
        wait_for_events(b, started.id, 4)
        c.routers[0].stop(signal.SIGKILL)
        failed = wait_for(b, started.id, {"failed", "completed"})
        assert failed.status == "failed"
        assert failed.error is not None and "1 times" in failed.error.message
        check_one_sequence(events_of(b, started.id), "response.failed")
        assert len(hub.chat_requests()) == 1
    finally:
        c.stop()


@pytest.mark.postgres
def test_cancel_through_the_other_router_stops_the_model_call(
    pg_cluster: Cluster, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text=SLOW + " " + SLOW, chunk_delay_s=0.1))
    a, b = pg_cluster.clients
    started = a.responses.create(model="m", input="stop me", background=True)
    with ThreadPoolExecutor(1) as pool:
        follower = pool.submit(events_of, b, started.id)
        wait_for_events(b, started.id, 5)
        cancelled = b.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        # Router a learns it at its next renewal and stops the model call.
        deadline = time.monotonic() + LEASE_S + 2
        while pg_cluster.metric(0, "respgw_router_background_runs_total", outcome="cancelled") < 1:
            assert time.monotonic() < deadline, "router a kept running the cancelled response"
            time.sleep(0.05)
        events = follower.result(30)
    check_one_sequence(events, "response.cancelled")
    assert events[-1]["response"]["status"] == "cancelled"
    time.sleep(0.5)
    assert a.responses.retrieve(started.id).status == "cancelled"
    assert b.responses.cancel(started.id).status == "cancelled"
    # The stored stream is the one the follower saw.
    assert events_of(a, started.id) == events


@pytest.mark.postgres
def test_a_resumed_stream_through_the_other_router_misses_nothing_and_repeats_nothing(
    pg_cluster: Cluster, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.05))
    a, b = pg_cluster.clients
    started = a.responses.create(model="m", input="resume me", background=True)
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(events_of, a, started.id)
        first: list[dict[str, Any]] = []
        with b.responses.retrieve(started.id, stream=True) as events:
            for event in events:
                first.append(event.model_dump())
                if len(first) == 9:
                    break  # the client drops the connection
        last = first[-1]["sequence_number"]
        rest = events_of(b, started.id, starting_after=last)
        uninterrupted = whole.result(30)
    assert first + rest == uninterrupted
    check_one_sequence(uninterrupted, "response.completed")
    assert uninterrupted[-1]["response"]["output"][0]["content"][0]["text"] == SLOW


@pytest.mark.postgres
def test_fifty_background_responses_survive_a_router_killed_midway(
    pg_cluster: Cluster, hub: FakeHub
) -> None:
    hub.enqueue(*(Reply(text="a b c d e f g h", chunk_delay_s=0.2) for _ in range(120)))
    clients = pg_cluster.clients
    with ThreadPoolExecutor(10) as pool:
        created = list(
            pool.map(
                lambda n: clients[n % 2].responses.create(
                    model="m", input=f"job {n}", background=True
                ),
                range(50),
            )
        )
    time.sleep(0.5)
    pg_cluster.routers[0].stop(signal.SIGKILL)
    survivor = clients[1]
    finals = [wait_for(survivor, r.id, {"completed", "failed", "incomplete"}, 60) for r in created]
    assert {f.status for f in finals} == {"completed"}, [f.error for f in finals]
    for response in created:
        check_one_sequence(events_of(survivor, response.id), "response.completed")
    assert pg_cluster.metric(1, "respgw_router_background_runs_total", start="takeover") >= 1
    # None finalized twice: the surviving router never had a result refused, and each response's
    # stored form is the one its stream's single terminal event carries.
    assert pg_cluster.metric(1, "respgw_router_background_runs_total", outcome="lost") == 0
    for final in finals:
        terminal = events_of(survivor, final.id)[-1]["response"]
        assert terminal["id"] == final.id
        assert [i["id"] for i in terminal["output"]] == [i.id for i in final.output]
        assert terminal["output"][0]["content"][0]["text"] == final.output_text


def test_a_takeover_asks_the_bootstrap_service_again_and_keeps_the_container(
    hub: FakeHub, tmp_path: Path, schema: str
) -> None:
    tl = ThreadLoop()
    settings = replace(
        BootstrapSettings(),
        listen="127.0.0.1:0",
        workdir=str(tmp_path / "sessions"),
        metrics_port=0,
    )
    tools = tl.run(bootstrap_server.start(settings))
    c = make_cluster(
        "sqlite",
        hub,
        tmp_path,
        schema,
        "--bootstrap-address",
        f"127.0.0.1:{tools.port}",
        "--bootstrap-headers",
        "x-user",
    )
    try:
        hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.1), Reply(text="second run"))
        a, b = c.clients
        started = a.responses.create(
            model="m",
            input="run my code",
            tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
            background=True,
            extra_headers={"x-user": "user-1"},
        )
        container = started.model_dump()["tools"][0]["container"]
        assert isinstance(container, str) and container
        wait_for_events(b, started.id, 4)
        c.routers[0].stop(signal.SIGKILL)
        done = wait_for(b, started.id, {"completed", "failed"})
        assert done.status == "completed", done.error
        assert done.model_dump()["tools"][0]["container"] == container
        first, second = hub.chat_requests()
        # The second run got what the bootstrap service prepared for the first (same request).
        assert first["messages"] == second["messages"]
    finally:
        c.stop()
        tl.run(tools.stop(0.5))
        tl.close()
