"""SQLite backend (the default): one database file in WAL mode, shared safely by any number of
connections and processes.

Why the standard library's sqlite3 in worker threads rather than an async wrapper: each
transaction runs as one plain function on one thread, from ``BEGIN IMMEDIATE`` to ``COMMIT``, so
the write lock is held only for the statements themselves and never across an event-loop hop
(aiosqlite goes back to the loop between statements). Writes of one process go through a single
writer thread, so they queue in order instead of spinning in SQLite's busy handler; writers in
other processes wait on the file lock through ``busy_timeout``. Reads use a small pool of reader
threads and never block on writers (WAL).

Group commit: the writer thread takes every write waiting in its queue (up to
``GROUP_COMMIT_MAX``) into one transaction, each write in its own savepoint, and commits once, so
concurrent writes share one fsync. A write that fails is rolled back to its savepoint alone and
its caller gets its own error; every caller is answered only after the COMMIT that holds its
write. Writes still apply one after another in arrival order, each seeing those before it.
"""

from __future__ import annotations

import asyncio
import collections
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

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

LIVE = "(expire_time_us IS NULL OR expire_time_us > :now)"

# Each migration is a list of statements applied in one transaction; append, never edit.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE responses (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            previous_response_id TEXT NOT NULL,
            conversation_id TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            response_json BLOB NOT NULL,
            digest BLOB NOT NULL,
            conversation_version INTEGER NOT NULL,
            create_time_us INTEGER NOT NULL,
            expire_time_us INTEGER
        )""",
        "CREATE UNIQUE INDEX responses_id ON responses (tenant, id)",
        """CREATE UNIQUE INDEX responses_idempotency_key ON responses (tenant, idempotency_key)
            WHERE idempotency_key <> ''""",
        """CREATE INDEX responses_expiry ON responses (expire_time_us)
            WHERE expire_time_us IS NOT NULL""",
        """CREATE TABLE response_items (
            response_pk INTEGER NOT NULL REFERENCES responses (pk) ON DELETE CASCADE,
            kind INTEGER NOT NULL,
            position INTEGER NOT NULL,
            item_id TEXT NOT NULL,
            json BLOB NOT NULL,
            PRIMARY KEY (response_pk, kind, position)
        ) WITHOUT ROWID""",
        """CREATE TABLE conversations (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            metadata TEXT NOT NULL,
            version INTEGER NOT NULL,
            request_id TEXT NOT NULL,
            request_digest BLOB NOT NULL,
            create_time_us INTEGER NOT NULL,
            expire_time_us INTEGER
        )""",
        "CREATE UNIQUE INDEX conversations_id ON conversations (tenant, id)",
        """CREATE UNIQUE INDEX conversations_request_id ON conversations (tenant, request_id)
            WHERE request_id <> ''""",
        """CREATE INDEX conversations_expiry ON conversations (expire_time_us)
            WHERE expire_time_us IS NOT NULL""",
        """CREATE TABLE conversation_items (
            conversation_pk INTEGER NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            item_id TEXT NOT NULL,
            json BLOB NOT NULL,
            create_time_us INTEGER NOT NULL,
            PRIMARY KEY (conversation_pk, seq)
        ) WITHOUT ROWID""",
        """CREATE UNIQUE INDEX conversation_items_id
            ON conversation_items (conversation_pk, item_id)""",
    ],
    # 2: the events of a streamed turn, for an exact replay.
    ["ALTER TABLE responses ADD COLUMN stream_events_json BLOB NOT NULL DEFAULT x''"],
    # 3: running turns (background responses), replaced whole by their final turn.
    ["ALTER TABLE responses ADD COLUMN in_progress INTEGER NOT NULL DEFAULT 0"],
    # 4: background responses as jobs held by leases, and the event log of each (IF NOT EXISTS:
    # a store set back to an older version by hand keeps these tables).
    [
        """CREATE TABLE IF NOT EXISTS background_jobs (
            response_pk INTEGER PRIMARY KEY REFERENCES responses (pk) ON DELETE CASCADE,
            tenant TEXT NOT NULL,
            response_id TEXT NOT NULL,
            spec BLOB NOT NULL,
            owner TEXT NOT NULL,
            lease_token INTEGER NOT NULL,
            lease_expire_us INTEGER NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            cancelled INTEGER NOT NULL DEFAULT 0,
            finished_token INTEGER NOT NULL DEFAULT 0,
            create_time_us INTEGER NOT NULL
        )""",
        """CREATE INDEX IF NOT EXISTS background_jobs_claimable
            ON background_jobs (lease_expire_us, response_pk) WHERE done = 0""",
        """CREATE TABLE IF NOT EXISTS response_events (
            response_pk INTEGER NOT NULL REFERENCES responses (pk) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            json BLOB NOT NULL,
            PRIMARY KEY (response_pk, seq)
        ) WITHOUT ROWID""",
    ],
    # 5: the latest claim of each job by its request_id, so that a retried claim gets its job.
    [
        """CREATE TABLE IF NOT EXISTS background_claims (
            claim_id TEXT PRIMARY KEY,
            response_pk INTEGER NOT NULL REFERENCES responses (pk) ON DELETE CASCADE,
            lease_token INTEGER NOT NULL
        )""",
        """CREATE INDEX IF NOT EXISTS background_claims_response
            ON background_claims (response_pk)""",
    ],
    # 6: items by id, for GetItems (item_reference inputs). A conversation's items keep one
    # unique index, led by the item id now, which serves both lookups (by conversation and id,
    # and by id alone), so that an append maintains no more indexes than before.
    [
        "CREATE INDEX IF NOT EXISTS response_items_item_id ON response_items (item_id)",
        "DROP INDEX IF EXISTS conversation_items_id",
        """CREATE UNIQUE INDEX IF NOT EXISTS conversation_items_item_id
            ON conversation_items (item_id, conversation_pk)""",
    ],
    # 7: compaction summaries (PutCompaction), by tenant and compaction item id.
    [
        """CREATE TABLE IF NOT EXISTS compactions (
            pk INTEGER PRIMARY KEY,
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            summary BLOB NOT NULL,
            create_time_us INTEGER NOT NULL,
            expire_time_us INTEGER
        )""",
        "CREATE UNIQUE INDEX IF NOT EXISTS compactions_id ON compactions (tenant, id)",
        """CREATE INDEX IF NOT EXISTS compactions_expiry ON compactions (expire_time_us)
            WHERE expire_time_us IS NOT NULL""",
    ],
    # 8: what a turn's chain was known to be, so that a turn stored with require_intact_chain
    # on it need not walk the chain again (see _intact_chain). Every deletion of a response, by
    # any process or release, counts in response_deletions through the trigger.
    [
        "ALTER TABLE responses ADD COLUMN chain_whole_at INTEGER",
        "ALTER TABLE responses ADD COLUMN chain_expire_us INTEGER",
        "CREATE TABLE IF NOT EXISTS response_deletions (n INTEGER NOT NULL)",
        """INSERT INTO response_deletions (n)
            SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM response_deletions)""",
        """CREATE TRIGGER IF NOT EXISTS responses_deleted AFTER DELETE ON responses
            BEGIN UPDATE response_deletions SET n = n + 1; END""",
    ],
    # 9: a long value of a turn (its response JSON, event log or an item's JSON: a long
    # answer's) in a row of its own, written in pieces (see _large_value); the row it belongs
    # to holds an empty value and points at it. Rows written before keep their values in place.
    [
        """CREATE TABLE IF NOT EXISTS large_values (
            pk INTEGER PRIMARY KEY,
            response_pk INTEGER NOT NULL REFERENCES responses (pk) ON DELETE CASCADE,
            data BLOB NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS large_values_response ON large_values (response_pk)",
        "ALTER TABLE responses ADD COLUMN response_json_at INTEGER",
        "ALTER TABLE responses ADD COLUMN stream_events_at INTEGER",
        "ALTER TABLE response_items ADD COLUMN json_at INTEGER",
    ],
    # 10: a long item's JSON in a conversation, in a row of its own as in 9, owned by the
    # conversation (its items outlive their response). A table of its own, since large_values'
    # owner column cannot be made nullable in place (SQLite would copy every value to rebuild
    # it). Items written before keep their JSON in place.
    [
        """CREATE TABLE IF NOT EXISTS conversation_large_values (
            pk INTEGER PRIMARY KEY,
            conversation_pk INTEGER NOT NULL REFERENCES conversations (pk) ON DELETE CASCADE,
            data BLOB NOT NULL
        )""",
        """CREATE INDEX IF NOT EXISTS conversation_large_values_conversation
            ON conversation_large_values (conversation_pk)""",
        "ALTER TABLE conversation_items ADD COLUMN json_at INTEGER",
    ],
]

