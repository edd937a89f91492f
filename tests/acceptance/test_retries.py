"""Retries never duplicate (issue 13, item 2), a streamed conversation turn that loses the race
is run again before anything is sent (item 3), and a turn whose store outcome is unknown says
so. Through the official openai SDK (its own retries, default settings) and raw HTTP."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import httpx2
import openai
import orjson
import pytest

from gateway.grpcerrors import RemoteError
from router_svc import errors, state_client
from router_svc.routes import conversations
from state_svc.config import StateSettings
from tests.acceptance.test_limits import GuardedStack
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import POSTGRES_DSN, Stack


def item_texts(client: openai.OpenAI, conversation_id: str) -> list[str]:
    return [
        text_of(i.model_dump())
        for i in client.conversations.items.list(conversation_id, order="asc", limit=100)
    ]


def sse_events(body: bytes) -> list[dict[str, Any]]:
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(orjson.loads(line[6:]))
    return events


# --- SDK retries --------------------------------------------------------------------------------


def test_an_sdk_retry_after_a_lost_reply_stores_the_turn_once(stack: Stack, hub: FakeHub) -> None:
    # The SDK gives up on each attempt after 0.5 s and retries with the same body; the router
    # keeps running the first attempt and stores it. The retries find it instead of storing a
    # second turn.
    client = openai.OpenAI(base_url=stack.url, api_key="unused", max_retries=2, timeout=0.5)
    conv = client.conversations.create()
    hub.enqueue(Reply(text="slow answer", delay_s=1.0), Reply(text="second try", delay_s=1.0))
    answer = client.responses.create(model="m", input="hello", conversation=conv.id)
    assert answer.output_text == "slow answer"
    time.sleep(1.5)  # the second attempt's own turn is finished (and not stored) by now
    assert item_texts(client, conv.id) == ["hello", "slow answer"]
    client.close()


def test_the_same_request_sent_twice_on_purpose_makes_two_turns(stack: Stack, hub: FakeHub) -> None:
    client = openai.OpenAI(base_url=stack.url, api_key="unused")  # default retries
    conv = client.conversations.create()
    first = client.responses.create(model="m", input="again", conversation=conv.id)
    second = client.responses.create(model="m", input="again", conversation=conv.id)
    assert first.id != second.id
    assert item_texts(client, conv.id) == ["again", "echo: again", "again", "echo: again"]
    plain = [client.responses.create(model="m", input="same") for _ in range(2)]
    assert plain[0].id != plain[1].id
    assert [client.responses.retrieve(r.id).id for r in plain] == [r.id for r in plain]
    client.close()


def test_a_retried_stream_replays_the_first_attempt(stack: Stack, hub: FakeHub) -> None:
    body = {"model": "m", "input": "stream me", "stream": True}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/responses"
        first = http.post(url, json=body, headers={"x-stainless-retry-count": "0"})
        retry = http.post(url, json=body, headers={"x-stainless-retry-count": "1"})
    first_events, retry_events = sse_events(first.content), sse_events(retry.content)
    assert first_events[-1]["type"] == "response.completed"
    assert retry_events[-1]["type"] == "response.completed"
    assert retry_events[-1]["response"]["id"] == first_events[-1]["response"]["id"]
    assert len(hub.chat_requests()) == 1


def test_a_retry_of_a_failed_first_attempt_makes_the_turn(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(status=500))
    client = openai.OpenAI(base_url=stack.url, api_key="unused", max_retries=2)
    conv = client.conversations.create()
    answer = client.responses.create(model="m", input="try", conversation=conv.id)
    assert answer.output_text == "echo: try"
    assert item_texts(client, conv.id) == ["try", "echo: try"]
    client.close()


# --- Idempotency-Key -----------------------------------------------------------------------------


def test_an_idempotency_key_with_another_body_is_a_400(stack: Stack, hub: FakeHub) -> None:
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/responses"
        headers = {"Idempotency-Key": "k-1"}
        first = http.post(url, json={"model": "m", "input": "one"}, headers=headers)
        assert first.status_code == 200
        same = http.post(url, json={"input": "one", "model": "m"}, headers=headers)
        assert same.json()["id"] == first.json()["id"]
        other = http.post(url, json={"model": "m", "input": "two"}, headers=headers)
    assert other.status_code == 400
    error = other.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "idempotency_key_reused"
    assert len(hub.chat_requests()) == 1


def test_an_idempotency_key_too_long_is_a_400(stack: Stack, hub: FakeHub) -> None:
    with httpx.Client(timeout=10) as http:
        r = http.post(
            f"{stack.url}/responses",
            json={"model": "m", "input": "x"},
            headers={"Idempotency-Key": "k" * 3000},
        )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_idempotency_key"
    assert hub.chat_requests() == []


# --- conversations and their items ------------------------------------------------------------


def test_conversation_items_with_a_key_are_appended_once(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create()
    message = {"type": "message", "role": "user", "content": "note"}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations/{conv.id}/items"
        headers = {"Idempotency-Key": "items-1"}
        first = http.post(url, json={"items": [message]}, headers=headers)
        again = http.post(url, json={"items": [message]}, headers=headers)
        other = http.post(url, json={"items": [{**message, "content": "other"}]}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["data"][0]["id"] == first.json()["data"][0]["id"]
    assert other.status_code == 400
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert item_texts(client, conv.id) == ["note"]


def test_a_conversation_created_with_a_key_and_items_is_created_once(
    stack: Stack, hub: FakeHub
) -> None:
    body = {"items": [{"type": "message", "role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations"
        made = [http.post(url, json=body, headers={"Idempotency-Key": "c-1"}) for _ in range(2)]
    assert [r.status_code for r in made] == [200, 200]
    assert made[0].json()["id"] == made[1].json()["id"]


def test_sdk_retries_of_conversation_items_append_once(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    conv = client.conversations.create()
    body = {"items": [{"type": "message", "role": "user", "content": "once"}]}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations/{conv.id}/items"
        first = http.post(url, json=body, headers={"x-stainless-retry-count": "0"})
        retry = http.post(url, json=body, headers={"x-stainless-retry-count": "1"})
        assert retry.json()["data"][0]["id"] == first.json()["data"][0]["id"]
        assert item_texts(client, conv.id) == ["once"]
        # The same body as a new call (a first attempt) is appended again.
        again = http.post(url, json=body, headers={"x-stainless-retry-count": "0"})
    assert again.json()["data"][0]["id"] != first.json()["data"][0]["id"]
    assert item_texts(client, conv.id) == ["once", "once"]


# --- creating conversations ---------------------------------------------------------------------


class LosingTransport(httpx2.BaseTransport):
    """An HTTP transport of the SDK's HTTP library that loses the reply to the first ``lose`` POSTs to ``path``: the router
    gets and carries out the request, the client sees a timeout (and the SDK retries)."""

    def __init__(self, path: str, lose: int = 1) -> None:
        self.inner = httpx2.HTTPTransport()
        self.path = path
        self.lose = lose
        self.lost: list[httpx2.Response] = []
        self.sent: list[httpx2.Request] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path.endswith(self.path):
            self.sent.append(request)
            if len(self.lost) < self.lose:
                response.read()
                self.lost.append(response)
                raise httpx2.ReadTimeout("the reply was lost", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def losing_client(stack: Stack, path: str, lose: int = 1) -> tuple[openai.OpenAI, LosingTransport]:
    transport = LosingTransport(path, lose)
    client = openai.OpenAI(
        base_url=stack.url, api_key="unused", http_client=httpx2.Client(transport=transport)
    )  # default retries (2)
    return client, transport


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stored_stack(request: pytest.FixtureRequest, hub: FakeHub, tmp_path: Path) -> Iterator[Stack]:
    """The gateway on a SQL backend (the ``stack`` fixture's is the memory one)."""
    schema = "retries_" + secrets.token_hex(6)
    state = replace(
        StateSettings(),
        backend=request.param,
        sqlite_path=str(tmp_path / "state.db"),
        postgres_dsn=POSTGRES_DSN,
        postgres_schema=schema,
        postgres_pool_size=2,
    )
    s = Stack(hub.url, state=state, router={"default_model": "fake-model"}).start()
    try:
        yield s
    finally:
        s.stop()
        if request.param == "postgres":
            asyncio.run(_drop_schema(schema))


async def _drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.parametrize("lose", [1, 2])
def test_an_sdk_retried_create_after_a_lost_reply_returns_the_first_conversation(
    stack: Stack, hub: FakeHub, lose: int
) -> None:
    check_lost_create_replies(stack, lose)


def test_sdk_retried_creates_on_sql_backends(stored_stack: Stack, hub: FakeHub) -> None:
    check_lost_create_replies(stored_stack, 2)
    with httpx.Client(timeout=10) as http:
        url = f"{stored_stack.url}/conversations"
        made = [
            http.post(url, json={}, headers={"x-stainless-retry-count": "0"}).json()["id"]
            for _ in range(2)
        ]
        retry = http.post(url, json={}, headers={"x-stainless-retry-count": "1"}).json()["id"]
    assert made[0] != made[1]
    assert retry == made[0]  # the window's first one, unused


def check_lost_create_replies(stack: Stack, lose: int) -> None:
    client, transport = losing_client(stack, "/conversations", lose)
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "first words"}],
        metadata={"topic": "retries"},
    )
    assert [r.headers["x-stainless-retry-count"] for r in transport.sent] == [
        str(i) for i in range(lose + 1)
    ]
    assert [r.status_code for r in transport.lost] == [200] * lose
    # The conversation the lost attempts made is the one the retry answers: no second one.
    assert {r.json()["id"] for r in transport.lost} == {conv.id}
    assert conv.metadata == {"topic": "retries"}
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [text_of(i.model_dump()) for i in items] == ["first words"]
    client.close()


