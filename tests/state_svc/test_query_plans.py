"""The hot queries use indexes only, so that a call costs the same however much the store holds
(issue 9: the SQLite history query scanned every stored item, and a 10-turn history cost three
times more at 10,000 stored turns than at 1,000).

Each SQL backend's store is filled with 20,000 turns (chains of ten, two items each, some with
idempotency keys or an expiry) and as many conversations of three items, written straight into
its tables. Then every backend call runs once while each statement the backend sends is
recorded, and each recorded statement is explained: none may scan ``responses``, ``response_items``,
``conversations`` or ``conversation_items`` whole (nor a whole tenant of them), and SQLite may not
build an automatic index. Plans are checked before and after ANALYZE, since neither backend may
depend on statistics to find the right plan, and PostgreSQL's are checked as custom plans (the
first executions of a prepared statement) and as the generic plan it may switch to after.
Foreign keys must be indexed on the child side, or deleting a response or a conversation would
scan its items' table.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from state_svc.backends import sqlite as sqlite_backend
from state_svc.backends.base import Backend, Item, Turn
from state_svc.backends.postgres import PostgresBackend
from state_svc.backends.sqlite import (
    CHAIN_LINKS_SQL,
    CHAIN_MARK_SQL,
    CONVERSATION_HISTORY_SQL,
    HISTORY_CAPPED_SQL,
    HISTORY_SQL,
    ITEMS_SQL,
    TURN_LOOKUP_SQL,
    SqliteBackend,
)
from tests.state_svc.conftest import POSTGRES_DSN

TENANT = "tenant-a"
TURNS = 20_000
CONVERSATIONS = 20_000
CONVERSATION_ITEMS = 3
STORE_TABLES = ("responses", "response_items", "conversations", "conversation_items")
# SQLite's store also keeps long values in a table of their own; PostgreSQL's in pieces.
SQLITE_TABLES = (*STORE_TABLES, "large_values")
POSTGRES_TABLES = (*STORE_TABLES, "large_values", "large_value_pieces")
# An item's JSON this long is a long value in either store.
LONG_JSON = b'{"text": "' + b"x" * (256 * 1024) + b'"}'
_DML = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")


# --- what every backend is asked to do ---------------------------------------------------------


def new_turn(response_id: str, **fields: Any) -> Turn:
    return Turn(
        id=response_id,
        response_json=b'{"object": "response"}',
        input_items=(Item(id=f"{response_id}-in", json=b'{"type": "message"}'),),
        output_items=(Item(id=f"{response_id}-out", json=b'{"type": "message"}'),),
        **fields,
    )


async def exercise(backend: Backend) -> None:
    """Every call of the backend, with its hot paths: new, chained, replayed and running turns,
    turns in a conversation, lookups, histories, pages, deletes and a sweep."""
    t = TENANT
    none = {"expected_conversation_version": None}
    # Chained on a preloaded turn, then on each other; replays by id and by key.
    await backend.put_turn(t, new_turn("q_1", previous_response_id="fill_15"), **none)
    await backend.put_turn(
        t, new_turn("q_2", previous_response_id="q_1", idempotency_key="k"), **none
    )
    await backend.put_turn(
        t, new_turn("q_2", previous_response_id="q_1", idempotency_key="k"), **none
    )
    await backend.put_turn(t, new_turn("q_other", idempotency_key="k"), **none)
    chained = new_turn("q_intact", previous_response_id="q_2")
    await backend.put_turn(
        t, chained, expected_conversation_version=None, require_intact_chain=True
    )
    # A running turn, replaced by its final turn.
    await backend.put_turn(t, new_turn("q_3", previous_response_id="q_2", in_progress=True), **none)
    await backend.put_turn(t, new_turn("q_3", previous_response_id="q_2"), **none)
    await backend.get_response(t, response_id="q_3")
    await backend.get_response(t, idempotency_key="k")
    await backend.response_history(t, "q_3", limit=0)
    await backend.response_history(t, "q_3", limit=3)
    await backend.response_history(t, "fill_19999", limit=0)

    created = await backend.create_conversation(t, {"a": "b"}, [Item("c-1", b"{}")], "req-1")
    await backend.create_conversation(t, {"a": "b"}, [Item("c-1", b"{}")], "req-1")
    conv = created.conversation.id
    await backend.put_turn(
        t, new_turn("q_c", conversation_id=conv), expected_conversation_version=1
    )
    await backend.put_turn(t, new_turn("q_cr", conversation_id=conv, in_progress=True), **none)
    await backend.put_turn(t, new_turn("q_cr", conversation_id=conv), **none)
    await backend.append_items(t, conv, [Item("c-2", b"{}")], expected_version=None)
    await backend.append_items(t, conv, [Item("c-2", b"{}")], expected_version=None)
    await backend.conversation_history(t, conv, limit=0)
    await backend.conversation_history(t, "conv_fill_7", limit=5)
    for descending in (False, True):
        for after_sequence, after_item_id in ((None, ""), (None, "c-1"), (2, "")):
            await backend.list_items(
                t,
                "conv_fill_7",
                descending=descending,
                limit=10,
                after_sequence=after_sequence,
                after_item_id=after_item_id,
            )
            await backend.list_items(
                t,
                conv,
                descending=descending,
                limit=10,
                after_sequence=after_sequence,
                after_item_id=after_item_id,
            )
    await backend.get_item(t, conv, "c-2")
    # Long values: a running turn replaced by its final one, in a conversation; one of its
    # items deleted from the conversation, read by every read first.
    long_turn = replace(
        new_turn("q_long", conversation_id=conv),
        response_json=LONG_JSON,
        stream_events_json=LONG_JSON,
        output_items=(Item("q_long-out", LONG_JSON),),
    )
    await backend.put_turn(t, replace(long_turn, in_progress=True), **none)
    await backend.put_turn(t, long_turn, **none)
    await backend.put_turn(t, replace(long_turn, id="q_long_2", conversation_id=""), **none)
    await backend.get_response(t, response_id="q_long")
    await backend.response_history(t, "q_long", limit=0)
    await backend.response_history(t, "q_long", limit=1)
    await backend.get_items(t, ["q_long-out"])
    await backend.conversation_history(t, conv, limit=0)
    await backend.list_items(
        t, conv, descending=False, limit=10, after_sequence=None, after_item_id=""
    )
    await backend.get_item(t, conv, "q_long-out")
    await backend.delete_item(t, conv, "q_long-out")
    # Items by id: in responses (preloaded and new), in conversations, and not at all.
    await backend.get_items(t, ["fill_7-0", "q_3-in", "c-2", "c-1", "nope"])
    await backend.get_conversation(t, conv)
    await backend.get_conversation_by_request(t, "req-1")
    await backend.update_conversation(t, conv, {"c": "d"})
    await backend.delete_item(t, conv, "c-2")
    await backend.delete_response(t, "q_1")
    await backend.delete_conversation(t, conv)
    await backend.sweep()


# --- SQLite ------------------------------------------------------------------------------------


class TracedSqlite(SqliteBackend):
    """The SQLite backend, recording every statement its connections run (with their values)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="normal")
        self.statements: list[str] = []
        self._traced: set[int] = set()

    def _conn(self) -> sqlite3.Connection:
        conn = super()._conn()
        if id(conn) not in self._traced:
            self._traced.add(id(conn))
            conn.set_trace_callback(self.statements.append)
        return conn


