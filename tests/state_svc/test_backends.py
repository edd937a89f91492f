"""The contract suite: every guarantee of state_service.proto, through the real gRPC stub, held
against each backend (memory, SQLite, PostgreSQL) alike."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from gateway.grpcerrors import ServiceError, error_info
from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import server
from state_svc.backends.base import Item, PutTurnResult, Turn
from state_svc.backends.sqlite import SqliteBackend
from state_svc.config import StateSettings
from tests.state_svc.conftest import (
    POSTGRES_DSN,
    STORES,
    TENANT,
    Client,
    Start,
    assert_error,
    fails,
    item,
    simple_turn,
    turn,
)

NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
ABORTED = grpc.StatusCode.ABORTED


# --- responses ----------------------------------------------------------------------------


async def test_put_and_get_returns_bytes_unchanged(client: Client) -> None:
    odd = item("msg_odd", "ünïcode \u2028 \\u0000 {}")
    put = await client.put(turn("resp_1", inputs=[odd, item("msg_2")], outputs=[item("msg_3")]))
    assert not put.replayed
    assert put.conversation_version == 0
    got = (await client.get("resp_1")).response
    assert got == put.response
    assert [i.id for i in got.input_items] == ["msg_odd", "msg_2"]
    assert [i.sequence for i in got.input_items] == [1, 2]
    assert [i.sequence for i in got.output_items] == [1]
    assert got.input_items[0].json == odd.json
    assert got.response_json == turn("resp_1").response_json
    assert got.create_time.seconds > 0
    assert not got.HasField("expire_time")


async def test_stream_events_are_kept_and_compared(client: Client) -> None:
    events = b'[{"type": "response.created", "sequence_number": 0}]'
    streamed = turn("resp_s")
    streamed.stream_events_json = events
    await client.put(streamed)
    assert (await client.get("resp_s")).response.stream_events_json == events
    assert (await client.put(streamed)).replayed
    other = turn("resp_s")
    other.stream_events_json = b"[]"
    err = await fails(client.put(other))
    assert err.reason == "RESPONSE_ID_CONFLICT"
    assert (await client.get("resp_s")).response.stream_events_json == events


async def test_replay_of_same_turn_stores_nothing(client: Client) -> None:
    first = await client.put(simple_turn("resp_1"))
    again = await client.put(simple_turn("resp_1"))
    assert again.replayed
    assert again.response == first.response
    history = await client.history(response_id="resp_1")
    assert [i.id for i in history.items] == ["resp_1-in", "resp_1-out"]


async def test_same_id_different_content_is_conflict(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    err = await fails(client.put(simple_turn("resp_1", body="other")))
    assert_error(err, grpc.StatusCode.ALREADY_EXISTS, "RESPONSE_ID_CONFLICT", response_id="resp_1")
    changed_items = turn("resp_1", inputs=[item("resp_1-in", "changed")])
    err = await fails(client.put(changed_items))
    assert err.reason == "RESPONSE_ID_CONFLICT"
    got = (await client.get("resp_1")).response
    assert got.response_json == simple_turn("resp_1").response_json
    assert got.input_items[0].json == item("resp_1-in").json


async def test_idempotency_key_returns_first_response(client: Client) -> None:
    first = await client.put(simple_turn("resp_1", key="key-1"))
    second = await client.put(simple_turn("resp_2", key="key-1"))
    assert second.replayed
    assert second.response == first.response
    assert_error(await fails(client.get("resp_2")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    by_key = await client.stub.GetResponse(
        pb.GetResponseRequest(tenant=TENANT, idempotency_key="key-1")
    )
    assert by_key.response.id == "resp_1"
    err = await fails(
        client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, idempotency_key="nope"))
    )
    assert_error(err, NOT_FOUND, "RESPONSE_NOT_FOUND")


async def test_put_checks_what_it_builds_on(client: Client) -> None:
    err = await fails(client.put(simple_turn("resp_1", previous="resp_missing")))
    assert_error(err, NOT_FOUND, "PREVIOUS_RESPONSE_NOT_FOUND", previous_response_id="resp_missing")
    err = await fails(client.put(simple_turn("resp_1", conversation="conv_missing")))
    assert_error(err, NOT_FOUND, "CONVERSATION_NOT_FOUND", conversation_id="conv_missing")
    # Nothing was stored by the failed calls.
    assert_error(await fails(client.get("resp_1")), NOT_FOUND, "RESPONSE_NOT_FOUND")


async def test_long_chain_history_in_one_call_oldest_first(client: Client) -> None:
    turns = 210
    previous = ""
    for n in range(turns):
        await client.put(simple_turn(f"resp_{n:03d}", previous=previous))
        previous = f"resp_{n:03d}"
    history = await client.history(response_id=previous)
    expected = [f"resp_{n:03d}-{kind}" for n in range(turns) for kind in ("in", "out")]
    assert [i.id for i in history.items] == expected
    assert list(history.response_ids) == [f"resp_{n:03d}" for n in range(turns)]
    assert not history.truncated and history.omitted_item_count == 0
    # A middle anchor gives the chain up to it, not beyond.
    middle = await client.history(response_id="resp_099")
    assert [i.id for i in middle.items] == expected[:200]
    # max_items keeps the newest items and says how many were left out.
    cut = await client.history(response_id=previous, max_items=7)
    assert [i.id for i in cut.items] == expected[-7:]
    assert cut.truncated and cut.omitted_item_count == len(expected) - 7
    assert len(cut.response_ids) == turns


async def test_service_cap_is_reported(start: Start, connect: Callable[..., Client]) -> None:
    running = await start(history_max_items=5)
    client = connect(running.port)
    previous = ""
    for n in range(4):
        await client.put(simple_turn(f"resp_{n}", previous=previous))
        previous = f"resp_{n}"
    capped = await client.history(response_id=previous)
    assert [i.id for i in capped.items] == [
        "resp_1-out", "resp_2-in", "resp_2-out", "resp_3-in", "resp_3-out",
    ]  # fmt: skip
    assert capped.truncated and capped.omitted_item_count == 3
    # A smaller max_items wins over the cap; a larger one does not lift it.
    assert len((await client.history(response_id=previous, max_items=2)).items) == 2
    assert len((await client.history(response_id=previous, max_items=50)).items) == 5
    conv = await client.conversation([item(f"m{n}") for n in range(8)])
    capped = await client.history(conversation_id=conv)
    assert [i.sequence for i in capped.items] == [4, 5, 6, 7, 8]
    assert capped.truncated and capped.omitted_item_count == 3


async def test_turn_with_no_items_is_part_of_the_chain(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    await client.put(turn("resp_2", previous="resp_1"))
    await client.put(simple_turn("resp_3", previous="resp_2"))
    history = await client.history(response_id="resp_3")
    assert list(history.response_ids) == ["resp_1", "resp_2", "resp_3"]
    assert [i.id for i in history.items] == ["resp_1-in", "resp_1-out", "resp_3-in", "resp_3-out"]


async def test_delete_response_breaks_later_history(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    await client.put(simple_turn("resp_2", previous="resp_1"))
    await client.put(simple_turn("resp_3", previous="resp_2"))
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_2"))
    assert_error(await fails(client.get("resp_2")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    err = await fails(client.history(response_id="resp_2"))
    assert_error(err, NOT_FOUND, "RESPONSE_NOT_FOUND")
    err = await fails(client.history(response_id="resp_3"))
    assert_error(
        err,
        grpc.StatusCode.FAILED_PRECONDITION,
        "HISTORY_BROKEN",
        response_id="resp_3",
        missing_response_id="resp_2",
    )
    err = await fails(client.put(simple_turn("resp_4", previous="resp_2")))
    assert err.reason == "PREVIOUS_RESPONSE_NOT_FOUND"
    # The later turn keeps its own items; the earlier chain is whole.
    assert (await client.get("resp_3")).response.input_items[0].id == "resp_3-in"
    assert list((await client.history(response_id="resp_1")).response_ids) == ["resp_1"]
    # A replayed delete is NOT_FOUND.
    err = await fails(
        client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_2"))
    )
    assert_error(err, NOT_FOUND, "RESPONSE_NOT_FOUND")


async def test_reused_id_does_not_mend_or_loop_a_broken_chain(client: Client) -> None:
    await client.put(simple_turn("resp_a"))
    await client.put(simple_turn("resp_b", previous="resp_a"))
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_a"))
    # A new resp_a chained on resp_b would make a cycle a -> b -> a if links were followed
    # blindly; b's history must stay broken (its resp_a is gone) and nothing may loop.
    await client.put(simple_turn("resp_a", previous="resp_b", body="new"))
    err = await fails(client.history(response_id="resp_b"))
    assert err.reason == "HISTORY_BROKEN"
    err = await fails(client.history(response_id="resp_a"))
    assert err.reason == "HISTORY_BROKEN"


def put_intact(
    client: Client, response: resources_pb2.StoredResponse
) -> Awaitable[pb.PutTurnResponse]:
    """PutTurn with require_intact_chain."""
    return client.stub.PutTurn(
        pb.PutTurnRequest(tenant=TENANT, response=response, require_intact_chain=True)
    )


async def test_intact_chain_required(client: Client) -> None:
    for n in (1, 2, 3):
        await client.put(simple_turn(f"resp_{n}", previous=f"resp_{n - 1}" if n > 1 else ""))
    stored = await put_intact(client, simple_turn("resp_4", previous="resp_3"))
    assert not stored.replayed
    history = await client.history(response_id="resp_4")
    assert list(history.response_ids) == ["resp_1", "resp_2", "resp_3", "resp_4"]
    # Ignored without a previous response.
    assert not (await put_intact(client, simple_turn("resp_first"))).replayed

    # The grandparent goes: the previous response is there, its history is not.
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_2"))
    err = await fails(put_intact(client, simple_turn("resp_5", previous="resp_3")))
    assert_error(
        err,
        FAILED_PRECONDITION,
        "HISTORY_BROKEN",
        response_id="resp_3",
        missing_response_id="resp_2",
    )
    assert_error(await fails(client.get("resp_5")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    # Deeper too, and a retry of a turn stored while the chain was whole is still a replay.
    err = await fails(put_intact(client, simple_turn("resp_5", previous="resp_4")))
    assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="resp_2")
    assert (await put_intact(client, simple_turn("resp_4", previous="resp_3"))).replayed
    # A missing previous response is reported as before.
    err = await fails(put_intact(client, simple_turn("resp_5", previous="resp_2")))
    assert_error(err, NOT_FOUND, "PREVIOUS_RESPONSE_NOT_FOUND", previous_response_id="resp_2")
    assert_error(await fails(client.get("resp_5")), NOT_FOUND, "RESPONSE_NOT_FOUND")

    # Without the flag nothing changed: only the previous response is checked.
    assert not (await client.put(simple_turn("resp_5", previous="resp_3"))).replayed
    err = await fails(client.history(response_id="resp_5"))
    assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="resp_2")


async def test_intact_chain_walks_like_history(client: Client) -> None:
    # A re-created id is not the original link (see the test above it for GetHistory).
    await client.put(simple_turn("resp_a"))
    await client.put(simple_turn("resp_b", previous="resp_a"))
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_a"))
    await client.put(simple_turn("resp_a", previous="resp_b", body="new"))
    err = await fails(put_intact(client, simple_turn("resp_c", previous="resp_b")))
    assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="resp_a")
    err = await fails(put_intact(client, simple_turn("resp_c", previous="resp_a")))
    assert err.reason == "HISTORY_BROKEN"
    # A running previous response is reported as before.
    await client.put(simple_turn("resp_1"))
    await client.put(running_turn("resp_bg", previous="resp_1"))
    err = await fails(put_intact(client, simple_turn("resp_c", previous="resp_bg")))
    assert_error(err, FAILED_PRECONDITION, "RESPONSE_IN_PROGRESS", previous_response_id="resp_bg")
    assert_error(await fails(client.get("resp_c")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    # A long chain is walked whole.
    previous = ""
    for n in range(150):
        await client.put(simple_turn(f"long_{n}", previous=previous))
        previous = f"long_{n}"
    assert not (await put_intact(client, simple_turn("long_end", previous=previous))).replayed
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="long_0"))
    err = await fails(put_intact(client, simple_turn("long_next", previous="long_end")))
    assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="long_0")


async def test_intact_chain_refuses_an_expired_ancestor(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start(retention_s=2.0)
    client = connect(running.port)
    first = await client.put(simple_turn("resp_1"))
    await asyncio.sleep(1.2)
    second = await client.put(simple_turn("resp_2", previous="resp_1"))
    assert not (await put_intact(client, simple_turn("resp_3", previous="resp_2"))).replayed
    await sleep_until(first.response.expire_time.ToNanoseconds() / 1e9 + 0.05)
    err = await fails(put_intact(client, simple_turn("resp_4", previous="resp_2")))
    assert_error(
        err,
        FAILED_PRECONDITION,
        "HISTORY_BROKEN",
        response_id="resp_2",
        missing_response_id="resp_1",
    )
    # resp_2 has not expired yet: without the flag the turn is stored on it.
    assert time.time() < second.response.expire_time.ToNanoseconds() / 1e9
    assert not (await client.put(simple_turn("resp_4", previous="resp_2"))).replayed


async def test_intact_chain_stored_intact_still_sees_a_deleted_ancestor(client: Client) -> None:
    """A chain whose every turn was stored with require_intact_chain (as the router stores the
    turns it chains from its cache) is refused as soon as any ancestor goes, however it went."""
    previous = ""
    for n in range(6):
        await put_intact(client, simple_turn(f"whole_{n}", previous=previous))
        previous = f"whole_{n}"
    # An unrelated deletion changes nothing for this chain.
    await client.put(simple_turn("other"))
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="other"))
    assert not (await put_intact(client, simple_turn("whole_6", previous="whole_5"))).replayed

    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="whole_2"))
    for previous in ("whole_6", "whole_5", "whole_3"):
        err = await fails(put_intact(client, simple_turn("whole_7", previous=previous)))
        assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="whole_2")
    # What is left in front of the gap is still whole.
    assert not (await put_intact(client, simple_turn("whole_7", previous="whole_1"))).replayed
    # The id of the deleted ancestor used again does not mend the chain behind it.
    await put_intact(client, simple_turn("whole_2", previous="whole_1", body="new"))
    err = await fails(put_intact(client, simple_turn("whole_8", previous="whole_6")))
    assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="whole_2")
    assert not (await put_intact(client, simple_turn("whole_8", previous="whole_2"))).replayed


async def test_intact_chain_stored_intact_still_sees_an_expired_ancestor(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start(retention_s=2.0)
    client = connect(running.port)
    first = await put_intact(client, simple_turn("resp_1"))
    await asyncio.sleep(1.2)
    await put_intact(client, simple_turn("resp_2", previous="resp_1"))
    assert not (await put_intact(client, simple_turn("resp_3", previous="resp_2"))).replayed
    await sleep_until(first.response.expire_time.ToNanoseconds() / 1e9 + 0.05)
    for previous in ("resp_3", "resp_2"):
        err = await fails(put_intact(client, simple_turn("resp_4", previous=previous)))
        assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="resp_1")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_store_written_before_chain_marks_is_migrated(
    start: Start, connect: Callable[..., Client]
) -> None:
    """A SQLite store from before migration 8 (no chain marks, no deletion count) is migrated;
    its chains are walked once, and a deletion is seen after."""
    first = await start()
    client = connect(first.port)
    for n in range(3):
        await put_intact(client, simple_turn(f"resp_{n}", previous=f"resp_{n - 1}" if n else ""))
    await first.stop(0)
    with sqlite3.connect(first.settings.sqlite_path) as db:
        for statement in (
            "DROP TRIGGER responses_deleted",
            "DROP TABLE response_deletions",
            "ALTER TABLE responses DROP COLUMN chain_whole_at",
            "ALTER TABLE responses DROP COLUMN chain_expire_us",
            "DELETE FROM schema_version WHERE version > 7",
        ):
            db.execute(statement)

    again = await start()
    client = connect(again.port)
    assert not (await put_intact(client, simple_turn("resp_3", previous="resp_2"))).replayed
    assert not (await put_intact(client, simple_turn("resp_4", previous="resp_3"))).replayed
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    err = await fails(put_intact(client, simple_turn("resp_5", previous="resp_4")))
    assert_error(err, FAILED_PRECONDITION, "HISTORY_BROKEN", missing_response_id="resp_1")
    history = await client.history(response_id="resp_0")
    assert list(history.response_ids) == ["resp_0"]


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_put_reports_the_history_cap(start: Start, connect: Callable[..., Client]) -> None:
    uncapped = connect((await start()).port)
    assert (await uncapped.put(simple_turn("resp_1"))).history_max_items == 0
    capped = connect((await start(history_max_items=7)).port)
    assert (await capped.put(simple_turn("resp_1"))).history_max_items == 7
    # On a replay too.
    replayed = await capped.put(simple_turn("resp_1"))
    assert replayed.replayed and replayed.history_max_items == 7


async def test_conversation_turn_keeps_items_after_response_delete(client: Client) -> None:
    conv = await client.conversation()
    put = await client.put(simple_turn("resp_1", conversation=conv))
    assert put.conversation_version == 2
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    assert [i.id for i in await client.conversation_items(conv)] == ["resp_1-in", "resp_1-out"]


# --- conversations: ordering, concurrency, versions ---------------------------------------


async def test_sequences_follow_write_order_not_time(client: Client) -> None:
    conv = await client.conversation([item(f"init_{n}") for n in range(3)])
    # Many items within the same millisecond, in one call and in back-to-back calls.
    names = [f"z_{n}" for n in range(30)] + [f"a_{n}" for n in range(30)]
    await client.append(conv, [item(n) for n in names[:30]])
    for n in names[30:]:
        await client.append(conv, [item(n)])
    await client.put(turn("resp_1", conversation=conv, inputs=[item("in")], outputs=[item("out")]))
    items = await client.conversation_items(conv)
    assert [i.id for i in items] == [f"init_{n}" for n in range(3)] + names + ["in", "out"]
    assert [i.sequence for i in items] == list(range(1, len(items) + 1))
    created = [i.create_time.ToNanoseconds() for i in items]
    assert created == sorted(created)
    listed = await client.list_items(conv, page_size=100)
    assert [i.id for i in listed.items] == [i.id for i in items]


async def test_concurrent_turns_land_in_one_total_order(
    running: server.Running, connect: Callable[..., Client]
) -> None:
    setup = connect(running.port)
    conv = await setup.conversation([item("first")])
    callers = [connect(running.port) for _ in range(32)]

    async def one(n: int, client: Client) -> int:
        reply = await client.put(
            turn(
                f"resp_{n}",
                conversation=conv,
                inputs=[item(f"t{n}-in-1"), item(f"t{n}-in-2")],
                outputs=[item(f"t{n}-out")],
            )
        )
        return reply.conversation_version

    versions = await asyncio.gather(*(one(n, c) for n, c in enumerate(callers)))
    assert sorted(versions) == [1 + 3 * k for k in range(1, 33)]
    items = await setup.conversation_items(conv)
    check_total_order(items, [f"t{n}" for n in range(32)], ["in-1", "in-2", "out"], first=1)
    conversation = await setup.stub.GetConversation(
        pb.GetConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    assert conversation.conversation.version == 97


def check_total_order(
    items: Sequence[resources_pb2.Item], turns: list[str], parts: list[str], first: int = 0
) -> None:
    """Sequences are gapless from 1; after ``first`` items, every turn's items ``<turn>-<part>``
    appear exactly once, contiguous and in order."""
    assert [i.sequence for i in items] == list(range(1, len(items) + 1))
    ids = [i.id for i in items][first:]
    assert sorted(ids) == sorted(f"{t}-{p}" for t in turns for p in parts)
    for start in range(0, len(ids), len(parts)):
        owner = ids[start].split("-", 1)[0]
        assert ids[start : start + len(parts)] == [f"{owner}-{p}" for p in parts]


async def test_expected_version_mismatch_writes_nothing(client: Client) -> None:
    conv = await client.conversation([item("a")])
    err = await fails(client.append(conv, [item("b")], expected=0))
    assert_error(
        err,
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        conversation_id=conv,
        expected_version="0",
        actual_version="1",
    )
    err = await fails(client.put(simple_turn("resp_1", conversation=conv), expected=5))
    assert_error(err, grpc.StatusCode.ABORTED, "VERSION_MISMATCH")
    assert_error(await fails(client.get("resp_1")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert [i.id for i in await client.conversation_items(conv)] == ["a"]
    appended = await client.append(conv, [item("b")], expected=1)
    assert appended.conversation_version == 2
    put = await client.put(simple_turn("resp_1", conversation=conv), expected=2)
    assert put.conversation_version == 4
    history = await client.history(conversation_id=conv)
    assert history.conversation_version == 4
    # expected_conversation_version is ignored for a turn outside a conversation.
    assert not (await client.put(simple_turn("resp_2"), expected=99)).replayed


async def test_create_items_replay_and_conflicts(client: Client) -> None:
    conv = await client.conversation([item("a")])
    first = await client.append(conv, [item("b"), item("c")])
    assert [i.sequence for i in first.items] == [2, 3] and not first.replayed
    again = await client.append(conv, [item("b"), item("c")], expected=1)
    assert again.replayed and again.conversation_version == 3
    assert list(again.items) == list(first.items)
    err = await fails(client.append(conv, [item("b", "changed"), item("c")]))
    assert_error(err, grpc.StatusCode.ALREADY_EXISTS, "ITEM_ID_CONFLICT", item_id="b")
    err = await fails(client.append(conv, [item("c"), item("d")]))
    assert_error(err, grpc.StatusCode.ALREADY_EXISTS, "ITEM_ID_CONFLICT", item_id="c")
    err = await fails(client.put(turn("resp_1", conversation=conv, inputs=[item("a")])))
    assert_error(err, grpc.StatusCode.ALREADY_EXISTS, "ITEM_ID_CONFLICT", item_id="a")
    assert_error(await fails(client.get("resp_1")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "b", "c"]


async def test_create_conversation_request_id(client: Client) -> None:
    items = [item("a"), item("b")]
    first = await client.stub.CreateConversation(
        pb.CreateConversationRequest(
            tenant=TENANT, items=items, request_id="req-1", metadata={"k": "v"}
        )
    )
    assert first.conversation.id.startswith("conv_")
    assert [i.sequence for i in first.items] == [1, 2]
    assert first.conversation.version == 2
    again = await client.stub.CreateConversation(
        pb.CreateConversationRequest(
            tenant=TENANT, items=items, request_id="req-1", metadata={"k": "v"}
        )
    )
    assert not first.replayed and again.replayed
    again.replayed = False
    assert again == first
    err = await fails(
        client.stub.CreateConversation(
            pb.CreateConversationRequest(tenant=TENANT, items=items, request_id="req-1")
        )
    )
    assert_error(err, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT", request_id="req-1")
    ids = {await client.conversation(items) for _ in range(3)}
    assert len(ids) == 3 and first.conversation.id not in ids
    assert len(await client.conversation_items(first.conversation.id)) == 2


async def test_a_replayed_create_returns_the_conversation_as_it_is_now(client: Client) -> None:
    request = pb.CreateConversationRequest(
        tenant=TENANT, items=[item("a")], request_id="req-now", metadata={"k": "v"}
    )
    first = await client.stub.CreateConversation(request)
    conv = first.conversation.id
    await client.append(conv, [item("b")])
    await client.stub.UpdateConversation(
        pb.UpdateConversationRequest(tenant=TENANT, conversation_id=conv, metadata={"k": "w"})
    )
    again = await client.stub.CreateConversation(request)
    assert again.replayed and again.conversation.id == conv
    assert again.conversation.version == 2
    assert dict(again.conversation.metadata) == {"k": "w"}
    assert [(i.id, i.sequence) for i in again.items] == [("a", 1)]
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "b"]


async def test_concurrent_creates_with_one_request_id_make_one_conversation(
    client: Client,
) -> None:
    request = pb.CreateConversationRequest(tenant=TENANT, items=[item("a")], request_id="req-c")
    replies = await asyncio.gather(*(client.stub.CreateConversation(request) for _ in range(8)))
    assert len({r.conversation.id for r in replies}) == 1
    assert sum(not r.replayed for r in replies) == 1


async def test_get_conversation_by_request_id(client: Client) -> None:
    made = await client.stub.CreateConversation(
        pb.CreateConversationRequest(tenant=TENANT, request_id="req-get", metadata={"k": "v"})
    )
    got = await client.stub.GetConversation(
        pb.GetConversationRequest(tenant=TENANT, request_id="req-get")
    )
    assert got.conversation == made.conversation
    missing = await fails(
        client.stub.GetConversation(pb.GetConversationRequest(tenant=TENANT, request_id="req-no"))
    )
    assert_error(missing, NOT_FOUND, "CONVERSATION_NOT_FOUND", request_id="req-no")
    # Another tenant's request_id is not found either.
    other = await fails(
        client.stub.GetConversation(pb.GetConversationRequest(tenant="other", request_id="req-get"))
    )
    assert_error(other, NOT_FOUND, "CONVERSATION_NOT_FOUND")
    both = await fails(
        client.stub.GetConversation(
            pb.GetConversationRequest(
                tenant=TENANT, conversation_id=made.conversation.id, request_id="req-get"
            )
        )
    )
    assert_error(both, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="request_id")
    neither = await fails(client.stub.GetConversation(pb.GetConversationRequest(tenant=TENANT)))
    assert_error(neither, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="conversation_id")
    # Once the conversation is deleted, its request_id finds nothing and creates a new one.
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=made.conversation.id)
    )
    gone = await fails(
        client.stub.GetConversation(pb.GetConversationRequest(tenant=TENANT, request_id="req-get"))
    )
    assert_error(gone, NOT_FOUND, "CONVERSATION_NOT_FOUND")
    new = await client.stub.CreateConversation(
        pb.CreateConversationRequest(tenant=TENANT, request_id="req-get", metadata={"k": "v"})
    )
    assert not new.replayed and new.conversation.id != made.conversation.id


async def test_conversation_metadata_and_delete(client: Client) -> None:
    conv = await client.conversation([item("a")], k1="v1")
    got = (
        await client.stub.GetConversation(
            pb.GetConversationRequest(tenant=TENANT, conversation_id=conv)
        )
    ).conversation
    assert dict(got.metadata) == {"k1": "v1"} and got.version == 1
    updated = await client.stub.UpdateConversation(
        pb.UpdateConversationRequest(tenant=TENANT, conversation_id=conv, metadata={"k2": "v2"})
    )
    assert dict(updated.conversation.metadata) == {"k2": "v2"}
    assert updated.conversation.create_time == got.create_time
    await client.put(simple_turn("resp_1", conversation=conv))
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    for call in conversation_calls(client, conv, "a"):
        assert_error(await fails(call), NOT_FOUND, "CONVERSATION_NOT_FOUND")
    # Responses made in it stay retrievable.
    assert (await client.get("resp_1")).response.conversation_id == conv
    err = await fails(client.put(simple_turn("resp_2", conversation=conv)))
    assert err.reason == "CONVERSATION_NOT_FOUND"


def conversation_calls(client: Client, conv: str, item_id: str, tenant: str = TENANT) -> list:  # type: ignore[type-arg]
    """Every RPC that names a conversation."""
    stub = client.stub
    return [
        stub.GetConversation(pb.GetConversationRequest(tenant=tenant, conversation_id=conv)),
        stub.UpdateConversation(
            pb.UpdateConversationRequest(tenant=tenant, conversation_id=conv, metadata={"x": "y"})
        ),
        stub.GetHistory(pb.GetHistoryRequest(tenant=tenant, conversation_id=conv)),
        stub.CreateConversationItems(
            pb.CreateConversationItemsRequest(
                tenant=tenant, conversation_id=conv, items=[item("new")]
            )
        ),
        stub.ListConversationItems(
            pb.ListConversationItemsRequest(tenant=tenant, conversation_id=conv, order=pb.ORDER_ASC)
        ),
        stub.GetConversationItem(
            pb.GetConversationItemRequest(tenant=tenant, conversation_id=conv, item_id=item_id)
        ),
        stub.DeleteConversationItem(
            pb.DeleteConversationItemRequest(tenant=tenant, conversation_id=conv, item_id=item_id)
        ),
        stub.PutTurn(
            pb.PutTurnRequest(tenant=tenant, response=simple_turn("resp_x", conversation=conv))
        ),
        stub.DeleteConversation(pb.DeleteConversationRequest(tenant=tenant, conversation_id=conv)),
    ]


async def test_delete_item_keeps_other_sequences(client: Client) -> None:
    conv = await client.conversation([item("a"), item("b"), item("c")])
    deleted = await client.stub.DeleteConversationItem(
        pb.DeleteConversationItemRequest(tenant=TENANT, conversation_id=conv, item_id="b")
    )
    assert deleted.conversation.version == 3
    err = await fails(
        client.stub.GetConversationItem(
            pb.GetConversationItemRequest(tenant=TENANT, conversation_id=conv, item_id="b")
        )
    )
    assert_error(err, NOT_FOUND, "ITEM_NOT_FOUND", item_id="b")
    err = await fails(
        client.stub.DeleteConversationItem(
            pb.DeleteConversationItemRequest(tenant=TENANT, conversation_id=conv, item_id="b")
        )
    )
    assert_error(err, NOT_FOUND, "ITEM_NOT_FOUND")
    appended = await client.append(conv, [item("d")])
    assert appended.items[0].sequence == 4
    items = await client.conversation_items(conv)
    assert [(i.id, i.sequence) for i in items] == [("a", 1), ("c", 3), ("d", 4)]
    got = await client.stub.GetConversationItem(
        pb.GetConversationItemRequest(tenant=TENANT, conversation_id=conv, item_id="c")
    )
    assert got.item == items[1]


# --- running turns (background responses) ------------------------------------------------


def running_turn(
    response_id: str, *, body: str = "running", **kwargs: Any
) -> resources_pb2.StoredResponse:
    """A running turn: ``turn`` with in_progress set."""
    response = turn(response_id, body=body, **kwargs)
    response.in_progress = True
    return response


def by_key(client: Client, key: str) -> Awaitable[pb.GetResponseResponse]:
    return client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, idempotency_key=key))


async def test_running_turn_is_retrievable_but_not_built_on(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    conv = await client.conversation([item("a")])
    put = await client.put(
        running_turn("resp_bg", previous="resp_1", key="key-bg", inputs=[item("bg-in")])
    )
    assert put.response.in_progress and not put.replayed and put.conversation_version == 0
    got = (await client.get("resp_bg")).response
    assert got == put.response
    assert [i.id for i in got.input_items] == ["bg-in"]
    # The idempotency key finds the running turn, and a second request with it replays it.
    assert (await by_key(client, "key-bg")).response == got
    again = await client.put(simple_turn("resp_other", key="key-bg"))
    assert again.replayed and again.response == got
    assert_error(await fails(client.get("resp_other")), NOT_FOUND, "RESPONSE_NOT_FOUND")

    err = await fails(client.history(response_id="resp_bg"))
    assert_error(err, FAILED_PRECONDITION, "RESPONSE_IN_PROGRESS", response_id="resp_bg")
    err = await fails(client.history(response_id="resp_bg", max_items=1))
    assert_error(err, FAILED_PRECONDITION, "RESPONSE_IN_PROGRESS", response_id="resp_bg")
    err = await fails(client.put(simple_turn("resp_next", previous="resp_bg")))
    assert_error(err, FAILED_PRECONDITION, "RESPONSE_IN_PROGRESS", previous_response_id="resp_bg")
    assert_error(await fails(client.get("resp_next")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    # What it was chained on is untouched.
    assert list((await client.history(response_id="resp_1")).response_ids) == ["resp_1"]

    # In a conversation, a running turn's items stay out of it until the turn is final.
    in_conv = await client.put(running_turn("resp_bg2", conversation=conv, inputs=[item("b")]))
    assert in_conv.response.in_progress and in_conv.conversation_version == 1
    assert [i.id for i in await client.conversation_items(conv)] == ["a"]
    assert [i.id for i in (await client.list_items(conv)).items] == ["a"]
    conversation = await client.stub.GetConversation(
        pb.GetConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    assert conversation.conversation.version == 1
    err = await fails(
        client.stub.GetConversationItem(
            pb.GetConversationItemRequest(tenant=TENANT, conversation_id=conv, item_id="b")
        )
    )
    assert_error(err, NOT_FOUND, "ITEM_NOT_FOUND")


async def test_running_turn_is_replaced_whole_until_final(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    first = await client.put(
        running_turn("resp_bg", previous="resp_1", key="key-bg", body="queued")
    )
    # A status update: everything replaced, create and expire time and key kept (this call
    # sends no key).
    update = running_turn(
        "resp_bg", previous="resp_1", body="in_progress", outputs=[item("partial")]
    )
    update.stream_events_json = b'[{"type": "response.created", "sequence_number": 0}]'
    second = await client.put(update)
    assert not second.replayed and second.response.in_progress
    assert second.response.create_time == first.response.create_time
    assert second.response.idempotency_key == "key-bg"
    got = (await client.get("resp_bg")).response
    assert got == second.response
    assert got.response_json == update.response_json
    assert got.stream_events_json == update.stream_events_json
    assert [i.id for i in got.output_items] == ["partial"]

    final = turn(
        "resp_bg",
        previous="resp_1",
        key="key-bg",
        body="completed",
        inputs=[item("bg-in")],
        outputs=[item("bg-out-1"), item("bg-out-2")],
    )
    done = await client.put(final)
    assert not done.replayed and not done.response.in_progress
    assert done.response.create_time == first.response.create_time
    got = (await client.get("resp_bg")).response
    assert got == done.response
    # The old items are gone, the stream events too (the final turn sent none).
    assert [i.id for i in got.input_items] == ["bg-in"]
    assert [(i.id, i.sequence) for i in got.output_items] == [("bg-out-1", 1), ("bg-out-2", 2)]
    assert got.stream_events_json == b""
    assert (await by_key(client, "key-bg")).response == got
    history = await client.history(response_id="resp_bg")
    assert list(history.response_ids) == ["resp_1", "resp_bg"]
    assert [i.id for i in history.items] == [
        "resp_1-in", "resp_1-out", "bg-in", "bg-out-1", "bg-out-2",
    ]  # fmt: skip
    assert not (await client.put(simple_turn("resp_next", previous="resp_bg"))).replayed

    # Final now: the same final turn is a replay, anything else a conflict, running or not.
    assert (await client.put(final)).replayed
    for other in [
        turn("resp_bg", previous="resp_1", key="key-bg", body="cancelled"),
        running_turn("resp_bg", previous="resp_1", key="key-bg", body="in_progress"),
        running_turn(
            "resp_bg",
            previous="resp_1",
            key="key-bg",
            body="completed",
            inputs=[item("bg-in")],
            outputs=[item("bg-out-1"), item("bg-out-2")],
        ),
    ]:
        err = await fails(client.put(other))
        assert_error(err, ALREADY_EXISTS, "RESPONSE_ID_CONFLICT", response_id="resp_bg")
    assert (await client.get("resp_bg")).response == got


async def test_final_turn_appends_after_what_came_meanwhile(client: Client) -> None:
    conv = await client.conversation([item("a")])
    await client.put(running_turn("resp_bg", conversation=conv, inputs=[item("bg-in")]))
    await client.append(conv, [item("b")])
    await client.put(simple_turn("resp_2", conversation=conv))
    update = await client.put(
        running_turn("resp_bg", conversation=conv, inputs=[item("bg-in")], outputs=[item("p")])
    )
    assert update.conversation_version == 4
    assert [i.id for i in await client.conversation_items(conv)] == [
        "a", "b", "resp_2-in", "resp_2-out",
    ]  # fmt: skip
    final = turn(
        "resp_bg",
        conversation=conv,
        inputs=[item("bg-in")],
        outputs=[item("bg-out-1"), item("bg-out-2")],
        body="completed",
    )
    done = await client.put(final)
    assert done.conversation_version == 7 and not done.replayed
    items = await client.conversation_items(conv)
    assert [(i.id, i.sequence) for i in items] == [
        ("a", 1), ("b", 2), ("resp_2-in", 3), ("resp_2-out", 4),
        ("bg-in", 5), ("bg-out-1", 6), ("bg-out-2", 7),
    ]  # fmt: skip
    # A retry of the final call appends nothing again.
    again = await client.put(final)
    assert again.replayed and again.conversation_version == 7
    assert len(await client.conversation_items(conv)) == 7
    await client.append(conv, [item("c")])
    assert [i.sequence for i in (await client.list_items(conv)).items] == list(range(1, 9))


async def test_replacement_keeps_chain_and_conversation(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    conv = await client.conversation()
    other_conv = await client.conversation()
    await client.put(running_turn("resp_c", conversation=conv))
    await client.put(running_turn("resp_p", previous="resp_1"))
    cases = [
        (turn("resp_c"), "response.conversation_id"),
        (turn("resp_c", conversation=other_conv), "response.conversation_id"),
        (running_turn("resp_c", conversation=other_conv), "response.conversation_id"),
        (turn("resp_c", previous="resp_1"), "response.previous_response_id"),
        (turn("resp_p"), "response.previous_response_id"),
        (turn("resp_p", conversation=conv), "response.previous_response_id"),
    ]
    for changed, field in cases:
        err = await fails(client.put(changed))
        assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field=field, response_id=changed.id)
    for response_id, conversation, previous in [("resp_c", conv, ""), ("resp_p", "", "resp_1")]:
        got = (await client.get(response_id)).response
        assert got.in_progress and got.response_json == running_turn(response_id).response_json
        assert (got.conversation_id, got.previous_response_id) == (conversation, previous)
    assert await client.conversation_items(conv) == []
    assert await client.conversation_items(other_conv) == []


async def test_version_mismatch_at_finalization_keeps_the_turn_running(client: Client) -> None:
    conv = await client.conversation([item("a")])
    # The expected version is checked for a running turn too, and then nothing is stored.
    err = await fails(client.put(running_turn("resp_bg", conversation=conv), expected=0))
    assert_error(err, ABORTED, "VERSION_MISMATCH", expected_version="0", actual_version="1")
    assert_error(await fails(client.get("resp_bg")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    started = await client.put(
        running_turn("resp_bg", conversation=conv, inputs=[item("bg-in")]), expected=1
    )
    assert started.conversation_version == 1
    await client.append(conv, [item("b")])
    final = turn("resp_bg", conversation=conv, inputs=[item("bg-in")], outputs=[item("bg-out")])
    err = await fails(client.put(final, expected=1))
    assert_error(
        err,
        ABORTED,
        "VERSION_MISMATCH",
        conversation_id=conv,
        expected_version="1",
        actual_version="2",
    )
    assert (await client.get("resp_bg")).response == started.response
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "b"]
    done = await client.put(final, expected=2)
    assert done.conversation_version == 4 and not done.response.in_progress
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "b", "bg-in", "bg-out"]


async def test_finalization_that_cannot_append_writes_nothing(client: Client) -> None:
    conv = await client.conversation([item("a")])
    started = await client.put(running_turn("resp_bg", conversation=conv, inputs=[item("x")]))
    # An item with the same id reached the conversation meanwhile.
    await client.append(conv, [item("x")])
    err = await fails(client.put(turn("resp_bg", conversation=conv, inputs=[item("x")])))
    assert_error(err, ALREADY_EXISTS, "ITEM_ID_CONFLICT", conversation_id=conv, item_id="x")
    assert (await client.get("resp_bg")).response == started.response
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "x"]
    # Once the conversation is gone, the turn cannot be finished in it.
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    err = await fails(client.put(turn("resp_bg", conversation=conv, inputs=[item("y")])))
    assert_error(err, NOT_FOUND, "CONVERSATION_NOT_FOUND", conversation_id=conv)
    assert (await client.get("resp_bg")).response == started.response


async def test_concurrent_finalizations_exactly_one_wins(
    running: server.Running, connect: Callable[..., Client]
) -> None:
    setup = connect(running.port)
    conv = await setup.conversation([item("a")])
    await setup.put(running_turn("resp_bg", conversation=conv, inputs=[item("bg-in")]))
    callers = [connect(running.port) for _ in range(8)]
    finals = [
        turn(
            "resp_bg",
            conversation=conv,
            inputs=[item("bg-in")],
            outputs=[item(f"out-{n}")],
            body=f"final {n}",
        )
        for n in range(len(callers))
    ]
    results = await asyncio.gather(
        *(c.put(f) for c, f in zip(callers, finals, strict=True)), return_exceptions=True
    )
    won = [n for n, r in enumerate(results) if isinstance(r, pb.PutTurnResponse)]
    assert len(won) == 1, results
    winner = won[0]
    for n, result in enumerate(results):
        if n != winner:
            assert isinstance(result, grpc.aio.AioRpcError), result
            err = error_info(result)
            assert_error(err, ALREADY_EXISTS, "RESPONSE_ID_CONFLICT", response_id="resp_bg")
    got = (await setup.get("resp_bg")).response
    assert got.response_json == finals[winner].response_json and not got.in_progress
    items = await setup.conversation_items(conv)
    assert [(i.id, i.sequence) for i in items] == [
        ("a", 1), ("bg-in", 2), (f"out-{winner}", 3),
    ]  # fmt: skip
    # The winner's call replays; a loser's still conflicts.
    assert (await setup.put(finals[winner])).replayed
    loser = finals[(winner + 1) % len(finals)]
    assert (await fails(setup.put(loser))).reason == "RESPONSE_ID_CONFLICT"


async def test_delete_running_turn(client: Client) -> None:
    conv = await client.conversation([item("a")])
    await client.put(running_turn("resp_bg", conversation=conv, key="key-bg", inputs=[item("b")]))
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_bg"))
    assert_error(await fails(client.get("resp_bg")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert_error(await fails(by_key(client, "key-bg")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert_error(
        await fails(client.history(response_id="resp_bg")), NOT_FOUND, "RESPONSE_NOT_FOUND"
    )
    err = await fails(
        client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_bg"))
    )
    assert_error(err, NOT_FOUND, "RESPONSE_NOT_FOUND")
    assert [i.id for i in await client.conversation_items(conv)] == ["a"]
    # The id and the key are free: a turn stored with them now is new, not a replacement.
    fresh = await client.put(
        turn("resp_bg", conversation=conv, key="key-bg", inputs=[item("b")], body="new")
    )
    assert not fresh.replayed and not fresh.response.in_progress
    assert fresh.conversation_version == 2
    assert [i.id for i in await client.conversation_items(conv)] == ["a", "b"]


@pytest.mark.parametrize("backend", STORES, indirect=True)
async def test_store_written_before_running_turns_is_migrated(
    start: Start, connect: Callable[..., Client]
) -> None:
    first = await start()
    client = connect(first.port)
    await client.put(simple_turn("resp_1", key="key-1"))
    before = (await client.get("resp_1")).response
    await first.stop(0)
    await downgrade_to_version_2(first.settings)

    again = await start()
    client = connect(again.port)
    assert (await client.get("resp_1")).response == before
    assert not before.in_progress
    assert (await by_key(client, "key-1")).response == before
    await client.put(running_turn("resp_bg", previous="resp_1"))
    assert (await client.get("resp_bg")).response.in_progress
    await client.put(turn("resp_bg", previous="resp_1", outputs=[item("out")]))
    history = await client.history(response_id="resp_bg")
    assert [i.id for i in history.items] == ["resp_1-in", "resp_1-out", "out"]


async def downgrade_to_version_2(settings: StateSettings) -> None:
    """Turns the store back into what migration 2 left: no in_progress column."""
    statements = [
        "ALTER TABLE {s}responses DROP COLUMN in_progress",
        "DELETE FROM {s}schema_version WHERE version > 2",
    ]
    if settings.backend == "sqlite":
        with sqlite3.connect(settings.sqlite_path) as db:
            for statement in statements:
                db.execute(statement.format(s=""))
        return
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        for statement in statements:
            await conn.execute(statement.format(s=f'"{settings.postgres_schema}".'))
    finally:
        await conn.close()


# --- items by id (GetItems) ------------------------------------------------------------------


def found(reply: pb.GetItemsResponse) -> list[tuple[str, str]]:
    """The items of a GetItems reply as (id, content)."""
    return [(i.id, json.loads(i.json)["content"]) for i in reply.items]


async def test_get_items_finds_response_and_conversation_items_in_request_order(
    client: Client,
) -> None:
    odd = item("msg_odd", "ünïcode \u2028 {}")
    await client.put(turn("resp_1", inputs=[odd, item("msg_in")], outputs=[item("msg_out")]))
    conv = await client.conversation([item("conv_item", "in a conversation")])
    reply = await client.items("msg_out", "nope", "conv_item", "msg_odd", "msg_out", "nope2")
    assert found(reply) == [
        ("msg_out", "msg_out"),
        ("conv_item", "in a conversation"),
        ("msg_odd", "ünïcode \u2028 {}"),
    ]
    assert list(reply.missing_item_ids) == ["nope", "nope2"]
    assert reply.items[2].json == odd.json  # the bytes as stored
    assert [i.sequence for i in reply.items] == [1, 1, 1]
    assert all(i.create_time.seconds > 0 for i in reply.items)
    nothing = await client.items("x")
    assert list(nothing.items) == [] and list(nothing.missing_item_ids) == ["x"]
    # A conversation turn's items are the response's and the conversation's: found once.
    await client.put(simple_turn("resp_c", conversation=conv))
    reply = await client.items("resp_c-in", "resp_c-out")
    assert [i.id for i in reply.items] == ["resp_c-in", "resp_c-out"]
    assert [i.sequence for i in reply.items] == [2, 3]  # the conversation's copy


async def test_get_items_gives_the_newest_copy(client: Client) -> None:
    await client.put(turn("resp_1", inputs=[item("msg_1", "first")]))
    await client.put(turn("resp_2", inputs=[item("msg_1", "second")], previous="resp_1"))
    assert found(await client.items("msg_1")) == [("msg_1", "second")]
    conv = await client.conversation()
    await client.append(conv, [item("msg_1", "third")])
    assert found(await client.items("msg_1")) == [("msg_1", "third")]
    await client.put(turn("resp_3", outputs=[item("msg_1", "fourth")]))
    assert found(await client.items("msg_1")) == [("msg_1", "fourth")]
    # The newest copy gone, the one before it is found again.
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_3"))
    assert found(await client.items("msg_1")) == [("msg_1", "third")]
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=conv)
    )
    assert found(await client.items("msg_1")) == [("msg_1", "second")]


async def test_get_items_skips_deleted_and_running_stores(client: Client) -> None:
    await client.put(simple_turn("resp_1"))
    conv = await client.conversation([item("c1"), item("c2")])
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    await client.stub.DeleteConversationItem(
        pb.DeleteConversationItemRequest(tenant=TENANT, conversation_id=conv, item_id="c1")
    )
    reply = await client.items("resp_1-in", "resp_1-out", "c1", "c2")
    assert [i.id for i in reply.items] == ["c2"]
    assert list(reply.missing_item_ids) == ["resp_1-in", "resp_1-out", "c1"]
    # A running turn's items are not found until its final turn replaces it.
    await client.put(running_turn("resp_r", inputs=[item("resp_r-in")]))
    assert list((await client.items("resp_r-in")).missing_item_ids) == ["resp_r-in"]
    await client.put(simple_turn("resp_r"))
    assert [i.id for i in (await client.items("resp_r-in")).items] == ["resp_r-in"]


async def test_get_items_checks_its_request(client: Client) -> None:
    for ids, field in [((), "item_ids"), (("a", ""), "item_ids[1]")]:
        err = await fails(client.items(*ids))
        assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field=field)
    err = await fails(client.items(*(f"i{n}" for n in range(101))))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="item_ids")
    err = await fails(client.items("a", "x" * 513))
    assert_error(err, INVALID_ARGUMENT, "INVALID_ARGUMENT", field="item_ids[1]")
    err = await fails(client.stub.GetItems(pb.GetItemsRequest(item_ids=["a"])))
    assert_error(err, INVALID_ARGUMENT, "TENANT_REQUIRED")
    assert len((await client.items(*(f"i{n}" for n in range(100)))).missing_item_ids) == 100


# --- tenancy ------------------------------------------------------------------------------


async def test_other_tenant_sees_nothing(
    running: server.Running, connect: Callable[..., Client]
) -> None:
    a = connect(running.port, "tenant-a")
    b = connect(running.port, "tenant-b")
    await a.put(simple_turn("resp_1", key="key-1"))
    await a.put(simple_turn("resp_2", previous="resp_1"))
    conv = await a.conversation([item("a")])
    snapshot = (await a.get("resp_2"), await a.history(conversation_id=conv))

    for call in [
        b.get("resp_1"),
        b.stub.GetResponse(pb.GetResponseRequest(tenant="tenant-b", idempotency_key="key-1")),
        b.history(response_id="resp_2"),
        b.stub.DeleteResponse(pb.DeleteResponseRequest(tenant="tenant-b", response_id="resp_1")),
    ]:
        assert_error(await fails(call), NOT_FOUND, "RESPONSE_NOT_FOUND")
    err = await fails(b.put(simple_turn("resp_9", previous="resp_2")))
    assert err.reason == "PREVIOUS_RESPONSE_NOT_FOUND"
    for call in conversation_calls(b, conv, "a", tenant="tenant-b"):
        assert_error(await fails(call), NOT_FOUND, "CONVERSATION_NOT_FOUND")
    hidden = await b.items("resp_1-in", "resp_2-out", "a")
    assert list(hidden.items) == [] and len(hidden.missing_item_ids) == 3
    # Ids are per tenant: B may store its own resp_1, and the key is B's own.
    own = await b.put(simple_turn("resp_1", key="key-1", body="b's"))
    assert not own.replayed
    assert (await a.get("resp_2"), await a.history(conversation_id=conv)) == snapshot
    assert (await a.get("resp_1")).response.response_json != own.response.response_json


# --- pagination ---------------------------------------------------------------------------


async def test_pages_are_stable_under_concurrent_appends(client: Client) -> None:
    conv = await client.conversation([item(f"i{n:02d}") for n in range(25)])
    seen: list[resources_pb2.Item] = []
    token = ""
    pages = 0
    while True:
        page = await client.list_items(conv, page_size=10, page_token=token)
        seen.extend(page.items)
        pages += 1
        # Appends between pages extend the listing at its end, never shift it.
        if pages <= 2:
            await client.append(conv, [item(f"late{pages}")])
        token = page.next_page_token
        if not token:
            break
    assert [i.sequence for i in seen] == list(range(1, 28))
    assert [i.id for i in seen][-2:] == ["late1", "late2"]

    newest_first: list[int] = []
    token = ""
    while True:
        page = await client.list_items(conv, order=pb.ORDER_DESC, page_size=7, page_token=token)
        newest_first.extend(i.sequence for i in page.items)
        await client.append(conv, [item(f"later{len(newest_first)}")])
        token = page.next_page_token
        if not token:
            break
    assert newest_first == list(range(27, 0, -1))


async def test_page_sizes_cursor_and_end(client: Client) -> None:
    conv = await client.conversation([item(f"i{n:03d}") for n in range(130)])
    assert len((await client.list_items(conv)).items) == 20
    assert len((await client.list_items(conv, page_size=500)).items) == 100
    exact = await client.conversation([item(f"e{n}") for n in range(10)])
    page = await client.list_items(exact, page_size=10)
    assert len(page.items) == 10 and page.next_page_token == ""
    after = await client.list_items(conv, after="i009", page_size=3)
    assert [i.id for i in after.items] == ["i010", "i011", "i012"]
    after = await client.list_items(conv, order=pb.ORDER_DESC, after="i009", page_size=3)
    assert [i.id for i in after.items] == ["i008", "i007", "i006"]
    last = await client.list_items(conv, order=pb.ORDER_DESC, after="i000")
    assert list(last.items) == [] and last.next_page_token == ""
    empty = await client.list_items(await client.conversation())
    assert list(empty.items) == [] and empty.next_page_token == ""
    err = await fails(client.list_items(conv, after="nope"))
    assert_error(err, NOT_FOUND, "ITEM_NOT_FOUND", item_id="nope")


async def test_foreign_or_mangled_page_token_is_invalid(client: Client) -> None:
    conv = await client.conversation([item(f"i{n}") for n in range(5)])
    other = await client.conversation([item(f"o{n}") for n in range(5)])
    token = (await client.list_items(conv, page_size=2)).next_page_token
    assert token
    bad_tokens = {
        "other conversation": (other, pb.ORDER_ASC, token),
        "other order": (conv, pb.ORDER_DESC, token),
        "garbage": (conv, pb.ORDER_ASC, "not a token"),
        "tampered": (conv, pb.ORDER_ASC, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")),
        "truncated": (conv, pb.ORDER_ASC, token[:5]),
    }
    for name, (target, order, bad) in bad_tokens.items():
        err = await fails(client.list_items(target, order=order, page_token=bad))
        assert (err.code, err.reason, err.metadata.get("field")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "page_token",
        ), name
    # The good token still works, and the page token wins over after_item_id.
    page = await client.list_items(conv, page_size=2, page_token=token, after="i4")
    assert [i.id for i in page.items] == ["i2", "i3"]


# --- retention ----------------------------------------------------------------------------


async def test_expired_rows_vanish_everywhere_and_are_swept(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start(retention_s=2.0)
    client = connect(running.port)
    first = await client.put(simple_turn("resp_1", key="key-1"))
    assert first.response.HasField("expire_time")
    conv = await client.conversation([item("a")])
    await asyncio.sleep(1.2)
    second = await client.put(simple_turn("resp_2", previous="resp_1"))
    assert await client.history(response_id="resp_2")
    await sleep_until(first.response.expire_time.ToNanoseconds() / 1e9 + 0.05)
    # resp_1 has expired, resp_2 has not (it expires 1.2 s later).
    assert time.time() < second.response.expire_time.ToNanoseconds() / 1e9
    assert_error(await fails(client.get("resp_1")), NOT_FOUND, "RESPONSE_NOT_FOUND")
    err = await fails(
        client.stub.GetResponse(pb.GetResponseRequest(tenant=TENANT, idempotency_key="key-1"))
    )
    assert err.reason == "RESPONSE_NOT_FOUND"
    assert (await fails(client.history(response_id="resp_1"))).reason == "RESPONSE_NOT_FOUND"
    assert (await fails(client.history(response_id="resp_2"))).reason == "HISTORY_BROKEN"
    err = await fails(client.put(simple_turn("resp_3", previous="resp_1")))
    assert err.reason == "PREVIOUS_RESPONSE_NOT_FOUND"
    for call in conversation_calls(client, conv, "a"):
        assert_error(await fails(call), NOT_FOUND, "CONVERSATION_NOT_FOUND")
    gone = await client.items("resp_1-in", "a", "resp_2-in")
    assert [i.id for i in gone.items] == ["resp_2-in"]
    assert list(gone.missing_item_ids) == ["resp_1-in", "a"]
    # An expired id and key are free again.
    fresh = await client.put(simple_turn("resp_1", key="key-1", body="new"))
    assert not fresh.replayed
    await sleep_until(second.response.expire_time.ToNanoseconds() / 1e9 + 0.05)
    # The sweeper deletes what expired; what is live stays.
    assert await running.backend.sweep() >= 1
    assert await running.backend.sweep() == 0
    assert (await client.get("resp_1")).response.response_json == fresh.response.response_json
    counts = await stored_rows(running.settings)
    if counts is not None and time.time() < fresh.response.expire_time.ToNanoseconds() / 1e9:
        assert counts == {
            "responses": 1,
            "response_items": 2,
            "conversations": 0,
            "conversation_items": 0,
        }


async def stored_rows(settings: StateSettings) -> dict[str, int] | None:
    """Row counts of the store's tables, read around the service (None for memory)."""
    tables = ["responses", "response_items", "conversations", "conversation_items"]
    if settings.backend == "sqlite":
        with sqlite3.connect(settings.sqlite_path) as db:
            return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    if settings.backend == "postgres":
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            schema = settings.postgres_schema
            return {t: await conn.fetchval(f'SELECT count(*) FROM "{schema}".{t}') for t in tables}
        finally:
            await conn.close()
    return None