def test_sdk_conversation_creates_sent_twice_on_purpose_make_two(
    stack: Stack, hub: FakeHub
) -> None:
    client = openai.OpenAI(base_url=stack.url, api_key="unused")
    made = [client.conversations.create(metadata={"k": "v"}) for _ in range(3)]
    assert len({c.id for c in made}) == 3
    empty = [client.conversations.create() for _ in range(2)]
    assert len({c.id for c in empty}) == 2
    client.close()


def test_an_sdk_retry_keeps_the_item_ids_of_the_first_attempt(stack: Stack, hub: FakeHub) -> None:
    body = {"items": [{"type": "message", "role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations"
        first = http.post(url, json=body, headers={"x-stainless-retry-count": "0"})
        retry = http.post(url, json=body, headers={"x-stainless-retry-count": "2"})
        assert first.status_code == retry.status_code == 200
        assert retry.json() == first.json()
        listed = http.get(f"{url}/{first.json()['id']}/items").json()["data"]
    assert len(listed) == 1 and listed[0]["id"].startswith("msg_")


def test_a_retry_never_returns_a_conversation_that_was_used(stack: Stack, hub: FakeHub) -> None:
    # The first conversation of this body was given to its client, who used it: a retry of
    # another call with the same body cannot be its lost first attempt, so it gets its own.
    client = stack.client()
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations"
        first = http.post(url, json={}, headers={"x-stainless-retry-count": "0"}).json()
        client.conversations.items.create(
            first["id"], items=[{"type": "message", "role": "user", "content": "mine"}]
        )
        retry = http.post(url, json={}, headers={"x-stainless-retry-count": "1"}).json()
        renamed = http.post(
            url, json={"metadata": {"a": "b"}}, headers={"x-stainless-retry-count": "0"}
        ).json()
        http.post(f"{url}/{renamed['id']}", json={"metadata": {"a": "c"}})
        retry_renamed = http.post(
            url, json={"metadata": {"a": "b"}}, headers={"x-stainless-retry-count": "1"}
        ).json()
    assert retry["id"] != first["id"]
    assert item_texts(client, retry["id"]) == []
    assert retry_renamed["id"] != renamed["id"]
    assert retry_renamed["metadata"] == {"a": "b"}


def test_an_sdk_retry_in_the_next_window_finds_the_first_attempt(
    stack: Stack, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversations, "RETRY_WINDOW_S", 1.0)
    time.sleep(1.0 - time.time() % 1.0 + 0.05)  # the start of a window
    body = {"metadata": {"window": "crossed"}}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations"
        first = http.post(url, json=body, headers={"x-stainless-retry-count": "0"}).json()
        time.sleep(1.0 - time.time() % 1.0 + 0.05)  # the next window
        retry = http.post(url, json=body, headers={"x-stainless-retry-count": "1"}).json()
    assert retry["id"] == first["id"]


def test_a_conversation_key_with_another_body_is_a_400(stack: Stack, hub: FakeHub) -> None:
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations"
        headers = {"Idempotency-Key": "c-2"}
        first = http.post(url, json={"metadata": {"k": "v"}}, headers=headers)
        other = http.post(url, json={"metadata": {"k": "w"}}, headers=headers)
    assert first.status_code == 200
    assert other.status_code == 400
    error = other.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "idempotency_key_reused"


LoseReply = Callable[[str], list[Any]]


@pytest.fixture
def lose_state_reply(monkeypatch: pytest.MonkeyPatch) -> LoseReply:
    """``lose(method)``: the state service carries out the router's first call of ``method`` but
    its reply is lost (the router's deadline runs out), so the router cannot know whether it was
    written. Returns the list the lost call's reply is put in."""

    def lose(method: str) -> list[Any]:
        lost: list[Any] = []
        real = state_client.StateClient._call

        async def call(self: Any, name: str, request: Any, **kwargs: Any) -> Any:
            reply = await real(self, name, request, **kwargs)
            if name == method and not lost:
                lost.append(reply)
                raise errors.from_state_error(
                    RemoteError(
                        code=grpc.StatusCode.DEADLINE_EXCEEDED,
                        reason="",
                        message="the state service did not answer in time",
                        metadata={},
                        domain="",
                    )
                )
            return reply

        monkeypatch.setattr(state_client.StateClient, "_call", call)
        return lost

    return lose


@pytest.fixture
def lost_state_reply(lose_state_reply: LoseReply) -> list[Any]:
    """The lost reply of the router's first CreateConversation call."""
    return lose_state_reply("CreateConversation")


@pytest.mark.parametrize(
    ("headers", "retry"),
    [
        ({}, "false"),
        ({"x-stainless-retry-count": "0"}, "true"),
        ({"Idempotency-Key": "items-lost"}, "true"),
    ],
)
def test_items_whose_append_outcome_is_unknown_say_whether_a_retry_is_safe(
    stack: Stack, hub: FakeHub, lose_state_reply: LoseReply, headers: dict[str, str], retry: str
) -> None:
    client = stack.client()
    conv = client.conversations.create()
    lost = lose_state_reply("CreateConversationItems")
    body = {"items": [{"type": "message", "role": "user", "content": "once"}]}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations/{conv.id}/items"
        r = http.post(url, json=body, headers=headers)
        assert r.status_code == 503
        assert r.headers["x-should-retry"] == retry
        assert len(lost) == 1
        if retry == "true":
            again_headers = dict(headers)
            if "x-stainless-retry-count" in headers:
                again_headers["x-stainless-retry-count"] = "1"
            again = http.post(url, json=body, headers=again_headers)
            assert again.status_code == 200
            assert again.json()["data"][0]["id"] == lost[0].items[0].id
    assert item_texts(client, conv.id) == ["once"]


@pytest.mark.parametrize(
    ("headers", "retry"),
    [
        ({}, "false"),
        ({"x-stainless-retry-count": "0"}, "true"),
        ({"Idempotency-Key": "c-lost"}, "true"),
    ],
)
def test_a_create_whose_outcome_is_unknown_says_whether_a_retry_is_safe(
    stack: Stack, hub: FakeHub, lost_state_reply: list[Any], headers: dict[str, str], retry: str
) -> None:
    body = {"items": [{"type": "message", "role": "user", "content": "x"}]}
    with httpx.Client(timeout=10) as http:
        url = f"{stack.url}/conversations"
        r = http.post(url, json=body, headers=headers)
        assert r.status_code == 503
        assert r.headers["x-should-retry"] == retry
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        if retry == "true":
            again = http.post(
                url,
                json=body,
                headers={**headers, "x-stainless-retry-count": "1"}
                if "x-stainless-retry-count" in headers
                else headers,
            )
            assert again.status_code == 200
            assert again.json()["id"] == lost_state_reply[0].conversation.id


def test_the_sdk_retries_a_create_whose_store_reply_was_lost(
    stack: Stack, hub: FakeHub, lost_state_reply: list[Any]
) -> None:
    client = openai.OpenAI(base_url=stack.url, api_key="unused")  # default retries
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "once"}]
    )
    assert conv.id == lost_state_reply[0].conversation.id
    assert item_texts(client, conv.id) == ["once"]
    client.close()


