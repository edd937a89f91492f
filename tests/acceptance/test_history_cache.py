"""A chained turn on a response this router stored needs no GetHistory call, and still never
builds on a history that broke: deleted through this router, or through another replica."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from respgw.state.v1 import state_service_pb2 as pb
from respgw.state.v1 import state_service_pb2_grpc
from tests.fakehub import FakeHub
from tests.support import Stack


@pytest.fixture
def stack(hub: FakeHub) -> Iterator[Stack]:
    s = Stack(hub.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


def state_calls(method: str) -> float:
    labels = {"method": method}
    return REGISTRY.get_sample_value("respgw_router_state_call_latency_seconds_count", labels) or 0


def test_a_chain_on_this_routers_turns_reads_no_history(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    first = client.responses.create(model="m", input="one")
    before = state_calls("GetHistory")
    second = client.responses.create(model="m", input="two", previous_response_id=first.id)
    third = client.responses.create(model="m", input="three", previous_response_id=second.id)
    assert state_calls("GetHistory") == before
    # The hub saw the whole chain, oldest first, exactly as a GetHistory would give it.
    messages = hub.chat_requests()[-1]["messages"]
    assert [m["content"] for m in messages] == [
        "one",
        "echo: one",
        "two",
        "echo: two",
        "three",
    ]
    assert third.output_text == "echo: three"
    # A router without the cache sends the hub the same history.
    plain = Stack(hub.url, router={"history_cache_mb": 0}).start()
    try:
        other = plain.client()
        a = other.responses.create(model="m", input="one")
        b = other.responses.create(model="m", input="two", previous_response_id=a.id)
        other.responses.create(model="m", input="three", previous_response_id=b.id)
        assert hub.chat_requests()[-1]["messages"] == messages
    finally:
        plain.stop()


def test_a_delete_through_this_router_breaks_the_chain_before_the_hub(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    first = client.responses.create(model="m", input="one")
    second = client.responses.create(model="m", input="two", previous_response_id=first.id)
    client.responses.delete(first.id)
    calls = len(hub.chat_requests())
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="three", previous_response_id=second.id)
    assert info.value.code == "history_unavailable"
    assert len(hub.chat_requests()) == calls


def test_a_delete_through_another_replica_is_refused_when_storing(
    stack: Stack, hub: FakeHub
) -> None:
    """The other replica is played by a direct DeleteResponse on the state service: this router
    still remembers the chain, calls the hub, and the state service refuses the turn (nothing
    stored, no 200)."""
    client = stack.client()
    first = client.responses.create(model="m", input="one")
    second = client.responses.create(model="m", input="two", previous_response_id=first.id)

    async def delete_elsewhere() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.state_port}") as channel:
            stub = state_service_pb2_grpc.StateServiceStub(channel)
            await stub.DeleteResponse(
                pb.DeleteResponseRequest(tenant="default", response_id=first.id)
            )

    stack.tl.run(delete_elsewhere())
    refused = {"method": "PutTurn", "code": "FAILED_PRECONDITION"}
    before = REGISTRY.get_sample_value("respgw_router_state_call_errors_total", refused) or 0
    calls = len(hub.chat_requests())
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="three", previous_response_id=second.id)
    assert info.value.code == "history_unavailable"
    assert info.value.param == "previous_response_id"
    # The hub was called (the router trusted its memory) but the state service refused to store
    # the turn, so it was never answered as a success.
    assert len(hub.chat_requests()) == calls + 1
    assert REGISTRY.get_sample_value("respgw_router_state_call_errors_total", refused) == before + 1
    # The chain stays broken, now also for a router that reads the history.
    with httpx.Client() as http:
        r = http.post(
            f"{stack.url}/responses",
            json={"model": "m", "input": "four", "previous_response_id": second.id, "store": False},
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "history_unavailable"


def test_a_store_false_turn_always_reads_the_history(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    first = client.responses.create(model="m", input="one")
    before = state_calls("GetHistory")
    client.responses.create(model="m", input="two", previous_response_id=first.id, store=False)
    assert state_calls("GetHistory") == before + 1
