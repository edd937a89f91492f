"""Compaction (POST /v1/responses/compact, context_management) and the reasoning
``encrypted_content`` the gateway mints for ``store: false`` clients, through the openai SDK,
the real router and state service, and the fake hub."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from router_svc import compaction, sealing, state_records
from router_svc.state_client import StateClient
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import ROUTER_READY, STATE_READY, Process, Stack, state_process

KEY = base64.b64encode(b"k" * 32).decode()
SUMMARY = "The user is planning a trip to Lisbon in May and wants a budget under 900 EUR."


@pytest.fixture(autouse=True)
def _no_tokenizer(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thresholds here are set against the estimate: the hub has no tokenizer unless a test
    gives it one (a reset within a test keeps it so)."""
    reset = hub.reset

    def reset_without_tokenizer() -> None:
        reset()
        hub.tokenizer = False

    monkeypatch.setattr(hub, "reset", reset_without_tokenizer)
    hub.tokenizer = False


@pytest.fixture
def keyed(hub: FakeHub) -> Iterator[Stack]:
    """A gateway with two tenants and a sealing key of its own."""
    s = Stack(
        hub.url,
        router={
            "default_model": "fake-model",
            "api_keys": "key-a=tenant-a,key-b=tenant-b",
            "seal_keys": f"k1={KEY}",
        },
    ).start()
    yield s
    s.stop()


def history() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "I want to go to Lisbon in May."},
        {"role": "assistant", "content": "Great choice! What is your budget?"},
        {"role": "user", "content": "Under 900 EUR."},
    ]


def _dumped(item: Any) -> dict[str, Any]:
    """An output item as input again. (The SDK types a user message of a compaction's output as
    an assistant message and warns when dumping its input_text parts.)"""
    dumped: dict[str, Any] = item.model_dump(exclude_none=True, warnings=False)
    return dumped


def _roles(messages: list[dict[str, Any]]) -> list[str]:
    return [m["role"] for m in messages]


def test_compact_returns_user_messages_and_a_sealed_summary(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SUMMARY, usage={"prompt_tokens": 40, "completion_tokens": 20}))
    compacted = client.responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
    assert compacted.object == "response.compaction"
    assert [i.type for i in compacted.output] == ["message", "message", "compaction"]
    assert [i.role for i in compacted.output[:2]] == ["user", "user"]  # type: ignore[union-attr]
    item = compacted.output[-1]
    assert item.type == "compaction"
    assert item.id.startswith("cmp_")
    assert item.encrypted_content.startswith("rgw1.")
    assert SUMMARY not in item.encrypted_content  # sealed, not merely encoded
    assert compacted.usage.input_tokens == 40
    assert compacted.usage.output_tokens == 20
    # The model was asked to summarize the whole history, the instruction last.
    (sent,) = hub.chat_requests()
    assert _roles(sent["messages"]) == ["user", "assistant", "user", "user"]
    assert sent["messages"][-1]["content"] == compaction.SUMMARY_PROMPT
    assert "Lisbon" in text_of(sent["messages"][0])


def test_a_replayed_compaction_item_sends_the_summary_instead(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SUMMARY))
    compacted = client.responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
    hub.reset()
    next_input = [
        *[_dumped(i) for i in compacted.output],
        {"role": "user", "content": "Which neighbourhood should I stay in?"},
    ]
    resp = client.responses.create(model="fake-model", input=next_input, store=False)  # type: ignore[arg-type]
    assert resp.status == "completed"
    (sent,) = hub.chat_requests()
    texts = [text_of(m) for m in sent["messages"]]
    assert _roles(sent["messages"]) == ["user", "user", "user", "user"]
    assert texts[0] == "I want to go to Lisbon in May."
    assert texts[2] == compaction.SUMMARY_HEADER + SUMMARY
    assert texts[3] == "Which neighbourhood should I stay in?"
    assert not any("What is your budget" in t for t in texts)  # replaced by the summary