# --- streamed conversation turns ------------------------------------------------------------------


async def test_32_concurrent_streamed_turns_on_one_conversation_all_succeed(
    stack: Stack, hub: FakeHub
) -> None:
    client = openai.AsyncOpenAI(base_url=stack.url, api_key="unused")  # default retries
    conv = await client.conversations.create()

    async def turn(i: int) -> str:
        async with client.responses.stream(
            model="m", input=f"question {i}", conversation=conv.id
        ) as events:
            final = await events.get_final_response()
        return final.output_text

    answers = await asyncio.gather(*(turn(i) for i in range(32)))
    assert sorted(answers) == sorted(f"echo: question {i}" for i in range(32))
    items = [
        text_of(i.model_dump())
        async for i in client.conversations.items.list(conv.id, order="asc", limit=100)
    ]
    await client.close()
    assert len(items) == 64
    seen = [[text_of(m) for m in r["messages"]] for r in hub.chat_requests()]
    for j in range(32):
        question, answer = items[2 * j], items[2 * j + 1]
        assert answer == f"echo: {question}"
        # The turn was answered on exactly the conversation stored before it.
        assert items[: 2 * j + 1] in seen


def test_a_streamed_conversation_turn_that_loses_the_race_is_run_again(
    stack: Stack, hub: FakeHub
) -> None:
    # A non-streamed turn (not held back by the streamed turns' lock) wins the race; the streamed
    # one is run again on the new history before anything is sent.
    client = stack.client()
    conv = client.conversations.create()
    hub.enqueue(Reply(text="streamed, first try", delay_s=0.6), Reply(text="plain", delay_s=0.1))
    result: dict[str, Any] = {}

    def streamed() -> None:
        with httpx.Client(timeout=10) as http:
            r = http.post(
                f"{stack.url}/responses",
                json={"model": "m", "input": "streamed", "conversation": conv.id, "stream": True},
            )
            result["status"] = r.status_code
            result["events"] = sse_events(r.content)

    thread = threading.Thread(target=streamed)
    thread.start()
    time.sleep(0.2)
    client.responses.create(model="m", input="plain", conversation=conv.id)
    thread.join(10)
    assert result["status"] == 200
    events = result["events"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "echo: streamed"
    assert item_texts(client, conv.id) == ["plain", "plain", "streamed", "echo: streamed"]


# --- the store's outcome unknown ------------------------------------------------------------------


def _stop_state_soon(stack: Stack, after_s: float) -> threading.Thread:
    def stop() -> None:
        time.sleep(after_s)
        stack.stop_state()

    thread = threading.Thread(target=stop)
    thread.start()
    return thread


def test_a_stream_whose_store_outcome_is_unknown_says_so(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="a b c d", chunk_delay_s=0.3))
    stopper = _stop_state_soon(stack, 0.4)
    with httpx.Client(timeout=20) as http:
        r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x", "stream": True})
    stopper.join()
    events = sse_events(r.content)
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "store_outcome_unknown"
    # Nothing that could contradict a stored turn.
    assert not any(e["type"] in ("response.failed", "response.completed") for e in events)


