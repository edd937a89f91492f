"""One turn of POST /v1/responses, unit by unit: the session key, the upstream body, and the store
path's decisions (the history cache and require_intact_chain, Idempotency-Keys and SDK retries,
conversation versions, an outage) against a real state service (memory backend, on 127.0.0.1:0)
and the fake hub; streamed turns (router_svc.streaming) too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from respgw.state.v1 import state_service_pb2 as pb
from router_svc import app as router_app
from router_svc import errors, idempotency, inputs, streaming, turn, validate
from router_svc.config import RouterSettings
from router_svc.dialects import dialect_for
from router_svc.services import Services
from state_svc import server as state_server
from state_svc.config import StateSettings
from tests.fakehub import FakeHub, Reply

TENANT = "t1"


def request(**body: Any) -> validate.TurnRequest:
    return validate.parse_turn_request({"model": "fake-model", "input": "hi", **body})


# --- the session key ----------------------------------------------------------------------------


def test_the_session_key_follows_the_chain_or_the_conversation() -> None:
    chained = turn.session_key(TENANT, request(), "resp_root")
    assert chained.startswith("rg-") and "resp_root" not in chained
    assert turn.session_key(TENANT, request(previous_response_id="resp_b"), "resp_root") == chained
    assert turn.session_key("t2", request(), "resp_root") != chained
    assert turn.session_key(TENANT, request(), "resp_other") != chained
    conv = turn.session_key(TENANT, request(conversation="conv_1"), "resp_root")
    assert conv == turn.session_key(TENANT, request(conversation="conv_1"), "resp_x") != chained
    # The client's own prompt_cache_key wins.
    assert turn.session_key(TENANT, request(prompt_cache_key="mine"), "resp_root") == "mine"


# --- against a real state service ---------------------------------------------------------------


@pytest.fixture
async def state() -> AsyncIterator[Any]:
    settings = replace(StateSettings(), backend="memory", listen="127.0.0.1:0", metrics_port=0)
    running = await state_server.start(settings)
    yield running
    await running.stop(0.5)


async def services(hub: FakeHub, port: int, **settings: Any) -> Services:
    base = replace(
        RouterSettings(),
        hub_url=hub.url,
        state_address=f"127.0.0.1:{port}",
        history_cache_mb=8,
        default_model="fake-model",
    )
    return router_app.build_services(replace(base, **settings))


async def close(svc: Services) -> None:
    await svc.hub.close()
    await svc.state.close()
    await svc.bootstrapper.close()


@pytest.fixture
async def svc(hub: FakeHub, state: Any) -> AsyncIterator[Services]:
    s = await services(hub, state.port)
    yield s
    await close(s)


async def run(svc: Services, req: validate.TurnRequest, **options: Any) -> turn.Turn:
    """Begins and completes a turn (stored when the request says so); returns it."""
    t = await turn.begin(svc, req, tenant=TENANT, **options)
    t.stored_response = await turn.complete(svc, t)
    return t


async def stored(svc: Services, response_id: str) -> dict[str, Any] | None:
    reply = await svc.state.find(
        svc.state.get_response(pb.GetResponseRequest(tenant=TENANT, response_id=response_id))
    )
    return None if reply is None else dict(orjson.loads(reply.response.response_json))


def hub_messages(hub: FakeHub) -> list[str]:
    return [f"{m['role']}:{m['content']}" for m in hub.chat_requests()[-1]["messages"]]


CHAT = dialect_for("chat")
RESPONSES = dialect_for("responses")


async def test_the_upstream_body_is_the_dialects_with_the_session_key(
    hub: FakeHub, state: Any
) -> None:
    svc = await services(hub, state.port, hub_prompt_cache_key=True)
    try:
        t = await turn.begin(svc, request(instructions="be brief"), tenant=TENANT)
        given = await turn.begin(svc, request(prompt_cache_key="mine"), tenant=TENANT)
    finally:
        await close(svc)
    path, body = t.upstream(CHAT, stream=True)
    assert path == "/chat/completions" and body["stream"] is True
    assert body["prompt_cache_key"] == t.session_key != ""
    assert t.session_key == turn.session_key(TENANT, t.req, t.response_id)
    r_path, r_body = t.upstream(RESPONSES, stream=False)
    assert r_path == "/responses" and r_body["prompt_cache_key"] == t.session_key
    assert given.upstream(CHAT, stream=False)[1]["prompt_cache_key"] == "mine"
    # What the model is sent instead, when set, replaces history, injected items and input.
    t.model_input = [inputs.user_message("instead")]
    assert t.model_items() == t.model_input
    chat = t.upstream(CHAT, stream=False)[1]
    assert [m["content"] for m in chat["messages"]] == ["be brief", "instead"]


async def test_without_the_setting_the_session_key_is_not_in_the_body(
    hub: FakeHub, state: Any
) -> None:
    svc = await services(hub, state.port, hub_prompt_cache_key=False)
    try:
        t = await turn.begin(svc, request(), tenant=TENANT)
    finally:
        await close(svc)
    assert t.session_key == ""
    assert "prompt_cache_key" not in t.upstream(CHAT, stream=False)[1]
    assert t.headers() == {}
    t.omitted_history_items = 3
    assert t.headers() == {turn.HISTORY_TRUNCATED_HEADER: "3"}
    t.tools_not_run = ("web_search", "shell")
    assert t.headers() == {
        turn.HISTORY_TRUNCATED_HEADER: "3",
        turn.TOOLS_NOT_RUN_HEADER: "web_search, shell",
    }


def test_the_tools_not_run_are_named_once_in_order() -> None:
    tools = [
        {"type": "shell", "environment": {"type": "container_auto"}},
        {"type": "function", "name": "f"},
        {"type": "web_search"},
        {"type": "web_search"},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "web_search_preview"},
    ]
    assert turn.tools_not_run(tools, executor=False) == (
        "shell",
        "web_search",
        "code_interpreter",
        "web_search_preview",
    )
    # With an execution service the tool loop runs the stateful ones.
    assert turn.tools_not_run(tools, executor=True) == ("web_search", "web_search_preview")
    assert turn.tools_not_run([{"type": "function", "name": "f"}], executor=False) == ()
    # A local shell (environment local, or none) is always offered: the client runs its calls.
    for local in ({"type": "shell"}, {"type": "shell", "environment": {"type": "local"}}):
        assert turn.tools_not_run([local, {"type": "web_search"}], executor=False) == (
            "web_search",
        )


async def test_ids_no_stored_object_can_have_are_not_looked_up(svc: Services) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        await turn.begin(svc, request(previous_response_id="resp_" + "x" * 300), tenant=TENANT)
    assert info.value.code == "previous_response_not_found"
    assert "..." in info.value.message  # shown cut
    with pytest.raises(errors.NotFound) as conv:
        await turn.begin(svc, request(conversation="conv_\x01"), tenant=TENANT)
    assert conv.value.param == "conversation" and "conv_?" in conv.value.message
    with pytest.raises(errors.InvalidRequest) as missing:
        await turn.begin(svc, request(previous_response_id="resp_missing"), tenant=TENANT)
    assert missing.value.code == "previous_response_not_found"


async def test_a_stored_turn_is_found_and_an_unstored_one_is_not(
    svc: Services, hub: FakeHub
) -> None:
    kept = await run(svc, request())
    assert kept.stored_response is not None
    assert await stored(svc, kept.response_id) == kept.stored_response
    # The answer's JSON is the stored bytes when include hides nothing.
    assert kept.json_of(kept.stored_response) == kept.stored_json != b""
    unkept = await run(svc, request(store=False))
    assert unkept.stored_response is not None and unkept.stored_response["store"] is False
    assert await stored(svc, unkept.response_id) is None
    assert len(hub.chat_requests()) == 2


async def test_a_chain_reads_its_history_from_the_cache_then_from_the_state_service(
    svc: Services, hub: FakeHub
) -> None:
    first = await run(svc, request(input="one"))
    assert svc.history_cache is not None
    second = await turn.begin(
        svc, request(input="two", previous_response_id=first.response_id), tenant=TENANT
    )
    assert second.parent_chain is not None  # no GetHistory call
    assert [i["type"] for i in second.history] == ["message", "message"]
    assert second.chain_root == first.response_id
    await turn.complete(svc, second)
    assert hub_messages(hub) == ["user:one", "assistant:echo: one", "user:two"]

    # The same chain, read by a router without a cache (or another router): GetHistory.
    svc.history_cache = None
    third = await turn.begin(
        svc, request(input="three", previous_response_id=second.response_id), tenant=TENANT
    )
    assert third.parent_chain is None and len(third.history) == 4
    assert third.chain_root == first.response_id  # the first response of the chain
    assert len(third.history_json) == 4


async def test_the_cache_is_not_used_for_an_unstored_turn_or_remembered_for_a_conversation(
    svc: Services,
) -> None:
    first = await run(svc, request())
    unstored = await turn.begin(
        svc, request(previous_response_id=first.response_id, store=False), tenant=TENANT
    )
    assert unstored.parent_chain is None and len(unstored.history) == 2
    created = await svc.state.create_conversation(pb.CreateConversationRequest(tenant=TENANT))
    conv = created.conversation.id
    in_conv = await run(svc, request(conversation=conv))
    assert svc.history_cache is not None
    assert svc.history_cache.get(TENANT, in_conv.response_id) is None
    assert svc.history_cache.get(TENANT, first.response_id) is not None


async def test_a_cached_chain_broken_meanwhile_is_refused_when_stored(
    svc: Services, hub: FakeHub
) -> None:
    first = await run(svc, request(input="one"))
    second = await run(svc, request(input="two", previous_response_id=first.response_id))
    # The first response is deleted behind this router's back (by another replica): its cache
    # still holds the chain, and the turn is begun on it...
    await svc.state.delete_response(
        pb.DeleteResponseRequest(tenant=TENANT, response_id=first.response_id)
    )
    third = await turn.begin(
        svc, request(input="three", previous_response_id=second.response_id), tenant=TENANT
    )
    assert third.parent_chain is not None
    # ...but storing it requires the chain intact: nothing is stored on a broken history.
    with pytest.raises(errors.ApiError) as info:
        await turn.complete(svc, third)
    assert info.value.status == 400 and info.value.param == "previous_response_id"
    assert await stored(svc, third.response_id) is None


async def test_an_idempotency_key_stores_one_turn(svc: Services, hub: FakeHub) -> None:
    req = request(input="pay once")
    ident = idempotency.identify(TENANT, b"", req.body, "key-1", None, store=True)
    assert await idempotency.find_first(svc, TENANT, ident) is None
    first = await run(svc, req, ident=ident)
    assert first.response_id == ident.response_id
    # A retry found before the hub is called...
    found = await idempotency.find_first(svc, TENANT, ident)
    assert found is not None and found["id"] == first.response_id
    # ...and one that raced past that check: its store answers the first turn.
    hub.enqueue(Reply(text="another answer"))
    racer = await turn.begin(svc, req, tenant=TENANT, ident=ident)
    answered = await turn.complete(svc, racer)
    assert answered == first.stored_response
    # The same key with another body is a 400.
    other = request(input="pay twice")
    reused = idempotency.identify(TENANT, b"", other.body, "key-1", None, store=True)
    with pytest.raises(errors.InvalidRequest) as info:
        await idempotency.find_first(svc, TENANT, reused)
    assert info.value.code == "idempotency_key_reused"
    racing_other = await turn.begin(svc, other, tenant=TENANT, ident=reused)
    with pytest.raises(errors.InvalidRequest) as stored_info:
        await turn.complete(svc, racing_other)
    assert stored_info.value.code == "idempotency_key_reused"


async def test_an_sdk_retry_finds_its_first_attempt_and_a_repeat_is_its_own_turn(
    svc: Services,
) -> None:
    raw = b'{"model":"fake-model","input":"same words"}'
    req = validate.parse_turn_request(orjson.loads(raw))
    first_ident = idempotency.identify(TENANT, raw, req.body, "", 0, store=True)
    first = await run(svc, req, ident=first_ident)
    retry = idempotency.identify(TENANT, raw, req.body, "", 1, store=True)
    found = await idempotency.find_first(svc, TENANT, retry)
    assert found is not None and found["id"] == first.response_id
    # The same request sent again on purpose (a first attempt again, not a retry): its own turn,
    # stored without the key.
    again = await turn.begin(svc, req, tenant=TENANT, ident=first_ident)
    answered = await turn.complete(svc, again)
    assert answered["id"] == again.response_id != first.response_id
    assert again.idempotency_key == "" and again.key_kind == ""
    assert await stored(svc, again.response_id) is not None


async def test_a_conversation_changed_under_a_turn_is_a_conflict_and_settle_runs_it_again(
    svc: Services, hub: FakeHub
) -> None:
    created = await svc.state.create_conversation(pb.CreateConversationRequest(tenant=TENANT))
    conv = created.conversation.id
    slow = await turn.begin(svc, request(conversation=conv, input="a"), tenant=TENANT)
    fast = await run(svc, request(conversation=conv, input="b"))
    assert fast.conversation_version == slow.conversation_version == 0
    with pytest.raises(errors.Conflict) as info:
        await turn.complete(svc, slow)
    assert info.value.code == "conversation_locked"
    t, answer = await streaming.settle(
        svc, request(conversation=conv, input="a"), tenant=TENANT, ident=idempotency.NO_IDENTITY
    )
    assert isinstance(answer, dict) and answer["id"] == t.response_id
    assert t.conversation_version == 2  # the history with "b" and its answer in it
    assert hub_messages(hub) == ["user:b", "assistant:echo: b", "user:a"]


async def test_a_turn_that_cannot_be_stored_does_not_call_the_hub(hub: FakeHub, state: Any) -> None:
    svc = await services(hub, state.port, state_timeout_s=1.0)
    try:
        await run(svc, request())  # connected once
        await state.stop(0.1)
        with pytest.raises(errors.StateUnavailable) as info:
            await turn.begin(svc, request(), tenant=TENANT)
        assert info.value.status == 503 and info.value.headers == {"x-should-retry": "true"}
        assert len(hub.chat_requests()) == 1
        # A turn that stores nothing needs no state service.
        unstored = await run(svc, request(store=False))
        assert unstored.stored_response is not None
        assert len(hub.chat_requests()) == 2
    finally:
        await close(svc)


async def test_a_failed_store_says_whether_a_retry_is_safe(hub: FakeHub, state: Any) -> None:
    svc = await services(hub, state.port, state_timeout_s=1.0)
    try:
        plain = await turn.begin(svc, request(), tenant=TENANT)
        ident = idempotency.identify(TENANT, b"", request().body, "k", None, store=True)
        keyed = await turn.begin(svc, request(), tenant=TENANT, ident=ident)
        answer = await turn.answer(svc, plain)
        await state.stop(0.1)
        with pytest.raises(errors.ApiError) as info:
            await turn.store(svc, plain, answer)
        with pytest.raises(errors.ApiError) as keyed_info:
            await turn.store(svc, keyed, answer)
    finally:
        await close(svc)
    assert info.value.status == 503 and keyed_info.value.status == 503
    # A lost connection may have written the turn: retrying without a key could store it twice,
    # retrying with one is the same write.
    assert info.value.outcome_unknown
    assert info.value.headers["x-should-retry"] == "false"
    assert keyed_info.value.headers["x-should-retry"] == "true"


async def test_a_history_over_the_state_services_cap_needs_truncation_auto(hub: FakeHub) -> None:
    settings = replace(
        StateSettings(),
        backend="memory",
        listen="127.0.0.1:0",
        metrics_port=0,
        history_max_items=3,
    )
    capped = await state_server.start(settings)
    svc = await services(hub, capped.port)
    try:
        first = await run(svc, request(input="one"))
        second = await run(svc, request(input="two", previous_response_id=first.response_id))
        for cached in (True, False):
            if not cached:
                svc.history_cache = None
            req = request(input="three", previous_response_id=second.response_id)
            with pytest.raises(errors.InvalidRequest) as info:
                await turn.begin(svc, req, tenant=TENANT)
            assert (info.value.param, info.value.code) == ("truncation", "context_length_exceeded")
            assert "(1 older items would be left out)" in info.value.message
            cut = await turn.begin(
                svc, replace(req, body={**req.body, "truncation": "auto"}), tenant=TENANT
            )
            assert (cut.parent_chain is not None) == cached
            assert cut.omitted_history_items == 1 and len(cut.history) == 3
            assert cut.headers() == {turn.HISTORY_TRUNCATED_HEADER: "1"}
    finally:
        await close(svc)
        await capped.stop(0.5)


async def test_item_references_resolve_from_the_history_or_the_tenants_items(
    svc: Services,
) -> None:
    first = await run(svc, request(input="remember me"))
    assert first.stored_response is not None
    said = first.req.input_items[0]["id"]
    answered = first.stored_response["output"][0]["id"]
    refs = [
        {"type": "item_reference", "id": answered},
        {"role": "user", "content": "and?"},
        {"type": "item_reference", "id": said},
    ]
    # Without the chain: both found by GetItems.
    alone = await turn.begin(svc, request(input=refs), tenant=TENANT)
    assert alone.req.references == ()
    assert [i["id"] for i in alone.req.input_items][::2] == [answered, said]
    assert alone.req.input_items[2]["content"][0]["text"] == "remember me"
    # From the chain's own history, and a copy of it (the history is sent too).
    chained = await turn.begin(
        svc, request(input=refs, previous_response_id=first.response_id), tenant=TENANT
    )
    assert chained.req.input_items[0] == chained.history[1]
    assert chained.req.input_items[0] is not chained.history[1]
    unknown = [{"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_nope"}]
    with pytest.raises(errors.InvalidRequest) as info:
        await turn.begin(svc, request(input=unknown), tenant=TENANT)
    assert info.value.param == "input[1]"
    assert info.value.status == 400


async def test_a_streamed_turn_is_stored_before_its_terminal_event(svc: Services) -> None:
    t = await turn.begin(svc, request(stream=True, input="a b c"), tenant=TENANT)
    events: list[dict[str, Any]] = []
    async for chunk in await streaming.open_stream(svc, t):
        if chunk.startswith(b"data: [DONE]"):
            events.append({"type": "[DONE]"})
            continue
        data = chunk.split(b"data: ", 1)[1]
        event = orjson.loads(data)
        if event["type"] == "response.completed":
            # Stored by the time the client reads it: a chained request finds it at once.
            found = await stored(svc, t.response_id)
            assert found is not None and found["status"] == "completed"
        events.append(event)
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-2:] == ["response.completed", "[DONE]"]
    assert [e["sequence_number"] for e in events[:-1]] == list(range(len(events) - 1))


def events_of(chunks: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for chunk in chunks:
        data = chunk.split(b"data: ", 1)[1].strip()
        out.append({"type": "[DONE]"} if data == b"[DONE]" else orjson.loads(data))
    return out


async def test_a_failed_hub_call_stores_nothing(svc: Services, hub: FakeHub) -> None:
    hub.enqueue(Reply(status=500))
    t = await turn.begin(svc, request(), tenant=TENANT)
    with pytest.raises(errors.UpstreamError) as info:
        await turn.complete(svc, t)
    assert info.value.code == "upstream_error"
    assert await stored(svc, t.response_id) is None

    # JSON of the wrong shape (a field of the wrong type) is the hub's fault, not a 500.
    wrong_type = {"choices": [{"message": {"content": "x", "tool_calls": 5}}]}
    hub.enqueue(Reply(raw_body=orjson.dumps(wrong_type)))
    shaped = await turn.begin(svc, request(), tenant=TENANT)
    with pytest.raises(errors.UpstreamError) as wrong:
        await turn.complete(svc, shaped)
    assert (wrong.value.status, wrong.value.code) == (502, "upstream_malformed_response")
    assert await stored(svc, shaped.response_id) is None

    hub.enqueue(Reply(status=503))
    streamed = await turn.begin(svc, request(stream=True), tenant=TENANT)
    events = events_of([chunk async for chunk in await streaming.open_stream(svc, streamed)])
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-3:] == ["error", "response.failed", "[DONE]"]
    assert events[-2]["response"]["status"] == "failed"
    assert await stored(svc, streamed.response_id) is None


async def test_a_streamed_conversation_turn_is_held_until_stored(
    svc: Services, hub: FakeHub
) -> None:
    created = await svc.state.create_conversation(pb.CreateConversationRequest(tenant=TENANT))
    conv = created.conversation.id
    slow = await turn.begin(svc, request(conversation=conv, input="a", stream=True), tenant=TENANT)
    await run(svc, request(conversation=conv, input="b"))
    # Its conversation changed meanwhile: nothing was sent, the conflict is raised before.
    with pytest.raises(errors.Conflict):
        await streaming.buffered_stream(svc, slow)
    t, answer = await streaming.settle(
        svc,
        request(conversation=conv, input="a", stream=True),
        tenant=TENANT,
        ident=idempotency.NO_IDENTITY,
    )
    assert not isinstance(answer, dict)
    events = events_of(list(answer))
    assert [e["type"] for e in events][-2:] == ["response.completed", "[DONE]"]
    assert events[-2]["response"]["id"] == t.response_id
    assert await stored(svc, t.response_id) is not None


async def test_a_reference_to_an_item_of_the_conversation_is_sent_but_not_stored_again(
    svc: Services, hub: FakeHub
) -> None:
    created = await svc.state.create_conversation(pb.CreateConversationRequest(tenant=TENANT))
    conv = created.conversation.id
    first = await run(svc, request(conversation=conv, input="the fact"))
    said = first.req.input_items[0]["id"]
    refs = [{"type": "item_reference", "id": said}, {"role": "user", "content": "again?"}]
    again = await turn.begin(svc, request(conversation=conv, input=refs), tenant=TENANT)
    assert again.req.unstored == (0,)
    assert [i.get("id") for i in again.req.stored_inputs()] == [again.req.input_items[1]["id"]]
    answer = await turn.complete(svc, again)  # a conversation holds an id once: no conflict
    assert answer["id"] == again.response_id
    assert hub_messages(hub) == [
        "user:the fact",
        "assistant:echo: the fact",
        "user:the fact",
        "user:again?",
    ]
    items = await svc.state.list_conversation_items(
        pb.ListConversationItemsRequest(
            tenant=TENANT, conversation_id=conv, order=pb.ORDER_ASC, page_size=100
        ),
    )
    assert [i.id for i in items.items].count(said) == 1