def test_a_stored_compaction_item_is_replayed_through_previous_response_id(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SUMMARY))
    compacted = client.responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
    first = client.responses.create(
        model="fake-model",
        input=[_dumped(i) for i in compacted.output],  # type: ignore[misc]
    )
    hub.reset()
    client.responses.create(
        model="fake-model", input="And the food?", previous_response_id=first.id
    )
    (sent,) = hub.chat_requests()
    texts = [text_of(m) for m in sent["messages"]]
    assert compaction.SUMMARY_HEADER + SUMMARY in texts
    assert texts[-1] == "And the food?"
    assert "assistant" in _roles(sent["messages"])  # the first turn's answer, after the item
    assert not any("What is your budget" in t for t in texts)


def test_compact_continues_a_stored_chain(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    first = client.responses.create(model="fake-model", input="I like trains.")
    hub.reset()
    hub.enqueue(Reply(text=SUMMARY))
    compacted = client.responses.compact(
        model="fake-model", input="Plan the route.", previous_response_id=first.id
    )
    (sent,) = hub.chat_requests()
    assert [text_of(m) for m in sent["messages"]][:3] == [
        "I like trains.",
        "echo: I like trains.",
        "Plan the route.",
    ]
    assert [i.type for i in compacted.output] == ["message", "message", "compaction"]


def test_compact_errors_are_openai_shaped(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as missing:
        client.responses.compact(model="fake-model")
    assert missing.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.responses.compact(model="fake-model", input="x", previous_response_id="resp_nope")
    assert unknown.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    hub.enqueue(Reply(text=""))
    with pytest.raises(openai.APIStatusError) as empty:
        client.responses.compact(model="fake-model", input="x")
    assert empty.value.status_code == 502
    assert hub.chat_requests()  # the model was asked


def _compaction_of(stack: Stack, api_key: str, hub: FakeHub) -> dict[str, Any]:
    hub.enqueue(Reply(text=SUMMARY))
    compacted = stack.client(api_key).responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
    return _dumped(compacted.output[-1])


def test_a_compaction_item_cannot_be_used_by_another_tenant(keyed: Stack, hub: FakeHub) -> None:
    item = _compaction_of(keyed, "key-a", hub)
    hub.reset()
    other = keyed.client("key-b")
    with pytest.raises(openai.BadRequestError) as refused:
        other.responses.create(input=[item, {"role": "user", "content": "go on"}], store=False)  # type: ignore[list-item]
    body = refused.value.body
    assert body["param"] == "input[0].encrypted_content"  # type: ignore[index]
    assert body["code"] == "invalid_encrypted_content"  # type: ignore[index]
    assert hub.chat_requests() == []  # the hub never saw it
    # Its own tenant may use it.
    ok = keyed.client("key-a").responses.create(
        input=[item, {"role": "user", "content": "go on"}],  # type: ignore[list-item]
        store=False,
    )
    assert ok.status == "completed"


def _changed_body(content: str) -> str:
    prefix, key_id, body, ref = content.split(".")
    body = body[:-4] + ("AAAA" if not body.endswith("AAAA") else "BBBB")
    return ".".join((prefix, key_id, body, ref))


@pytest.mark.parametrize(
    "tamper",
    [
        _changed_body,  # the ciphertext
        lambda c: c.rpartition(".")[0] + ".cmp_" + "0" * 48,  # another ref under a known key
        lambda c: c.rpartition(".")[0],  # the ref dropped
        lambda c: c[: len("rgw1.k1.") + 10],  # cut short
        lambda c: "rgw1.k1.!!!not-base64!!!",
        lambda c: "not ours at all",
    ],
)
def test_tampered_compaction_content_is_a_400(keyed: Stack, hub: FakeHub, tamper: Any) -> None:
    item = _compaction_of(keyed, "key-a", hub)
    item["encrypted_content"] = tamper(item["encrypted_content"])
    with pytest.raises(openai.BadRequestError) as refused:
        keyed.client("key-a").responses.create(
            input=[{"role": "user", "content": "hi"}, item],  # type: ignore[list-item]
            store=False,
        )
    assert refused.value.body["param"] == "input[1].encrypted_content"  # type: ignore[index]


def test_a_key_rotation_keeps_old_content_open(hub: FakeHub) -> None:
    old = Stack(hub.url, router={"default_model": "fake-model", "seal_keys": f"k1={KEY}"}).start()
    try:
        item = _compaction_of(old, "unused", hub)
    finally:
        old.stop()
    new_key = base64.b64encode(b"n" * 32).decode()
    rotated = Stack(
        hub.url,
        router={"default_model": "fake-model", "seal_keys": f"k2={new_key},k1={KEY}"},
    ).start()
    try:
        hub.reset()
        client = rotated.client()
        client.responses.create(input=[item, {"role": "user", "content": "next"}], store=False)  # type: ignore[list-item]
        assert compaction.SUMMARY_HEADER + SUMMARY in [
            text_of(m) for m in hub.chat_requests()[-1]["messages"]
        ]
        hub.enqueue(Reply(text=SUMMARY))
        fresh = client.responses.compact(model="fake-model", input="x")
        assert fresh.output[-1].encrypted_content.startswith("rgw1.k2.")  # type: ignore[union-attr]
    finally:
        rotated.stop()


# --- the summary kept in the state service ------------------------------------------------------


def _state_calls(method: str) -> float:
    """The state calls of every router in this process so far, of one RPC."""
    count = REGISTRY.get_sample_value(
        "respgw_router_state_call_latency_seconds_count", {"method": method}
    )
    return count or 0.0


def _restored() -> float:
    return REGISTRY.get_sample_value("respgw_router_compactions_restored_total") or 0.0


@pytest.fixture
def replicas(hub: FakeHub) -> Iterator[tuple[Stack, Stack]]:
    """Two routers on one state service, both without --seal-keys (so each seals with a random
    key of its own, as replicas of a deployment without the Secret do), with two tenants."""
    router = {"default_model": "fake-model", "api_keys": "key-a=tenant-a,key-b=tenant-b"}
    a = Stack(hub.url, router=router).start()
    b = Stack(hub.url, router=router, state_port=a.state_port).start()
    yield a, b
    b.stop()
    a.stop()


def test_the_summary_is_stored_whatever_store_says(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text=SUMMARY))
    compacted = stack.client().responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
    item = compacted.output[-1]
    assert item.encrypted_content.endswith("." + item.id)  # type: ignore[union-attr]

    async def read(*tenants: str) -> list[Any]:
        state = StateClient(f"127.0.0.1:{stack.state_port}", timeout_s=5.0)
        try:
            return [
                await state.find(
                    state.get_compaction(state_records.get_compaction(tenant, str(item.id)))
                )
                for tenant in tenants
            ]
        finally:
            await state.close()

    # Kept for its tenant (single-tenant mode: "default") only.
    mine, theirs = stack.tl.run(read("default", "another"))
    assert mine is not None and mine.compaction.summary.decode() == SUMMARY
    assert theirs is None


def test_a_compaction_item_opens_on_another_replica(
    replicas: tuple[Stack, Stack], hub: FakeHub
) -> None:
    a, b = replicas
    item = _compaction_of(a, "key-a", hub)
    next_input = [item, {"role": "user", "content": "Which neighbourhood?"}]
    # The router that sealed it opens it itself: no state call.
    hub.reset()
    gets, restored = _state_calls("GetCompaction"), _restored()
    a.client("key-a").responses.create(input=next_input, store=False)  # type: ignore[arg-type]
    assert _state_calls("GetCompaction") == gets and _restored() == restored
    assert compaction.SUMMARY_HEADER + SUMMARY in [
        text_of(m) for m in hub.chat_requests()[-1]["messages"]
    ]
    # Another router has not its key: it restores the summary from the state service.
    hub.reset()
    resp = b.client("key-a").responses.create(input=next_input, store=False)  # type: ignore[arg-type]
    assert resp.status == "completed"
    assert _state_calls("GetCompaction") == gets + 1 and _restored() == restored + 1
    (sent,) = hub.chat_requests()
    texts = [text_of(m) for m in sent["messages"]]
    assert texts == [compaction.SUMMARY_HEADER + SUMMARY, "Which neighbourhood?"]


def test_another_replica_never_restores_another_tenants_item(
    replicas: tuple[Stack, Stack], hub: FakeHub
) -> None:
    a, b = replicas
    item = _compaction_of(a, "key-a", hub)
    hub.reset()
    for stack in (a, b):  # with the key (the seal), without it (the state service's tenancy)
        with pytest.raises(openai.BadRequestError) as refused:
            stack.client("key-b").responses.create(
                input=[{"role": "user", "content": "hi"}, item],  # type: ignore[list-item]
                store=False,
            )
        assert refused.value.body["param"] == "input[1].encrypted_content"  # type: ignore[index]
        assert refused.value.body["code"] == "invalid_encrypted_content"  # type: ignore[index]
    assert hub.chat_requests() == []


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c.rpartition(".")[0] + ".cmp_" + "0" * 48,  # a ref the tenant never had
        lambda c: c.rpartition(".")[0],  # no ref: nothing to restore it from
    ],
)
def test_another_replica_refuses_what_it_cannot_restore(
    replicas: tuple[Stack, Stack], hub: FakeHub, tamper: Any
) -> None:
    a, b = replicas
    item = _compaction_of(a, "key-a", hub)
    item["encrypted_content"] = tamper(item["encrypted_content"])
    with pytest.raises(openai.BadRequestError) as refused:
        b.client("key-a").responses.create(
            input=[{"role": "user", "content": "hi"}, item],  # type: ignore[list-item]
            store=False,
        )
    assert refused.value.body["param"] == "input[1].encrypted_content"  # type: ignore[index]


