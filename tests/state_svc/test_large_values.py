"""Long values (a long answer's response JSON, event log and output item) on every backend, and in
a SQLite store, where each is written in a row of its own (large_values, see
state_svc.backends.sqlite._large_value): read back byte for byte by every read, gone with their
response, replaced with a running turn, and a store from before them migrated with its rows read
as they were."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import asyncpg
import grpc
import orjson
import pytest

from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import server
from state_svc.backends import postgres as postgres_backend
from state_svc.backends import sqlite as sqlite_backend
from tests.state_svc.conftest import POSTGRES_DSN, TENANT, Client, Start, item, simple_turn

LARGE = sqlite_backend.LARGE_JSON_BYTES
# An answer longer than a large value, with what JSON escapes in it; not a multiple of the
# pieces it is written in.
TEXT = ('héllo "wörld"\n\tand\\on ' * (LARGE // 10))[: LARGE + LARGE // 3 + 11]


def output(response_id: str, text: str = TEXT) -> dict[str, object]:
    return {
        "id": f"{response_id}-out",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "text": text}],
    }


def long_log(response_id: str) -> bytes:
    """An event log longer than a large value."""
    delta = {"type": "response.output_text.delta", "item_id": f"{response_id}-out", "delta": "x"}
    return orjson.dumps([{**delta, "sequence_number": n} for n in range(LARGE // 60)])


def long_turn(
    response_id: str, *, combined: bool = True, in_progress: bool = False
) -> resources_pb2.StoredResponse:
    """A turn whose response JSON, output item and event log are each longer than a large value:
    its item inside its response JSON (response_json_with_output_items, as the router sends a
    long answer) or sent apart (as an older router does)."""
    out = output(response_id)
    response = orjson.dumps({"id": response_id, "object": "response", "output": [out]})
    stored = resources_pb2.StoredResponse(
        id=response_id,
        input_items=[item(f"{response_id}-in")],
        stream_events_json=long_log(response_id),
        in_progress=in_progress,
    )
    if combined:
        stored.response_json_with_output_items = response
    else:
        stored.response_json = response
        stored.output_items.add(id=f"{response_id}-out", json=orjson.dumps(out))
    return stored


def assert_long(got: resources_pb2.StoredResponse, response_id: str) -> None:
    """``got`` is the turn long_turn(response_id) made, byte for byte."""
    sent = long_turn(response_id)
    assert got.response_json == sent.response_json_with_output_items
    assert got.stream_events_json == sent.stream_events_json
    assert [i.json for i in got.output_items] == [orjson.dumps(output(response_id))]
    assert [i.json for i in got.input_items] == [i.json for i in sent.input_items]


@pytest.mark.parametrize("combined", [True, False], ids=["combined", "items-apart"])
async def test_long_values_read_back_by_every_read(client: Client, combined: bool) -> None:
    first = long_turn("resp_1", combined=combined)
    if combined:
        await client.put_chunked(first, piece_bytes=100_003)
    else:
        await client.put(first)
    assert_long((await client.get("resp_1")).response, "resp_1")
    second = simple_turn("resp_2", previous="resp_1")
    await client.put(second)
    long_item = orjson.dumps(output("resp_1"))
    for limit in (0, 3):
        history = await client.history(response_id="resp_2", max_items=limit)
        assert [i.id for i in history.items] == [
            "resp_1-in",
            "resp_1-out",
            "resp_2-in",
            "resp_2-out",
        ][-limit if limit else 0 :]
        assert history.items[-3].json == long_item
    found = await client.items("resp_1-out", "resp_1-in")
    assert [(i.id, i.json) for i in found.items] == [
        ("resp_1-out", long_item),
        ("resp_1-in", first.input_items[0].json),
    ]
    # A replay answers the turn stored, whichever way it is sent again.
    again = await client.put_chunked(long_turn("resp_1"), piece_bytes=250_000)
    assert again.replayed
    assert_long(again.response, "resp_1")
    assert (await client.put(long_turn("resp_1", combined=False))).replayed


# --- SQLite: where the long values are ------------------------------------------------------


def rows(path: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return list(db.execute(sql, args))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_keeps_long_values_apart_and_drops_them_with_their_response(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start()
    client = connect(running.port)
    path = running.settings.sqlite_path
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    await client.put(simple_turn("resp_small"))
    # The response's row and its item's hold empty values pointing at three large ones.
    assert rows(
        path,
        """SELECT length(response_json), length(stream_events_json),
            response_json_at IS NOT NULL, stream_events_at IS NOT NULL
        FROM responses WHERE id = ?""",
        "resp_1",
    ) == [(0, 0, 1, 1)]
    assert rows(
        path, "SELECT item_id, length(json), json_at IS NOT NULL FROM response_items ORDER BY 1"
    ) == [("resp_1-in", len(item("resp_1-in").json), 0), ("resp_1-out", 0, 1)] + [
        (i, len(item(i).json), 0) for i in ("resp_small-in", "resp_small-out")
    ]
    sizes = sorted(n for (n,) in rows(path, "SELECT length(data) FROM large_values"))
    sent = long_turn("resp_1")
    assert sizes == sorted(
        [
            len(sent.response_json_with_output_items),
            len(sent.stream_events_json),
            len(orjson.dumps(output("resp_1"))),
        ]
    )
    # A small turn stores nothing apart.
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    assert rows(path, "SELECT count(*) FROM large_values") == [(0,)]
    # Expired ones go with their response when swept.
    await client.put_chunked(long_turn("resp_2"), piece_bytes=100_003)
    assert rows(path, "SELECT count(*) FROM large_values") == [(3,)]
    await running.stop(0)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE responses SET expire_time_us = 1")
    again = await start()
    assert await again.backend.sweep() == 2
    assert rows(path, "SELECT count(*) FROM large_values") == [(0,)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_running_turn_replaced_keeps_only_the_final_values(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start()
    client = connect(running.port)
    path = running.settings.sqlite_path
    await client.put_chunked(long_turn("resp_1", in_progress=True), piece_bytes=100_003)
    assert rows(path, "SELECT count(*) FROM large_values") == [(3,)]
    # Replaced by a long final turn: its own three values, the running turn's gone.
    final = long_turn("resp_1")
    await client.put(long_turn("resp_1", combined=False))
    assert rows(path, "SELECT count(*) FROM large_values") == [(3,)]
    assert_long((await client.get("resp_1")).response, "resp_1")
    assert (
        final.response_json_with_output_items == (await client.get("resp_1")).response.response_json
    )
    # Replaced by a short one: nothing apart is left.
    await client.put_chunked(long_turn("resp_2", in_progress=True), piece_bytes=100_003)
    short = simple_turn("resp_2")
    await client.put(short)
    assert rows(path, "SELECT count(*) FROM large_values") == [(3,)]  # resp_1's
    got = (await client.get("resp_2")).response
    assert got.response_json == short.response_json
    assert [i.json for i in got.output_items] == [short.output_items[0].json]
    assert got.stream_events_json == b""


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_store_from_before_large_values_is_migrated(
    start: Start, connect: Callable[..., Client]
) -> None:
    """A store from before migration 9 (long values in their rows) reads its rows as they were
    once migrated, and writes new long values apart."""
    first = await start()
    client = connect(first.port)
    path = first.settings.sqlite_path
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    await first.stop(0)
    with sqlite3.connect(path) as db:
        # resp_1 as an older release wrote it: every value in its own row.
        for statement in (
            """UPDATE responses SET
                response_json = (SELECT data FROM large_values WHERE pk = response_json_at),
                stream_events_json = (SELECT data FROM large_values WHERE pk = stream_events_at)
            WHERE response_json_at IS NOT NULL""",
            """UPDATE response_items SET json = (SELECT data FROM large_values WHERE pk = json_at)
            WHERE json_at IS NOT NULL""",
            "DROP TABLE large_values",
            "ALTER TABLE responses DROP COLUMN response_json_at",
            "ALTER TABLE responses DROP COLUMN stream_events_at",
            "ALTER TABLE response_items DROP COLUMN json_at",
            "DELETE FROM schema_version WHERE version > 8",
        ):
            db.execute(statement)
    assert rows(path, "SELECT length(response_json) > ? FROM responses", LARGE) == [(1,)]

    again = await start()
    client = connect(again.port)
    assert rows(path, "SELECT max(version) FROM schema_version") == [
        (len(sqlite_backend.MIGRATIONS),)
    ]
    assert_long((await client.get("resp_1")).response, "resp_1")
    history = await client.history(response_id="resp_1")
    assert history.items[-1].json == orjson.dumps(output("resp_1"))
    await client.put_chunked(long_turn("resp_2"), piece_bytes=100_003)
    assert_long((await client.get("resp_2")).response, "resp_2")
    assert rows(path, "SELECT count(*) FROM large_values") == [(3,)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_reads_a_response_without_its_items_when_asked(
    start: Start, connect: Callable[..., Client]
) -> None:
    """GetResponseChunked sends no items: SQLite then reads none (a long answer's output item
    is as long as the answer), and the long values are the same either way."""
    running = await start()
    client = connect(running.port)
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    whole = await running.backend.get_response(TENANT, response_id="resp_1")
    bare = await running.backend.get_response(TENANT, response_id="resp_1", with_items=False)
    assert (len(whole.input_items), len(whole.output_items)) == (1, 1)
    assert (bare.input_items, bare.output_items) == ((), ())
    sent = long_turn("resp_1")
    for turn in (whole, bare):
        assert bytes(turn.response_json) == sent.response_json_with_output_items
        assert bytes(turn.stream_events_json) == sent.stream_events_json


# --- conversations: a long item on every backend --------------------------------------------


async def test_long_conversation_items_read_back_and_deleted(client: Client) -> None:
    """A long item appended to a conversation (by CreateConversationItems and by a turn in it)
    reads back byte for byte by every read of a conversation's items, and a deleted one is
    gone."""
    long_item = resources_pb2.Item(id="item_long", json=orjson.dumps(output("item")))
    conversation = await client.conversation([item("item_first")])
    await client.append(conversation, [long_item])
    turn = long_turn("resp_1", combined=False)
    turn.conversation_id = conversation
    await client.put(turn)
    expected = [
        ("item_first", item("item_first").json),
        ("item_long", long_item.json),
        ("resp_1-in", turn.input_items[0].json),
        ("resp_1-out", turn.output_items[0].json),
    ]
    assert [(i.id, i.json) for i in await client.conversation_items(conversation)] == expected
    listed = await client.list_items(conversation)
    assert [(i.id, i.json) for i in listed.items] == expected
    got = await client.stub.GetConversationItem(
        pb.GetConversationItemRequest(
            tenant=TENANT, conversation_id=conversation, item_id="item_long"
        )
    )
    assert got.item.json == long_item.json
    # Appended again, the same long item is a replay.
    assert (await client.append(conversation, [long_item])).replayed
    await client.stub.DeleteConversationItem(
        pb.DeleteConversationItemRequest(
            tenant=TENANT, conversation_id=conversation, item_id="item_long"
        )
    )
    left = [(i.id, i.json) for i in await client.conversation_items(conversation)]
    assert left == [expected[0], *expected[2:]]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_keeps_long_conversation_items_apart_and_drops_them_with_their_owner(
    start: Start, connect: Callable[..., Client]
) -> None:
    """A conversation's long item is written in a row of its own, owned by the conversation (not
    by the response it came with: the item outlives it), read back by GetItems too, and gone
    with the item, the conversation, or the conversation's expiry."""
    running = await start()
    client = connect(running.port)
    path = running.settings.sqlite_path
    long_item = resources_pb2.Item(id="item_long", json=orjson.dumps(output("item")))
    conversation = await client.conversation([item("item_first"), long_item])
    assert rows(
        path, "SELECT item_id, length(json), json_at IS NOT NULL FROM conversation_items"
    ) == [("item_first", len(item("item_first").json), 0), ("item_long", 0, 1)]
    assert rows(path, "SELECT length(data) FROM conversation_large_values") == [
        (len(long_item.json),)
    ]
    # A turn in it: the response's copy and the conversation's copy, each apart.
    turn = long_turn("resp_1", combined=False)
    turn.conversation_id = conversation
    await client.put(turn)
    assert rows(path, "SELECT count(*) FROM conversation_large_values") == [(2,)]
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    assert rows(path, "SELECT count(*) FROM large_values") == [(0,)]
    found = await client.items("item_long", "resp_1-out")
    assert [(i.id, i.json) for i in found.items] == [
        ("item_long", long_item.json),
        ("resp_1-out", turn.output_items[0].json),
    ]
    # A turn whose item clashes with one already there is refused, and leaves no value behind.
    clash = long_turn("resp_2", combined=False)
    clash.conversation_id = conversation
    clash.output_items[0].id = "item_long"
    with pytest.raises(grpc.aio.AioRpcError):
        await client.put(clash)
    assert rows(path, "SELECT count(*) FROM conversation_large_values") == [(2,)]
    # Gone with the item, then with the conversation.
    await client.stub.DeleteConversationItem(
        pb.DeleteConversationItemRequest(
            tenant=TENANT, conversation_id=conversation, item_id="item_long"
        )
    )
    assert rows(path, "SELECT count(*) FROM conversation_large_values") == [(1,)]
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=conversation)
    )
    assert rows(path, "SELECT count(*) FROM conversation_large_values") == [(0,)]
    # Expired ones go with their conversation when swept.
    await client.conversation([long_item])
    await running.stop(0)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE conversations SET expire_time_us = 1")
    again = await start()
    assert await again.backend.sweep() == 1
    assert rows(path, "SELECT count(*) FROM conversation_large_values") == [(0,)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_store_from_before_conversation_values_is_migrated(
    start: Start, connect: Callable[..., Client]
) -> None:
    """A store from before migration 10 (a conversation's long items in their rows) reads them
    as they were once migrated, and writes new long items apart."""
    first = await start()
    client = connect(first.port)
    path = first.settings.sqlite_path
    long_item = resources_pb2.Item(id="item_long", json=orjson.dumps(output("item")))
    conversation = await client.conversation([item("item_first"), long_item])
    await first.stop(0)
    with sqlite3.connect(path) as db:
        for statement in (
            """UPDATE conversation_items
            SET json = (SELECT data FROM conversation_large_values WHERE pk = json_at)
            WHERE json_at IS NOT NULL""",
            "DROP TABLE conversation_large_values",
            "ALTER TABLE conversation_items DROP COLUMN json_at",
            "DELETE FROM schema_version WHERE version > 9",
        ):
            db.execute(statement)
    assert rows(path, "SELECT length(json) > ? FROM conversation_items ORDER BY seq", LARGE) == [
        (0,),
        (1,),
    ]

    again = await start()
    client = connect(again.port)
    assert rows(path, "SELECT max(version) FROM schema_version") == [
        (len(sqlite_backend.MIGRATIONS),)
    ]
    expected = [("item_first", item("item_first").json), ("item_long", long_item.json)]
    assert [(i.id, i.json) for i in await client.conversation_items(conversation)] == expected
    listed = await client.list_items(conversation)
    assert [(i.id, i.json) for i in listed.items] == expected
    assert [i.json for i in (await client.items("item_long")).items] == [long_item.json]
    assert (await client.append(conversation, [long_item])).replayed
    await client.append(
        conversation, [resources_pb2.Item(id="item_long_2", json=orjson.dumps(output("item")))]
    )
    assert rows(path, "SELECT count(*) FROM conversation_large_values") == [(1,)]
    await client.stub.DeleteConversationItem(
        pb.DeleteConversationItemRequest(
            tenant=TENANT, conversation_id=conversation, item_id="item_long"
        )
    )
    assert [i.id for i in await client.conversation_items(conversation)] == [
        "item_first",
        "item_long_2",
    ]
    # Migrated again (a store whose version was set back by hand keeps the table and column).
    await again.stop(0)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM schema_version WHERE version > 9")
    third = await start()
    client = connect(third.port)
    assert [i.json for i in await client.conversation_items(conversation)] == [
        item("item_first").json,
        orjson.dumps(output("item")),
    ]


# --- PostgreSQL: where the long values are --------------------------------------------------

POSTGRES = [pytest.param("postgres", marks=pytest.mark.postgres)]
PG_LARGE = postgres_backend.LARGE_JSON_BYTES


async def pg_rows(running: server.Running, sql: str, *args: object) -> list[tuple[object, ...]]:
    """The rows of ``sql`` ({s}: the service's schema, quoted) in the service's store."""
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        schema = '"' + running.settings.postgres_schema + '"'
        return [tuple(r) for r in await conn.fetch(sql.format(s=schema), *args)]
    finally:
        await conn.close()


async def pg_values(running: server.Running) -> list[tuple[object, ...]]:
    """Each large value: its owner (response id or conversation), its size, its pieces and
    their sizes together, in size order."""
    return await pg_rows(
        running,
        """SELECT coalesce(r.id, 'conversation'), v.size, count(p.seq), sum(length(p.data))
        FROM {s}.large_values v LEFT JOIN {s}.responses r ON r.pk = v.response_pk
            LEFT JOIN {s}.large_value_pieces p ON p.value_pk = v.pk
        GROUP BY 1, 2, v.pk ORDER BY 2, 1""",
    )


async def pg_pieces(running: server.Running) -> int:
    return int((await pg_rows(running, "SELECT count(*) FROM {s}.large_value_pieces"))[0][0])


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
async def test_postgres_keeps_long_values_in_pieces_and_drops_them_with_their_owner(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start()
    client = connect(running.port)
    assert PG_LARGE == LARGE  # the tests' long values are long for both
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    await client.put(simple_turn("resp_small"))
    # The response's row and its item's hold empty values pointing at three large ones.
    assert await pg_rows(
        running,
        """SELECT length(response_json), length(stream_events_json),
            response_json_at IS NOT NULL, stream_events_at IS NOT NULL
        FROM {s}.responses WHERE id = $1""",
        "resp_1",
    ) == [(0, 0, True, True)]
    assert await pg_rows(
        running,
        "SELECT item_id, length(json), json_at IS NOT NULL FROM {s}.response_items ORDER BY 1",
    ) == [("resp_1-in", len(item("resp_1-in").json), False), ("resp_1-out", 0, True)] + [
        (i, len(item(i).json), False) for i in ("resp_small-in", "resp_small-out")
    ]
    sent = long_turn("resp_1")
    sizes = sorted(
        [
            len(sent.response_json_with_output_items),
            len(sent.stream_events_json),
            len(orjson.dumps(output("resp_1"))),
        ]
    )
    piece = postgres_backend._LARGE_PIECE_BYTES
    assert await pg_values(running) == [
        ("resp_1", n, -(-n // piece), n)
        for n in sizes  # in pieces of at most `piece`
    ]
    assert all(n > piece for n in sizes[1:])  # so that some are in more than one piece
    await client.stub.DeleteResponse(pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"))
    assert await pg_values(running) == []
    assert await pg_pieces(running) == 0
    # A conversation's long item: its own value, gone with the item, or with the conversation.
    long_item = resources_pb2.Item(id="item_long", json=orjson.dumps(output("item")))
    conversation = await client.conversation([long_item])
    n = len(long_item.json)
    assert await pg_values(running) == [("conversation", n, -(-n // piece), n)]
    await client.stub.DeleteConversationItem(
        pb.DeleteConversationItemRequest(
            tenant=TENANT, conversation_id=conversation, item_id="item_long"
        )
    )
    assert await pg_values(running) == []
    await client.append(conversation, [long_item])
    await client.stub.DeleteConversation(
        pb.DeleteConversationRequest(tenant=TENANT, conversation_id=conversation)
    )
    assert (await pg_values(running), await pg_pieces(running)) == ([], 0)
    # Expired ones go with their response (or conversation) when swept.
    await client.put_chunked(long_turn("resp_2"), piece_bytes=100_003)
    await client.conversation([long_item])
    assert len(await pg_values(running)) == 4
    await pg_rows(running, "UPDATE {s}.responses SET expire_time_us = 1")
    await pg_rows(running, "UPDATE {s}.conversations SET expire_time_us = 1")
    assert await running.backend.sweep() == 3
    assert (await pg_values(running), await pg_pieces(running)) == ([], 0)


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
async def test_postgres_running_turn_replaced_keeps_only_the_final_values(
    start: Start, connect: Callable[..., Client]
) -> None:
    running = await start()
    client = connect(running.port)
    await client.put_chunked(long_turn("resp_1", in_progress=True), piece_bytes=100_003)
    assert len(await pg_values(running)) == 3
    # Replaced by a long final turn: its own three values, the running turn's gone.
    final = long_turn("resp_1")
    await client.put(long_turn("resp_1", combined=False))
    assert len(await pg_values(running)) == 3
    got = (await client.get("resp_1")).response
    assert_long(got, "resp_1")
    assert final.response_json_with_output_items == got.response_json
    # Replaced by a short one: nothing apart is left.
    await client.put_chunked(long_turn("resp_2", in_progress=True), piece_bytes=100_003)
    short = simple_turn("resp_2")
    await client.put(short)
    assert [owner for owner, *_ in await pg_values(running)] == ["resp_1"] * 3
    got = (await client.get("resp_2")).response
    assert got.response_json == short.response_json
    assert [i.json for i in got.output_items] == [short.output_items[0].json]
    assert got.stream_events_json == b""
    assert await pg_rows(
        running,
        "SELECT response_json_at, stream_events_at FROM {s}.responses WHERE id = 'resp_2'",
    ) == [(None, None)]


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
async def test_postgres_store_from_before_large_values_is_migrated(
    start: Start, connect: Callable[..., Client]
) -> None:
    """A store from before migration 8 (long values in their rows) reads its rows as they were
    once migrated, and writes new long values in pieces."""
    first = await start()
    client = connect(first.port)
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    conversation = await client.conversation([item("item_first")])
    long_item = resources_pb2.Item(id="item_long", json=orjson.dumps(output("item")))
    await client.append(conversation, [long_item])
    await first.stop(0)
    whole = "(SELECT string_agg(data, ''::bytea ORDER BY seq) FROM {s}.large_value_pieces WHERE value_pk = %s)"
    # resp_1 and the item as an older release wrote them: every value in its own row.
    for statement in (
        f"""UPDATE {{s}}.responses SET response_json = {whole % "response_json_at"},
            stream_events_json = {whole % "stream_events_at"}
        WHERE response_json_at IS NOT NULL""",
        f"UPDATE {{s}}.response_items SET json = {whole % 'json_at'} WHERE json_at IS NOT NULL",
        f"UPDATE {{s}}.conversation_items SET json = {whole % 'json_at'} WHERE json_at IS NOT NULL",
        "DROP TABLE {s}.large_value_pieces",
        "DROP TABLE {s}.large_values",
        "ALTER TABLE {s}.responses DROP COLUMN response_json_at",
        "ALTER TABLE {s}.responses DROP COLUMN stream_events_at",
        "ALTER TABLE {s}.response_items DROP COLUMN json_at",
        "ALTER TABLE {s}.conversation_items DROP COLUMN json_at",
        "DELETE FROM {s}.schema_version WHERE version > 7",
    ):
        await pg_rows(first, statement)
    assert await pg_rows(first, "SELECT length(response_json) > $1 FROM {s}.responses", LARGE) == [
        (True,)
    ]

    again = await start()
    client = connect(again.port)
    assert await pg_rows(again, "SELECT max(version) FROM {s}.schema_version") == [
        (len(postgres_backend.MIGRATIONS),)
    ]
    assert_long((await client.get("resp_1")).response, "resp_1")
    history = await client.history(response_id="resp_1")
    assert history.items[-1].json == orjson.dumps(output("resp_1"))
    found = await client.items("item_long")
    assert [i.json for i in found.items] == [long_item.json]
    assert [i.json for i in await client.conversation_items(conversation)] == [
        item("item_first").json,
        long_item.json,
    ]
    await client.put_chunked(long_turn("resp_2"), piece_bytes=100_003)
    assert_long((await client.get("resp_2")).response, "resp_2")
    assert [owner for owner, *_ in await pg_values(again)] == ["resp_2"] * 3


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
async def test_postgres_large_values_migration_is_idempotent(
    start: Start, connect: Callable[..., Client]
) -> None:
    """Migration 8 applied again (a store set back to version 7 by hand, its tables kept)
    changes nothing: every value stored before reads as it did, none is lost."""
    first = await start()
    client = connect(first.port)
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    await first.stop(0)
    await pg_rows(first, "DELETE FROM {s}.schema_version WHERE version > 7")
    again = await start()
    client = connect(again.port)
    assert await pg_rows(again, "SELECT max(version), count(*) FROM {s}.schema_version") == [
        (len(postgres_backend.MIGRATIONS), len(postgres_backend.MIGRATIONS))
    ]
    assert len(await pg_values(again)) == 3
    assert_long((await client.get("resp_1")).response, "resp_1")
    # Its statements once more, on the current schema.
    for statement in postgres_backend.MIGRATIONS[7]:
        await pg_rows(again, statement)
    assert_long((await client.get("resp_1")).response, "resp_1")


@pytest.mark.parametrize("backend", POSTGRES, indirect=True)
async def test_postgres_reads_long_values_a_piece_at_a_time(
    start: Start, connect: Callable[..., Client]
) -> None:
    """GetResponse fills each long value into one buffer of its size from its pieces (not
    joined whole in the statement), in one snapshot; a value whose pieces do not make its
    size is an error, never a truncated answer."""
    running = await start()
    client = connect(running.port)
    await client.put_chunked(long_turn("resp_1"), piece_bytes=100_003)
    turn = await running.backend.get_response(TENANT, response_id="resp_1")
    values = [turn.response_json, turn.stream_events_json, turn.output_items[0].json]
    assert all(isinstance(v, memoryview) for v in values)
    assert isinstance(turn.input_items[0].json, bytes)  # short: as stored
    assert_long((await client.get("resp_1")).response, "resp_1")
    await pg_rows(
        running,
        """UPDATE {s}.large_values SET size = size + 1
        WHERE pk = (SELECT response_json_at FROM {s}.responses WHERE id = 'resp_1')""",
    )
    with pytest.raises(RuntimeError, match="shorter than its size"):
        await running.backend.get_response(TENANT, response_id="resp_1")