# The live background jobs that are not finished, with their response still running: what
# the caps count and what a claim chooses from.
_PENDING_JOBS = """background_jobs j JOIN responses r ON r.pk = j.response_pk
WHERE j.done = 0 AND r.in_progress AND (r.expire_time_us IS NULL OR r.expire_time_us > :now)"""

# One statement, under the one writer: the oldest claimable job gets the next token.
CLAIM_SQL = f"""
UPDATE background_jobs
SET owner = :owner, lease_token = lease_token + 1, lease_expire_us = :expire
WHERE response_pk = (
    SELECT j.response_pk FROM {_PENDING_JOBS}
        AND j.lease_expire_us <= :now AND (:tenant = '' OR j.tenant = :tenant)
    ORDER BY j.lease_expire_us, j.response_pk LIMIT 1
)
RETURNING response_pk, tenant, response_id, spec, lease_token, owner, lease_expire_us,
    create_time_us
"""

_JOB_STATE_SQL = """
SELECT r.pk, r.in_progress, j.response_pk IS NOT NULL, j.lease_token, j.done, j.cancelled,
    j.finished_token, j.owner
FROM responses r LEFT JOIN background_jobs j ON j.response_pk = r.pk
WHERE r.tenant = :tenant AND r.id = :id
    AND (r.expire_time_us IS NULL OR r.expire_time_us > :now)
"""

# The chain behind a response in one statement. Each step must go to an older row (smaller pk):
# a previous response is always stored before its follower, so a link to a newer row means the
# original was deleted and its id reused; the walk stops there and the history reads as broken.
# This also makes the walk finite whatever ids callers reuse.
_CHAIN_SQL = f"""
WITH RECURSIVE chain (pk, id, prev, create_time_us, in_progress, expire_time_us) AS (
    SELECT pk, id, previous_response_id, create_time_us, in_progress, expire_time_us
    FROM responses WHERE tenant = :tenant AND id = :id AND {LIVE}
  UNION ALL
    SELECT r.pk, r.id, r.previous_response_id, r.create_time_us, r.in_progress,
        r.expire_time_us
    FROM chain c CROSS JOIN responses r ON r.tenant = :tenant AND r.id = c.prev AND r.pk < c.pk
    WHERE r.expire_time_us IS NULL OR r.expire_time_us > :now
)"""
_CHAIN_ROWS = """SELECT pk, id, prev, create_time_us, NULL, NULL, NULL, NULL, NULL, in_progress,
    NULL
FROM chain"""
HISTORY_SQL = f"""{_CHAIN_SQL}
{_CHAIN_ROWS}
UNION ALL
SELECT i.response_pk, NULL, NULL, NULL, i.kind, i.position, i.item_id, i.json, NULL, NULL,
    i.json_at
FROM chain c CROSS JOIN response_items i ON i.response_pk = c.pk
ORDER BY 1, 5 NULLS FIRST, 6
"""
# With a limit, only the newest :limit items, each with the count of all. Kept apart because
# the window functions cost twice the plain join (measured: 2.3 ms against 1.1 ms, 200 turns).
HISTORY_CAPPED_SQL = f"""{_CHAIN_SQL},
items AS (
    SELECT i.response_pk, i.kind, i.position, i.item_id, i.json, i.json_at,
        row_number() OVER (ORDER BY i.response_pk DESC, i.kind DESC, i.position DESC) AS rank,
        count(*) OVER () AS total
    FROM chain c CROSS JOIN response_items i ON i.response_pk = c.pk
)
{_CHAIN_ROWS}
UNION ALL
SELECT t.response_pk, NULL, NULL, NULL, t.kind, t.position, t.item_id, t.json, t.total, NULL,
    t.json_at
FROM items t WHERE t.rank <= :limit
ORDER BY 1, 5 NULLS FIRST, 6
"""

# The chain behind a new turn's previous response, (id, previous id, expire time) oldest first,
# for require_intact_chain (base.check_chain): the same walk as GetHistory's, over responses only.
CHAIN_LINKS_SQL = f"""{_CHAIN_SQL}
SELECT id, prev, expire_time_us FROM chain ORDER BY pk
"""

# What the previous response of a turn stored with require_intact_chain says of its chain (see
# _intact_chain), and how many responses were ever deleted.
CHAIN_MARK_SQL = f"""
SELECT r.previous_response_id, r.chain_whole_at, r.chain_expire_us, r.expire_time_us, d.n
FROM responses r CROSS JOIN response_deletions d
WHERE r.tenant = :tenant AND r.id = :id AND {LIVE.replace("expire", "r.expire")}
"""

# The rows a new turn must be checked against: its id, its previous id and its idempotency key.
# One indexed lookup each: written as an OR, SQLite scans every response of the tenant instead.
_TURN_COLUMNS = "pk, id, idempotency_key, digest, conversation_version, expire_time_us, in_progress"
TURN_LOOKUP_SQL = f"""
SELECT {_TURN_COLUMNS} FROM responses WHERE tenant = :tenant AND id = :id
UNION
SELECT {_TURN_COLUMNS} FROM responses WHERE tenant = :tenant AND id = :previous
UNION
SELECT {_TURN_COLUMNS} FROM responses
WHERE tenant = :tenant AND idempotency_key = :key AND idempotency_key <> ''
"""

CONVERSATION_HISTORY_SQL = f"""
WITH c AS MATERIALIZED (
    SELECT pk, version,
        (SELECT count(*) FROM conversation_items x WHERE x.conversation_pk = conversations.pk)
        AS total
    FROM conversations WHERE tenant = :tenant AND id = :id AND {LIVE}
)
SELECT c.version, c.total, i.seq, i.item_id, i.json, i.create_time_us, i.json_at
FROM c LEFT JOIN conversation_items i ON i.conversation_pk = c.pk
ORDER BY i.seq DESC LIMIT :limit
"""

# The copies of some items (ids as a JSON array) in the tenant's live, final responses and live
# conversations, as rows for base.newest_items. Each id drives one search of each item index.
ITEMS_SQL = f"""
WITH ids (item_id) AS MATERIALIZED (SELECT DISTINCT value FROM json_each(:ids))
SELECT i.item_id, i.json, r.create_time_us, i.position, {base.RESPONSE_COPY}, r.pk, i.json_at,
    'large_values'
FROM ids CROSS JOIN response_items i ON i.item_id = ids.item_id
    CROSS JOIN responses r ON r.pk = i.response_pk
WHERE r.tenant = :tenant AND NOT r.in_progress AND {LIVE.replace("expire", "r.expire")}
UNION ALL
SELECT i.item_id, i.json, i.create_time_us, i.seq, {base.CONVERSATION_COPY}, c.pk, i.json_at,
    'conversation_large_values'
FROM ids CROSS JOIN conversation_items i ON i.item_id = ids.item_id
    CROSS JOIN conversations c ON c.pk = i.conversation_pk
WHERE c.tenant = :tenant AND {LIVE.replace("expire", "c.expire")}
"""

_UNAVAILABLE_MARKERS = ("locked", "busy", "unable to open", "disk i/o", "readonly", "full")

# Most writes committed in one transaction (see the module docstring).
GROUP_COMMIT_MAX = 64


def _unavailable(exc: BaseException) -> BaseException:
    """A lock timeout or a storage failure as BACKEND_UNAVAILABLE; any other error as is."""
    if isinstance(exc, sqlite3.OperationalError) and any(
        marker in str(exc).lower() for marker in _UNAVAILABLE_MARKERS
    ):
        error = errors.backend_unavailable(str(exc))
        error.__cause__ = exc
        return error
    return exc