def _finished(client: openai.OpenAI, response_id: str) -> Any:
    deadline = time.monotonic() + 20
    done = client.responses.retrieve(response_id)
    while done.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        done = client.responses.retrieve(response_id)
    return done


@pytest.mark.parametrize("mode", ["whole", "stream", "background"])
def test_a_turns_compaction_is_restored_on_another_replica(
    replicas: tuple[Stack, Stack], hub: FakeHub, mode: str
) -> None:
    a, b = replicas
    client = a.client("key-a")
    body: Any = {
        "model": "fake-model",
        "input": [{"role": "user", "content": LONG}, {"role": "user", "content": "Where?"}],
        "context_management": [{"type": "compaction", "compact_threshold": 100}],
    }
    hub.enqueue(Reply(text=SUMMARY), Reply(text="Stay in Alfama."))
    if mode == "stream":
        with client.responses.stream(**body) as events:
            first = events.get_final_response()
    elif mode == "background":
        first = _finished(client, client.responses.create(**body, background=True).id)
    else:
        first = client.responses.create(**body)
    assert [i.type for i in first.output] == ["compaction", "message"]
    item = first.output[0]
    assert item.encrypted_content.endswith("." + item.id)  # type: ignore[union-attr]
    # The next turn of the chain through the other replica: the stored compaction item is
    # restored there, and the long message it replaced is not sent again.
    hub.reset()
    restored = _restored()
    b.client("key-a").responses.create(input="Thanks!", previous_response_id=first.id)
    texts = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
    assert texts == [
        LONG,
        "Where?",
        compaction.SUMMARY_HEADER + SUMMARY,
        "Stay in Alfama.",
        "Thanks!",
    ]
    assert _restored() == restored + 1
    # A store: false client replaying the item itself is served alike.
    hub.reset()
    b.client("key-a").responses.create(
        input=[_dumped(item), {"role": "user", "content": "More?"}],  # type: ignore[list-item]
        store=False,
    )
    texts = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
    assert texts == [compaction.SUMMARY_HEADER + SUMMARY, "More?"]