@pytest.mark.parametrize(
    ("headers", "retry"), [({}, "false"), ({"x-stainless-retry-count": "0"}, "true")]
)
def test_a_turn_that_may_be_stored_says_whether_a_retry_is_safe(
    stack: Stack, hub: FakeHub, headers: dict[str, str], retry: str
) -> None:
    # Without a key, a retry could store the turn twice; an SDK's retry would find it.
    hub.enqueue(Reply(text="late", delay_s=0.6))
    stopper = _stop_state_soon(stack, 0.2)
    with httpx.Client(timeout=20) as http:
        r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"}, headers=headers)
    stopper.join()
    assert r.status_code == 503
    assert r.headers["x-should-retry"] == retry
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "127.0.0.1" not in error["message"]


# --- the hub's answer of the wrong shape ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"choices": "none"}',
        b'{"choices": [{"message": "text", "finish_reason": "stop"}]}',
        b'{"choices": [{"message": {"content": "x", "tool_calls": [{"function": 3}]}}]}',
        b"[]",
    ],
)
def test_hub_json_of_the_wrong_shape_is_a_502(stack: Stack, hub: FakeHub, raw: bytes) -> None:
    hub.enqueue(Reply(raw_body=raw))
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
    assert r.status_code == 502, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"choices": [{"message": {"content": 5}, "finish_reason": "stop"}]}',
        b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "many"}}',
    ],
)
def test_hub_json_with_values_of_the_wrong_type_is_a_502(
    stack: Stack, hub: FakeHub, raw: bytes
) -> None:
    # Not an answer without its text or token counts: every case is in test_hub_shapes.py.
    hub.enqueue(Reply(raw_body=raw))
    with httpx.Client(timeout=10) as http:
        r = http.post(f"{stack.url}/responses", json={"model": "m", "input": "x"})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_malformed_response"


