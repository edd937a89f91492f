"""Long answers: stored whole by the path that sends them to the state service in pieces
(PutTurnChunked), or encoded in one piece to a service without it, replayed exactly, built on;
streams that wait for a slow client (issue 13)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from respgw.state.v1 import state_service_pb2
from router_svc import state_records, streaming
from state_svc import server as state_server
from state_svc import service
from state_svc.config import StateSettings
from tests.fakehub import FakeHub, Reply
from tests.support import Stack

# ~88 KB in 9,000 deltas: its last events are large (sent in pieces).
TEXT = " ".join(f"word{i}" for i in range(9000))


@pytest.fixture
def sqlite_stack(hub: FakeHub, tmp_path: Path) -> Iterator[Stack]:
    settings = replace(StateSettings(), backend="sqlite", sqlite_path=str(tmp_path / "state.db"))
    s = Stack(hub.url, state=settings, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


@pytest.fixture(params=["items sent", "items from the response"])
def encoded(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, sqlite_stack: Stack
) -> None:
    """Every turn of the test takes the path of a large one: with its output items, or (once the
    router learned that the state service takes them from the response JSON) without."""
    monkeypatch.setattr(state_records, "LARGE_TURN_BYTES", 1)
    if request.param == "items from the response":
        with httpx.Client() as http:
            body = {"model": "fake-model", "input": "first", "store": True}
            assert http.post(f"{sqlite_stack.url}/responses", json=body).status_code == 200


def _chunked_calls() -> float:
    """PutTurnChunked calls the state service (in this process) answered OK."""
    labels = {"method": "PutTurnChunked", "code": "OK"}
    return REGISTRY.get_sample_value("respgw_grpc_server_requests_total", labels) or 0.0


@pytest.mark.usefixtures("encoded")
def test_a_long_streamed_answer_is_stored_replayed_exactly_and_built_on(
    sqlite_stack: Stack, hub: FakeHub
) -> None:
    client = sqlite_stack.client()
    hub.enqueue(Reply(text=TEXT))
    chunked_before = _chunked_calls()
    with httpx.Client(timeout=30) as http:
        body = {"model": "fake-model", "input": "tell me", "stream": True}
        with http.stream("POST", f"{sqlite_stack.url}/responses", json=body) as r:
            live = [line for line in r.iter_lines() if line]
        final = orjson.loads(live[-2].removeprefix("data: "))["response"]
        assert final["status"] == "completed"
        replay = http.get(f"{sqlite_stack.url}/responses/{final['id']}", params={"stream": "true"})
        assert len(live) > 6000
        assert [line for line in replay.text.splitlines() if line] == live, "byte for byte"
        assert _chunked_calls() == chunked_before + 1  # sent in pieces
        stored = http.get(f"{sqlite_stack.url}/responses/{final['id']}").json()
    assert stored == final
    assert client.responses.retrieve(final["id"]).output_text == TEXT
    [item] = client.responses.input_items.list(final["id"]).data
    assert item.type == "message"

    hub.enqueue(Reply(text="short"))
    client.responses.create(model="fake-model", input="and then?", previous_response_id=final["id"])
    history = hub.requests[-1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == TEXT


def _router_calls(method: str) -> float:
    """The router's (in this process) calls of ``method`` on the state service."""
    labels = {"method": method}
    return (
        REGISTRY.get_sample_value("respgw_router_state_call_latency_seconds_count", labels) or 0.0
    )


# ~900 KB in 2,000 deltas, non-ASCII throughout (a piece of the read may end inside a character).
LONGER = " ".join(f"mot{i}-" + 'é\u2028ü"\\/' * 60 for i in range(2000))