def test_a_compaction_item_outlives_a_router_restart(tmp_path: Path, hub: FakeHub) -> None:
    """Real processes: the router that compacted is restarted without --seal-keys (a new random
    key), and the item it handed out still reaches the model as its summary."""
    state = state_process("--backend", "sqlite", "--sqlite-path", str(tmp_path / "state.db"))
    state_port = state.start(STATE_READY)
    args = ["router", "--port", "0", "--hub-url", hub.url]
    args += ["--state-address", f"127.0.0.1:{state_port}", "--default-model", "fake-model"]
    try:
        first = Process(args)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{first.start(ROUTER_READY)}/v1",
            api_key="unused",
            max_retries=0,
        ) as client:
            hub.enqueue(Reply(text=SUMMARY))
            compacted = client.responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
        assert first.stopped_gracefully()
        item = _dumped(compacted.output[-1])
        again = Process(args)
        try:
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{again.start(ROUTER_READY)}/v1",
                api_key="unused",
                max_retries=0,
            ) as client:
                hub.reset()
                resp = client.responses.create(
                    input=[item, {"role": "user", "content": "Which neighbourhood?"}],  # type: ignore[list-item]
                    store=False,
                )
            assert resp.status == "completed"
            texts = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
            assert compaction.SUMMARY_HEADER + SUMMARY in texts
            assert "Great choice! What is your budget?" not in texts
        finally:
            assert again.stopped_gracefully()
    finally:
        assert state.stopped_gracefully()