async def test_32_streamed_turns_on_one_conversation_through_two_routers_all_succeed(
    stack: Stack, hub: FakeHub
) -> None:
    # Across replicas nothing serializes the turns before the state service: the losers of each
    # race are run again on the new history, by the router and then by the SDK's retries.
    second = GuardedStack(
        hub.url, state_port=stack.state_port, router={"default_model": "fake-model"}
    )
    await asyncio.to_thread(second.start)
    try:
        clients = [openai.AsyncOpenAI(base_url=s.url, api_key="unused") for s in (stack, second)]
        conv = await clients[0].conversations.create()

        async def turn(i: int) -> str:
            async with clients[i % 2].responses.stream(
                model="m", input=f"question {i}", conversation=conv.id
            ) as events:
                final = await events.get_final_response()
            return final.output_text

        answers = await asyncio.gather(*(turn(i) for i in range(32)))
        assert sorted(answers) == sorted(f"echo: question {i}" for i in range(32))
        items = [
            text_of(i.model_dump())
            async for i in clients[1].conversations.items.list(conv.id, order="asc", limit=100)
        ]
        for c in clients:
            await c.close()
    finally:
        await asyncio.to_thread(second.stop)
    assert len(items) == 64
    for j in range(32):
        assert items[2 * j + 1] == f"echo: {items[2 * j]}"