@dataclass(slots=True)
class _Write:
    """A write waiting for the writer thread, and where to answer its caller."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


def _answer(writes: Sequence[_Write]) -> None:
    """On the callers' event loop: each caller gets its write's result or error."""
    for write in writes:
        if write.future.done():  # the caller went away (cancelled)
            continue
        if write.error is not None:
            write.future.set_exception(write.error)
        else:
            write.future.set_result(write.result)


class SqliteBackend:
    """The state store in one SQLite file; see the module docstring for the threading model."""

    def __init__(
        self,
        path: str,
        *,
        retention_s: float = 0.0,
        synchronous: str = "full",
        readers: int = 4,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self._path = path
        self._retention_s = retention_s
        if synchronous.lower() not in {"full", "normal", "extra"}:
            raise ValueError(
                f"sqlite synchronous must be full, normal or extra, not {synchronous!r}"
            )
        self._synchronous = synchronous.upper()
        self._busy_timeout_s = busy_timeout_s
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-write")
        self._queue: collections.deque[_Write] = collections.deque()
        self._queue_lock = threading.Lock()
        self._draining = False  # a _drain is submitted or running (under _queue_lock)
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-read")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

    async def open(self) -> SqliteBackend:
        """Creates or migrates the schema; safe when several processes open one file at once."""
        await self._run(self._writer, self._migrate)
        return self

    # --- threads, connections and transactions --------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _migrate(self) -> None:
        conn = self._conn()
        # WAL is a property of the file; switching needs no transaction and is a no-op after.
        # Two processes opening a new file at once can both try the switch, and SQLite answers
        # the loser "database is locked" at once, without its busy handler: try again, within
        # the busy timeout.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current: int = row[0] or 0
            for version, statements in enumerate(MIGRATIONS[current:], current + 1):
                for statement in statements:
                    if not _column_exists(conn, statement):
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _read_transaction(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn()
        # DEFERRED gives a read one consistent snapshot without taking the write lock.
        conn.execute("BEGIN")
        try:
            result = fn(conn, *args)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(conn, *args)`` in the writer thread's next group commit."""
        loop = asyncio.get_running_loop()
        write = _Write(fn, args, loop, loop.create_future())
        with self._queue_lock:
            self._queue.append(write)
            if not self._draining:
                # One drain at a time, running until the queue is empty: a write queued while
                # it commits joins its next group, with no drain of its own to wake.
                try:
                    self._writer.submit(self._drain)
                except RuntimeError:  # closed
                    self._queue.remove(write)
                    raise
                self._draining = True
        result: T = await write.future
        return result

    def _drain(self) -> None:
        """The writer thread: commits the queued writes, GROUP_COMMIT_MAX at most at once, until
        none is left."""
        while True:
            with self._queue_lock:
                if not self._queue:
                    self._draining = False
                    return
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), GROUP_COMMIT_MAX))
                ]
            try:
                self._commit_group(self._conn(), batch)
            except BaseException as exc:
                for write in batch:
                    if write.error is None:
                        write.result, write.error = None, _unavailable(exc)
                with self._queue_lock:
                    # The writes still queued get a drain of their own, as before this one.
                    self._draining = bool(self._queue)
                    if self._draining:
                        try:
                            self._writer.submit(self._drain)
                        except RuntimeError:  # closed
                            self._draining = False
                raise
            finally:
                by_loop: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
                for write in batch:
                    by_loop.setdefault(write.loop, []).append(write)
                for loop, writes in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_answer, writes)
                    except RuntimeError:  # that loop is closed: nobody waits any more
                        pass

    def _commit_group(self, conn: sqlite3.Connection, batch: Sequence[_Write]) -> None:
        """Runs each write in its own savepoint of one transaction, then commits. A write's
        result counts only once COMMIT returned; if the transaction itself fails (BEGIN, COMMIT,
        or an error that makes SQLite roll it all back), every write gets that error."""
        try:
            # IMMEDIATE takes the write lock up front (waiting through busy_timeout), so a
            # write never fails half-way on a lock upgrade.
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            for write in batch:
                write.error = _unavailable(exc)
            return
        try:
            for write in batch:
                conn.execute("SAVEPOINT one_write")
                try:
                    write.result = write.fn(conn, *write.args)
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back
                    conn.execute("ROLLBACK TO one_write")
                    write.error = _unavailable(exc)
                conn.execute("RELEASE one_write")
            conn.execute("COMMIT")
        except BaseException as exc:
            for write in batch:
                write.result = None
                if write.error is None:
                    write.error = _unavailable(exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not isinstance(exc, Exception):
                raise

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._run(self._readers, self._read_transaction, fn, *args)

    async def close(self) -> None:
        # A write may still wait on another process's lock: wait for it off the event loop.
        await asyncio.to_thread(self._writer.shutdown, True)
        await asyncio.to_thread(self._readers.shutdown, True)
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # --- responses ------------------------------------------------------------------------

    async def put_turn(
        self,
        tenant: str,
        turn: Turn,
        *,
        expected_conversation_version: int | None,
        require_intact_chain: bool = False,
    ) -> PutTurnResult:
        return await self._write(
            self._put_turn, tenant, turn, expected_conversation_version, require_intact_chain
        )

    def _put_turn(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        turn: Turn,
        expected: int | None,
        intact_chain: bool = False,
    ) -> PutTurnResult:
        now = base.now_us()
        digest = base.turn_digest(turn)
        rows = conn.execute(
            TURN_LOOKUP_SQL,
            {
                "tenant": tenant,
                "id": turn.id,
                "previous": turn.previous_response_id,
                "key": turn.idempotency_key,
            },
        ).fetchall()
        found = base.lookup_turn(turn, digest, rows, now)
        if found.running is not None:
            return self._replace_turn(conn, tenant, found.running, turn, digest, expected, now)
        if found.replay is not None:
            pk, version = found.replay
            return PutTurnResult(_load_turn(conn, pk), True, version)
        # Expired but not yet swept: such rows must not block the id or the key.
        conn.executemany("DELETE FROM responses WHERE pk = ?", [(pk,) for pk in found.expired])
        found.check_previous(turn)
        expire = base.expire_at(now, self._retention_s)
        whole_at = chain_expire = None
        if intact_chain and turn.previous_response_id:
            whole_at, chain_expire = _intact_chain(conn, tenant, turn.previous_response_id, now)
            chain_expire = _earliest(chain_expire, expire)

        conversation = _turn_conversation(conn, tenant, turn, expected, now)
        version = conversation[1] if conversation else 0
        cur = conn.execute(
            """INSERT INTO responses (tenant, id, previous_response_id, conversation_id,
                idempotency_key, response_json, digest, conversation_version, create_time_us,
                expire_time_us, stream_events_json, in_progress, chain_whole_at, chain_expire_us)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
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
                whole_at,
                chain_expire,
            ),
        )
        assert cur.lastrowid is not None
        _write_large_json(conn, cur.lastrowid, turn)
        _insert_response_items(conn, cur.lastrowid, turn)
        if conversation is not None and not turn.in_progress:
            appended = [*turn.input_items, *turn.output_items]
            self._append(conn, conversation[0], turn.conversation_id, appended, version, now)
        return PutTurnResult(base.stored_turn(turn, now, expire), False, version)

    def _replace_turn(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        pk: int,
        turn: Turn,
        digest: bytes,
        expected: int | None,
        now: int,
    ) -> PutTurnResult:
        """Replaces the running turn ``pk`` in place, keeping its pk and so its place in the
        chain order (the one writer's transaction makes this atomic); a final turn's items
        join its conversation now."""
        stored = base.replacing_turn(_load_turn(conn, pk), turn)
        conversation = _turn_conversation(conn, tenant, turn, expected, now)
        version = conversation[1] if conversation else 0
        _drop_large_values(conn, pk)
        conn.execute(
            """UPDATE responses SET response_json = ?, digest = ?, conversation_version = ?,
                stream_events_json = ?, in_progress = ?
            WHERE pk = ?""",
            (
                _unless_large(turn.response_json),
                digest,
                version,
                _unless_large(turn.stream_events_json),
                turn.in_progress,
                pk,
            ),
        )
        _write_large_json(conn, pk, turn)
        conn.execute("DELETE FROM response_items WHERE response_pk = ?", (pk,))
        _insert_response_items(conn, pk, turn)
        if conversation is not None and not turn.in_progress:
            appended = [*turn.input_items, *turn.output_items]
            self._append(conn, conversation[0], turn.conversation_id, appended, version, now)
        if not turn.in_progress:
            # A final turn finishes the running turn's job, if it has one (see PutTurn).
            conn.execute(
                "UPDATE background_jobs SET done = 1 WHERE response_pk = ? AND done = 0", (pk,)
            )
        return PutTurnResult(stored, False, version)

    def _append(
        self,
        conn: sqlite3.Connection,
        conversation_pk: int,
        conversation_id: str,
        items: Sequence[Item],
        version: int,
        now: int,
    ) -> tuple[Item, ...]:
        """Appends ``items`` so that the last gets sequence ``version``, and sets the version."""
        first = version - len(items) + 1
        stored = tuple(
            Item(id=item.id, json=item.json, sequence=seq, create_time_us=now)
            for seq, item in enumerate(items, first)
        )
        try:
            # A large item's JSON apart, as the conversation's (an item whose id clashes fails
            # the insert, and the write's savepoint takes its values back).
            conn.executemany(
                """INSERT INTO conversation_items (conversation_pk, seq, item_id, json,
                    create_time_us, json_at) VALUES (?, ?, ?, ?, ?, ?)""",
                [
                    (
                        conversation_pk,
                        i.sequence,
                        i.id,
                        _unless_large(i.json),
                        now,
                        _large_value(conn, i.json, conversation_pk=conversation_pk),
                    )
                    for i in stored
                ],
            )
        except sqlite3.IntegrityError as exc:
            raise errors.item_id_conflict(
                conversation_id, _first_existing(conn, conversation_pk, items)
            ) from exc
        conn.execute(
            """UPDATE conversations SET version = ?, expire_time_us = coalesce(?, expire_time_us)
            WHERE pk = ?""",
            (version, base.expire_at(now, self._retention_s), conversation_pk),
        )
        return stored

    async def get_response(
        self,
        tenant: str,
        *,
        response_id: str = "",
        idempotency_key: str = "",
        with_items: bool = True,
    ) -> Turn:
        return await self._read(
            self._get_response, tenant, response_id, idempotency_key, with_items
        )

    def _get_response(
        self, conn: sqlite3.Connection, tenant: str, response_id: str, key: str, with_items: bool
    ) -> Turn:
        # The key's index is partial: the query must repeat its condition to use it.
        where = "idempotency_key = :value AND idempotency_key <> ''" if key else "id = :value"
        value = key or response_id
        row = conn.execute(
            f"SELECT pk FROM responses WHERE tenant = :tenant AND {where} AND {LIVE}",
            {"tenant": tenant, "value": value, "now": base.now_us()},
        ).fetchone()
        if row is None:
            if key:
                raise errors.idempotency_key_not_found(key)
            raise errors.response_not_found(response_id)
        return _load_turn(conn, row[0], with_items=with_items)

    async def response_history(self, tenant: str, response_id: str, *, limit: int) -> History:
        return await self._read(self._response_history, tenant, response_id, limit)

    def _response_history(
        self, conn: sqlite3.Connection, tenant: str, response_id: str, limit: int
    ) -> History:
        rows = conn.execute(
            HISTORY_CAPPED_SQL if limit else HISTORY_SQL,
            {"tenant": tenant, "id": response_id, "now": base.now_us(), "limit": limit},
        ).fetchall()
        return base.history_from_rows(response_id, _read_apart(conn, rows, 7, "large_values"))

    async def get_items(self, tenant: str, item_ids: Sequence[str]) -> dict[str, Item]:
        return await self._read(_get_items, tenant, item_ids)

    async def delete_response(self, tenant: str, response_id: str) -> None:
        await self._write(self._delete_response, tenant, response_id)

    def _delete_response(self, conn: sqlite3.Connection, tenant: str, response_id: str) -> None:
        cur = conn.execute(
            f"DELETE FROM responses WHERE tenant = :tenant AND id = :id AND {LIVE}",
            {"tenant": tenant, "id": response_id, "now": base.now_us()},
        )
        if cur.rowcount == 0:
            raise errors.response_not_found(response_id)

    # --- conversations --------------------------------------------------------------------

    async def create_conversation(
        self, tenant: str, metadata: Mapping[str, str], items: Sequence[Item], request_id: str
    ) -> CreatedConversation:
        return await self._write(self._create_conversation, tenant, metadata, items, request_id)

    def _create_conversation(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        metadata: Mapping[str, str],
        items: Sequence[Item],
        request_id: str,
    ) -> CreatedConversation:
        now = base.now_us()
        digest = base.conversation_digest(metadata, items) if request_id else b""
        if request_id:
            row = conn.execute(
                f"""SELECT {_CONVERSATION_COLUMNS}, pk, request_digest FROM conversations
                WHERE tenant = ? AND request_id = ? AND request_id <> ''""",
                (tenant, request_id),
            ).fetchone()
            if row is not None and base.live(row[4], now):
                if row[6] != digest:
                    raise errors.request_id_conflict(request_id)
                first = _conversation(row)
                # The first call's result: its items got sequence 1..n at creation.
                return CreatedConversation(
                    first, base.positioned(items, first.create_time_us), replayed=True
                )
            if row is not None:
                conn.execute("DELETE FROM conversations WHERE pk = ?", (row[5],))
        conversation = Conversation(
            id=base.new_conversation_id(),
            metadata=dict(metadata),
            version=len(items),
            create_time_us=now,
            expire_time_us=base.expire_at(now, self._retention_s),
        )
        cur = conn.execute(
            """INSERT INTO conversations (tenant, id, metadata, version, request_id,
                request_digest, create_time_us, expire_time_us)
            VALUES (?, ?, ?, 0, ?, ?, ?, ?)""",
            (
                tenant,
                conversation.id,
                _dump_metadata(metadata),
                request_id,
                digest,
                now,
                conversation.expire_time_us,
            ),
        )
        assert cur.lastrowid is not None
        stored = self._append(conn, cur.lastrowid, conversation.id, items, len(items), now)
        return CreatedConversation(conversation, stored)

    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation:
        return await self._read(_find_conversation, tenant, conversation_id)

    async def get_conversation_by_request(self, tenant: str, request_id: str) -> Conversation:
        return await self._read(_find_conversation_by_request, tenant, request_id)

    async def update_conversation(
        self, tenant: str, conversation_id: str, metadata: Mapping[str, str]
    ) -> Conversation:
        return await self._write(self._update_conversation, tenant, conversation_id, metadata)

    def _update_conversation(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        conversation_id: str,
        metadata: Mapping[str, str],
    ) -> Conversation:
        conn.execute(
            f"""UPDATE conversations SET metadata = :metadata
            WHERE tenant = :tenant AND id = :id AND {LIVE}""",
            {
                "metadata": _dump_metadata(metadata),
                "tenant": tenant,
                "id": conversation_id,
                "now": base.now_us(),
            },
        )
        return _find_conversation(conn, tenant, conversation_id)

    async def delete_conversation(self, tenant: str, conversation_id: str) -> None:
        await self._write(self._delete_conversation, tenant, conversation_id)

    def _delete_conversation(
        self, conn: sqlite3.Connection, tenant: str, conversation_id: str
    ) -> None:
        cur = conn.execute(
            f"DELETE FROM conversations WHERE tenant = :tenant AND id = :id AND {LIVE}",
            {"tenant": tenant, "id": conversation_id, "now": base.now_us()},
        )
        if cur.rowcount == 0:
            raise errors.conversation_not_found(conversation_id)

    async def conversation_history(
        self, tenant: str, conversation_id: str, *, limit: int
    ) -> History:
        return await self._read(self._conversation_history, tenant, conversation_id, limit)

    def _conversation_history(
        self, conn: sqlite3.Connection, tenant: str, conversation_id: str, limit: int
    ) -> History:
        rows = conn.execute(
            CONVERSATION_HISTORY_SQL,
            {"tenant": tenant, "id": conversation_id, "now": base.now_us(), "limit": limit or -1},
        ).fetchall()
        rows = _read_apart(conn, rows, 4, "conversation_large_values")
        return base.conversation_history_from_rows(conversation_id, rows)

    async def append_items(
        self,
        tenant: str,
        conversation_id: str,
        items: Sequence[Item],
        *,
        expected_version: int | None,
    ) -> AppendResult:
        return await self._write(
            self._append_items, tenant, conversation_id, items, expected_version
        )

    def _append_items(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        conversation_id: str,
        items: Sequence[Item],
        expected: int | None,
    ) -> AppendResult:
        now = base.now_us()
        pk, version = _conversation_key(conn, tenant, conversation_id, now)
        marks = ",".join("?" * len(items))
        existing = {
            row[1]: Item(
                id=row[1],
                json=_value(conn, row[2], row[4], "conversation_large_values"),
                sequence=row[0],
                create_time_us=row[3],
            )
            for row in conn.execute(
                f"""SELECT seq, item_id, json, create_time_us, json_at FROM conversation_items
                WHERE conversation_pk = ? AND item_id IN ({marks})""",
                (pk, *(i.id for i in items)),
            ).fetchall()
        }
        replayed = base.classify_append(conversation_id, items, existing)
        if replayed is not None:
            return AppendResult(replayed, version, True)
        base.check_version(conversation_id, expected, version)
        version += len(items)
        stored = self._append(conn, pk, conversation_id, items, version, now)
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
        return await self._read(
            _list_items,
            tenant,
            conversation_id,
            descending,
            limit,
            after_sequence,
            after_item_id,
        )

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> Item:
        return await self._read(_get_item, tenant, conversation_id, item_id)

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str) -> Conversation:
        return await self._write(_delete_item, tenant, conversation_id, item_id)

    # --- housekeeping ---------------------------------------------------------------------

    async def sweep(self) -> int:
        total = 0
        for table in ("responses", "conversations", "compactions"):
            while True:
                # Small batches keep each write transaction (and the lock) short.
                gone = await self._write(_sweep_batch, table, 500)
                total += gone
                if gone < 500:
                    break
        return total

    # --- compaction summaries -----------------------------------------------------------------

    async def put_compaction(self, tenant: str, compaction: Compaction) -> PutCompactionResult:
        return await self._write(self._put_compaction, tenant, compaction)

    def _put_compaction(
        self, conn: sqlite3.Connection, tenant: str, compaction: Compaction
    ) -> PutCompactionResult:
        now = base.now_us()
        row = conn.execute(
            """SELECT pk, summary, create_time_us, expire_time_us FROM compactions
            WHERE tenant = ? AND id = ?""",
            (tenant, compaction.id),
        ).fetchone()
        existing = None
        if row is not None and base.live(row[3], now):
            existing = Compaction(compaction.id, row[1], row[2], row[3])
        result = base.stored_compaction(compaction, existing, now, self._retention_s)
        if result.replayed:
            return result
        if row is not None:  # expired, not swept yet: its id is free again
            conn.execute("DELETE FROM compactions WHERE pk = ?", (row[0],))
        stored = result.compaction
        conn.execute(
            """INSERT INTO compactions (tenant, id, summary, create_time_us, expire_time_us)
            VALUES (?, ?, ?, ?, ?)""",
            (tenant, stored.id, stored.summary, stored.create_time_us, stored.expire_time_us),
        )
        return result

    async def get_compaction(self, tenant: str, compaction_id: str) -> Compaction:
        return await self._read(_get_compaction, tenant, compaction_id)

    # --- background jobs (each function runs in the one writer's transaction) -----------------

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
        return await self._write(
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

    def _enqueue_job(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        turn: Turn,
        spec: bytes,
        owner: str,
        lease_us: int,
        intact_chain: bool,
        max_per_tenant: int,
        max_total: int,
    ) -> EnqueueResult:
        now = base.now_us()
        state = _job_state(conn, tenant, turn.id, now)
        if state is not None and state.has_job:
            held = bool(owner) and state.owner == owner and not state.done
            version = conn.execute(
                "SELECT conversation_version FROM responses WHERE pk = ?", (state.pk,)
            ).fetchone()[0]
            return EnqueueResult(
                PutTurnResult(_load_turn(conn, state.pk), True, version),
                _load_job(conn, state.pk) if held else None,
            )
        if max_per_tenant > 0 or max_total > 0:
            total, of_tenant = conn.execute(
                f"SELECT count(*), coalesce(sum(j.tenant = :tenant), 0) FROM {_PENDING_JOBS}",
                {"tenant": tenant, "now": now},
            ).fetchone()
            base.check_pending(of_tenant, total, max_per_tenant, max_total)
        result = self._put_turn(conn, tenant, turn, None, intact_chain)
        if result.replayed:
            return EnqueueResult(result, None)
        pk = conn.execute(
            f"SELECT pk FROM responses WHERE tenant = :tenant AND id = :id AND {LIVE}",
            {"tenant": tenant, "id": turn.id, "now": now},
        ).fetchone()[0]
        conn.execute(
            """INSERT INTO background_jobs (response_pk, tenant, response_id, spec, owner,
                lease_token, lease_expire_us, create_time_us)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                pk,
                tenant,
                turn.id,
                spec,
                owner,
                1 if owner else 0,
                now + lease_us if owner else 0,
                now,
            ),
        )
        return EnqueueResult(result, _load_job(conn, pk) if owner else None)

    async def claim_job(
        self, tenant: str, owner: str, lease_us: int, request_id: str
    ) -> Job | None:
        return await self._write(_claim_job, tenant, owner, lease_us, request_id)

    async def renew_lease(
        self, tenant: str, response_id: str, lease_token: int, lease_us: int
    ) -> Renewal:
        return await self._write(_renew_lease, tenant, response_id, lease_token, lease_us)

    async def append_events(
        self, tenant: str, response_id: str, lease_token: int, events: Sequence[Event]
    ) -> int:
        return await self._write(_append_events, tenant, response_id, lease_token, events)

    async def finish_job(
        self, tenant: str, turn: Turn, lease_token: int, events: Sequence[Event]
    ) -> PutTurnResult:
        return await self._write(self._finish_job, tenant, turn, lease_token, events)

    def _finish_job(
        self,
        conn: sqlite3.Connection,
        tenant: str,
        turn: Turn,
        lease_token: int,
        events: Sequence[Event],
    ) -> PutTurnResult:
        state = _job_state(conn, tenant, turn.id, base.now_us())
        if state is not None and state.done and not state.cancelled:
            if state.finished_token == lease_token:
                version = conn.execute(
                    "SELECT conversation_version FROM responses WHERE pk = ?", (state.pk,)
                ).fetchone()[0]
                return PutTurnResult(_load_turn(conn, state.pk), True, version)
        state = base.check_holder(state, turn.id, lease_token)
        _insert_events(conn, state.pk, turn.id, events)
        final = replace(turn, stream_events_json=_joined_log(conn, state.pk))
        # A failure here rolls the write back to its savepoint: the events go too.
        result = self._put_final(conn, tenant, state.pk, final)
        conn.execute(
            "UPDATE background_jobs SET done = 1, finished_token = ? WHERE response_pk = ?",
            (lease_token, state.pk),
        )
        return result

    def _put_final(
        self, conn: sqlite3.Connection, tenant: str, pk: int, final: Turn
    ) -> PutTurnResult:
        """The final turn of a background job, as PutTurn replaces a running turn; when its
        conversation was deleted meanwhile, stored without appending its items anywhere."""
        conversation = final.conversation_id
        running = _load_turn(conn, pk)
        if (
            not conversation
            or not running.in_progress
            or _live_conversation(conn, tenant, conversation, base.now_us())
        ):
            return self._put_turn(conn, tenant, final, None)
        stored = base.replacing_turn(running, final)
        _drop_large_values(conn, pk)
        conn.execute(
            """UPDATE responses SET response_json = ?, digest = ?, stream_events_json = ?,
                in_progress = 0
            WHERE pk = ?""",
            (
                _unless_large(final.response_json),
                base.turn_digest(final),
                _unless_large(final.stream_events_json),
                pk,
            ),
        )
        _write_large_json(conn, pk, final)
        conn.execute("DELETE FROM response_items WHERE response_pk = ?", (pk,))
        _insert_response_items(conn, pk, final)
        return PutTurnResult(stored, False, 0)

    async def cancel_job(self, tenant: str, turn: Turn, cancel_event: bytes) -> CancelResult:
        return await self._write(self._cancel_job, tenant, turn, cancel_event)

    def _cancel_job(
        self, conn: sqlite3.Connection, tenant: str, turn: Turn, cancel_event: bytes
    ) -> CancelResult:
        state = _job_state(conn, tenant, turn.id, base.now_us())
        if state is None:
            raise errors.response_not_found(turn.id)
        if not state.running:
            return CancelResult(_load_turn(conn, state.pk), False)
        if not state.has_job:
            raise errors.not_background(turn.id)
        if cancel_event:
            last = _last_sequence(conn, state.pk)
            conn.execute(
                "INSERT INTO response_events (response_pk, seq, json) VALUES (?, ?, ?)",
                (state.pk, last + 1, base.stamped(cancel_event, last + 1)),
            )
        final = replace(turn, stream_events_json=_joined_log(conn, state.pk))
        result = self._put_final(conn, tenant, state.pk, final)
        conn.execute(
            "UPDATE background_jobs SET done = 1, cancelled = 1 WHERE response_pk = ?",
            (state.pk,),
        )
        return CancelResult(result.turn, True)

    async def read_events(
        self, tenant: str, response_id: str, *, after: int, limit: int
    ) -> EventPage:
        return await self._read(_read_events, tenant, response_id, after, limit)


# --- background jobs: statements (all run inside a transaction) ------------------------------


def _column_exists(conn: sqlite3.Connection, statement: str) -> bool:
    """Whether ``statement`` adds a column that is already there (a store set back to an older
    version by hand keeps its columns; SQLite has no ADD COLUMN IF NOT EXISTS)."""
    added = _ADD_COLUMN.match(statement)
    if added is None:
        return False
    table, column = added.groups()
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")


def _intact_chain(
    conn: sqlite3.Connection, tenant: str, previous_id: str, now: int
) -> tuple[int, int | None]:
    """Raises HISTORY_BROKEN unless the chain behind the live response ``previous_id`` is whole
    (base.check_chain); returns what a turn chained on it stores of its chain: the deletion
    count at which the chain was whole, and the earliest expiry in it (None: none expires).

    A response stored with require_intact_chain keeps both. While no response was deleted since
    (the count is the same) and none of the chain has expired, the chain is still whole, without
    a walk: its rows are still there, and a link (id, previous id, pk) never changes. Any
    deletion (the trigger counts it, whatever deleted the row) or expiry means a walk."""
    mark = conn.execute(CHAIN_MARK_SQL, {"tenant": tenant, "id": previous_id, "now": now})
    row = mark.fetchone()
    if row is not None:
        previous, whole_at, chain_expire, expire, deletions = row
        if not previous:  # a first turn is a whole chain by itself
            return deletions, expire
        if whole_at == deletions and (chain_expire is None or chain_expire > now):
            return deletions, chain_expire
    links = conn.execute(CHAIN_LINKS_SQL, {"tenant": tenant, "id": previous_id, "now": now})
    chain = links.fetchall()
    base.check_chain(previous_id, [(rid, prev) for rid, prev, _ in chain])
    deletions = conn.execute("SELECT n FROM response_deletions").fetchone()[0]
    earliest: int | None = None
    for _, _, expire in chain:
        earliest = _earliest(earliest, expire)
    return deletions, earliest


def _earliest(a: int | None, b: int | None) -> int | None:
    """The earlier of two expiry times, None being never."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _job_state(
    conn: sqlite3.Connection, tenant: str, response_id: str, now: int
) -> JobState | None:
    row = conn.execute(_JOB_STATE_SQL, {"tenant": tenant, "id": response_id, "now": now}).fetchone()
    if row is None:
        return None
    pk, running, has_job, token, done, cancelled, finished, owner = row
    if not has_job:
        return JobState(pk, bool(running), False)
    return JobState(pk, bool(running), True, token, bool(done), bool(cancelled), finished, owner)


def _live_conversation(
    conn: sqlite3.Connection, tenant: str, conversation_id: str, now: int
) -> bool:
    return (
        conn.execute(
            f"SELECT 1 FROM conversations WHERE tenant = :tenant AND id = :id AND {LIVE}",
            {"tenant": tenant, "id": conversation_id, "now": now},
        ).fetchone()
        is not None
    )


def _last_sequence(conn: sqlite3.Connection, response_pk: int) -> int:
    row = conn.execute(
        "SELECT coalesce(max(seq), -1) FROM response_events WHERE response_pk = ?", (response_pk,)
    ).fetchone()
    return int(row[0])


def _load_job(conn: sqlite3.Connection, response_pk: int) -> Job:
    row = conn.execute(
        """SELECT response_pk, tenant, response_id, spec, lease_token, owner, lease_expire_us,
            create_time_us FROM background_jobs WHERE response_pk = ?""",
        (response_pk,),
    ).fetchone()
    return _job(conn, row)


def _job(conn: sqlite3.Connection, row: Sequence[Any]) -> Job:
    return Job(
        tenant=row[1],
        response_id=row[2],
        spec=row[3],
        lease_token=row[4],
        owner=row[5],
        lease_expire_us=row[6],
        last_sequence=_last_sequence(conn, row[0]),
        create_time_us=row[7],
    )


def _claim_job(
    conn: sqlite3.Connection, tenant: str, owner: str, lease_us: int, request_id: str
) -> Job | None:
    first = conn.execute(
        """SELECT c.response_pk FROM background_claims c
        JOIN background_jobs j ON j.response_pk = c.response_pk
        WHERE c.claim_id = ? AND j.lease_token = c.lease_token AND j.done = 0""",
        (request_id,),
    ).fetchone()
    if first is not None:
        return _load_job(conn, first[0])
    now = base.now_us()
    row = conn.execute(
        CLAIM_SQL, {"tenant": tenant, "owner": owner, "expire": now + lease_us, "now": now}
    ).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM background_claims WHERE response_pk = ?", (row[0],))
    conn.execute(
        "INSERT OR REPLACE INTO background_claims (claim_id, response_pk, lease_token) "
        "VALUES (?, ?, ?)",
        (request_id, row[0], row[4]),
    )
    return _job(conn, row)


def _renew_lease(
    conn: sqlite3.Connection, tenant: str, response_id: str, lease_token: int, lease_us: int
) -> Renewal:
    now = base.now_us()
    state = _job_state(conn, tenant, response_id, now)
    if state is not None and state.cancelled:
        return Renewal(0, True)
    state = base.check_holder(state, response_id, lease_token)
    conn.execute(
        "UPDATE background_jobs SET lease_expire_us = ? WHERE response_pk = ?",
        (now + lease_us, state.pk),
    )
    return Renewal(now + lease_us, False)


def _insert_events(
    conn: sqlite3.Connection, response_pk: int, response_id: str, events: Sequence[Event]
) -> int:
    """Appends the events not in the log yet (base.new_events); returns the last sequence."""
    last = _last_sequence(conn, response_pk)
    if not events:
        return last
    stored = dict(
        conn.execute(
            "SELECT seq, json FROM response_events WHERE response_pk = ? AND seq BETWEEN ? AND ?",
            (response_pk, events[0].sequence, events[-1].sequence),
        ).fetchall()
    )
    fresh = base.new_events(response_id, last, stored, events)
    conn.executemany(
        "INSERT INTO response_events (response_pk, seq, json) VALUES (?, ?, ?)",
        [(response_pk, e.sequence, e.json) for e in fresh],
    )
    return max(last, events[-1].sequence)


def _append_events(
    conn: sqlite3.Connection,
    tenant: str,
    response_id: str,
    lease_token: int,
    events: Sequence[Event],
) -> int:
    state = base.check_holder(
        _job_state(conn, tenant, response_id, base.now_us()), response_id, lease_token
    )
    return _insert_events(conn, state.pk, response_id, events)


def _joined_log(conn: sqlite3.Connection, response_pk: int) -> bytes:
    return base.joined_log(
        row[0]
        for row in conn.execute(
            "SELECT json FROM response_events WHERE response_pk = ? ORDER BY seq", (response_pk,)
        )
    )


def _read_events(
    conn: sqlite3.Connection, tenant: str, response_id: str, after: int, limit: int
) -> EventPage:
    state = _job_state(conn, tenant, response_id, base.now_us())
    if state is None:
        raise errors.response_not_found(response_id)
    if state.running and not state.has_job:
        raise errors.not_background(response_id)
    rows = conn.execute(
        """SELECT seq, json FROM response_events WHERE response_pk = ? AND seq > ?
        ORDER BY seq LIMIT ?""",
        (state.pk, after, limit),
    ).fetchall()
    return EventPage([Event(seq, data) for seq, data in rows], not state.running)


# --- statements shared by the functions above (all run inside a transaction) ----------------

_CONVERSATION_COLUMNS = "id, metadata, version, create_time_us, expire_time_us"


def _conversation(row: Sequence[Any]) -> Conversation:
    return Conversation(
        id=row[0],
        metadata=orjson.loads(row[1]),
        version=row[2],
        create_time_us=row[3],
        expire_time_us=row[4],
    )


def _dump_metadata(metadata: Mapping[str, str]) -> str:
    return orjson.dumps(dict(metadata), option=orjson.OPT_SORT_KEYS).decode()


def _find_conversation(conn: sqlite3.Connection, tenant: str, conversation_id: str) -> Conversation:
    row = conn.execute(
        f"""SELECT {_CONVERSATION_COLUMNS} FROM conversations
        WHERE tenant = :tenant AND id = :id AND {LIVE}""",
        {"tenant": tenant, "id": conversation_id, "now": base.now_us()},
    ).fetchone()
    if row is None:
        raise errors.conversation_not_found(conversation_id)
    return _conversation(row)


def _find_conversation_by_request(
    conn: sqlite3.Connection, tenant: str, request_id: str
) -> Conversation:
    row = conn.execute(
        f"""SELECT {_CONVERSATION_COLUMNS} FROM conversations
        WHERE tenant = :tenant AND request_id = :request_id AND request_id <> '' AND {LIVE}""",
        {"tenant": tenant, "request_id": request_id, "now": base.now_us()},
    ).fetchone()
    if row is None:
        raise errors.request_not_found(request_id)
    return _conversation(row)


def _conversation_key(
    conn: sqlite3.Connection, tenant: str, conversation_id: str, now: int
) -> tuple[int, int]:
    """The live conversation's pk and version."""
    row = conn.execute(
        f"SELECT pk, version FROM conversations WHERE tenant = :tenant AND id = :id AND {LIVE}",
        {"tenant": tenant, "id": conversation_id, "now": now},
    ).fetchone()
    if row is None:
        raise errors.conversation_not_found(conversation_id)
    return row[0], row[1]


def _turn_conversation(
    conn: sqlite3.Connection, tenant: str, turn: Turn, expected: int | None, now: int
) -> tuple[int, int] | None:
    """The turn's live conversation as (pk, version after the turn), checked against
    ``expected``; None for a turn outside a conversation. A running turn appends nothing."""
    if not turn.conversation_id:
        return None
    pk, version = _conversation_key(conn, tenant, turn.conversation_id, now)
    base.check_version(turn.conversation_id, expected, version)
    if not turn.in_progress:
        version += len(turn.input_items) + len(turn.output_items)
    return pk, version


def _first_existing(conn: sqlite3.Connection, conversation_pk: int, items: Sequence[Item]) -> str:
    for item in items:
        if conn.execute(
            "SELECT 1 FROM conversation_items WHERE conversation_pk = ? AND item_id = ?",
            (conversation_pk, item.id),
        ).fetchone():
            return item.id
    return items[0].id


def _insert_response_items(conn: sqlite3.Connection, response_pk: int, turn: Turn) -> None:
    conn.executemany(
        """INSERT INTO response_items (response_pk, kind, position, item_id, json, json_at)
        VALUES (?, ?, ?, ?, ?, ?)""",
        [
            (
                response_pk,
                kind,
                position,
                item.id,
                _unless_large(item.json),
                _large_value(conn, item.json, response_pk=response_pk),
            )
            for kind, items in enumerate((turn.input_items, turn.output_items))
            for position, item in enumerate(items, 1)
        ],
    )


# A value this large (a long answer's JSON) is written by _large_value, not bound with its row.
LARGE_JSON_BYTES = 256 * 1024
# The most bytes written to a large value at once.
_LARGE_PIECE_BYTES = 256 * 1024
# The writer connection's page cache while it writes a large value, in KiB (see _large_value).
_LARGE_WRITE_CACHE_KIB = 256


def _unless_large(data: bytes | memoryview) -> bytes | memoryview:
    """``data``, or an empty value when it is large (written by _large_value instead)."""
    return b"" if len(data) >= LARGE_JSON_BYTES else data


def _large_value(
    conn: sqlite3.Connection,
    data: bytes | memoryview,
    *,
    response_pk: int | None = None,
    conversation_pk: int | None = None,
) -> int | None:
    """Writes ``data`` into a row of large_values (a response's: ``response_pk``) or of
    conversation_large_values (a conversation's item: ``conversation_pk``) when it is large,
    and returns that row's pk (None when it is not large: it is bound with its own row).

    A value bound to a statement is copied by sqlite3 and again by SQLite as it builds the row,
    so that a long answer was held three times while it was written. Here the row is inserted
    holding ``zeroblob(n)`` (a blob at the end of its row is never made in memory) and filled in
    pieces through incremental blob I/O, from the caller's buffer. Its pages go through the
    connection's page cache, which is made small meanwhile (dirty pages beyond it go to the WAL
    before the commit): else it would grow by the value's size too, up to its bound."""
    if len(data) < LARGE_JSON_BYTES:
        return None
    if response_pk is not None:
        table, owner_column, owner = "large_values", "response_pk", response_pk
    else:
        assert conversation_pk is not None
        table, owner_column, owner = "conversation_large_values", "conversation_pk", conversation_pk
    cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    conn.execute(f"PRAGMA cache_size = {-_LARGE_WRITE_CACHE_KIB}")
    try:
        cur = conn.execute(
            f"INSERT INTO {table} ({owner_column}, data) VALUES (?, zeroblob(?))",
            (owner, len(data)),
        )
        pk = cur.lastrowid
        assert pk is not None
        view = memoryview(data)
        with conn.blobopen(table, "data", pk) as blob:
            for start in range(0, len(view), _LARGE_PIECE_BYTES):
                blob.write(view[start : start + _LARGE_PIECE_BYTES])
    finally:
        conn.execute(f"PRAGMA cache_size = {int(cache)}")
    return pk


def _write_large_json(conn: sqlite3.Connection, pk: int, turn: Turn) -> None:
    """Writes the response JSON and event log of the row ``pk`` that _unless_large left out."""
    json_at = _large_value(conn, turn.response_json, response_pk=pk)
    events_at = _large_value(conn, turn.stream_events_json, response_pk=pk)
    if json_at is not None or events_at is not None:
        conn.execute(
            "UPDATE responses SET response_json_at = ?, stream_events_at = ? WHERE pk = ?",
            (json_at, events_at, pk),
        )


def _drop_large_values(conn: sqlite3.Connection, pk: int) -> None:
    """Deletes the large values of the response ``pk`` (before it is written anew)."""
    conn.execute("DELETE FROM large_values WHERE response_pk = ?", (pk,))
    conn.execute(
        """UPDATE responses SET response_json_at = NULL, stream_events_at = NULL
        WHERE pk = ? AND (response_json_at IS NOT NULL OR stream_events_at IS NOT NULL)""",
        (pk,),
    )


def _read_large(conn: sqlite3.Connection, table: str, pk: int) -> bytes:
    """The large value ``pk`` of ``table``, read through incremental blob I/O: sqlite3 makes
    the bytes object and SQLite copies the value's pages straight into it. Selected as a
    column, it is held twice (SQLite assembles it from its pages in a buffer of its own, which
    sqlite3 copies into bytes); read in pieces into a buffer, it would be copied again by
    whoever needs bytes (a gRPC message). The connection's page cache is made small meanwhile,
    as when it is written (see _large_value)."""
    cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    conn.execute(f"PRAGMA cache_size = {-_LARGE_WRITE_CACHE_KIB}")
    try:
        with conn.blobopen(table, "data", pk, readonly=True) as blob:
            return blob.read()
    finally:
        conn.execute(f"PRAGMA cache_size = {int(cache)}")


def _value(
    conn: sqlite3.Connection, data: bytes, at: int | None, table: str = "large_values"
) -> bytes:
    """A value as its row holds it, or the large value it points at."""
    return data if at is None else _read_large(conn, table, at)


def _read_apart(
    conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], index: int, table: str
) -> list[tuple[Any, ...]]:
    """``rows`` whose last column says where the value at ``index`` is: that value read from
    ``table`` (see _read_large) where it is a large value, and the last column dropped."""
    return [
        row[:-1]
        if row[-1] is None
        else (*row[:index], _read_large(conn, table, row[-1]), *row[index + 1 : -1])
        for row in rows
    ]