# --- context_management ------------------------------------------------------------------------

LONG = "word " * 200  # about 250 tokens by the estimate


def test_context_management_compacts_a_long_history(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    first = client.responses.create(model="fake-model", input=LONG)
    hub.reset()
    hub.enqueue(Reply(text=SUMMARY), Reply(text="Stay in Alfama."))
    resp = client.responses.create(
        model="fake-model",
        input="Where should I stay?",
        previous_response_id=first.id,
        context_management=[{"type": "compaction", "compact_threshold": 100}],
    )
    assert [i.type for i in resp.output] == ["compaction", "message"]
    assert resp.output_text == "Stay in Alfama."
    summarizing, answering = hub.chat_requests()
    assert summarizing["messages"][-1]["content"] == compaction.SUMMARY_PROMPT
    texts = [text_of(m) for m in answering["messages"]]
    assert texts == [LONG, "Where should I stay?", compaction.SUMMARY_HEADER + SUMMARY]
    # The next turn of the chain is sent the summary, not the long answer it replaced.
    hub.reset()
    client.responses.create(model="fake-model", input="Thanks!", previous_response_id=resp.id)
    texts = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
    assert texts == [
        LONG,
        "Where should I stay?",
        compaction.SUMMARY_HEADER + SUMMARY,
        "Stay in Alfama.",
        "Thanks!",
    ]
    stored = client.responses.retrieve(resp.id)
    assert stored.output[0].type == "compaction"
    # Its events, replayed (it was not streamed): the compaction as a live stream sends it.
    with client.responses.stream(response_id=resp.id) as replay:
        kinds = [e.type for e in replay]
        replayed = replay.get_final_response()
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.compaction.compacting",
        "response.output_item.done",
    ]
    assert replayed.output[0].model_dump() == stored.output[0].model_dump()


