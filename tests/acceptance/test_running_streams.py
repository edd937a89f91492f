"""A streamed turn is retrievable as in_progress while it runs, as at OpenAI (issue 12, item 8),
through the openai SDK: the running form is stored beside the stream (the events do not change),
replaced by the final turn at its end; a failed stream is stored as failed; store: false stores
nothing; a router killed mid-stream leaves a response that another router stores as failed once
its lease ran out, never one in progress forever."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai.types.responses import Response
from prometheus_client import REGISTRY

from tests.acceptance.test_background_leases import Cluster, make_cluster
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import POSTGRES_DSN, Stack

# A slow answer: 30 words, one chunk each 0.05 s.
SLOW = " ".join(f"w{n}" for n in range(30))


@pytest.fixture
def off_stack(hub: FakeHub) -> Iterator[Stack]:
    s = Stack(
        hub.url, router={"default_model": "fake-model", "store_running_streams": False}
    ).start()
    yield s
    s.stop()


def retrieve(client: openai.OpenAI, response_id: str) -> Response | None:
    try:
        return client.responses.retrieve(response_id)
    except openai.NotFoundError:
        return None


def wait_stored(client: openai.OpenAI, response_id: str, status: str, timeout: float = 10) -> None:
    """Waits until the response reads as ``status`` (the running put runs beside the stream)."""
    deadline = time.monotonic() + timeout
    while True:
        got = retrieve(client, response_id)
        if got is not None and got.status == status:
            return
        assert time.monotonic() < deadline, f"{response_id} is {got and got.status}"
        time.sleep(0.02)


def shape(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Each event's type and sequence number: what must not change."""
    return [(e["type"], e["sequence_number"]) for e in events]


def test_a_running_stream_reads_in_progress_then_completed(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.05))
    events: list[dict[str, Any]] = []
    seen_running: Response | None = None
    with client.responses.create(model="m", input="go slowly", stream=True) as stream:
        for event in stream:
            events.append(event.model_dump())
            if event.type == "response.output_text.delta" and seen_running is None:
                response_id = events[0]["response"]["id"]
                wait_stored(client, response_id, "in_progress")
                seen_running = client.responses.retrieve(response_id)
                # Its input is there already; nothing can build on it yet (OpenAI's 400).
                assert [i.type for i in client.responses.input_items.list(response_id)] == [
                    "message"
                ]
                with pytest.raises(openai.BadRequestError) as chained:
                    client.responses.create(
                        model="m", input="too soon", previous_response_id=response_id
                    )
                assert chained.value.code == "previous_response_in_progress"
                assert chained.value.param == "previous_response_id"
                # A foreground response cannot be cancelled, running or not (as at OpenAI).
                with pytest.raises(openai.BadRequestError) as cancel:
                    client.responses.cancel(response_id)
                assert cancel.value.code == "not_cancellable"
    assert seen_running is not None
    assert seen_running.status == "in_progress" and seen_running.output == []
    assert seen_running.id == events[0]["response"]["id"]
    assert seen_running.model_dump()["background"] is False
    assert events[-1]["type"] == "response.completed"
    done = client.responses.retrieve(seen_running.id)
    assert done.status == "completed" and done.output_text == SLOW
    # The replay is the stream as it was sent, and the turn can be built on now.
    with client.responses.retrieve(seen_running.id, stream=True) as replay:
        assert [e.model_dump() for e in replay] == events
    hub.enqueue(Reply(text="next"))
    client.responses.create(model="m", input="and then", previous_response_id=seen_running.id)
    assert [text_of(m) for m in hub.chat_requests()[-1]["messages"]] == [
        "go slowly",
        SLOW,
        "and then",
    ]


def test_the_events_are_those_of_a_router_that_stores_no_running_turn(
    stack: Stack, off_stack: Stack, hub: FakeHub
) -> None:
    runs = []
    for s in (stack, off_stack):
        hub.enqueue(Reply(text="a b c d", chunk_delay_s=0.01))
        with s.client().responses.create(model="m", input="x", stream=True) as stream:
            runs.append([e.model_dump() for e in stream])
    assert shape(runs[0]) == shape(runs[1])
    assert runs[0][-1]["response"]["status"] == "completed"


def test_off_a_running_stream_is_not_found_until_it_ends(off_stack: Stack, hub: FakeHub) -> None:
    client = off_stack.client()
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.02))
    with client.responses.create(model="m", input="x", stream=True) as stream:
        response_id = ""
        for n, event in enumerate(stream):
            if n == 0:
                response_id = event.response.id  # type: ignore[union-attr]
            if n == 5:
                assert retrieve(client, response_id) is None
    assert client.responses.retrieve(response_id).status == "completed"