def _load_turn(conn: sqlite3.Connection, pk: int, *, with_items: bool = True) -> Turn:
    """The response ``pk`` with its items (without: none), its large values read through blob
    I/O (see _read_large)."""
    head = """SELECT id, previous_response_id, conversation_id, idempotency_key, response_json,
        create_time_us, expire_time_us, stream_events_json, in_progress, response_json_at,
        stream_events_at
    FROM responses WHERE pk = ?"""
    items = """SELECT kind, position, item_id, json, json_at FROM response_items
    WHERE response_pk = ? ORDER BY kind, position"""
    row = conn.execute(head, (pk,)).fetchone()
    groups: tuple[list[Item], list[Item]] = ([], [])
    for kind, position, item_id, data, at in conn.execute(items, (pk,)) if with_items else ():
        groups[kind].append(
            Item(
                id=item_id,
                json=_value(conn, data, at),
                sequence=position,
                create_time_us=row[5],
            )
        )
    return Turn(
        id=row[0],
        previous_response_id=row[1],
        conversation_id=row[2],
        idempotency_key=row[3],
        response_json=_value(conn, row[4], row[9]),
        create_time_us=row[5],
        expire_time_us=row[6],
        stream_events_json=_value(conn, row[7], row[10]),
        in_progress=bool(row[8]),
        input_items=tuple(groups[0]),
        output_items=tuple(groups[1]),
    )