def test_the_hubs_tokenizer_decides_when_it_has_one(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    body: Any = {
        "model": "fake-model",
        "input": LONG,
        "instructions": "Be brief.",
        "context_management": [{"type": "compaction", "compact_threshold": 100}],
    }
    hub.tokenizer = True
    hub.token_count = 99  # the estimate says about 250; the tokenizer knows better
    resp = client.responses.create(**body)
    assert [i.type for i in resp.output] == ["message"]
    (counted,) = hub.tokenize_requests()
    assert counted == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": LONG}],
        "add_generation_prompt": True,
    }
    hub.token_count = 100
    hub.enqueue(Reply(text=SUMMARY), Reply(text="ok"))
    resp = client.responses.create(**body)
    assert [i.type for i in resp.output] == ["compaction", "message"]


def test_without_a_tokenizer_the_estimate_is_used_and_it_is_asked_once(
    stack: Stack, hub: FakeHub
) -> None:
    client = stack.client()
    for _ in range(2):
        hub.enqueue(Reply(text=SUMMARY), Reply(text="ok"))
        resp = client.responses.create(
            model="fake-model",
            input=LONG,
            context_management=[{"type": "compaction", "compact_threshold": 100}],
        )
        assert [i.type for i in resp.output] == ["compaction", "message"]
    assert len(hub.tokenize_requests()) == 1  # a 404 once; then only the estimate


def test_context_management_under_the_threshold_does_nothing(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    resp = client.responses.create(
        model="fake-model",
        input="short",
        context_management=[{"type": "compaction", "compact_threshold": 10000}],
    )
    assert [i.type for i in resp.output] == ["message"]
    assert len(hub.chat_requests()) == 1


def test_context_management_compacts_in_a_stream(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SUMMARY), Reply(text="Stay in Alfama."))
    with client.responses.stream(
        model="fake-model",
        input=[{"role": "user", "content": LONG}, {"role": "user", "content": "Where?"}],
        context_management=[{"type": "compaction", "compact_threshold": 100}],
    ) as events:
        kinds = [e.type for e in events]
        final = events.get_final_response()
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.compaction.compacting",
        "response.output_item.done",
    ]
    assert kinds[-1] == "response.completed"
    assert [i.type for i in final.output] == ["compaction", "message"]
    assert final.output[0].encrypted_content.startswith("rgw1.")  # type: ignore[union-attr]
    assert final.output_text == "Stay in Alfama."
    texts = [text_of(m) for m in hub.chat_requests()[-1]["messages"]]
    assert texts[-1] == compaction.SUMMARY_HEADER + SUMMARY
    stored = client.responses.retrieve(final.id)
    assert stored.output[0].model_dump() == final.output[0].model_dump()


def test_a_background_turn_compacts_too(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text=SUMMARY), Reply(text="Later answer."))
    queued = client.responses.create(
        model="fake-model",
        input=LONG,
        background=True,
        context_management=[{"type": "compaction", "compact_threshold": 100}],
    )
    deadline = time.monotonic() + 20
    done = client.responses.retrieve(queued.id)
    while done.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        done = client.responses.retrieve(queued.id)
    assert done.status == "completed"
    assert [i.type for i in done.output] == ["compaction", "message"]
    assert done.output_text == "Later answer."


# --- reasoning encrypted_content --------------------------------------------------------------