def fill_sqlite(path: str) -> None:
    """Writes the preload rows straight into the tables, in one transaction."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.execute(
            """WITH RECURSIVE g (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < :last)
            INSERT INTO responses (tenant, id, previous_response_id, conversation_id,
                idempotency_key, response_json, digest, conversation_version, create_time_us,
                expire_time_us)
            SELECT :tenant, 'fill_' || n, CASE WHEN n % 10 = 0 THEN '' ELSE 'fill_' || (n - 1) END,
                '', CASE WHEN n % 3 = 0 THEN 'key_' || n ELSE '' END, x'7b7d', x'00', 0, n,
                CASE WHEN n % 7 = 0 THEN 4000000000000000 END
            FROM g""",
            {"tenant": TENANT, "last": TURNS - 1},
        )
        db.execute(
            """INSERT INTO response_items (response_pk, kind, position, item_id, json)
            SELECT pk, k.kind, 1, id || '-' || k.kind, x'7b7d'
            FROM responses, (SELECT 0 AS kind UNION ALL SELECT 1) AS k"""
        )
        db.execute(
            """WITH RECURSIVE g (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < :last)
            INSERT INTO conversations (tenant, id, metadata, version, request_id, request_digest,
                create_time_us, expire_time_us)
            SELECT :tenant, 'conv_fill_' || n, '{}', :items, '', x'', n,
                CASE WHEN n % 7 = 0 THEN 4000000000000000 END
            FROM g""",
            {"tenant": TENANT, "last": CONVERSATIONS - 1, "items": CONVERSATION_ITEMS},
        )
        db.execute(
            """WITH RECURSIVE s (seq) AS (SELECT 1 UNION ALL SELECT seq + 1 FROM s WHERE seq < ?)
            INSERT INTO conversation_items (conversation_pk, seq, item_id, json, create_time_us)
            SELECT c.pk, s.seq, 'c-' || s.seq, x'7b7d', 0 FROM conversations c, s""",
            (CONVERSATION_ITEMS,),
        )
        db.execute("COMMIT")
    finally:
        db.close()


def _aliases(sql: str) -> set[str]:
    """The store tables a statement names, and the aliases it gives them."""
    keywords = "WHERE|ON|SET|LEFT|JOIN|CROSS|INNER|USING|ORDER|GROUP|LIMIT|VALUES|RETURNING|UNION"
    names = set(SQLITE_TABLES)
    pattern = rf"\b(?:{'|'.join(SQLITE_TABLES)})\s+(?:AS\s+)?(?!(?:{keywords})\b)([A-Za-z_]\w*)"
    names.update(re.findall(pattern, sql, flags=re.IGNORECASE))
    return names


def sqlite_plan_problems(db: sqlite3.Connection, sql: str, params: Any = ()) -> list[str]:
    """What is wrong with a statement's plan: a SCAN of a store table (by name or alias), a
    SEARCH that only narrows to a tenant, an AUTOMATIC index."""
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
    names = _aliases(sql)
    problems = []
    for detail in plan:
        words = detail.split()
        if words[0] == "SCAN" and words[1] in names:
            problems.append(detail)
        elif "AUTOMATIC" in detail or re.search(r"\(tenant=\?\)", detail):
            problems.append(detail)
    return [f"{problem}\n  in plan {plan}\n  of {sql.strip()}" for problem in problems]


def sqlite_fk_problems(db: sqlite3.Connection) -> list[str]:
    """Foreign keys whose child columns lead no index of the child table."""
    problems = []
    for table in SQLITE_TABLES:
        leading = {
            tuple(r[2] for r in db.execute(f"PRAGMA index_info('{index[1]}')"))
            for index in db.execute(f"PRAGMA index_list('{table}')")
        }
        for fk in db.execute(f"PRAGMA foreign_key_list('{table}')"):
            column = fk[3]
            if not any(cols[:1] == (column,) for cols in leading):
                problems.append(f"{table}.{column} references {fk[2]} without an index")
    return problems


@pytest.fixture
def sqlite_path(tmp_path: Path) -> str:
    return str(tmp_path / "plans.db")


async def test_sqlite_hot_queries_use_indexes(sqlite_path: str) -> None:
    backend = await TracedSqlite(sqlite_path).open()
    try:
        fill_sqlite(sqlite_path)
        await exercise(backend)
    finally:
        await backend.close()
    statements = list(dict.fromkeys(s for s in backend.statements if s.split()[0] in _DML))
    assert sum("WITH RECURSIVE chain" in s for s in statements) >= 3
    assert any("INSERT INTO large_values" in s for s in statements)
    constants = {
        "CHAIN_LINKS_SQL": CHAIN_LINKS_SQL,
        "CHAIN_MARK_SQL": CHAIN_MARK_SQL,
        "HISTORY_SQL": HISTORY_SQL,
        "HISTORY_CAPPED_SQL": HISTORY_CAPPED_SQL,
        "TURN_LOOKUP_SQL": TURN_LOOKUP_SQL,
        "CONVERSATION_HISTORY_SQL": CONVERSATION_HISTORY_SQL,
        "ITEMS_SQL": ITEMS_SQL,
    }
    params: dict[str, object] = {"tenant": TENANT, "id": "fill_19", "previous": "fill_18"}
    params |= {"key": "key_18", "now": 0, "limit": 5, "ids": '["fill_7-0", "c-1"]'}

    db = sqlite3.connect(sqlite_path)
    try:
        assert sqlite_fk_problems(db) == []
        for analyzed in (False, True):
            if analyzed:
                db.execute("ANALYZE")
                db.close()
                db = sqlite3.connect(sqlite_path)
                assert db.execute("SELECT count(*) FROM sqlite_stat1").fetchone()[0] > 0
            else:
                has_stats = db.execute(
                    "SELECT 1 FROM sqlite_schema WHERE name = 'sqlite_stat1'"
                ).fetchone()
                assert has_stats is None, "the plans must not depend on statistics"
            problems = [p for s in statements for p in sqlite_plan_problems(db, s)]
            for name, sql in constants.items():
                problems += [f"{name}: {p}" for p in sqlite_plan_problems(db, sql, params)]
            assert problems == [], f"analyzed={analyzed}:\n" + "\n\n".join(problems)
    finally:
        db.close()


def test_sqlite_plan_check_sees_a_scan(sqlite_path: str) -> None:
    """The check itself: the history join as it was before issue 9 is caught."""
    db = sqlite3.connect(sqlite_path)
    try:
        for migration in sqlite_backend.MIGRATIONS:
            for statement in migration:
                db.execute(statement)
        old = HISTORY_SQL.replace("CROSS JOIN response_items", "JOIN response_items")
        params = {"tenant": TENANT, "id": "x", "now": 0}
        assert any("SCAN i" in p for p in sqlite_plan_problems(db, old, params))
        assert sqlite_plan_problems(db, HISTORY_SQL, params) == []
        assert sqlite_plan_problems(db, "SELECT pk FROM responses WHERE tenant = 'a'") != []
    finally:
        db.close()


# --- PostgreSQL --------------------------------------------------------------------------------


class Recorder:
    """Records the statements (and arguments) sent through every asyncpg connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.statements: dict[str, tuple[Any, ...]] = {}
        self.on = False
        for name in ("fetch", "fetchrow", "fetchval", "execute"):
            original = getattr(asyncpg.connection.Connection, name)
            monkeypatch.setattr(asyncpg.connection.Connection, name, self._wrap(original))
        cursor = asyncpg.connection.Connection.cursor

        def recorded_cursor(conn: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            self._record(query, args)
            return cursor(conn, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.connection.Connection, "cursor", recorded_cursor)

    def _record(self, query: str, args: tuple[Any, ...]) -> None:
        if self.on and query.split()[0].upper() in _DML and "pg_advisory" not in query:
            self.statements.setdefault(query, args)

    def _wrap(self, original: Any) -> Any:
        async def recorded(conn: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            self._record(query, args)
            return await original(conn, query, *args, **kwargs)

        return recorded


async def fill_postgres(conn: asyncpg.Connection, s: str) -> None:
    await conn.execute(
        f"""INSERT INTO {s}.responses (tenant, id, previous_response_id, conversation_id,
            idempotency_key, response_json, digest, conversation_version, create_time_us,
            expire_time_us)
        SELECT $1, 'fill_' || n, CASE WHEN n % 10 = 0 THEN '' ELSE 'fill_' || (n - 1) END, '',
            CASE WHEN n % 3 = 0 THEN 'key_' || n ELSE '' END, '{{}}'::bytea, '\\x00'::bytea, 0,
            n, CASE WHEN n % 7 = 0 THEN 4000000000000000 END
        FROM generate_series(0, $2 - 1) AS n""",
        TENANT,
        TURNS,
    )
    await conn.execute(
        f"""INSERT INTO {s}.response_items (response_pk, kind, position, item_id, json)
        SELECT pk, k, 1, id || '-' || k, '{{}}'::bytea
        FROM {s}.responses, generate_series(0, 1) AS k"""
    )
    await conn.execute(
        f"""INSERT INTO {s}.conversations (tenant, id, metadata, version, request_id,
            request_digest, create_time_us, expire_time_us)
        SELECT $1, 'conv_fill_' || n, '{{}}', $3, '', ''::bytea, n,
            CASE WHEN n % 7 = 0 THEN 4000000000000000 END
        FROM generate_series(0, $2 - 1) AS n""",
        TENANT,
        CONVERSATIONS,
        CONVERSATION_ITEMS,
    )
    await conn.execute(
        f"""INSERT INTO {s}.conversation_items (conversation_pk, seq, item_id, json,
            create_time_us)
        SELECT c.pk, q, 'c-' || q, '{{}}'::bytea, 0
        FROM {s}.conversations c, generate_series(1, $1) AS q""",
        CONVERSATION_ITEMS,
    )
    # A long value of each response and conversation, in two pieces (not pointed at: only
    # their number matters to the plans).
    await conn.execute(
        f"""INSERT INTO {s}.large_values (response_pk, size) SELECT pk, 2 FROM {s}.responses"""
    )
    await conn.execute(
        f"""INSERT INTO {s}.large_values (conversation_pk, size)
        SELECT pk, 2 FROM {s}.conversations"""
    )
    await conn.execute(
        f"""INSERT INTO {s}.large_value_pieces (value_pk, seq, data)
        SELECT pk, q, '\\x00'::bytea FROM {s}.large_values, generate_series(0, 1) AS q"""
    )


def postgres_plan_problems(plan: Any, statement: str) -> list[str]:
    """Scans of a store table (or of a whole index of one) in a JSON plan."""
    problems = []

    def walk(node: dict[str, Any]) -> None:
        relation = node.get("Relation Name")
        kind = node["Node Type"]
        if relation in POSTGRES_TABLES and (
            kind == "Seq Scan"
            or (kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node)
        ):
            problems.append(f"{kind} on {relation}")
        if kind == "Bitmap Index Scan" and "Index Cond" not in node:
            problems.append(f"{kind} on {node.get('Index Name')}")
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan[0]["Plan"])
    return [f"{problem} in\n{statement.strip()}" for problem in problems]


async def explain_postgres(
    conn: asyncpg.Connection, statements: dict[str, tuple[Any, ...]]
) -> list[str]:
    problems = []
    for statement, args in statements.items():
        # A custom plan, as for the first executions of a prepared statement...
        await conn.execute("SET plan_cache_mode = auto")
        row = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
        problems += postgres_plan_problems(json.loads(row), statement)
        # ...and the generic plan the server may switch to after (the values do not matter).
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        prepared = await conn.prepare(statement)
        nulls = ", ".join("NULL" for _ in prepared.get_parameters())
        execute = f"EXECUTE {prepared.get_name()}" + (f"({nulls})" if nulls else "")
        row = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {execute}")
        problems += [
            f"generic plan: {p}" for p in postgres_plan_problems(json.loads(row), statement)
        ]
    await conn.execute("RESET plan_cache_mode")
    return problems


def postgres_fk_query(schema: str) -> str:
    """Foreign keys of the schema whose columns lead no index of their table."""
    return f"""
SELECT c.conrelid::regclass::text, c.conname FROM pg_constraint c
WHERE c.contype = 'f' AND c.connamespace = '{schema}'::regnamespace
  AND NOT EXISTS (
    SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid
      AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey
  )"""


@pytest.fixture
async def pg_backend(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[PostgresBackend, Recorder]]:
    recorder = Recorder(monkeypatch)
    backend = await PostgresBackend(POSTGRES_DSN, schema=pg_schema, pool_size=2).open()
    try:
        yield backend, recorder
    finally:
        await backend.close()


@pytest.mark.postgres
async def test_postgres_hot_queries_use_indexes(
    pg_schema: str, pg_backend: tuple[PostgresBackend, Recorder]
) -> None:
    backend, recorder = pg_backend
    s = f'"{pg_schema}"'
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await fill_postgres(conn, s)
        recorder.on = True
        await exercise(backend)
        recorder.on = False
        statements = recorder.statements
        assert sum("WITH RECURSIVE chain" in s for s in statements) >= 3
        # The long values' reads (their pieces joined) and deletes are among them.
        assert sum("large_value_pieces" in s for s in statements) >= 5
        assert any(s.startswith("DELETE FROM") and "large_values" in s for s in statements)
        assert any("any($1::bigint[]) ORDER BY value_pk, seq" in s for s in statements)
        assert await conn.fetch(postgres_fk_query(pg_schema)) == []
        # Freshly filled tables have no statistics yet (the planner goes by their size); the
        # plans must be right before and after ANALYZE.
        for analyzed in (False, True):
            if analyzed:
                for table in POSTGRES_TABLES:
                    await conn.execute(f"ANALYZE {s}.{table}")
            problems = await explain_postgres(conn, statements)
            assert problems == [], f"analyzed={analyzed}:\n" + "\n\n".join(problems)
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_postgres_plan_check_sees_a_scan(pg_schema: str) -> None:
    """The check itself: a lookup without an index is caught."""
    backend = await PostgresBackend(POSTGRES_DSN, schema=pg_schema, pool_size=1).open()
    await backend.close()
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await fill_postgres(conn, f'"{pg_schema}"')
        problems = await explain_postgres(
            conn, {f'SELECT pk FROM "{pg_schema}".responses WHERE response_json = $1': (b"{}",)}
        )
        assert any("Seq Scan on responses" in p for p in problems)
    finally:
        await conn.close()