def _list_items(
    conn: sqlite3.Connection,
    tenant: str,
    conversation_id: str,
    descending: bool,
    limit: int,
    after_sequence: int | None,
    after_item_id: str,
) -> ItemPage:
    pk, _ = _conversation_key(conn, tenant, conversation_id, base.now_us())
    if after_sequence is None and after_item_id:
        row = conn.execute(
            "SELECT seq FROM conversation_items WHERE conversation_pk = ? AND item_id = ?",
            (pk, after_item_id),
        ).fetchone()
        if row is None:
            raise errors.item_not_found(conversation_id, after_item_id)
        after_sequence = row[0]
    if descending:
        where, order = "seq < ?", "DESC"
        bound = (1 << 62) if after_sequence is None else after_sequence
    else:
        where, order = "seq > ?", "ASC"
        bound = 0 if after_sequence is None else after_sequence
    rows = conn.execute(
        f"""SELECT seq, item_id, json, create_time_us, json_at FROM conversation_items
        WHERE conversation_pk = ? AND {where} ORDER BY seq {order} LIMIT ?""",
        (pk, bound, limit + 1),
    ).fetchall()
    items = [
        Item(
            id=r[1],
            json=_value(conn, r[2], r[4], "conversation_large_values"),
            sequence=r[0],
            create_time_us=r[3],
        )
        for r in rows[:limit]
    ]
    return ItemPage(items, len(rows) > limit)


