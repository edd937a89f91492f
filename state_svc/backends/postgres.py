"""PostgreSQL backend: an asyncpg pool over tables the service creates and migrates itself in
its own schema.

Appends to one conversation serialize on the conversation's row lock (``UPDATE ... RETURNING``
or ``SELECT ... FOR UPDATE``), taken in the transaction that inserts the items, so replicas
share one total order. Transactions run at READ COMMITTED; a transaction that loses a race on a
unique key (two replays of one turn at once) is retried and then finds the winner's row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import asyncpg
import orjson

from state_svc import errors
from state_svc.backends import base
from state_svc.backends.base import (
    AppendResult,
    CancelResult,
    Compaction,
    Conversation,
    CreatedConversation,
    EnqueueResult,
    Event,
    EventPage,
    History,
    Item,
    ItemPage,
    Job,
    JobState,
    PutCompactionResult,
    PutTurnResult,
    Renewal,
    Turn,
)

T = TypeVar("T")

Conn = asyncpg.Connection

# Each migration is a list of statements ({s} is the quoted schema) applied in one transaction;
# append, never edit.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE {s}.responses (
            pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant text NOT NULL,
            id text NOT NULL,
            previous_response_id text NOT NULL,
            conversation_id text NOT NULL,
            idempotency_key text NOT NULL,
            response_json bytea NOT NULL,
            digest bytea NOT NULL,
            conversation_version bigint NOT NULL,
            create_time_us bigint NOT NULL,
            expire_time_us bigint,
            CONSTRAINT responses_id UNIQUE (tenant, id)
        )""",
        """CREATE UNIQUE INDEX responses_idempotency_key ON {s}.responses
            (tenant, idempotency_key) WHERE idempotency_key <> ''""",
        """CREATE INDEX responses_expiry ON {s}.responses (expire_time_us)
            WHERE expire_time_us IS NOT NULL""",
        """CREATE TABLE {s}.response_items (
            response_pk bigint NOT NULL REFERENCES {s}.responses (pk) ON DELETE CASCADE,
            kind smallint NOT NULL,
            position integer NOT NULL,
            item_id text NOT NULL,
            json bytea NOT NULL,
            PRIMARY KEY (response_pk, kind, position)
        )""",
        """CREATE TABLE {s}.conversations (
            pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant text NOT NULL,
            id text NOT NULL,
            metadata text NOT NULL,
            version bigint NOT NULL,
            request_id text NOT NULL,
            request_digest bytea NOT NULL,
            create_time_us bigint NOT NULL,
            expire_time_us bigint,
            CONSTRAINT conversations_id UNIQUE (tenant, id)
        )""",
        """CREATE UNIQUE INDEX conversations_request_id ON {s}.conversations
            (tenant, request_id) WHERE request_id <> ''""",
        """CREATE INDEX conversations_expiry ON {s}.conversations (expire_time_us)
            WHERE expire_time_us IS NOT NULL""",
        """CREATE TABLE {s}.conversation_items (
            conversation_pk bigint NOT NULL
                REFERENCES {s}.conversations (pk) ON DELETE CASCADE,
            seq bigint NOT NULL,
            item_id text NOT NULL,
            json bytea NOT NULL,
            create_time_us bigint NOT NULL,
            PRIMARY KEY (conversation_pk, seq),
            CONSTRAINT conversation_items_id UNIQUE (conversation_pk, item_id)
        )""",
    ],
    # 2: the events of a streamed turn, for an exact replay.
    ["ALTER TABLE {s}.responses ADD COLUMN stream_events_json bytea NOT NULL DEFAULT ''::bytea"],
    # 3: running turns (background responses), replaced whole by their final turn.
    ["ALTER TABLE {s}.responses ADD COLUMN in_progress boolean NOT NULL DEFAULT false"],
    # 4: background responses as jobs held by leases, and the event log of each (IF NOT EXISTS:
    # a store set back to an older version by hand keeps these tables).
    [
        """CREATE TABLE IF NOT EXISTS {s}.background_jobs (
            response_pk bigint PRIMARY KEY REFERENCES {s}.responses (pk) ON DELETE CASCADE,
            tenant text NOT NULL,
            response_id text NOT NULL,
            spec bytea NOT NULL,
            owner text NOT NULL,
            lease_token bigint NOT NULL,
            lease_expire_us bigint NOT NULL,
            done boolean NOT NULL DEFAULT false,
            cancelled boolean NOT NULL DEFAULT false,
            finished_token bigint NOT NULL DEFAULT 0,
            create_time_us bigint NOT NULL
        )""",
        """CREATE INDEX IF NOT EXISTS background_jobs_claimable ON {s}.background_jobs
            (lease_expire_us, response_pk) WHERE NOT done""",
        """CREATE TABLE IF NOT EXISTS {s}.response_events (
            response_pk bigint NOT NULL REFERENCES {s}.responses (pk) ON DELETE CASCADE,
            seq bigint NOT NULL,
            json bytea NOT NULL,
            PRIMARY KEY (response_pk, seq)
        )""",
    ],
    # 5: the latest claim of each job by its request_id, so that a retried claim gets its job.
    [
        """CREATE TABLE IF NOT EXISTS {s}.background_claims (
            claim_id text NOT NULL,
            response_pk bigint NOT NULL REFERENCES {s}.responses (pk) ON DELETE CASCADE,
            lease_token bigint NOT NULL,
            CONSTRAINT background_claims_id PRIMARY KEY (claim_id)
        )""",
        """CREATE INDEX IF NOT EXISTS background_claims_response
            ON {s}.background_claims (response_pk)""",
    ],
    # 6: items by id, for GetItems (item_reference inputs). The unique constraint on a
    # conversation's item ids is led by the item id now, which serves both lookups (by
    # conversation and id, and by id alone), so that an append maintains no more indexes than
    # before; ON CONFLICT (conversation_pk, item_id) infers it whatever its column order.
    [
        "CREATE INDEX IF NOT EXISTS response_items_item_id ON {s}.response_items (item_id)",
        "ALTER TABLE {s}.conversation_items DROP CONSTRAINT IF EXISTS conversation_items_id",
        """ALTER TABLE {s}.conversation_items
            ADD CONSTRAINT conversation_items_id UNIQUE (item_id, conversation_pk)""",
    ],
    # 7: compaction summaries (PutCompaction), by tenant and compaction item id.
    [
        """CREATE TABLE IF NOT EXISTS {s}.compactions (
            pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant text NOT NULL,
            id text NOT NULL,
            summary bytea NOT NULL,
            create_time_us bigint NOT NULL,
            expire_time_us bigint,
            CONSTRAINT compactions_id UNIQUE (tenant, id)
        )""",
        """CREATE INDEX IF NOT EXISTS compactions_expiry ON {s}.compactions (expire_time_us)
            WHERE expire_time_us IS NOT NULL""",
    ],
    # 8: a long value (a response JSON, event log or item JSON: a long answer's) in pieces of
    # its own, written and read a piece at a time (see _large_value); the row it belongs to
    # holds an empty value and points at it. It belongs to a response or a conversation and goes
    # with it. Rows written before keep their values in place and read as they were.
    [
        """CREATE TABLE IF NOT EXISTS {s}.large_values (
            pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            response_pk bigint REFERENCES {s}.responses (pk) ON DELETE CASCADE,
            conversation_pk bigint REFERENCES {s}.conversations (pk) ON DELETE CASCADE,
            size bigint NOT NULL,
            CONSTRAINT large_values_owner CHECK (num_nonnulls(response_pk, conversation_pk) = 1)
        )""",
        """CREATE INDEX IF NOT EXISTS large_values_response ON {s}.large_values (response_pk)
            WHERE response_pk IS NOT NULL""",
        """CREATE INDEX IF NOT EXISTS large_values_conversation
            ON {s}.large_values (conversation_pk) WHERE conversation_pk IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS {s}.large_value_pieces (
            value_pk bigint NOT NULL REFERENCES {s}.large_values (pk) ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (value_pk, seq)
        )""",
        "ALTER TABLE {s}.responses ADD COLUMN IF NOT EXISTS response_json_at bigint",
        "ALTER TABLE {s}.responses ADD COLUMN IF NOT EXISTS stream_events_at bigint",
        "ALTER TABLE {s}.response_items ADD COLUMN IF NOT EXISTS json_at bigint",
        "ALTER TABLE {s}.conversation_items ADD COLUMN IF NOT EXISTS json_at bigint",
    ],
]