def test_store_false_stores_nothing_while_running_or_after(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.02))
    with client.responses.create(model="m", input="x", stream=True, store=False) as stream:
        response_id = ""
        for n, event in enumerate(stream):
            if n == 0:
                response_id = event.response.id  # type: ignore[union-attr]
            if n == 10:
                assert retrieve(client, response_id) is None
    assert retrieve(client, response_id) is None


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(text=SLOW, chunk_delay_s=0.02, break_after_chunks=5), id="cut"),
        pytest.param(Reply(status=500), id="hub error"),
    ],
)
def test_a_stream_the_hub_fails_is_stored_failed(stack: Stack, hub: FakeHub, reply: Reply) -> None:
    client = stack.client()
    hub.enqueue(reply)
    with client.responses.create(model="m", input="fail me", stream=True) as stream:
        events = [e.model_dump() for e in stream]
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    response_id = events[0]["response"]["id"]
    wait_stored(client, response_id, "failed")
    failed = client.responses.retrieve(response_id)
    assert failed.model_dump()["error"] == events[-1]["response"]["error"]
    # The partial answer is shown, but no later turn builds on it.
    hub.enqueue(Reply(text="again"))
    client.responses.create(model="m", input="retry", previous_response_id=response_id)
    assert [text_of(m) for m in hub.chat_requests()[-1]["messages"]] == ["fail me", "retry"]


