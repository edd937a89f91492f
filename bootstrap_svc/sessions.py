"""Execution sessions of the reference bootstrap service.

A session is one private working directory (mode 0700) with an id: ``cntr_...`` for a
code_interpreter container, ``sess_...`` for a shell. A session is reused across the turns of one
conversation, or of one previous_response_id chain (every response id a session served is
remembered), expires after its idle TTL without use (``idle_ttl_s``, or the TTL it was created
with through the Containers API), and is removed when its conversation or chain is released or
it is deleted. A tenant holds at most ``max_sessions_per_tenant`` live sessions. A shell whose
environment is a ``container_reference`` runs in that container, of either kind.

The registry of sessions, their files' ids, and the results kept for replays live in a small
SQLite file in the work folder, so all of it survives a restart of the service: a reused session
keeps its files. One process owns a work folder at a time (an exclusive lock enforces it).

Every registry change runs synchronously on the event loop, without an await in the middle, so
concurrent calls never see half of one another's changes and need no locks; a registry operation
is a few SQLite statements on a local file. Only removing directories (which may be large) runs in
a thread, after the rows are gone. Whoever runs code in the sessions subscribes to
:attr:`SessionStore.on_forget` to stop it when a session goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from bootstrap_svc.errors import RequestConflict, SessionGone, SessionLimit

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
LOCK_FILE = "registry.lock"
KIND_PREFIX = {"code_interpreter": "cntr_", "shell": "sess_"}
_SESSION_NAME = re.compile(r"^(cntr|sess)_[0-9a-f]{32}$")
# Sessions that run code as a uid of their own use these many uids at most.
MAX_SLOTS = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_scope ON sessions (tenant, conversation_id, kind);
CREATE TABLE IF NOT EXISTS responses (
    tenant TEXT NOT NULL,
    response_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    session_id TEXT NOT NULL,
    PRIMARY KEY (tenant, response_id, kind)
);
CREATE INDEX IF NOT EXISTS responses_by_session ON responses (session_id);
CREATE TABLE IF NOT EXISTS requests (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    result BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
CREATE TABLE IF NOT EXISTS files (
    session_id TEXT NOT NULL,
    path TEXT NOT NULL,
    file_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, path)
);
"""
# Columns added after the first release; a registry made before gets them on open.
_ADDED_COLUMNS = {
    "name": "TEXT NOT NULL DEFAULT ''",
    "idle_ttl_s": "REAL",  # NULL: the service's --idle-ttl-s
    "memory_bytes": "INTEGER NOT NULL DEFAULT 0",  # 0: the service's default
    "slot": "INTEGER",  # the session's uid is uid_base + slot (root mode)
    "had_python": "INTEGER NOT NULL DEFAULT 0",
}
_COLUMNS = (
    "id, tenant, kind, conversation_id, last_used, name, created_at, idle_ttl_s, memory_bytes, "
    "slot, had_python"
)


class WorkdirLocked(RuntimeError):
    """Another process already serves from this work folder."""


@dataclass(frozen=True)
class Session:
    id: str
    tenant: str
    kind: str
    conversation_id: str
    directory: str
    last_used: float
    expire_at: float
    name: str = ""
    created_at: float = 0.0
    idle_ttl_s: float = 0.0
    memory_bytes: int = 0  # 0: the service's default
    slot: int | None = None
    had_python: bool = False


@dataclass(frozen=True)
class Claim:
    """One tool kind a request needs a session for; ``container`` names a session to reuse."""

    kind: str
    container: str = ""
    # The container was named as a reference to any session (a shell's container_reference
    # environment): a code_interpreter container serves the shell too.
    any_kind: bool = False
    # The memory of a session made for this claim (an auto container's memory_limit); 0: the
    # service's default. A session found for it keeps its own.
    memory_bytes: int = 0


@dataclass(frozen=True)
class Scope:
    """Where a request belongs: the ids that decide which sessions it reuses."""

    conversation_id: str = ""
    previous_response_id: str = ""
    response_id: str = ""