# A value this large (a long answer's JSON) is written in pieces by _large_value, not bound
# with its row.
LARGE_JSON_BYTES = 256 * 1024
# The most bytes of a large value in one row of large_value_pieces.
_LARGE_PIECE_BYTES = 32 * 1024
# The pieces of large values read at a time (see _read_values).
_PIECES_PREFETCH = 4
# The columns that may hold a large value, with the column saying where it is then.
_VALUE_COLUMNS = {
    "response_json": "response_json_at",
    "stream_events_json": "stream_events_at",
    "i.json": "i.json_at",
}
# In a row of _turn_sql(pieces=True): where a large value is.
_POINTERS = ("response_json_at", "stream_events_at", "json_at")

# A unique violation on these means another transaction stored the same id or key first: the
# retry finds that row and answers a replay (or a conflict).
_RACE_CONSTRAINTS = {
    "responses_id",
    "responses_idempotency_key",
    "conversations_request_id",
    "background_claims_id",
    "compactions_id",
}

_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

_ATTEMPTS = 5


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _lock_key(schema: str, purpose: str = "migrate") -> int:
    """The advisory lock that serializes migrations of one schema across processes (or, with
    purpose "enqueue", the capped enqueues of background responses)."""
    digest = hashlib.blake2b(
        f"respgw-state-{purpose}:".encode() + schema.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresBackend:
    """The state store in PostgreSQL; every table lives in ``schema``."""

    def __init__(
        self, dsn: str, *, schema: str = "respgw", pool_size: int = 10, retention_s: float = 0.0
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pool_size = pool_size
        self._retention_s = retention_s
        self._pool: asyncpg.Pool | None = None
        s = _quote(schema)
        self._s = s
        whole = self._whole
        live = "(expire_time_us IS NULL OR expire_time_us > $3)"
        # Walks the chain like the SQLite backend; see HISTORY_SQL there for why each step must
        # reach an older row. The LATERAL subqueries (OFFSET 0 keeps the planner from flattening
        # them) make each link and its items index lookups: on a young table without statistics
        # the planner otherwise hash-joined the tenant's whole table at every step (measured:
        # 100 ms instead of 3 ms for a 200-turn chain).
        chain = f"""
WITH RECURSIVE chain (pk, id, prev, create_time_us, in_progress) AS (
    SELECT pk, id, previous_response_id, create_time_us, in_progress FROM {s}.responses
    WHERE tenant = $1 AND id = $2 AND {live}
  UNION ALL
    SELECT r.pk, r.id, r.previous_response_id, r.create_time_us, r.in_progress
    FROM chain c CROSS JOIN LATERAL (
        SELECT pk, id, previous_response_id, create_time_us, in_progress FROM {s}.responses
        WHERE tenant = $1 AND id = c.prev AND pk < c.pk AND {live}
        LIMIT 1
    ) r
)"""
        # The chain behind a new turn's previous response for require_intact_chain, locked
        # (KEY SHARE, like the previous response itself) so that no response in it can be
        # deleted until the turn commits; a response deleted between the walk and the lock is
        # not returned, and base.check_chain then finds the gap.
        self._chain_links_sql = f"""{chain}
SELECT id, previous_response_id FROM {s}.responses
WHERE pk = any(ARRAY(SELECT pk FROM chain)) ORDER BY pk FOR KEY SHARE
"""
        chain_rows = """SELECT pk, id, prev, create_time_us, NULL::smallint, NULL::integer,
    NULL::text, NULL::bytea, NULL::bigint, in_progress FROM chain"""
        items = f"""chain c CROSS JOIN LATERAL (
    SELECT * FROM {s}.response_items WHERE response_pk = c.pk OFFSET 0
) i"""
        self._history_sql = f"""{chain}
{chain_rows}
UNION ALL
SELECT i.response_pk, NULL, NULL, NULL, i.kind, i.position, i.item_id,
    {whole("i.json", "i.json_at")}, NULL, NULL
FROM {items}
ORDER BY 1, 5 NULLS FIRST, 6
"""
        # With a limit ($4), only the newest items, each with the count of all (see SQLite).
        self._history_capped_sql = f"""{chain},
items AS (
    SELECT i.response_pk, i.kind, i.position, i.item_id, i.json, i.json_at,
        row_number() OVER (ORDER BY i.response_pk DESC, i.kind DESC, i.position DESC) AS rank,
        count(*) OVER () AS total
    FROM {items}
)
{chain_rows}
UNION ALL
SELECT response_pk, NULL, NULL, NULL, kind, position, item_id, {whole("json", "json_at")},
    total, NULL
FROM items WHERE rank <= $4
ORDER BY 1, 5 NULLS FIRST, 6
"""
        # The copies of some items ($2) in the tenant's live, final responses and live
        # conversations, as rows for base.newest_items: each id one search of each item index
        # (the LATERAL subqueries, as above, keep the planner from joining whole tables).
        self._items_sql = f"""
WITH ids AS MATERIALIZED (SELECT DISTINCT unnest($2::text[]) AS item_id)
SELECT i.item_id, {whole("i.json", "i.json_at")}, r.create_time_us, i.position::bigint,
    {base.RESPONSE_COPY}, r.pk
FROM ids CROSS JOIN LATERAL (
    SELECT * FROM {s}.response_items x WHERE x.item_id = ids.item_id OFFSET 0
) i CROSS JOIN LATERAL (
    SELECT * FROM {s}.responses y WHERE y.pk = i.response_pk OFFSET 0
) r
WHERE r.tenant = $1 AND NOT r.in_progress
    AND (r.expire_time_us IS NULL OR r.expire_time_us > $3)
UNION ALL
SELECT i.item_id, {whole("i.json", "i.json_at")}, i.create_time_us, i.seq,
    {base.CONVERSATION_COPY}, c.pk
FROM ids CROSS JOIN LATERAL (
    SELECT * FROM {s}.conversation_items x WHERE x.item_id = ids.item_id OFFSET 0
) i CROSS JOIN LATERAL (
    SELECT * FROM {s}.conversations y WHERE y.pk = i.conversation_pk OFFSET 0
) c
WHERE c.tenant = $1 AND (c.expire_time_us IS NULL OR c.expire_time_us > $3)
"""
        self._conversation_history_sql = f"""
WITH c AS MATERIALIZED (
    SELECT pk, version,
        (SELECT count(*) FROM {s}.conversation_items x WHERE x.conversation_pk = v.pk) AS total
    FROM {s}.conversations v WHERE tenant = $1 AND id = $2 AND {live}
)
SELECT c.version, c.total, i.seq, i.item_id, {whole("i.json", "i.json_at")}, i.create_time_us
FROM c LEFT JOIN {s}.conversation_items i ON i.conversation_pk = c.pk
ORDER BY i.seq DESC LIMIT $4
"""

    def _whole(self, column: str, at: str) -> str:
        """The SQL of a value that may be a large value: ``column`` itself, or, when ``at``
        points at a large value (see _large_value), its pieces joined."""
        return f"""CASE WHEN {at} IS NULL THEN {column} ELSE (
    SELECT string_agg(p.data, ''::bytea ORDER BY p.seq) FROM {self._s}.large_value_pieces p
    WHERE p.value_pk = {at}) END"""

    def _turn_sql(self, where: str, *, pieces: bool = False) -> str:
        """The response matching ``where`` (on ``r``), in a first row, then its items, each in
        a row of its own, in order (see _turn_from_rows): one statement, one snapshot, and
        the response JSON in one row, not repeated in each item's. Large values are joined
        from their pieces, or, with ``pieces``, left out: a row then holds where each is
        (``response_json_at``, ``stream_events_at``, ``json_at``) instead, for _read_values."""
        s = self._s
        whole = self._whole
        values = {name: whole(name, at) for name, at in _VALUE_COLUMNS.items()}
        head_extra = item_extra = items_null = ""
        if pieces:
            values = {name: name for name in _VALUE_COLUMNS}
            head_extra = ", response_json_at, stream_events_at, NULL::bigint AS json_at"
            item_extra = ", i.json_at"
            items_null = ", NULL, NULL"
        return f"""WITH r AS MATERIALIZED (
    SELECT r.pk, r.id, r.previous_response_id, r.conversation_id, r.idempotency_key,
        r.response_json, r.response_json_at, r.create_time_us, r.expire_time_us,
        r.stream_events_json, r.stream_events_at, r.in_progress
    FROM {s}.responses r WHERE {where}
)
SELECT id, previous_response_id, conversation_id, idempotency_key,
    {values["response_json"]} AS response_json, create_time_us, expire_time_us,
    {values["stream_events_json"]} AS stream_events_json, in_progress, NULL::smallint AS kind,
    NULL::integer AS position, NULL::text AS item_id, NULL::bytea AS json{head_extra}
FROM r
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, i.kind, i.position, i.item_id,
    {values["i.json"]}{items_null}{item_extra}
FROM r JOIN {s}.response_items i ON i.response_pk = r.pk
ORDER BY kind NULLS FIRST, position"""

    async def _read_values(self, conn: Conn, pks: Sequence[int]) -> dict[int, memoryview]:
        """The large values ``pks``, each read a few pieces at a time into a buffer of its
        size: fetched whole (or joined in the statement), asyncpg would hold a long answer
        once as received and once more as the value, and every piece of it at once. The
        caller's transaction gives this and its own reads one snapshot."""
        sizes = await conn.fetch(
            f"SELECT pk, size FROM {self._s}.large_values WHERE pk = any($1::bigint[])", pks
        )
        if len(sizes) != len(set(pks)):
            raise RuntimeError("a large value is missing")
        buffers = {row["pk"]: bytearray(row["size"]) for row in sizes}
        filled = dict.fromkeys(buffers, 0)
        async for row in conn.cursor(
            f"""SELECT value_pk, data FROM {self._s}.large_value_pieces
            WHERE value_pk = any($1::bigint[]) ORDER BY value_pk, seq""",
            list(buffers),
            prefetch=_PIECES_PREFETCH,
        ):
            pk, data = row[0], row[1]
            start = filled[pk]
            if start + len(data) > len(buffers[pk]):
                raise RuntimeError(f"large value {pk} is longer than its size")
            buffers[pk][start : start + len(data)] = data
            filled[pk] = start + len(data)
        if any(filled[pk] != len(buffer) for pk, buffer in buffers.items()):
            raise RuntimeError("a large value is shorter than its size")
        return {pk: memoryview(buffer) for pk, buffer in buffers.items()}

    async def open(self) -> PostgresBackend:
        """Creates the pool, then the schema and its tables (or migrates them)."""
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, timeout=10
            )
            await self._migrate()
        except BaseException:
            await self.close()
            raise
        return self

    async def _migrate(self) -> None:
        async with self._acquire() as conn, conn.transaction():
            # A transaction-scoped advisory lock: a second process starting at the same moment
            # waits here, then finds the schema current. CREATE SCHEMA IF NOT EXISTS alone is not
            # safe under concurrency.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(self._schema))
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._s}.schema_version (version integer NOT NULL)"
            )
            current = await conn.fetchval(f"SELECT max(version) FROM {self._s}.schema_version")
            current = current or 0
            for version, statements in enumerate(MIGRATIONS[current:], current + 1):
                for statement in statements:
                    await conn.execute(statement.format(s=self._s))
                await conn.execute(
                    f"INSERT INTO {self._s}.schema_version (version) VALUES ($1)", version
                )

    def _acquire(self) -> Any:
        if self._pool is None:
            raise errors.backend_unavailable("the PostgreSQL pool is closed")
        return self._pool.acquire()

    async def _run(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        write: bool = True,
        snapshot: bool = False,
    ) -> T:
        """Runs ``fn(conn, *args)`` in one transaction, retrying the races a retry resolves;
        without ``write``, outside any (one statement); with ``snapshot``, in a read-only one
        whose statements all see one snapshot (REPEATABLE READ)."""
        for attempt in range(_ATTEMPTS):
            try:
                async with self._acquire() as conn:
                    if snapshot:
                        async with conn.transaction(isolation="repeatable_read", readonly=True):
                            return await fn(conn, *args)
                    if not write:
                        return await fn(conn, *args)
                    async with conn.transaction():
                        return await fn(conn, *args)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name not in _RACE_CONSTRAINTS or attempt == _ATTEMPTS - 1:
                    raise
            except asyncpg.exceptions.TransactionRollbackError as exc:
                if attempt == _ATTEMPTS - 1:
                    raise errors.backend_unavailable(str(exc)) from exc
            except _UNAVAILABLE as exc:
                raise errors.backend_unavailable(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # --- responses ------------------------------------------------------------------------

    async def put_turn(
        self,
        tenant: str,
        turn: Turn,
        *,
        expected_conversation_version: int | None,
        require_intact_chain: bool = False,
    ) -> PutTurnResult:
        digest = base.turn_digest(turn)
        return await self._run(
            self._put_turn,
            tenant,
            turn,
            digest,
            expected_conversation_version,
            require_intact_chain,
        )

    async def _put_turn(
        self,
        conn: Conn,
        tenant: str,
        turn: Turn,
        digest: bytes,
        expected: int | None,
        intact_chain: bool,
    ) -> PutTurnResult:
        s = self._s
        now = base.now_us()
        # One indexed lookup per part (as in the SQLite backend). The row with the turn's own id
        # is locked as for an update: two calls replacing one running turn serialize here, and
        # the second then reads the first's committed row (READ COMMITTED re-reads a row it
        # waited for). KEY SHARE keeps the previous response from being deleted until this turn
        # commits without blocking other turns chained on it. `pk = any(ARRAY(...))` fetches
        # the other rows by primary key: with `pk IN (...)` and statistics in which most rows
        # have no key, a turn without one (key '') was planned as a hash join over a sequential
        # scan of the whole table.
        rows = await conn.fetch(
            f"""WITH own AS (
                SELECT {_TURN_COLUMNS} FROM {s}.responses WHERE tenant = $1 AND id = $2
                FOR NO KEY UPDATE
            ), other AS (
                SELECT {_TURN_COLUMNS} FROM {s}.responses WHERE id <> $2 AND pk = any(ARRAY(
                    SELECT pk FROM {s}.responses WHERE tenant = $1 AND id = $3
                    UNION ALL
                    SELECT pk FROM {s}.responses
                    WHERE tenant = $1 AND idempotency_key = $4 AND idempotency_key <> ''
                ))
                FOR KEY SHARE
            )
            SELECT * FROM own UNION ALL SELECT * FROM other""",
            tenant,
            turn.id,
            turn.previous_response_id,
            turn.idempotency_key,
        )
        found = base.lookup_turn(turn, digest, rows, now)
        if found.running is not None:
            return await self._replace_turn(conn, tenant, found.running, turn, digest, expected)
        if found.replay is not None:
            pk, version = found.replay
            return PutTurnResult(await self._load_turn(conn, pk), True, version)
        if found.expired:
            # Expired but not yet swept: such rows must not block the id or the key.
            await conn.execute(f"DELETE FROM {s}.responses WHERE pk = any($1)", found.expired)
        found.check_previous(turn)
        if intact_chain and turn.previous_response_id:
            links = await conn.fetch(self._chain_links_sql, tenant, turn.previous_response_id, now)
            base.check_chain(turn.previous_response_id, [(r[0], r[1]) for r in links])

        expire = base.expire_at(now, self._retention_s)
        conversation = await self._conversation_for(conn, tenant, turn, expected, now)
        version = conversation[1] if conversation else 0
        if _has_large(turn):
            await self._insert_large_turn(conn, tenant, turn, digest, version, now, expire)
        else:
            await self._insert_turn(conn, tenant, turn, digest, version, now, expire)
        if conversation is not None and not turn.in_progress:
            appended = [*turn.input_items, *turn.output_items]
            await self._insert_items(
                conn, conversation[0], turn.conversation_id, appended, version, now
            )
        return PutTurnResult(base.stored_turn(turn, now, expire), False, version)

    async def _insert_turn(
        self,
        conn: Conn,
        tenant: str,
        turn: Turn,
        digest: bytes,
        version: int,
        now: int,
        expire: int | None,
    ) -> None:
        """Inserts a new turn without large values, with its items, in one statement."""
        s = self._s
        kinds, positions, ids, jsons = _response_item_columns(turn)
        await conn.execute(
            f"""WITH r AS (
                INSERT INTO {s}.responses (tenant, id, previous_response_id, conversation_id,
                    idempotency_key, response_json, digest, conversation_version,
                    create_time_us, expire_time_us, stream_events_json, in_progress)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $15, $16) RETURNING pk
            )
            INSERT INTO {s}.response_items (response_pk, kind, position, item_id, json)
            SELECT r.pk, u.kind, u.position, u.item_id, u.json
            FROM r, unnest($11::smallint[], $12::integer[], $13::text[], $14::bytea[])
                AS u (kind, position, item_id, json)""",
            tenant,
            turn.id,
            turn.previous_response_id,
            turn.conversation_id,
            turn.idempotency_key,
            turn.response_json,
            digest,
            version,
            now,
            expire,
            kinds,
            positions,
            ids,
            jsons,
            turn.stream_events_json,
            turn.in_progress,
        )

    async def _insert_large_turn(
        self,
        conn: Conn,
        tenant: str,
        turn: Turn,
        digest: bytes,
        version: int,
        now: int,
        expire: int | None,
    ) -> None:
        """Inserts a new turn with large values: its row (each large value empty), then each
        large value in pieces, then its items."""
        s = self._s
        pk = await conn.fetchval(
            f"""INSERT INTO {s}.responses (tenant, id, previous_response_id, conversation_id,
                idempotency_key, response_json, digest, conversation_version, create_time_us,
                expire_time_us, stream_events_json, in_progress)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING pk""",
            tenant,
            turn.id,
            turn.previous_response_id,
            turn.conversation_id,
            turn.idempotency_key,
            _unless_large(turn.response_json),
            digest,
            version,
            now,
            expire,
            _unless_large(turn.stream_events_json),
            turn.in_progress,
        )
        json_at = await self._large_value(conn, turn.response_json, response_pk=pk)
        events_at = await self._large_value(conn, turn.stream_events_json, response_pk=pk)
        if json_at is not None or events_at is not None:
            await conn.execute(
                f"""UPDATE {s}.responses SET response_json_at = $2, stream_events_at = $3
                WHERE pk = $1""",
                pk,
                json_at,
                events_at,
            )
        await self._insert_response_items(conn, pk, turn)

    async def _rewrite_turn(
        self, conn: Conn, pk: int, turn: Turn, digest: bytes, version: int | None = None
    ) -> None:
        """Writes ``turn`` over the stored response ``pk`` (a running turn being replaced):
        its values, large ones in pieces (the old ones dropped), its conversation version
        unless None, and its items."""
        s = self._s
        # The response's large values, its items' among them (deleted below).
        await conn.execute(f"DELETE FROM {s}.large_values WHERE response_pk = $1", pk)
        json_at = await self._large_value(conn, turn.response_json, response_pk=pk)
        events_at = await self._large_value(conn, turn.stream_events_json, response_pk=pk)
        await conn.execute(
            f"""UPDATE {s}.responses SET response_json = $2, digest = $3,
                stream_events_json = $4, in_progress = $5, response_json_at = $6,
                stream_events_at = $7, conversation_version = coalesce($8, conversation_version)
            WHERE pk = $1""",
            pk,
            _unless_large(turn.response_json),
            digest,
            _unless_large(turn.stream_events_json),
            turn.in_progress,
            json_at,
            events_at,
            version,
        )
        await conn.execute(f"DELETE FROM {s}.response_items WHERE response_pk = $1", pk)
        await self._insert_response_items(conn, pk, turn)

    async def _insert_response_items(self, conn: Conn, pk: int, turn: Turn) -> None:
        """Inserts the items of the response ``pk``, a large item's JSON in pieces."""
        kinds, positions, ids, jsons = _response_item_columns(turn)
        ats = [await self._large_value(conn, data, response_pk=pk) for data in jsons]
        await conn.execute(
            f"""INSERT INTO {self._s}.response_items
                (response_pk, kind, position, item_id, json, json_at)
            SELECT $1, u.kind, u.position, u.item_id, u.json, u.json_at
            FROM unnest($2::smallint[], $3::integer[], $4::text[], $5::bytea[], $6::bigint[])
                AS u (kind, position, item_id, json, json_at)""",
            pk,
            kinds,
            positions,
            ids,
            [_unless_large(data) for data in jsons],
            ats,
        )

    async def _large_value(
        self,
        conn: Conn,
        data: bytes | memoryview,
        *,
        response_pk: int | None = None,
        conversation_pk: int | None = None,
    ) -> int | None:
        """Writes ``data`` as a large value of its response or conversation when it is large,
        and returns its pk (None when it is not large: it is bound with its own row).

        asyncpg copies each value bound to a statement into the message it sends, so that a
        long answer bound whole (with its item's JSON, a second copy of it) was held two or
        three times more while written. Here it goes in rows of at most _LARGE_PIECE_BYTES,
        each a view of the caller's buffer, inserted by one executemany: asyncpg encodes its
        arguments lazily and sends them a few messages at a time, pipelined, so that about
        four pieces are copied at once (COPY held 512 KiB: a 0.5 MB answer's size again)."""
        if len(data) < LARGE_JSON_BYTES:
            return None
        pk: int = await conn.fetchval(
            f"""INSERT INTO {self._s}.large_values (response_pk, conversation_pk, size)
            VALUES ($1, $2, $3) RETURNING pk""",
            response_pk,
            conversation_pk,
            len(data),
        )
        view = memoryview(data)
        await conn.executemany(
            f"""INSERT INTO {self._s}.large_value_pieces (value_pk, seq, data)
            VALUES ($1, $2, $3)""",
            (
                (pk, n, view[start : start + _LARGE_PIECE_BYTES])
                for n, start in enumerate(range(0, len(view), _LARGE_PIECE_BYTES))
            ),
        )
        return pk

    async def _replace_turn(
        self,
        conn: Conn,
        tenant: str,
        pk: int,
        turn: Turn,
        digest: bytes,
        expected: int | None,
    ) -> PutTurnResult:
        """Replaces the running turn ``pk`` (locked by the caller) in place, keeping its pk and
        so its place in the chain order; a final turn's items join its conversation now."""
        s = self._s
        now = base.now_us()
        stored = base.replacing_turn(await self._load_turn(conn, pk), turn)
        conversation = await self._conversation_for(conn, tenant, turn, expected, now)
        version = conversation[1] if conversation else 0
        await self._rewrite_turn(conn, pk, turn, digest, version)
        if conversation is not None and not turn.in_progress:
            appended = [*turn.input_items, *turn.output_items]
            await self._insert_items(
                conn, conversation[0], turn.conversation_id, appended, version, now
            )
        if not turn.in_progress:
            # A final turn finishes the running turn's job, if it has one (see PutTurn).
            await conn.execute(
                f"UPDATE {s}.background_jobs SET done = true WHERE response_pk = $1 AND NOT done",
                pk,
            )
        return PutTurnResult(stored, False, version)

    async def _conversation_for(
        self, conn: Conn, tenant: str, turn: Turn, expected: int | None, now: int
    ) -> tuple[int, int] | None:
        """The turn's live conversation as (pk, version after the turn), checked against
        ``expected``; None for a turn outside a conversation. For a final turn this takes the
        row lock that serializes appends (held until commit) and sets the new version; a
        running turn appends nothing, so it only reads."""
        if not turn.conversation_id:
            return None
        if turn.in_progress:
            row = await conn.fetchrow(
                f"""SELECT pk, version FROM {self._s}.conversations WHERE tenant = $1 AND id = $2
                    AND (expire_time_us IS NULL OR expire_time_us > $3)""",
                tenant,
                turn.conversation_id,
                now,
            )
            appended = 0
        else:
            appended = len(turn.input_items) + len(turn.output_items)
            row = await conn.fetchrow(
                f"""UPDATE {self._s}.conversations
                SET version = version + $4, expire_time_us = coalesce($5, expire_time_us)
                WHERE tenant = $1 AND id = $2
                    AND (expire_time_us IS NULL OR expire_time_us > $3)
                RETURNING pk, version""",
                tenant,
                turn.conversation_id,
                now,
                appended,
                base.expire_at(now, self._retention_s),
            )
        if row is None:
            raise errors.conversation_not_found(turn.conversation_id)
        base.check_version(turn.conversation_id, expected, row["version"] - appended)
        return row["pk"], row["version"]

    async def _insert_items(
        self,
        conn: Conn,
        conversation_pk: int,
        conversation_id: str,
        items: Sequence[Item],
        version: int,
        now: int,
    ) -> tuple[Item, ...]:
        """Inserts ``items`` so that the last gets sequence ``version`` (the caller holds the
        conversation's row lock and sets the version)."""
        first = version - len(items) + 1
        stored = tuple(
            Item(id=item.id, json=item.json, sequence=seq, create_time_us=now)
            for seq, item in enumerate(items, first)
        )
        if not stored:
            return stored
        # A large item's JSON in pieces, as the conversation's (an item whose id clashes fails
        # the call below, and the transaction takes its pieces back).
        ats = [
            await self._large_value(conn, i.json, conversation_pk=conversation_pk) for i in stored
        ]
        inserted = await conn.fetch(
            f"""INSERT INTO {self._s}.conversation_items
                (conversation_pk, seq, item_id, json, create_time_us, json_at)
            SELECT $1, u.seq, u.item_id, u.json, $5, u.json_at
            FROM unnest($2::bigint[], $3::text[], $4::bytea[], $6::bigint[])
                AS u (seq, item_id, json, json_at)
            ON CONFLICT (conversation_pk, item_id) DO NOTHING
            RETURNING item_id""",
            conversation_pk,
            [i.sequence for i in stored],
            [i.id for i in stored],
            [_unless_large(i.json) for i in stored],
            now,
            ats,
        )
        if len(inserted) < len(stored):
            fresh = {row["item_id"] for row in inserted}
            clash = next(i.id for i in stored if i.id not in fresh)
            raise errors.item_id_conflict(conversation_id, clash)
        return stored

    async def _load_turn(self, conn: Conn, pk: int) -> Turn:
        rows = await conn.fetch(self._turn_sql("r.pk = $1"), pk)
        return _turn_from_rows(rows)

    async def get_response(
        self,
        tenant: str,
        *,
        response_id: str = "",
        idempotency_key: str = "",
        with_items: bool = True,
    ) -> Turn:
        # One statement without a transaction, as for any read; a response with large values
        # is read again with them in one snapshot (see _read_values).
        turn = await self._run(
            self._get_response, tenant, response_id, idempotency_key, False, write=False
        )
        if turn is None:
            turn = await self._run(
                self._get_response, tenant, response_id, idempotency_key, True, snapshot=True
            )
        assert turn is not None
        return turn

    async def _get_response(
        self, conn: Conn, tenant: str, response_id: str, key: str, large: bool
    ) -> Turn | None:
        """The response, or None when it has large values and ``large`` is False."""
        # The key's index is partial: the query must repeat its condition to use it.
        where = "r.idempotency_key = $2 AND r.idempotency_key <> ''" if key else "r.id = $2"
        rows = await conn.fetch(
            self._turn_sql(
                f"""r.tenant = $1 AND {where}
                AND (r.expire_time_us IS NULL OR r.expire_time_us > $3)""",
                pieces=True,
            ),
            tenant,
            key or response_id,
            base.now_us(),
        )
        if not rows:
            if key:
                raise errors.idempotency_key_not_found(key)
            raise errors.response_not_found(response_id)
        pks = [row[at] for row in rows for at in _POINTERS if row[at] is not None]
        if not pks:
            return _turn_from_rows(rows)
        if not large:
            return None
        return _turn_from_rows(rows, await self._read_values(conn, pks))

    async def response_history(self, tenant: str, response_id: str, *, limit: int) -> History:
        args: list[object] = [tenant, response_id, base.now_us()]
        sql = self._history_sql
        if limit:
            sql = self._history_capped_sql
            args.append(limit)
        rows = await self._run(_fetch, sql, *args, write=False)
        return base.history_from_rows(response_id, rows)

    async def get_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, Item]:
        rows = await self._run(
            _fetch, self._items_sql, tenant, list(item_ids), base.now_us(), write=False
        )
        return base.newest_items(tuple(row) for row in rows)

    async def delete_response(self, tenant: str, response_id: str) -> None:
        status = await self._run(
            _execute,
            f"""DELETE FROM {self._s}.responses WHERE tenant = $1 AND id = $2
                AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            response_id,
            base.now_us(),
        )
        if status == "DELETE 0":
            raise errors.response_not_found(response_id)

    # --- conversations --------------------------------------------------------------------

    async def create_conversation(
        self, tenant: str, metadata: Mapping[str, str], items: Sequence[Item], request_id: str
    ) -> CreatedConversation:
        digest = base.conversation_digest(metadata, items) if request_id else b""
        return await self._run(
            self._create_conversation, tenant, metadata, items, request_id, digest
        )

    async def _create_conversation(
        self,
        conn: Conn,
        tenant: str,
        metadata: Mapping[str, str],
        items: Sequence[Item],
        request_id: str,
        digest: bytes,
    ) -> CreatedConversation:
        s = self._s
        now = base.now_us()
        if request_id:
            row = await conn.fetchrow(
                f"""SELECT {_CONVERSATION_COLUMNS}, pk, request_digest FROM {s}.conversations
                WHERE tenant = $1 AND request_id = $2 AND request_id <> ''""",
                tenant,
                request_id,
            )
            if row is not None and base.live(row["expire_time_us"], now):
                if row["request_digest"] != digest:
                    raise errors.request_id_conflict(request_id)
                first = _conversation(row)
                # The first call's result: its items got sequence 1..n at creation.
                return CreatedConversation(
                    first, base.positioned(items, first.create_time_us), replayed=True
                )
            if row is not None:
                await conn.execute(f"DELETE FROM {s}.conversations WHERE pk = $1", row["pk"])
        conversation = Conversation(
            id=base.new_conversation_id(),
            metadata=dict(metadata),
            version=len(items),
            create_time_us=now,
            expire_time_us=base.expire_at(now, self._retention_s),
        )
        pk = await conn.fetchval(
            f"""INSERT INTO {s}.conversations (tenant, id, metadata, version, request_id,
                request_digest, create_time_us, expire_time_us)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING pk""",
            tenant,
            conversation.id,
            _dump_metadata(metadata),
            len(items),
            request_id,
            digest,
            now,
            conversation.expire_time_us,
        )
        stored = await self._insert_items(conn, pk, conversation.id, items, len(items), now)
        return CreatedConversation(conversation, stored)

    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation:
        row = await self._run(
            _fetchrow,
            f"""SELECT {_CONVERSATION_COLUMNS} FROM {self._s}.conversations
            WHERE tenant = $1 AND id = $2 AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            conversation_id,
            base.now_us(),
            write=False,
        )
        if row is None:
            raise errors.conversation_not_found(conversation_id)
        return _conversation(row)

    async def get_conversation_by_request(self, tenant: str, request_id: str) -> Conversation:
        row = await self._run(
            _fetchrow,
            f"""SELECT {_CONVERSATION_COLUMNS} FROM {self._s}.conversations
            WHERE tenant = $1 AND request_id = $2 AND request_id <> ''
                AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            request_id,
            base.now_us(),
            write=False,
        )
        if row is None:
            raise errors.request_not_found(request_id)
        return _conversation(row)

    async def update_conversation(
        self, tenant: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> Conversation:
        row = await self._run(
            _fetchrow,
            f"""UPDATE {self._s}.conversations SET metadata = $4
            WHERE tenant = $1 AND id = $2 AND (expire_time_us IS NULL OR expire_time_us > $3)
            RETURNING {_CONVERSATION_COLUMNS}""",
            tenant,
            conversation_id,
            base.now_us(),
            _dump_metadata(metadata),
        )
        if row is None:
            raise errors.conversation_not_found(conversation_id)
        return _conversation(row)

    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        status = await self._run(
            _execute,
            f"""DELETE FROM {self._s}.conversations WHERE tenant = $1 AND id = $2
                AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            conversation_id,
            base.now_us(),
        )
        if status == "DELETE 0":
            raise errors.conversation_not_found(conversation_id)

    async def conversation_history(
        self, tenant: str, conversation_id: str, *, limit: int
    ) -> History:
        rows = await self._run(
            _fetch,
            self._conversation_history_sql,
            tenant,
            conversation_id,
            base.now_us(),
            limit or None,
            write=False,
        )
        return base.conversation_history_from_rows(conversation_id, rows)

    async def append_items(
        self,
        tenant: str,
        conversation_id: str,
        items: Sequence[Item],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        return await self._run(self._append_items, tenant, conversation_id, items, expected_version)

    async def _append_items(
        self,
        conn: Conn,
        tenant: str,
        conversation_id: str,
        items: Sequence[Item],
        expected: int | None,
    ) -> AppendResult:
        s = self._s
        now = base.now_us()
        # Lock first, then look: a concurrent replay of the same items waits here and then
        # sees them stored.
        row = await conn.fetchrow(
            f"""SELECT pk, version FROM {s}.conversations WHERE tenant = $1 AND id = $2
                AND (expire_time_us IS NULL OR expire_time_us > $3) FOR UPDATE""",
            tenant,
            conversation_id,
            now,
        )
        if row is None:
            raise errors.conversation_not_found(conversation_id)
        pk, version = row["pk"], row["version"]
        existing = {
            r["item_id"]: Item(
                id=r["item_id"], json=r["json"], sequence=r["seq"], create_time_us=r["ct"]
            )
            for r in await conn.fetch(
                f"""SELECT seq, item_id, {self._whole("json", "json_at")} AS json,
                    create_time_us AS ct FROM {s}.conversation_items
                WHERE conversation_pk = $1 AND item_id = any($2::text[])""",
                pk,
                [i.id for i in items],
            )
        }
        replayed = base.classify_append(conversation_id, items, existing)
        if replayed is not None:
            return AppendResult(replayed, version, True)
        base.check_version(conversation_id, expected, version)
        version += len(items)
        await conn.execute(
            f"""UPDATE {s}.conversations
            SET version = $2, expire_time_us = coalesce($3, expire_time_us) WHERE pk = $1""",
            pk,
            version,
            base.expire_at(now, self._retention_s),
        )
        stored = await self._insert_items(conn, pk, conversation_id, items, version, now)
        return AppendResult(stored, version, False)

    async def list_items(
        self,
        tenant: str,
        conversation_id: str,
        *,
        descending: bool,
        limit: int,
        after_sequence: int | None,
        after_item_id: str,
    ) -> ItemPage:
        return await self._run(
            self._list_items,
            tenant,
            conversation_id,
            descending,
            limit,
            after_sequence,
            after_item_id,
            write=False,
        )

    async def _list_items(
        self,
        conn: Conn,
        tenant: str,
        conversation_id: str,
        descending: bool,
        limit: int,
        after_sequence: int | None,
        after_item_id: str,
    ) -> ItemPage:
        s = self._s
        compare, order = ("<", "DESC") if descending else (">", "ASC")
        default = (1 << 62) if descending else 0
        # The cursor is resolved in the same statement as the page (one snapshot for both); a
        # missing conversation gives no row, a missing cursor item a NULL `after`.
        cursor: int | str = default if after_sequence is None else after_sequence
        cursor_sql = "$4::bigint"
        if after_sequence is None and after_item_id:
            cursor = after_item_id
            cursor_sql = f"""(SELECT seq FROM {s}.conversation_items
                WHERE conversation_pk = v.pk AND item_id = $4)"""
        rows = await conn.fetch(
            f"""WITH c AS MATERIALIZED (
                SELECT v.pk, {cursor_sql} AS after FROM {s}.conversations v
                WHERE v.tenant = $1 AND v.id = $2
                    AND (v.expire_time_us IS NULL OR v.expire_time_us > $3)
            )
            SELECT c.after, i.seq, i.item_id, {self._whole("i.json", "i.json_at")} AS json,
                i.create_time_us
            FROM c LEFT JOIN LATERAL (
                SELECT * FROM {s}.conversation_items x
                WHERE x.conversation_pk = c.pk AND x.seq {compare} coalesce(c.after, {default})
                ORDER BY x.seq {order} LIMIT $5
            ) i ON true""",
            tenant,
            conversation_id,
            base.now_us(),
            cursor,
            limit + 1,
        )
        if not rows:
            raise errors.conversation_not_found(conversation_id)
        if after_sequence is None and after_item_id and rows[0]["after"] is None:
            raise errors.item_not_found(conversation_id, after_item_id)
        items = [
            Item(
                id=r["item_id"],
                json=r["json"],
                sequence=r["seq"],
                create_time_us=r["create_time_us"],
            )
            for r in rows[:limit]
            if r["seq"] is not None
        ]
        return ItemPage(items, len(rows) > limit)

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> Item:
        row = await self._run(
            _fetchrow,
            f"""SELECT i.seq, i.item_id, {self._whole("i.json", "i.json_at")} AS json,
                i.create_time_us
            FROM {self._s}.conversations c LEFT JOIN {self._s}.conversation_items i
                ON i.conversation_pk = c.pk AND i.item_id = $4
            WHERE c.tenant = $1 AND c.id = $2
                AND (c.expire_time_us IS NULL OR c.expire_time_us > $3)""",
            tenant,
            conversation_id,
            base.now_us(),
            item_id,
            write=False,
        )
        if row is None:
            raise errors.conversation_not_found(conversation_id)
        if row["seq"] is None:
            raise errors.item_not_found(conversation_id, item_id)
        return Item(
            id=row["item_id"],
            json=row["json"],
            sequence=row["seq"],
            create_time_us=row["create_time_us"],
        )

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str) -> Conversation:
        return await self._run(self._delete_item, tenant, conversation_id, item_id)

    async def _delete_item(
        self, conn: Conn, tenant: str, conversation_id: str, item_id: str
    ) -> Conversation:
        s = self._s
        row = await conn.fetchrow(
            f"""SELECT {_CONVERSATION_COLUMNS}, pk FROM {s}.conversations
            WHERE tenant = $1 AND id = $2 AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            conversation_id,
            base.now_us(),
        )
        if row is None:
            raise errors.conversation_not_found(conversation_id)
        # The item's large value (when it has one) goes with it.
        deleted = await conn.fetchval(
            f"""WITH gone AS (
                DELETE FROM {s}.conversation_items WHERE conversation_pk = $1 AND item_id = $2
                RETURNING json_at
            ), dropped AS (
                DELETE FROM {s}.large_values
                WHERE pk = (SELECT json_at FROM gone) AND conversation_pk = $1
            )
            SELECT count(*) FROM gone""",
            row["pk"],
            item_id,
        )
        if not deleted:
            raise errors.item_not_found(conversation_id, item_id)
        return _conversation(row)

    # --- background jobs ------------------------------------------------------------------
    #
    # Locks are taken in one order, the response's row before its job's (as DeleteResponse's
    # cascade takes them), so that these transactions never deadlock with each other or a delete.

    async def _job_state(
        self, conn: Conn, tenant: str, response_id: str, now: int, *, lock: bool = True
    ) -> JobState | None:
        s = self._s
        row = await conn.fetchrow(
            f"""SELECT pk, in_progress FROM {s}.responses WHERE tenant = $1 AND id = $2
                AND (expire_time_us IS NULL OR expire_time_us > $3)
            {"FOR NO KEY UPDATE" if lock else ""}""",
            tenant,
            response_id,
            now,
        )
        if row is None:
            return None
        job = await conn.fetchrow(
            f"""SELECT lease_token, done, cancelled, finished_token, owner
            FROM {s}.background_jobs WHERE response_pk = $1 {"FOR UPDATE" if lock else ""}""",
            row["pk"],
        )
        if job is None:
            return JobState(row["pk"], row["in_progress"], False)
        return JobState(
            row["pk"],
            row["in_progress"],
            True,
            job["lease_token"],
            job["done"],
            job["cancelled"],
            job["finished_token"],
            job["owner"],
        )

    async def _last_sequence(self, conn: Conn, response_pk: int) -> int:
        last = await conn.fetchval(
            f"SELECT max(seq) FROM {self._s}.response_events WHERE response_pk = $1", response_pk
        )
        return -1 if last is None else int(last)

    async def _load_job(self, conn: Conn, response_pk: int) -> Job:
        row = await conn.fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM {self._s}.background_jobs WHERE response_pk = $1",
            response_pk,
        )
        return _job(row, await self._last_sequence(conn, response_pk))

    async def _stored_turn(self, conn: Conn, response_pk: int) -> PutTurnResult:
        version = await conn.fetchval(
            f"SELECT conversation_version FROM {self._s}.responses WHERE pk = $1", response_pk
        )
        return PutTurnResult(await self._load_turn(conn, response_pk), True, version)

    async def enqueue_job(
        self,
        tenant: str,
        turn: Turn,
        spec: bytes,
        *,
        owner: str,
        lease_us: int,
        require_intact_chain: bool,
        max_pending_per_tenant: int,
        max_pending_total: int,
    ) -> EnqueueResult:
        return await self._run(
            self._enqueue_job,
            tenant,
            turn,
            spec,
            owner,
            lease_us,
            require_intact_chain,
            max_pending_per_tenant,
            max_pending_total,
        )

    async def _enqueue_job(
        self,
        conn: Conn,
        tenant: str,
        turn: Turn,
        spec: bytes,
        owner: str,
        lease_us: int,
        intact_chain: bool,
        max_per_tenant: int,
        max_total: int,
    ) -> EnqueueResult:
        s = self._s
        if max_per_tenant > 0 or max_total > 0:
            # Capped enqueues take turns, so that concurrent ones cannot all pass the count.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _lock_key(self._schema, "enqueue")
            )
        now = base.now_us()
        state = await self._job_state(conn, tenant, turn.id, now, lock=False)
        if state is not None and state.has_job:
            held = bool(owner) and state.owner == owner and not state.done
            job = await self._load_job(conn, state.pk) if held else None
            return EnqueueResult(await self._stored_turn(conn, state.pk), job)
        if max_per_tenant > 0 or max_total > 0:
            row = await conn.fetchrow(
                f"""SELECT count(*) AS total, count(*) FILTER (WHERE j.tenant = $1) AS of_tenant
                FROM {s}.background_jobs j JOIN {s}.responses r ON r.pk = j.response_pk
                WHERE NOT j.done AND r.in_progress
                    AND (r.expire_time_us IS NULL OR r.expire_time_us > $2)""",
                tenant,
                now,
            )
            assert row is not None
            base.check_pending(row["of_tenant"], row["total"], max_per_tenant, max_total)
        digest = base.turn_digest(turn)
        result = await self._put_turn(conn, tenant, turn, digest, None, intact_chain)
        if result.replayed:
            return EnqueueResult(result, None)
        pk = await conn.fetchval(
            f"""INSERT INTO {s}.background_jobs (response_pk, tenant, response_id, spec, owner,
                lease_token, lease_expire_us, create_time_us)
            SELECT pk, $1, $2, $3, $4, $5, $6, $7 FROM {s}.responses
            WHERE tenant = $1 AND id = $2 AND (expire_time_us IS NULL OR expire_time_us > $7)
            RETURNING response_pk""",
            tenant,
            turn.id,
            spec,
            owner,
            1 if owner else 0,
            now + lease_us if owner else 0,
            now,
        )
        return EnqueueResult(result, await self._load_job(conn, pk) if owner else None)

    async def claim_job(
        self, tenant: str, owner: str, lease_us: int, request_id: str
    ) -> Job | None:
        return await self._run(self._claim_job, tenant, owner, lease_us, request_id)

    async def _claim_job(
        self, conn: Conn, tenant: str, owner: str, lease_us: int, request_id: str
    ) -> Job | None:
        s = self._s
        first = await conn.fetchval(
            f"""SELECT c.response_pk FROM {s}.background_claims c
            JOIN {s}.background_jobs j ON j.response_pk = c.response_pk
            WHERE c.claim_id = $1 AND j.lease_token = c.lease_token AND NOT j.done""",
            request_id,
        )
        if first is not None:
            return await self._load_job(conn, first)
        now = base.now_us()
        # One statement: the oldest claimable job, skipping any that a concurrent claim has
        # locked, gets the next token; two claims never get the same job.
        row = await conn.fetchrow(
            f"""WITH c AS (
                SELECT j.response_pk FROM {s}.background_jobs j
                JOIN {s}.responses r ON r.pk = j.response_pk
                WHERE NOT j.done AND j.lease_expire_us <= $1 AND r.in_progress
                    AND (r.expire_time_us IS NULL OR r.expire_time_us > $1)
                    AND ($2 = '' OR j.tenant = $2)
                ORDER BY j.lease_expire_us, j.response_pk
                LIMIT 1
                FOR UPDATE OF j SKIP LOCKED
            )
            UPDATE {s}.background_jobs j
            SET owner = $3, lease_token = j.lease_token + 1, lease_expire_us = $4
            FROM c WHERE j.response_pk = c.response_pk
            RETURNING {_JOB_COLUMNS.replace("response_pk", "j.response_pk")}""",
            now,
            tenant,
            owner,
            now + lease_us,
        )
        if row is None:
            return None
        await conn.execute(
            f"DELETE FROM {s}.background_claims WHERE response_pk = $1", row["response_pk"]
        )
        # A concurrent replay of the same claim makes this insert fail (background_claims_id):
        # the retry then finds that claim.
        await conn.execute(
            f"""INSERT INTO {s}.background_claims (claim_id, response_pk, lease_token)
            VALUES ($1, $2, $3)""",
            request_id,
            row["response_pk"],
            row["lease_token"],
        )
        return _job(row, await self._last_sequence(conn, row["response_pk"]))

    async def renew_lease(
        self, tenant: str, response_id: str, lease_token: int, lease_us: int
    ) -> Renewal:
        return await self._run(self._renew_lease, tenant, response_id, lease_token, lease_us)

    async def _renew_lease(
        self, conn: Conn, tenant: str, response_id: str, lease_token: int, lease_us: int
    ) -> Renewal:
        now = base.now_us()
        # Only the job's row is locked (as a claim locks it): renewals never wait on the turn.
        row = await conn.fetchrow(
            f"""UPDATE {self._s}.background_jobs SET lease_expire_us = $4
            WHERE lease_token = $3 AND NOT done AND response_pk = (
                SELECT pk FROM {self._s}.responses WHERE tenant = $1 AND id = $2
                    AND (expire_time_us IS NULL OR expire_time_us > $5))
            RETURNING lease_expire_us""",
            tenant,
            response_id,
            lease_token,
            now + lease_us,
            now,
        )
        if row is not None:
            return Renewal(row["lease_expire_us"], False)
        state = await self._job_state(conn, tenant, response_id, now, lock=False)
        if state is not None and state.cancelled:
            return Renewal(0, True)
        base.check_holder(state, response_id, lease_token)
        raise AssertionError("a current lease that could not be renewed")

    async def _insert_events(
        self, conn: Conn, response_pk: int, response_id: str, events: Sequence[Event]
    ) -> int:
        """Appends the events not in the log yet (base.new_events); returns the last sequence.
        The caller holds the job's row lock, which serializes appends to one log."""
        last = await self._last_sequence(conn, response_pk)
        if not events:
            return last
        stored = {
            r["seq"]: r["json"]
            for r in await conn.fetch(
                f"""SELECT seq, json FROM {self._s}.response_events
                WHERE response_pk = $1 AND seq BETWEEN $2 AND $3""",
                response_pk,
                events[0].sequence,
                events[-1].sequence,
            )
        }
        fresh = base.new_events(response_id, last, stored, events)
        if fresh:
            await conn.execute(
                f"""INSERT INTO {self._s}.response_events (response_pk, seq, json)
                SELECT $1, u.seq, u.json FROM unnest($2::bigint[], $3::bytea[]) AS u (seq, json)""",
                response_pk,
                [e.sequence for e in fresh],
                [e.json for e in fresh],
            )
        return max(last, events[-1].sequence)

    async def _joined_log(self, conn: Conn, response_pk: int) -> bytes:
        rows = await conn.fetch(
            f"SELECT json FROM {self._s}.response_events WHERE response_pk = $1 ORDER BY seq",
            response_pk,
        )
        return base.joined_log(r["json"] for r in rows)

    async def append_events(
        self, tenant: str, response_id: str, lease_token: int, events: Sequence[Event]
    ) -> int:
        return await self._run(self._append_events, tenant, response_id, lease_token, events)

    async def _append_events(
        self, conn: Conn, tenant: str, response_id: str, lease_token: int, events: Sequence[Event]
    ) -> int:
        state = await self._job_state(conn, tenant, response_id, base.now_us())
        state = base.check_holder(state, response_id, lease_token)
        return await self._insert_events(conn, state.pk, response_id, events)

    async def finish_job(
        self, tenant: str, turn: Turn, lease_token: int, events: Sequence[Event]
    ) -> PutTurnResult:
        return await self._run(self._finish_job, tenant, turn, lease_token, events)

    async def _finish_job(
        self, conn: Conn, tenant: str, turn: Turn, lease_token: int, events: Sequence[Event]
    ) -> PutTurnResult:
        state = await self._job_state(conn, tenant, turn.id, base.now_us())
        if state is not None and state.done and not state.cancelled:
            if state.finished_token == lease_token:
                return await self._stored_turn(conn, state.pk)
        state = base.check_holder(state, turn.id, lease_token)
        await self._insert_events(conn, state.pk, turn.id, events)
        final = replace(turn, stream_events_json=await self._joined_log(conn, state.pk))
        result = await self._put_final(conn, tenant, state.pk, final)
        await conn.execute(
            f"""UPDATE {self._s}.background_jobs SET done = true, finished_token = $2
            WHERE response_pk = $1""",
            state.pk,
            lease_token,
        )
        return result

    async def _put_final(self, conn: Conn, tenant: str, pk: int, final: Turn) -> PutTurnResult:
        """The final turn of a background job, as PutTurn replaces a running turn; when its
        conversation was deleted meanwhile, stored without appending its items anywhere."""
        s = self._s
        digest = base.turn_digest(final)
        if not final.conversation_id or await conn.fetchval(
            f"""SELECT 1 FROM {s}.conversations WHERE tenant = $1 AND id = $2
                AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            final.conversation_id,
            base.now_us(),
        ):
            return await self._put_turn(conn, tenant, final, digest, None, False)
        running = await self._load_turn(conn, pk)
        if not running.in_progress:
            return await self._put_turn(conn, tenant, final, digest, None, False)
        stored = base.replacing_turn(running, final)
        await self._rewrite_turn(conn, pk, replace(final, in_progress=False), digest)
        return PutTurnResult(stored, False, 0)

    async def cancel_job(self, tenant: str, turn: Turn, cancel_event: bytes) -> CancelResult:
        return await self._run(self._cancel_job, tenant, turn, cancel_event)

    async def _cancel_job(
        self, conn: Conn, tenant: str, turn: Turn, cancel_event: bytes
    ) -> CancelResult:
        s = self._s
        state = await self._job_state(conn, tenant, turn.id, base.now_us())
        if state is None:
            raise errors.response_not_found(turn.id)
        if not state.running:
            return CancelResult(await self._load_turn(conn, state.pk), False)
        if not state.has_job:
            raise errors.not_background(turn.id)
        if cancel_event:
            seq = await self._last_sequence(conn, state.pk) + 1
            await conn.execute(
                f"INSERT INTO {s}.response_events (response_pk, seq, json) VALUES ($1, $2, $3)",
                state.pk,
                seq,
                base.stamped(cancel_event, seq),
            )
        final = replace(turn, stream_events_json=await self._joined_log(conn, state.pk))
        result = await self._put_final(conn, tenant, state.pk, final)
        await conn.execute(
            f"""UPDATE {s}.background_jobs SET done = true, cancelled = true
            WHERE response_pk = $1""",
            state.pk,
        )
        return CancelResult(result.turn, True)

    async def read_events(
        self, tenant: str, response_id: str, *, after: int, limit: int
    ) -> EventPage:
        s = self._s
        # One statement, so one snapshot: when it finds the response final, the events it read
        # are the whole rest of the log.
        rows = await self._run(
            _fetch,
            f"""SELECT r.in_progress, j.response_pk IS NOT NULL AS has_job, e.seq, e.json
            FROM {s}.responses r
            LEFT JOIN {s}.background_jobs j ON j.response_pk = r.pk
            LEFT JOIN LATERAL (
                SELECT seq, json FROM {s}.response_events
                WHERE response_pk = r.pk AND seq > $4 ORDER BY seq LIMIT $5
            ) e ON true
            WHERE r.tenant = $1 AND r.id = $2
                AND (r.expire_time_us IS NULL OR r.expire_time_us > $3)
            ORDER BY e.seq""",
            tenant,
            response_id,
            base.now_us(),
            after,
            limit,
            write=False,
        )
        if not rows:
            raise errors.response_not_found(response_id)
        running = rows[0]["in_progress"]
        if running and not rows[0]["has_job"]:
            raise errors.not_background(response_id)
        events = [Event(r["seq"], r["json"]) for r in rows if r["seq"] is not None]
        return EventPage(events, not running)

    # --- compaction summaries -----------------------------------------------------------------

    async def put_compaction(self, tenant: str, compaction: Compaction) -> PutCompactionResult:
        return await self._run(self._put_compaction, tenant, compaction)

    async def _put_compaction(
        self, conn: Conn, tenant: str, compaction: Compaction
    ) -> PutCompactionResult:
        now = base.now_us()
        row = await conn.fetchrow(
            f"""SELECT pk, summary, create_time_us, expire_time_us FROM {self._s}.compactions
            WHERE tenant = $1 AND id = $2 FOR UPDATE""",
            tenant,
            compaction.id,
        )
        existing = None
        if row is not None and base.live(row["expire_time_us"], now):
            existing = Compaction(
                compaction.id, row["summary"], row["create_time_us"], row["expire_time_us"]
            )
        result = base.stored_compaction(compaction, existing, now, self._retention_s)
        if result.replayed:
            return result
        if row is not None:  # expired, not swept yet: its id is free again
            await conn.execute(f"DELETE FROM {self._s}.compactions WHERE pk = $1", row["pk"])
        stored = result.compaction
        # A concurrent first write of the same id fails on compactions_id: _run retries, and
        # the retry finds that row (a replay or a conflict).
        await conn.execute(
            f"""INSERT INTO {self._s}.compactions
            (tenant, id, summary, create_time_us, expire_time_us) VALUES ($1, $2, $3, $4, $5)""",
            tenant,
            stored.id,
            stored.summary,
            stored.create_time_us,
            stored.expire_time_us,
        )
        return result

    async def get_compaction(self, tenant: str, compaction_id: str) -> Compaction:
        row = await self._run(
            _fetchrow,
            f"""SELECT summary, create_time_us, expire_time_us FROM {self._s}.compactions
            WHERE tenant = $1 AND id = $2
                AND (expire_time_us IS NULL OR expire_time_us > $3)""",
            tenant,
            compaction_id,
            base.now_us(),
            write=False,
        )
        if row is None:
            raise errors.compaction_not_found(compaction_id)
        return Compaction(compaction_id, row[0], row[1], row[2])

    # --- housekeeping ---------------------------------------------------------------------

    async def sweep(self) -> int:
        total = 0
        for table in ("responses", "conversations", "compactions"):
            while True:
                # Small batches keep each transaction short; items go by ON DELETE CASCADE.
                # `= any(ARRAY(...))` deletes the batch by primary key: with `IN (subquery)`
                # the planner may hash-join a sequential scan of the whole table instead.
                status = await self._run(
                    _execute,
                    f"""DELETE FROM {self._s}.{table} WHERE pk = any(ARRAY(
                        SELECT pk FROM {self._s}.{table}
                        WHERE expire_time_us IS NOT NULL AND expire_time_us <= $1
                        ORDER BY expire_time_us LIMIT 500))""",
                    base.now_us(),
                )
                gone = int(status.split()[-1])
                total += gone
                if gone < 500:
                    break
        return total


_CONVERSATION_COLUMNS = "id, metadata, version, create_time_us, expire_time_us"
_JOB_COLUMNS = """response_pk, tenant, response_id, spec, lease_token, owner, lease_expire_us,
    create_time_us"""
_TURN_COLUMNS = "pk, id, idempotency_key, digest, conversation_version, expire_time_us, in_progress"


async def _fetch(conn: Conn, sql: str, *args: Any) -> list[Any]:
    return list(await conn.fetch(sql, *args))


async def _fetchrow(conn: Conn, sql: str, *args: Any) -> Any:
    return await conn.fetchrow(sql, *args)


async def _execute(conn: Conn, sql: str, *args: Any) -> str:
    return str(await conn.execute(sql, *args))


def _job(row: Any, last_sequence: int) -> Job:
    return Job(
        tenant=row["tenant"],
        response_id=row["response_id"],
        spec=row["spec"],
        lease_token=row["lease_token"],
        owner=row["owner"],
        lease_expire_us=row["lease_expire_us"],
        last_sequence=last_sequence,
        create_time_us=row["create_time_us"],
    )


def _conversation(row: Any) -> Conversation:
    return Conversation(
        id=row["id"],
        metadata=orjson.loads(row["metadata"]),
        version=row["version"],
        create_time_us=row["create_time_us"],
        expire_time_us=row["expire_time_us"],
    )


def _dump_metadata(metadata: Mapping[str, str]) -> str:
    return orjson.dumps(dict(metadata), option=orjson.OPT_SORT_KEYS).decode()


def _unless_large(data: bytes | memoryview) -> bytes | memoryview:
    """``data``, or an empty value when it is large (written by _large_value instead)."""
    return b"" if len(data) >= LARGE_JSON_BYTES else data


def _has_large(turn: Turn) -> bool:
    """Whether any value of ``turn`` is large (see _large_value)."""
    return any(
        len(data) >= LARGE_JSON_BYTES
        for data in (
            turn.response_json,
            turn.stream_events_json,
            *(i.json for i in turn.input_items),
            *(i.json for i in turn.output_items),
        )
    )


def _response_item_columns(
    turn: Turn,
) -> tuple[list[int], list[int], list[str], list[bytes | memoryview]]:
    """A turn's items as the columns (kind, position, id, json) for one unnest insert."""
    kinds: list[int] = []
    positions: list[int] = []
    ids: list[str] = []
    jsons: list[bytes | memoryview] = []
    for kind, items in enumerate((turn.input_items, turn.output_items)):
        for position, item in enumerate(items, 1):
            kinds.append(kind)
            positions.append(position)
            ids.append(item.id)
            jsons.append(item.json)
    return kinds, positions, ids, jsons


def _turn_from_rows(rows: Sequence[Any], values: Mapping[int, memoryview] | None = None) -> Turn:
    """A turn from its rows (see PostgresBackend._turn_sql): its own, then its items'; with
    ``values``, the large values they point at (by pk), as _read_values read them."""
    head = rows[0]

    def value(row: Any, name: str, at: str) -> bytes | memoryview:
        pk = row.get(at) if values else None
        return row[name] if pk is None else values[pk]  # type: ignore[index]

    groups: tuple[list[Item], list[Item]] = ([], [])
    for row in rows:
        if row["kind"] is not None:
            groups[row["kind"]].append(
                Item(
                    id=row["item_id"],
                    json=value(row, "json", "json_at"),
                    sequence=row["position"],
                    create_time_us=head["create_time_us"],
                )
            )
    return Turn(
        id=head["id"],
        previous_response_id=head["previous_response_id"],
        conversation_id=head["conversation_id"],
        idempotency_key=head["idempotency_key"],
        response_json=value(head, "response_json", "response_json_at"),
        create_time_us=head["create_time_us"],
        expire_time_us=head["expire_time_us"],
        stream_events_json=value(head, "stream_events_json", "stream_events_at"),
        in_progress=head["in_progress"],
        input_items=tuple(groups[0]),
        output_items=tuple(groups[1]),
    )