def _get_items(conn: sqlite3.Connection, tenant: str, item_ids: Sequence[str]) -> dict[str, Item]:
    rows = conn.execute(
        ITEMS_SQL,
        {"ids": orjson.dumps(list(item_ids)).decode(), "tenant": tenant, "now": base.now_us()},
    ).fetchall()
    # Each copy carries where its JSON is (in its row, or a large value) in place of it, and
    # only the copies chosen are read.
    found = base.newest_items(
        (item_id, (data, at, table), create_time_us, sequence, where, pk)
        for item_id, data, create_time_us, sequence, where, pk, at, table in rows
    )
    read = {}
    for item_id, item in found.items():
        data, at, table = cast(tuple[bytes, int | None, str], item.json)
        read[item_id] = replace(item, json=_value(conn, data, at, table))
    return read


def _get_item(conn: sqlite3.Connection, tenant: str, conversation_id: str, item_id: str) -> Item:
    row = conn.execute(
        """SELECT i.seq, i.item_id, i.json, i.create_time_us, i.json_at
        FROM conversations c LEFT JOIN conversation_items i
            ON i.conversation_pk = c.pk AND i.item_id = :item_id
        WHERE c.tenant = :tenant AND c.id = :id
            AND (c.expire_time_us IS NULL OR c.expire_time_us > :now)""",
        {"tenant": tenant, "id": conversation_id, "item_id": item_id, "now": base.now_us()},
    ).fetchone()
    if row is None:
        raise errors.conversation_not_found(conversation_id)
    if row[0] is None:
        raise errors.item_not_found(conversation_id, item_id)
    json = _value(conn, row[2], row[4], "conversation_large_values")
    return Item(id=row[1], json=json, sequence=row[0], create_time_us=row[3])


