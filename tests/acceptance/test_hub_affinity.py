"""The hub gets one session key per conversation or previous_response_id chain (header and
prompt_cache_key), so that a prefix-cache-aware router keeps them on one model server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakehub import FakeHub
from tests.support import Stack


@pytest.fixture
def stack(hub: FakeHub) -> Iterator[Stack]:
    s = Stack(hub.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


def keys(hub: FakeHub) -> list[tuple[str, str]]:
    """(header, prompt_cache_key) of every chat request the hub got, in order."""
    return [
        (headers.get("x-session-id", ""), body.get("prompt_cache_key", ""))
        for headers, body in zip(hub.headers, hub.requests, strict=True)
    ]


def test_a_chain_keeps_one_key_and_a_new_chain_gets_another(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    first = client.responses.create(model="m", input="one")
    second = client.responses.create(model="m", input="two", previous_response_id=first.id)
    client.responses.create(model="m", input="three", previous_response_id=second.id)
    client.responses.create(model="m", input="other chain")
    seen = keys(hub)
    assert all(header == body and header.startswith("rg-") for header, body in seen)
    assert seen[0] == seen[1] == seen[2]
    assert seen[3] != seen[0]
    assert first.id not in seen[0][0], "ids are not shown to the hub"


def test_the_key_is_the_same_when_the_history_is_read(hub: FakeHub) -> None:
    """Without the history cache (a router that did not store the chain) the chain's first
    response comes from GetHistory: the key is the one turn 1 had."""
    s = Stack(hub.url, router={"history_cache_mb": 0}).start()
    try:
        client = s.client()
        first = client.responses.create(model="m", input="one")
        second = client.responses.create(model="m", input="two", previous_response_id=first.id)
        client.responses.create(model="m", input="three", previous_response_id=second.id)
    finally:
        s.stop()
    seen = keys(hub)
    assert seen[0] == seen[1] == seen[2]


def test_a_conversation_keeps_one_key(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conversation = client.conversations.create()
    client.responses.create(model="m", input="one", conversation=conversation.id)
    client.responses.create(model="m", input="two", conversation=conversation.id)
    seen = keys(hub)
    assert seen[0] == seen[1] and seen[0][0].startswith("rg-")


def test_the_clients_prompt_cache_key_wins(stack: Stack, hub: FakeHub) -> None:
    stack.client().responses.create(model="m", input="one", prompt_cache_key="user-42")
    assert keys(hub) == [("user-42", "user-42")]


def test_both_can_be_turned_off(hub: FakeHub) -> None:
    s = Stack(hub.url, router={"hub_session_header": "", "hub_prompt_cache_key": False}).start()
    try:
        s.client().responses.create(model="m", input="one")
    finally:
        s.stop()
    assert keys(hub) == [("", "")]


def test_the_header_name_is_a_setting(hub: FakeHub) -> None:
    """Operators name the header their router hashes on; streamed turns carry it too."""
    s = Stack(hub.url, router={"hub_session_header": "X-Affinity-Key"}).start()
    try:
        client = s.client()
        first = client.responses.create(model="m", input="one")
        with client.responses.stream(
            model="m", input="two", previous_response_id=first.id
        ) as stream:
            stream.get_final_response()
    finally:
        s.stop()
    sent = [
        (h.get("x-affinity-key", ""), b["prompt_cache_key"])
        for h, b in zip(hub.headers, hub.requests, strict=True)
    ]
    assert sent[0] == sent[1] and sent[0][0].startswith("rg-")
    assert all("x-session-id" not in h for h in hub.headers)