def test_reasoning_round_trips_sealed_for_store_false(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(
        Reply(
            text=None,
            reasoning="The user wants the weather; call the tool.",
            tool_calls=[{"id": "call_1", "name": "weather", "arguments": "{}"}],
            finish_reason="tool_calls",
        )
    )
    tools: Any = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
    first = client.responses.create(
        model="fake-model",
        input="Weather?",
        tools=tools,
        store=False,
        include=["reasoning.encrypted_content"],
    )
    reasoning = first.output[0]
    assert reasoning.type == "reasoning"
    assert reasoning.encrypted_content is not None
    assert reasoning.encrypted_content.startswith("rgw1.")
    hub.reset()
    # Codex's way: the whole input again, with the call's output.
    replay: list[Any] = [
        {"role": "user", "content": "Weather?"},
        *[_dumped(i) for i in first.output],
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    client.responses.create(
        model="fake-model",
        input=replay,
        tools=tools,
        store=False,
        include=["reasoning.encrypted_content"],
    )
    messages = hub.chat_requests()[-1]["messages"]
    assert _roles(messages) == ["user", "assistant", "tool"]
    assert messages[1]["reasoning_content"] == "The user wants the weather; call the tool."
    assert messages[1]["tool_calls"][0]["id"] == "call_1"


def test_reasoning_is_sealed_in_a_stream(stack: Stack, hub: FakeHub) -> None:
    client = stack.client()
    hub.enqueue(Reply(text="It is sunny.", reasoning="Think about the sun."))
    with client.responses.stream(
        model="fake-model", input="Weather?", store=False, include=["reasoning.encrypted_content"]
    ) as events:
        done = [e for e in events if e.type == "response.output_item.done"]
        final = events.get_final_response()
    assert done[0].item.type == "reasoning"
    sealed = done[0].item.encrypted_content
    assert sealed is not None and sealed.startswith("rgw1.")
    assert final.output[0].encrypted_content == sealed  # type: ignore[union-attr]
    hub.reset()
    client.responses.create(
        model="fake-model",
        input=[
            {"role": "user", "content": "Weather?"},
            *[_dumped(i) for i in final.output],  # type: ignore[list-item]
            {"role": "user", "content": "And tomorrow?"},
        ],
        store=False,
    )
    messages = hub.chat_requests()[-1]["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": "It is sunny.",
        "reasoning_content": "Think about the sun.",
    }


def test_reasoning_is_not_sealed_unless_asked(stack: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="x", reasoning="thoughts"))
    resp = stack.client().responses.create(model="fake-model", input="q", store=False)
    assert resp.output[0].type == "reasoning"
    assert resp.output[0].encrypted_content is None


def test_sealed_reasoning_of_another_tenant_is_refused(keyed: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="x", reasoning="secret thoughts"))
    a = keyed.client("key-a").responses.create(
        input="q", store=False, include=["reasoning.encrypted_content"]
    )
    replay: list[Any] = [
        {"role": "user", "content": "q"},
        *[_dumped(i) for i in a.output],
        {"role": "user", "content": "more"},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        keyed.client("key-b").responses.create(input=replay, store=False)
    assert refused.value.body["param"] == "input[1].encrypted_content"  # type: ignore[index]
    # A reasoning item sealed as reasoning does not open as a compaction summary either.
    forged = {"type": "compaction", "encrypted_content": _dumped(a.output[0])["encrypted_content"]}
    with pytest.raises(openai.BadRequestError):
        keyed.client("key-a").responses.create(input=[forged, {"role": "user", "content": "x"}])  # type: ignore[list-item]


def test_foreign_reasoning_content_is_left_alone_on_a_chat_hub(stack: Stack, hub: FakeHub) -> None:
    """Encrypted content of another provider (a client that switched servers) is not ours to
    open: the item is not replayed, as any stored reasoning is not."""
    resp = stack.client().responses.create(
        model="fake-model",
        input=[
            {"role": "user", "content": "q"},
            {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "gAAAAB..."},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "more"},
        ],
        store=False,
    )
    assert resp.status == "completed"
    assert "reasoning_content" not in hub.chat_requests()[-1]["messages"][1]


# --- a Responses hub -------------------------------------------------------------------------