@dataclass(frozen=True)
class FileRecord:
    """A file of a session as the registry knows it (its path relative to the directory)."""

    file_id: str
    path: str
    source: str  # "user" or "assistant"
    created_at: float


class SessionStore:
    """The session registry of one work folder; see the module docstring."""

    def __init__(
        self,
        workdir: str,
        *,
        idle_ttl_s: float,
        max_sessions_per_tenant: int,
        replay_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.idle_ttl_s = idle_ttl_s
        self.max_sessions_per_tenant = max_sessions_per_tenant
        self.replay_ttl_s = replay_ttl_s
        self._clock = clock
        # Called with the ids of sessions as they are forgotten (released, deleted, expired).
        self.on_forget: list[Callable[[Sequence[str]], None]] = []
        # Called with each session directory the store creates (to hand it to the session's uid).
        self.on_create: list[Callable[[Session], None]] = []
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(
            os.path.join(self.workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise WorkdirLocked(f"another process serves from {self.workdir}") from exc
        self._db = sqlite3.connect(os.path.join(self.workdir, REGISTRY_FILE), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        for column, declaration in _ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {declaration}")
        self._reconcile()

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

    def _live(self, now: float) -> tuple[str, tuple[float, float]]:
        """The SQL condition of a live session, with its parameters."""
        return "last_used + COALESCE(idle_ttl_s, ?) >= ?", (self.idle_ttl_s, now)

    # -- PrepareTools ---------------------------------------------------------------------------

    def prepare(
        self,
        *,
        tenant: str,
        request_id: str,
        fingerprint: bytes,
        claims: Sequence[Claim],
        scope: Scope,
        render: Callable[[list[Session]], bytes],
    ) -> tuple[bytes, bool]:
        """Finds or creates one session per claim and records ``render(sessions)`` as the result
        of (tenant, request_id); returns (result, replayed). A replay with the same fingerprint
        returns the recorded result and changes nothing."""
        now = self._clock()
        replay = self._replay(tenant, request_id, fingerprint, now)
        if replay is not None:
            return replay, True
        created: list[Session] = []
        try:
            with self._transaction():
                self._db.execute(
                    "DELETE FROM requests WHERE tenant = ? AND request_id = ?", (tenant, request_id)
                )
                sessions = self._resolve(tenant, claims, scope, now, created)
                self._make_dirs(created)
                if scope.response_id:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                        [
                            (tenant, scope.response_id, c.kind, s.id)
                            for c, s in zip(claims, sessions, strict=True)
                        ],
                    )
                result = render(sessions)
                self._record(tenant, request_id, fingerprint, result, now)
        except BaseException:
            for session in created:
                shutil.rmtree(session.directory, ignore_errors=True)
            raise
        return result, False

    def _replay(self, tenant: str, request_id: str, fingerprint: bytes, now: float) -> bytes | None:
        row = self._db.execute(
            "SELECT fingerprint, result, created_at FROM requests WHERE tenant = ? AND request_id = ?",
            (tenant, request_id),
        ).fetchone()
        if row is None or row[2] < now - self.replay_ttl_s:
            return None
        if bytes(row[0]) != fingerprint:
            raise RequestConflict(
                f"request_id {request_id!r} was used before with different content"
            )
        return bytes(row[1])

    def _record(
        self, tenant: str, request_id: str, fingerprint: bytes, result: bytes, now: float
    ) -> None:
        self._db.execute(
            "INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
            (tenant, request_id, fingerprint, result, now),
        )

    def _make_dirs(self, created: list[Session]) -> None:
        for session in created:
            os.mkdir(session.directory, 0o700)
            # mkdir's mode is filtered by the umask; the directory must be private anyway.
            os.chmod(session.directory, 0o700)
            for hook in self.on_create:
                hook(session)

    def _resolve(
        self, tenant: str, claims: Sequence[Claim], scope: Scope, now: float, created: list[Session]
    ) -> list[Session]:
        found: list[Session | None] = []
        for claim in claims:
            if claim.container:
                if claim.any_kind:
                    session = self._find("id = ? AND tenant = ?", (claim.container, tenant), now)
                else:
                    session = self._find(
                        "id = ? AND tenant = ? AND kind = ?",
                        (claim.container, tenant, claim.kind),
                        now,
                    )
                if session is None:
                    raise SessionGone(
                        f"{claim.kind} session {claim.container!r} does not exist, expired or "
                        "was released"
                    )
            elif scope.conversation_id:
                session = self._find(
                    "tenant = ? AND conversation_id = ? AND kind = ?",
                    (tenant, scope.conversation_id, claim.kind),
                    now,
                )
            elif scope.previous_response_id:
                session = self._find(
                    "id = (SELECT session_id FROM responses "
                    "WHERE tenant = ? AND response_id = ? AND kind = ?)",
                    (tenant, scope.previous_response_id, claim.kind),
                    now,
                )
            else:
                session = None
            found.append(session)
        self._check_quota(tenant, sum(1 for s in found if s is None), now)
        sessions: list[Session] = []
        for claim, old in zip(claims, found, strict=True):
            if old is None:
                session = self._insert(
                    tenant, claim.kind, scope.conversation_id, now, memory_bytes=claim.memory_bytes
                )
                created.append(session)
            else:
                self._db.execute("UPDATE sessions SET last_used = ? WHERE id = ?", (now, old.id))
                session = self._get(old.id)
                assert session is not None
            sessions.append(session)
        return sessions

    def _check_quota(self, tenant: str, missing: int, now: float) -> None:
        if not missing:
            return
        live, args = self._live(now)
        (count,) = self._db.execute(
            f"SELECT count(*) FROM sessions WHERE tenant = ? AND {live}", (tenant, *args)
        ).fetchone()
        if count + missing > self.max_sessions_per_tenant:
            raise SessionLimit(
                f"tenant holds {count} live sessions; at most "
                f"{self.max_sessions_per_tenant} are allowed"
            )

    def _insert(
        self,
        tenant: str,
        kind: str,
        conversation_id: str,
        now: float,
        *,
        name: str = "",
        idle_ttl_s: float | None = None,
        memory_bytes: int = 0,
    ) -> Session:
        session_id = KIND_PREFIX[kind] + secrets.token_hex(16)
        self._db.execute(
            "INSERT INTO sessions (id, tenant, kind, conversation_id, created_at, last_used, name, "
            "idle_ttl_s, memory_bytes, slot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                tenant,
                kind,
                conversation_id,
                now,
                now,
                name,
                idle_ttl_s,
                memory_bytes,
                self._free_slot(),
            ),
        )
        session = self._get(session_id)
        assert session is not None
        return session

    def _free_slot(self) -> int:
        used = {r[0] for r in self._db.execute("SELECT slot FROM sessions WHERE slot IS NOT NULL")}
        slot = 1  # slot 0 is the start-up probe's
        while slot in used:
            slot += 1
        if slot >= MAX_SLOTS:
            raise SessionLimit(f"the service holds {MAX_SLOTS} sessions already")
        return slot

    def _find(self, where: str, args: tuple[str, ...], now: float) -> Session | None:
        live, live_args = self._live(now)
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE {where} AND {live} "
            "ORDER BY last_used DESC LIMIT 1",
            (*args, *live_args),
        ).fetchone()
        return None if row is None else self._session(row)

    def _get(self, session_id: str) -> Session | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return None if row is None else self._session(row)

    def _session(self, row: tuple[object, ...]) -> Session:
        ttl = self.idle_ttl_s if row[7] is None else float(row[7])  # type: ignore[arg-type]
        last_used = float(row[4])  # type: ignore[arg-type]
        return Session(
            id=str(row[0]),
            tenant=str(row[1]),
            kind=str(row[2]),
            conversation_id=str(row[3]),
            directory=os.path.join(self.workdir, str(row[0])),
            last_used=last_used,
            expire_at=last_used + ttl,
            name=str(row[5]),
            created_at=float(row[6]),  # type: ignore[arg-type]
            idle_ttl_s=ttl,
            memory_bytes=int(row[8]),  # type: ignore[call-overload]
            slot=None if row[9] is None else int(row[9]),  # type: ignore[call-overload]
            had_python=bool(row[10]),
        )

    # -- sessions made and used directly (the execution contract) -------------------------------

    def create(
        self,
        *,
        tenant: str,
        request_id: str,
        fingerprint: bytes,
        name: str,
        idle_ttl_s: float | None,
        memory_bytes: int,
    ) -> tuple[Session, bool]:
        """Makes an empty code_interpreter session (CreateSession); returns (session, replayed).
        Idempotent on (tenant, request_id) like :meth:`prepare`."""
        now = self._clock()
        key = "create\x00" + request_id
        replay = self._replay(tenant, key, fingerprint, now)
        if replay is not None:
            session = self.get(tenant, replay.decode())
            if session is None:
                raise SessionGone(f"the session request {request_id!r} made is gone")
            return session, True
        created: list[Session] = []
        try:
            with self._transaction():
                self._db.execute(
                    "DELETE FROM requests WHERE tenant = ? AND request_id = ?", (tenant, key)
                )
                self._check_quota(tenant, 1, now)
                session = self._insert(
                    tenant,
                    "code_interpreter",
                    "",
                    now,
                    name=name,
                    idle_ttl_s=idle_ttl_s,
                    memory_bytes=memory_bytes,
                )
                created.append(session)
                self._make_dirs(created)
                self._record(tenant, key, fingerprint, session.id.encode(), now)
        except BaseException:
            for made in created:
                shutil.rmtree(made.directory, ignore_errors=True)
            raise
        return session, False

    def get(self, tenant: str, session_id: str) -> Session | None:
        """The tenant's live session of this id, if any."""
        return self._find("id = ? AND tenant = ?", (session_id, tenant), self._clock())

    def touch(self, session: Session, *, python: bool = False) -> Session:
        """Records a use of the session (its expiry moves); ``python`` records that it ran
        Python."""
        self._db.execute(
            "UPDATE sessions SET last_used = ?, had_python = (had_python OR ?) WHERE id = ?",
            (self._clock(), python, session.id),
        )
        return self._get(session.id) or session

    def ensure_slot(self, session: Session) -> int:
        """The session's slot, given one now if it has none (a session of an older registry)."""
        if session.slot is not None:
            return session.slot
        with self._transaction():
            slot = self._free_slot()
            self._db.execute("UPDATE sessions SET slot = ? WHERE id = ?", (slot, session.id))
        return slot

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Removes one live session of the tenant; False when there is none."""
        if self.get(tenant, session_id) is None:
            return False
        self._forget([session_id])
        await self._remove_dirs([session_id])
        return True

    # -- files -----------------------------------------------------------------------------------

    def files(self, session_id: str) -> dict[str, FileRecord]:
        """The registered files of a session, by relative path."""
        return {
            r[1]: FileRecord(file_id=r[0], path=r[1], source=r[2], created_at=r[3])
            for r in self._db.execute(
                "SELECT file_id, path, source, created_at FROM files WHERE session_id = ?",
                (session_id,),
            )
        }

    def register_files(
        self, session_id: str, paths: Sequence[str], source: str, *, replace_source: bool = False
    ) -> dict[str, FileRecord]:
        """Gives each path not registered yet an id (``source`` says who made it); with
        ``replace_source`` a registered path takes ``source`` too. Returns the records by path."""
        known = self.files(session_id)
        now = self._clock()
        with self._transaction():
            for path in paths:
                if path not in known:
                    self._db.execute(
                        "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                        (session_id, path, "cfile_" + secrets.token_hex(16), source, now),
                    )
                elif replace_source:
                    self._db.execute(
                        "UPDATE files SET source = ? WHERE session_id = ? AND path = ?",
                        (source, session_id, path),
                    )
        return self.files(session_id)

    def forget_files(self, session_id: str, paths: Sequence[str]) -> None:
        if paths:
            self._db.executemany(
                "DELETE FROM files WHERE session_id = ? AND path = ?",
                [(session_id, p) for p in paths],
            )

    # -- ReleaseTools, expiry ------------------------------------------------------------------

    async def release(
        self, tenant: str, *, conversation_id: str = "", response_id: str = ""
    ) -> int:
        """Removes the sessions of a conversation and/or of the chain a response belongs to;
        returns how many there were."""
        ids: set[str] = set()
        if conversation_id:
            ids.update(
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM sessions WHERE tenant = ? AND conversation_id = ?",
                    (tenant, conversation_id),
                )
            )
        if response_id:
            ids.update(
                r[0]
                for r in self._db.execute(
                    "SELECT session_id FROM responses WHERE tenant = ? AND response_id = ?",
                    (tenant, response_id),
                )
            )
        self._forget(sorted(ids))
        await self._remove_dirs(ids)
        return len(ids)

    async def sweep(self) -> int:
        """Removes the sessions idle for longer than their TTL and the replay records older than
        replay_ttl_s; returns how many sessions were removed."""
        ids = self._expire()
        await self._remove_dirs(ids)
        return len(ids)

    async def run_sweeper(self) -> None:
        """Sweeps forever, often enough that an idle session outlives its TTL only briefly."""
        interval = min(max(self.idle_ttl_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.sweep()
            except Exception:
                log.exception("sweeping expired sessions failed")
            else:
                if removed:
                    log.info("expired idle sessions", extra={"count": removed})

    def _expire(self) -> list[str]:
        now = self._clock()
        live, args = self._live(now)
        ids = [r[0] for r in self._db.execute(f"SELECT id FROM sessions WHERE NOT ({live})", args)]
        self._forget(ids)
        self._db.execute("DELETE FROM requests WHERE created_at < ?", (now - self.replay_ttl_s,))
        return ids

    def _forget(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM responses WHERE session_id = ?", [(i,) for i in ids])
            self._db.executemany("DELETE FROM files WHERE session_id = ?", [(i,) for i in ids])
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])
        for hook in self.on_forget:
            try:
                hook(ids)
            except Exception:
                log.exception("a session listener failed")

    async def _remove_dirs(self, ids: set[str] | list[str]) -> None:
        for session_id in ids:
            await asyncio.to_thread(
                shutil.rmtree, os.path.join(self.workdir, session_id), ignore_errors=True
            )

    # -- inspection and start-up ---------------------------------------------------------------

    def live_sessions(self, tenant: str) -> list[Session]:
        """The tenant's live sessions, most recently used first."""
        live, args = self._live(self._clock())
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE tenant = ? AND {live} ORDER BY last_used DESC",
            (tenant, *args),
        ).fetchall()
        return [self._session(r) for r in rows]

    def list_sessions(
        self, tenant: str, after: tuple[float, str] | None, limit: int
    ) -> list[Session]:
        """The tenant's live sessions oldest first (created_at, then id), after ``after``."""
        live, args = self._live(self._clock())
        where = ""
        extra: tuple[float | str, ...] = ()
        if after is not None:
            where, extra = (
                " AND (created_at > ? OR (created_at = ? AND id > ?))",
                (
                    after[0],
                    after[0],
                    after[1],
                ),
            )
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE tenant = ? AND {live}{where} "
            "ORDER BY created_at, id LIMIT ?",
            (tenant, *args, *extra, limit),
        ).fetchall()
        return [self._session(r) for r in rows]

    def _reconcile(self) -> None:
        """Makes the registry and the folder agree after a crash: a registered session whose
        directory is gone is forgotten, a session directory nobody registered is removed, and
        whatever expired while the service was down goes."""
        known = {r[0] for r in self._db.execute("SELECT id FROM sessions")}
        present = {n for n in os.listdir(self.workdir) if _SESSION_NAME.match(n)}
        self._forget(sorted(known - present))
        for name in present - known:
            shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)
        for name in self._expire():
            shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._db.in_transaction:  # nested: part of the caller's transaction
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