def _delete_item(
    conn: sqlite3.Connection, tenant: str, conversation_id: str, item_id: str
) -> Conversation:
    pk, _ = _conversation_key(conn, tenant, conversation_id, base.now_us())
    gone = conn.execute(
        """DELETE FROM conversation_items WHERE conversation_pk = ? AND item_id = ?
        RETURNING json_at""",
        (pk, item_id),
    ).fetchall()
    if not gone:
        raise errors.item_not_found(conversation_id, item_id)
    if gone[0][0] is not None:
        conn.execute(
            "DELETE FROM conversation_large_values WHERE pk = ? AND conversation_pk = ?",
            (gone[0][0], pk),
        )
    return _find_conversation(conn, tenant, conversation_id)


def _get_compaction(conn: sqlite3.Connection, tenant: str, compaction_id: str) -> Compaction:
    row = conn.execute(
        f"""SELECT summary, create_time_us, expire_time_us FROM compactions
        WHERE tenant = :tenant AND id = :id AND {LIVE}""",
        {"tenant": tenant, "id": compaction_id, "now": base.now_us()},
    ).fetchone()
    if row is None:
        raise errors.compaction_not_found(compaction_id)
    return Compaction(compaction_id, bytes(row[0]), row[1], row[2])


def _sweep_batch(conn: sqlite3.Connection, table: str, batch: int) -> int:
    # Items go with their parent row through ON DELETE CASCADE.
    cur = conn.execute(
        f"""DELETE FROM {table} WHERE pk IN (
            SELECT pk FROM {table} WHERE expire_time_us IS NOT NULL AND expire_time_us <= ?
            LIMIT ?)""",
        (base.now_us(), batch),
    )
    return cur.rowcount