@pytest.mark.parametrize("backend", STORES, indirect=True)
async def test_sweeper_runs_on_its_own(start: Start, connect: Callable[..., Client]) -> None:
    running = await start(retention_s=0.3, sweep_interval_s=0.2)
    client = connect(running.port)
    await client.put(simple_turn("resp_1", key="key-1"))
    await client.conversation([item("a")])
    assert await stored_rows(running.settings) == {
        "responses": 1,
        "response_items": 2,
        "conversations": 1,
        "conversation_items": 1,
    }
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not any((await stored_rows(running.settings) or {}).values()):
            break
    else:
        pytest.fail("the sweeper did not delete the expired rows")


async def sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.time()))


async def test_conversation_expiry_slides_with_appends(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start(retention_s=30.0)
    client = connect(running.port)
    created = await client.stub.CreateConversation(pb.CreateConversationRequest(tenant=TENANT))
    await asyncio.sleep(0.05)
    await client.append(created.conversation.id, [item("a")])
    now = await client.stub.GetConversation(
        pb.GetConversationRequest(tenant=TENANT, conversation_id=created.conversation.id)
    )
    assert (
        now.conversation.expire_time.ToNanoseconds()
        > created.conversation.expire_time.ToNanoseconds()
    )


# --- SQLite group commit -----------------------------------------------------------------


class CountingSqlite(SqliteBackend):
    """The SQLite backend, counting the transactions its writer commits."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits = 0
        self._counted: set[int] = set()

    def _conn(self) -> sqlite3.Connection:
        conn = super()._conn()
        if id(conn) not in self._counted:
            self._counted.add(id(conn))
            conn.set_trace_callback(self._count)
        return conn

    def _count(self, statement: str) -> None:
        writer = threading.current_thread().name.startswith("sqlite-write")
        if writer and statement.strip().upper() == "COMMIT":
            self.commits += 1


def backend_turn(response_id: str, **fields: Any) -> Turn:
    """A turn for the backend itself, with items ``<id>-in`` and ``<id>-out`` by default."""
    items = {
        "input_items": (Item(id=f"{response_id}-in", json=b"{}"),),
        "output_items": (Item(id=f"{response_id}-out", json=b"{}"),),
    }
    return Turn(id=response_id, response_json=b'{"object": "response"}', **(items | fields))


async def queued_while_locked(path: str, writes: list[Awaitable[Any]]) -> list[Any]:
    """Starts ``writes`` while another connection holds the write lock, so that they queue up
    behind it; checks that none is answered before it is committed; returns their outcomes."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        tasks = [asyncio.ensure_future(w) for w in writes]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in tasks)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_sqlite_group_commit_keeps_every_write_and_their_order(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    backend = await CountingSqlite(path).open()
    try:
        conv = (await backend.create_conversation(TENANT, {}, [], "")).conversation.id
        backend.commits = 0
        writes: list[Awaitable[Any]] = []
        for n in range(150):
            fields = {"conversation_id": conv} if n % 2 else {}
            turn = backend_turn(f"resp_{n:03d}", **fields)
            writes.append(backend.put_turn(TENANT, turn, expected_conversation_version=None))
        results = await queued_while_locked(path, writes)
        # Shared transactions (the first writes may have gone alone before the rest queued),
        # and every caller answered with its own turn.
        assert backend.commits <= 4, backend.commits
        assert [r.turn.id for r in results] == [f"resp_{n:03d}" for n in range(150)]
        assert not any(r.replayed for r in results)
        # Applied in arrival order: conversation versions and stored order follow the calls.
        assert [r.conversation_version for r in results[1::2]] == list(range(2, 151, 2))
        with sqlite3.connect(path) as db:
            ids = [row[0] for row in db.execute("SELECT id FROM responses ORDER BY pk")]
        assert ids == [f"resp_{n:03d}" for n in range(150)]
        history = await backend.conversation_history(TENANT, conv, limit=0)
        assert [i.sequence for i in history.items] == list(range(1, 151))
        assert [i.id for i in history.items][:4] == [
            "resp_001-in", "resp_001-out", "resp_003-in", "resp_003-out",
        ]  # fmt: skip
    finally:
        await backend.close()


async def test_sqlite_group_commit_isolates_a_failing_write(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    backend = await CountingSqlite(path).open()
    try:
        created = await backend.create_conversation(TENANT, {}, [Item("taken", b"{}")], "")
        conv = created.conversation.id
        backend.commits = 0
        none: dict[str, Any] = {"expected_conversation_version": None}
        good = [backend_turn(f"resp_{n}", conversation_id=conv) for n in range(10)]
        # Fails late: its response row and items are written before its item id clashes.
        bad = backend_turn("resp_bad", conversation_id=conv, input_items=(Item("taken", b"{}"),))
        # The same id right after it, chained on a turn of the same batch: stored new.
        again = backend_turn("resp_bad", previous_response_id="resp_4")
        writes = [backend.put_turn(TENANT, t, **none) for t in good[:5]]
        writes.append(backend.put_turn(TENANT, bad, **none))
        writes.append(backend.put_turn(TENANT, again, **none))
        writes += [backend.put_turn(TENANT, t, **none) for t in good[5:]]
        results = await queued_while_locked(path, writes)
        assert backend.commits <= 2, backend.commits

        failed = results[5]
        assert isinstance(failed, ServiceError) and failed.reason == "ITEM_ID_CONFLICT", failed
        stored = [r for n, r in enumerate(results) if n != 5]
        assert all(isinstance(r, PutTurnResult) and not r.replayed for r in stored), results
        assert [r.conversation_version for r in stored if r.turn.conversation_id] == list(
            range(3, 22, 2)
        )
        # Nothing of the failed write is stored: the turn with its id is the one after it.
        got = await backend.get_response(TENANT, response_id="resp_bad")
        assert (got.previous_response_id, got.conversation_id) == ("resp_4", "")
        history = await backend.conversation_history(TENANT, conv, limit=0)
        assert [i.id for i in history.items] == ["taken"] + [
            f"resp_{n}-{part}" for n in range(10) for part in ("in", "out")
        ]
        with sqlite3.connect(path) as db:
            counts = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES]
        assert counts == [11, 22, 1, 21]
    finally:
        await backend.close()


class FailingOnceSqlite(SqliteBackend):
    """The SQLite backend whose writer fails its first group outside any statement (as a
    connection that cannot be opened would), once ``release`` is set."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.holding = threading.Event()
        self.release = threading.Event()

    def _commit_group(self, conn: sqlite3.Connection, batch: Sequence[Any]) -> None:
        if not self.holding.is_set():
            self.holding.set()
            self.release.wait(10)
            raise RuntimeError("the writer failed")
        super()._commit_group(conn, batch)


async def test_sqlite_writer_failure_answers_its_writes_and_drains_the_rest(
    tmp_path: Path,
) -> None:
    backend = await FailingOnceSqlite(str(tmp_path / "state.db")).open()
    try:
        none: dict[str, Any] = {"expected_conversation_version": None}
        first = asyncio.ensure_future(backend.put_turn(TENANT, backend_turn("resp_0"), **none))
        assert await asyncio.to_thread(backend.holding.wait, 10)  # the writer holds its group
        queued = [backend.put_turn(TENANT, backend_turn(f"resp_{n}"), **none) for n in (1, 2, 3)]
        tasks = [asyncio.ensure_future(w) for w in queued]
        await asyncio.sleep(0.1)
        backend.release.set()
        # The group that failed gets the error; the writes queued behind it are stored.
        with pytest.raises(RuntimeError):
            await first
        results = await asyncio.gather(*tasks)
        assert [r.turn.id for r in results] == ["resp_1", "resp_2", "resp_3"]
        assert not (await backend.put_turn(TENANT, backend_turn("after"), **none)).replayed
        with pytest.raises(ServiceError):
            await backend.get_response(TENANT, response_id="resp_0")
    finally:
        await backend.close()


TABLES = ["responses", "response_items", "conversations", "conversation_items"]


# --- the backend going away ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_locked_store_is_unavailable_and_retry_succeeds(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start(sqlite_busy_timeout_s=0.2)
    client = connect(running.port)
    await client.put(simple_turn("resp_1"))
    # Another process's writer holds the lock longer than the service waits.
    holder = sqlite3.connect(running.settings.sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        err = await fails(client.put(simple_turn("resp_2", previous="resp_1")))
        assert_error(err, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
        # Reads are not blocked by a writer (WAL).
        assert (await client.get("resp_1")).response.id == "resp_1"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Nothing was written, and the retry succeeds.
    assert not (await client.put(simple_turn("resp_2", previous="resp_1"))).replayed


@pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_lost_database_connection_is_unavailable_and_retry_succeeds(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start()
    client = connect(running.port)
    await client.put(simple_turn("resp_0"))
    schema = running.settings.postgres_schema
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        lock = admin.transaction()
        await lock.start()
        await admin.execute(f'LOCK TABLE "{schema}".responses IN ACCESS EXCLUSIVE MODE')
        call = asyncio.ensure_future(client.put(simple_turn("resp_1", previous="resp_0")))
        # Wait until the service's query blocks on the lock, then cut its connection.
        blocked = """SELECT pid FROM pg_stat_activity
            WHERE pg_backend_pid() = any(pg_blocking_pids(pid))"""
        for _ in range(500):
            if await admin.fetch(blocked):
                break
            await asyncio.sleep(0.01)
        await admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({blocked}) AS b")
        assert_error(await fails(call), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
        await lock.rollback()
    finally:
        await admin.close()
    # Nothing was written, and the retry succeeds on a fresh connection.
    assert not (await client.put(simple_turn("resp_1", previous="resp_0"))).replayed
    history = await client.history(response_id="resp_1")
    assert list(history.response_ids) == ["resp_0", "resp_1"]