def test_compact_on_a_responses_hub_without_its_own_endpoint(hub: FakeHub) -> None:
    s = Stack(hub.url, router={"default_model": "fake-model", "hub_api": "responses"}).start()
    try:
        # The fake hub has no /v1/responses/compact (a 404): the gateway summarizes itself.
        hub.enqueue(Reply(text=SUMMARY))
        compacted = s.client().responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
        assert compacted.output[-1].type == "compaction"
        assert hub.paths == ["/v1/responses"]
        summarizing = hub.requests[-1]
        assert summarizing["store"] is False
        assert summarizing["input"][-1]["content"][0]["text"] == compaction.SUMMARY_PROMPT
        hub.reset()
        next_input: list[Any] = [
            *[_dumped(i) for i in compacted.output],
            {"role": "user", "content": "next"},
        ]
        s.client().responses.create(
            input=next_input,
            store=False,
        )
        sent = hub.requests[-1]["input"]
        assert [i.get("type", "message") for i in sent] == ["message"] * 4
        assert sent[2]["content"][0]["text"] == compaction.SUMMARY_HEADER + SUMMARY
    finally:
        s.stop()


def test_compact_on_a_responses_hub_with_its_own_endpoint(hub: FakeHub) -> None:
    """OpenAI (or vLLM's stateful layer) compacts by itself: its item is passed through, and
    sent back to it untouched."""
    s = Stack(hub.url, router={"default_model": "fake-model", "hub_api": "responses"}).start()
    try:
        hub.compact_endpoint = True
        client = s.client()
        first = client.responses.create(input="I like trains.")
        hub.enqueue(Reply(text=SUMMARY))
        compacted = client.responses.compact(
            model="fake-model", input="Plan it.", previous_response_id=first.id
        )
        assert hub.paths[-1] == "/v1/responses/compact"
        sent = hub.requests[-1]
        assert [i["role"] for i in sent["input"]] == ["user", "assistant", "user"]
        item = _dumped(compacted.output[-1])
        assert item == {
            "id": "cmp_upstream",
            "type": "compaction",
            "encrypted_content": f"hub:{SUMMARY}",
        }
        client.responses.create(input=[item, {"role": "user", "content": "go"}], store=False)  # type: ignore[list-item]
        assert hub.requests[-1]["input"][0] == item
    finally:
        s.stop()


def test_the_compact_route_is_json_only(stack: Stack) -> None:
    answer = httpx.post(f"{stack.url}/responses/compact", content=b"[1]")
    assert answer.status_code in (400, 415)
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_sealing_module_refuses_other_tenants_and_purposes() -> None:
    sealer = sealing.Sealer(sealing.parse_keys(f"k1={KEY}"))
    sealed = sealer.seal("text", tenant="a", purpose=sealing.REASONING)
    assert sealer.open(sealed, tenant="a", purpose=sealing.REASONING) == "text"
    assert sealer.open(sealed, tenant="b", purpose=sealing.REASONING) is None
    assert sealer.open(sealed, tenant="a", purpose=sealing.COMPACTION) is None


def test_the_tool_loop_is_sent_the_summary_too(hub: FakeHub, tmp_path: Path) -> None:
    from tests.acceptance.test_code_interpreter import CODE_INTERPRETER, Bootstrap

    sandbox = Bootstrap(tmp_path / "sessions", call_timeout_s=2.0, call_cpu_s=2)
    s = Stack(
        hub.url, router={"default_model": "fake-model", "bootstrap_address": sandbox.address}
    ).start()
    try:
        client = s.client()
        hub.enqueue(Reply(text=SUMMARY))
        compacted = client.responses.compact(model="fake-model", input=history())  # type: ignore[arg-type]
        hub.reset()
        next_input: list[Any] = [
            *[_dumped(i) for i in compacted.output],
            {"role": "user", "content": "Compute the budget per day."},
        ]
        hub.enqueue(Reply(text="About 128 EUR a day."))
        resp = client.responses.create(input=next_input, tools=[CODE_INTERPRETER], store=False)
        assert resp.output_text == "About 128 EUR a day."
        (sent,) = hub.chat_requests()
        assert "python" in [t["function"]["name"] for t in sent["tools"]]  # the tool loop ran
        texts = [text_of(m) for m in sent["messages"]]
        assert compaction.SUMMARY_HEADER + SUMMARY in texts
        assert not any("What is your budget" in t for t in texts)
    finally:
        s.stop()
        sandbox.stop()