def test_a_conversation_stream_is_still_stored_only_at_its_end(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create()
    before = stored_running()
    hub.enqueue(Reply(text="in a conversation"))
    with client.responses.create(model="m", input="x", stream=True, conversation=conv.id) as s:
        events = [e.model_dump() for e in s]
    assert events[-1]["type"] == "response.completed"
    assert len(list(client.conversations.items.list(conv.id))) == 2
    assert stored_running() == before  # sent whole once stored, never stored as running


# --- a router killed mid-stream ---------------------------------------------------------------

LEASE_S = 1.5
SCAN_S = 0.3


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def routers(request: pytest.FixtureRequest, hub: FakeHub, tmp_path: Path) -> Iterator[Cluster]:
    """Two routers over one state service on SQLite, or two on PostgreSQL."""
    schema = f"respgw_run_{uuid.uuid4().hex[:10]}"
    c = make_cluster(request.param, hub, tmp_path, schema, "--running-stream-lease-s", str(LEASE_S))
    yield c
    c.stop()
    if request.param == "postgres":
        asyncio.run(drop_schema(schema))


async def drop_schema(name: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.slow
def test_a_router_killed_mid_stream_leaves_a_failed_response(
    routers: Cluster, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text=SLOW + " " + SLOW, chunk_delay_s=0.1))
    b = routers.clients[1]
    with httpx.Client(timeout=20) as http:
        with http.stream(
            "POST",
            f"http://127.0.0.1:{routers.ports[0]}/v1/responses",
            json={"model": "m", "input": "die", "stream": True},
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            response_id = json.loads(first[6:])["response"]["id"]
            wait_stored(b, response_id, "in_progress")  # read through the other router
            routers.routers[0].stop(signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
    # Once its lease ran out (and a scan came), router b stores it as failed.
    wait_stored(b, response_id, "failed", timeout=LEASE_S + 3 * SCAN_S + 10)
    failed = b.responses.retrieve(response_id)
    assert failed.error is not None and failed.error.code == "server_error"
    assert "stopped" in failed.error.message
    assert len(hub.chat_requests()) == 1, "the model is never run again for a foreground turn"
    # Its replay ends as failed, and a cancel is still refused.
    with b.responses.retrieve(response_id, stream=True) as replay:
        assert [e.type for e in replay][-1] == "response.failed"
    with pytest.raises(openai.BadRequestError):
        b.responses.cancel(response_id)
    metrics = httpx.get(f"http://127.0.0.1:{routers.ports[1]}/metrics").text
    assert "\nrespgw_router_abandoned_streams_total 1.0\n" in metrics


@pytest.mark.slow
def test_a_finished_stream_is_never_taken_over(routers: Cluster, hub: FakeHub) -> None:
    a, b = routers.clients
    hub.enqueue(Reply(text="done soon"))
    with a.responses.create(model="m", input="x", stream=True) as stream:
        events = [e.model_dump() for e in stream]
    response_id = events[0]["response"]["id"]
    time.sleep(LEASE_S + 4 * SCAN_S)  # its job's lease ran out: no router may claim it
    done = b.responses.retrieve(response_id)
    assert done.status == "completed" and done.output_text == "done soon"
    metrics = httpx.get(f"http://127.0.0.1:{routers.ports[1]}/metrics").text
    assert "\nrespgw_router_abandoned_streams_total 0.0\n" in metrics


# --- retries of a streamed first attempt ------------------------------------------------------


def sse_events(body: bytes) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in body.decode().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_a_retry_waits_for_the_first_attempt_still_streaming(stack: Stack, hub: FakeHub) -> None:
    # The first attempt's client goes away after response.created (as when the SDK gives up on
    # it); the router streams it on, stored as running. The SDK's retry finds it running, waits
    # for its end and is answered with it: the model is called once, one turn is stored.
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.02))
    body = {"model": "m", "input": "once", "stream": True}
    url = f"{stack.url}/responses"
    with httpx.Client(timeout=20) as http:
        with http.stream("POST", url, json=body, headers={"x-stainless-retry-count": "0"}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
        first_id = json.loads(first[6:])["response"]["id"]
        wait_stored(stack.client(), first_id, "in_progress")
        retry = http.post(url, json=body, headers={"x-stainless-retry-count": "1"})
    events = sse_events(retry.content)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["id"] == first_id
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == SLOW
    assert len(hub.chat_requests()) == 1


def test_a_retry_of_a_failed_stream_makes_its_own_turn(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(status=500))
    body = {"model": "m", "input": "try again", "stream": True}
    url = f"{stack.url}/responses"
    with httpx.Client(timeout=20) as http:
        first = sse_events(
            http.post(url, json=body, headers={"x-stainless-retry-count": "0"}).content
        )
        first_id = first[0]["response"]["id"]
        wait_stored(stack.client(), first_id, "failed")
        retry = sse_events(
            http.post(url, json=body, headers={"x-stainless-retry-count": "1"}).content
        )
    assert retry[-1]["type"] == "response.completed"
    assert retry[-1]["response"]["id"] != first_id
    assert stack.client().responses.retrieve(retry[-1]["response"]["id"]).status == "completed"
    assert stack.client().responses.retrieve(first_id).status == "failed"


def test_a_stream_retrieved_while_it_runs_is_sent_once_it_ended(stack: Stack, hub: FakeHub) -> None:
    # GET ?stream=true on a running stream waits for its end (the router that streams it keeps
    # no event log), then sends its events as they were sent.
    client = stack.client()
    hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.02))

    def follow(response_id: str) -> list[dict[str, Any]]:
        with client.responses.retrieve(response_id, stream=True) as followed:
            return [e.model_dump() for e in followed]

    with ThreadPoolExecutor(1) as pool:
        with client.responses.create(model="m", input="x", stream=True) as stream:
            events = []
            for event in stream:
                events.append(event.model_dump())
                if len(events) == 4:
                    wait_stored(client, events[0]["response"]["id"], "in_progress")
                    follower = pool.submit(follow, events[0]["response"]["id"])
        assert follower.result(30) == events


def test_with_a_delay_only_a_stream_that_lasts_is_stored_running(hub: FakeHub) -> None:
    s = Stack(hub.url, router={"default_model": "fake-model", "running_stream_delay_s": 0.5})
    s.start()
    try:
        client = s.client()
        before = stored_running()
        with client.responses.create(model="m", input="quick", stream=True) as stream:
            quick = [e.model_dump() for e in stream]
        assert client.responses.retrieve(quick[0]["response"]["id"]).status == "completed"
        time.sleep(0.6)
        assert stored_running() == before, "a stream shorter than the delay was stored running"
        hub.enqueue(Reply(text=SLOW, chunk_delay_s=0.05))
        with client.responses.create(model="m", input="slow", stream=True) as stream:
            for n, event in enumerate(stream):
                if n == 0:
                    response_id = event.response.id  # type: ignore[union-attr]
                    assert retrieve(client, response_id) is None  # not yet
                    wait_stored(client, response_id, "in_progress")
        assert stored_running() == before + 1
        assert client.responses.retrieve(response_id).status == "completed"
    finally:
        s.stop()


def stored_running() -> float:
    value = REGISTRY.get_sample_value("respgw_router_running_streams_total", {"outcome": "stored"})
    return value or 0.0