def test_a_replay_of_a_long_answer_is_the_live_stream_byte_for_byte(
    sqlite_stack: Stack, hub: FakeHub
) -> None:
    assert len(LONGER.encode()) > 3 * service.PIECE_BYTES
    hub.enqueue(Reply(text=LONGER))
    chunked_before = _router_calls("GetResponseChunked")
    with httpx.Client(timeout=30) as http:
        body = {"model": "fake-model", "input": "tell me", "stream": True}
        with http.stream("POST", f"{sqlite_stack.url}/responses", json=body) as r:
            live = r.read()
        last = [line for line in live.split(b"\n") if line.startswith(b"data: {")][-1]
        final = orjson.loads(last.removeprefix(b"data: "))["response"]
        assert final["status"] == "completed"
        url = f"{sqlite_stack.url}/responses/{final['id']}"
        replay = http.get(url, params={"stream": "true"})
        assert replay.status_code == 200
        assert replay.content == live, "byte for byte"
        # Read in pieces (GetResponseChunked), without its items, for the replay and the GET.
        assert http.get(url).json() == final
        after = http.get(url, params={"stream": "true", "starting_after": "1000"}).content
        assert after.startswith(b"event: response.output_text.delta\ndata: {")
        assert live.endswith(after)
    assert _router_calls("GetResponseChunked") == chunked_before + 3
    client = sqlite_stack.client()
    with client.responses.retrieve(final["id"], stream=True) as events:
        kinds = [event.type for event in events]
    assert kinds[-1] == "response.completed"
    assert client.responses.retrieve(final["id"]).output_text == LONGER


@pytest.mark.parametrize("text", [TEXT, LONGER, "short answer"], ids=["long", "non-ascii", "short"])
def test_a_held_stream_is_the_stored_turns_replay_byte_for_byte(
    sqlite_stack: Stack, hub: FakeHub, text: str
) -> None:
    # A conversation turn's stream is held until its turn is stored, then made from the stored
    # log and the response (not kept as events meanwhile): the same bytes as its replay, and a
    # stream the SDK reads to the same answer.
    hub.enqueue(Reply(text=text))
    client = sqlite_stack.client()
    conversation = client.conversations.create()
    with httpx.Client(timeout=30) as http:
        body = {"model": "fake-model", "input": "tell me", "stream": True}
        body["conversation"] = conversation.id
        with http.stream("POST", f"{sqlite_stack.url}/responses", json=body) as r:
            assert r.status_code == 200
            held = r.read()
        events = [
            orjson.loads(line.removeprefix(b"data: "))
            for line in held.split(b"\n")
            if line.startswith(b"data: {")
        ]
        final = events[-1]["response"]
        assert final["status"] == "completed"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas) == text
        assert len(deltas) > 1
        url = f"{sqlite_stack.url}/responses/{final['id']}"
        replay = http.get(url, params={"stream": "true"})
        assert replay.content == held, "byte for byte"
    hub.enqueue(Reply(text=text))
    with client.responses.stream(
        model="fake-model", input="again", conversation=conversation.id
    ) as stream:
        assert stream.get_final_response().output_text == text


# ~200 KB of code in 6,000 deltas: ASCII with escapes (newlines, tabs, backslashes, a few quotes:
# a text with many is parsed whole, see stored_json.QUOTE_EVERY).
CODE = "".join(f"    x{i} = {'q' if i % 100 else chr(34)}\t# \\ {i % 7}\n" for i in range(6000))


@pytest.mark.parametrize("text", [CODE, TEXT * 4], ids=["escaped", "plain"])
def test_a_long_answer_read_back_is_what_was_sent(
    sqlite_stack: Stack, hub: FakeHub, text: str
) -> None:
    """Read back (its text made from the stored JSON's bytes, router_svc.stored_json), a long
    answer is replayed byte for byte, and its GET (sent in slices) is the object's JSON exactly,
    with its length."""
    hub.enqueue(Reply(text=text))
    with httpx.Client(timeout=30) as http:
        body = {"model": "fake-model", "input": "tell me", "stream": True}
        with http.stream("POST", f"{sqlite_stack.url}/responses", json=body) as r:
            live = r.read()
        last = [line for line in live.split(b"\n") if line.startswith(b"data: {")][-1]
        final = orjson.loads(last.removeprefix(b"data: "))["response"]
        assert final["output"][0]["content"][0]["text"] == text
        url = f"{sqlite_stack.url}/responses/{final['id']}"
        assert http.get(url, params={"stream": "true"}).content == live, "byte for byte"
        got = http.get(url)
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/json"
        assert int(got.headers["content-length"]) == len(got.content)
        assert got.content == orjson.dumps(final)


@pytest.mark.usefixtures("encoded")
def test_a_long_answer_not_streamed_is_stored_and_built_on(
    sqlite_stack: Stack, hub: FakeHub
) -> None:
    client = sqlite_stack.client()
    hub.enqueue(Reply(text=TEXT), Reply(text="short"))
    first = client.responses.create(model="fake-model", input="tell me")
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(
        model="fake-model", input="and then?", previous_response_id=first.id
    )
    assert second.output_text == "short"
    assert hub.requests[-1]["messages"][1]["content"] == TEXT


def test_a_stream_that_waits_for_its_client_sends_every_event(
    stack: Stack, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "STREAM_BACKLOG", 2)
    client = stack.client()
    hub.enqueue(Reply(text=TEXT))
    with client.responses.stream(model="fake-model", input="tell me") as events:
        seqs = []
        for event in events:
            seqs.append(event.sequence_number)
            if len(seqs) % 500 == 0:
                time.sleep(0.05)  # a client slower than the hub
        final = events.get_final_response()
    assert seqs == list(range(len(seqs)))
    assert final.output_text == TEXT
    assert client.responses.retrieve(final.id).output_text == TEXT


def test_a_client_gone_while_its_stream_waits_still_gets_the_turn_stored(
    stack: Stack, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "STREAM_BACKLOG", 2)
    hub.enqueue(Reply(text=TEXT))
    with httpx.Client(timeout=10) as http:
        with http.stream(
            "POST",
            f"{stack.url}/responses",
            json={"model": "fake-model", "input": "x", "stream": True},
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    response_id = line.split('"id":"', 1)[1].split('"', 1)[0]
                    break
        client = stack.client()
        deadline = time.monotonic() + 10
        while True:
            found = http.get(f"{stack.url}/responses/{response_id}")
            # (Stored as in_progress while it runs: wait for its end.)
            done = found.status_code == 200 and found.json()["status"] != "in_progress"
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert found.status_code == 200
    assert client.responses.retrieve(response_id).output_text == TEXT


@pytest.fixture
def older_stack(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A state service that serves neither PutTurnChunked nor GetResponseChunked (gRPC answers
    UNIMPLEMENTED)."""
    register = state_server._LargeRequests.add_registered_method_handlers

    def without_chunked(
        self: state_server._LargeRequests, name: str, handlers: dict[str, Any]
    ) -> None:
        older = {
            k: v for k, v in handlers.items() if k not in ("PutTurnChunked", "GetResponseChunked")
        }
        register(self, name, older)

    monkeypatch.setattr(
        state_server._LargeRequests, "add_registered_method_handlers", without_chunked
    )
    settings = replace(StateSettings(), backend="sqlite", sqlite_path=str(tmp_path / "state.db"))
    s = Stack(hub.url, state=settings, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


def test_a_state_service_that_predates_the_combined_field_gets_the_items_sent(
    older_stack: Stack, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fleet being upgraded: a new replica said it takes the items from the response JSON, and
    # the next turn reaches one that does not know the field (it sees no response_json). Nor does
    # it serve PutTurnChunked: the router then sends large turns as one PutTurn.
    monkeypatch.setattr(state_records, "LARGE_TURN_BYTES", 1)
    sqlite_stack = older_stack
    original = service.StateServicer._put_turn

    async def older(
        self: service.StateServicer, request: state_service_pb2.PutTurnRequest
    ) -> state_service_pb2.PutTurnResponse:
        request.response.ClearField("response_json_with_output_items")
        reply = await original(self, request)
        reply.response_json_with_output_items = True
        return reply

    monkeypatch.setattr(service.StateServicer, "_put_turn", older)
    client = sqlite_stack.client()
    hub.enqueue(Reply(text="first"), Reply(text=TEXT), Reply(text="third"))
    first = client.responses.create(model="fake-model", input="one")
    with client.responses.stream(
        model="fake-model", input="two", previous_response_id=first.id
    ) as events:
        for _ in events:
            pass
        second = events.get_final_response()
    # Nor GetResponseChunked: GET reads it with GetResponse.
    assert client.responses.retrieve(second.id).output_text == TEXT
    with client.responses.retrieve(second.id, stream=True) as replayed:
        last = list(replayed)[-1]
    assert last.type == "response.completed" and last.response.output_text == TEXT
    client.responses.create(model="fake-model", input="three", previous_response_id=second.id)
    history = hub.requests[-1]["messages"]
    assert [m["content"] for m in history if m["role"] == "assistant"] == ["first", TEXT]
