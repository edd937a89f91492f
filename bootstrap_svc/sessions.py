"""Execution sessions of the reference bootstrap service.

A session is one private working directory (mode 0700) with an id: ``cntr_...`` for a
code_interpreter container, ``sess_...`` for a shell. A session is reused across the turns of one
conversation, or of one previous_response_id chain (every response id a session served is
remembered), expires after ``idle_ttl_s`` without use, and is removed when its conversation or chain
is released. A tenant holds at most ``max_sessions_per_tenant`` live sessions.

The registry of sessions, and the PrepareTools results kept for replays, live in a small SQLite
file in the work folder, so both survive a restart of the service: a reused session keeps its files.
One process owns a work folder at a time (an exclusive lock enforces it).

Every registry change runs synchronously on the event loop, without an await in the middle, so
concurrent calls never see half of one another's changes and need no locks; a registry operation
is a few SQLite statements on a local file. Only removing directories (which may be large) runs in
a thread, after the rows are gone.
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

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
LOCK_FILE = "registry.lock"
KIND_PREFIX = {"code_interpreter": "cntr_", "shell": "sess_"}
_SESSION_NAME = re.compile(r"^(cntr|sess)_[0-9a-f]{32}$")

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
"""


class SessionError(Exception):
    """A PrepareTools call the registry refuses; ``reason`` is the ErrorInfo reason."""

    reason = "SESSION_ERROR"


class SessionLimit(SessionError):
    """The tenant already holds its maximum of live sessions."""

    reason = "SESSION_LIMIT"


class SessionGone(SessionError):
    """A session the request names explicitly expired, was released or never existed."""

    reason = "SESSION_GONE"


class RequestConflict(SessionError):
    """The request_id was used before with different content."""

    reason = "REQUEST_ID_CONFLICT"


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


@dataclass(frozen=True)
class Claim:
    """One tool kind a request needs a session for; ``container`` names a session to reuse."""

    kind: str
    container: str = ""


@dataclass(frozen=True)
class Scope:
    """Where a request belongs: the ids that decide which sessions it reuses."""

    conversation_id: str = ""
    previous_response_id: str = ""
    response_id: str = ""


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
        self._reconcile()

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)

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
        row = self._db.execute(
            "SELECT fingerprint, result, created_at FROM requests WHERE tenant = ? AND request_id = ?",
            (tenant, request_id),
        ).fetchone()
        if row is not None and row[2] >= now - self.replay_ttl_s:
            if bytes(row[0]) != fingerprint:
                raise RequestConflict(
                    f"request_id {request_id!r} was used before with different content"
                )
            return bytes(row[1]), True
        created: list[Session] = []
        try:
            with self._transaction():
                if row is not None:
                    self._db.execute(
                        "DELETE FROM requests WHERE tenant = ? AND request_id = ?",
                        (tenant, request_id),
                    )
                sessions = self._resolve(tenant, claims, scope, now, created)
                for session in created:
                    os.mkdir(session.directory, 0o700)
                    # mkdir's mode is filtered by the umask; the directory must be private anyway.
                    os.chmod(session.directory, 0o700)
                if scope.response_id:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                        [(tenant, scope.response_id, s.kind, s.id) for s in sessions],
                    )
                result = render(sessions)
                self._db.execute(
                    "INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                    (tenant, request_id, fingerprint, result, now),
                )
        except BaseException:
            for session in created:
                shutil.rmtree(session.directory, ignore_errors=True)
            raise
        return result, False

    def _resolve(
        self, tenant: str, claims: Sequence[Claim], scope: Scope, now: float, created: list[Session]
    ) -> list[Session]:
        live_after = now - self.idle_ttl_s
        found: list[Session | None] = []
        for claim in claims:
            if claim.container:
                session = self._find(
                    "id = ? AND tenant = ? AND kind = ?",
                    (claim.container, tenant, claim.kind),
                    live_after,
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
                    live_after,
                )
            elif scope.previous_response_id:
                session = self._find(
                    "id = (SELECT session_id FROM responses "
                    "WHERE tenant = ? AND response_id = ? AND kind = ?)",
                    (tenant, scope.previous_response_id, claim.kind),
                    live_after,
                )
            else:
                session = None
            found.append(session)
        missing = sum(1 for s in found if s is None)
        if missing:
            (live,) = self._db.execute(
                "SELECT count(*) FROM sessions WHERE tenant = ? AND last_used >= ?",
                (tenant, live_after),
            ).fetchone()
            if live + missing > self.max_sessions_per_tenant:
                raise SessionLimit(
                    f"tenant holds {live} live sessions; at most "
                    f"{self.max_sessions_per_tenant} are allowed"
                )
        sessions: list[Session] = []
        for claim, old in zip(claims, found, strict=True):
            if old is None:
                session_id = KIND_PREFIX[claim.kind] + secrets.token_hex(16)
                session = Session(
                    id=session_id,
                    tenant=tenant,
                    kind=claim.kind,
                    conversation_id=scope.conversation_id,
                    directory=os.path.join(self.workdir, session_id),
                    last_used=now,
                    expire_at=now + self.idle_ttl_s,
                )
                self._db.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                    (session.id, tenant, claim.kind, scope.conversation_id, now, now),
                )
                created.append(session)
            else:
                self._db.execute("UPDATE sessions SET last_used = ? WHERE id = ?", (now, old.id))
                session = Session(
                    id=old.id,
                    tenant=tenant,
                    kind=old.kind,
                    conversation_id=old.conversation_id,
                    directory=old.directory,
                    last_used=now,
                    expire_at=now + self.idle_ttl_s,
                )
            sessions.append(session)
        return sessions

    def _find(self, where: str, args: tuple[str, ...], live_after: float) -> Session | None:
        row = self._db.execute(
            "SELECT id, tenant, kind, conversation_id, last_used FROM sessions "
            f"WHERE {where} AND last_used >= ? ORDER BY last_used DESC LIMIT 1",
            (*args, live_after),
        ).fetchone()
        return None if row is None else self._session(row)

    def _session(self, row: tuple[str, str, str, str, float]) -> Session:
        return Session(
            id=row[0],
            tenant=row[1],
            kind=row[2],
            conversation_id=row[3],
            directory=os.path.join(self.workdir, row[0]),
            last_used=row[4],
            expire_at=row[4] + self.idle_ttl_s,
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
        """Removes the sessions idle for longer than idle_ttl_s and the replay records older than
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
        ids = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM sessions WHERE last_used < ?", (now - self.idle_ttl_s,)
            )
        ]
        self._forget(ids)
        self._db.execute("DELETE FROM requests WHERE created_at < ?", (now - self.replay_ttl_s,))
        return ids

    def _forget(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._transaction():
            self._db.executemany("DELETE FROM responses WHERE session_id = ?", [(i,) for i in ids])
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])

    async def _remove_dirs(self, ids: set[str] | list[str]) -> None:
        for session_id in ids:
            await asyncio.to_thread(
                shutil.rmtree, os.path.join(self.workdir, session_id), ignore_errors=True
            )

    # -- inspection and start-up ---------------------------------------------------------------

    def live_sessions(self, tenant: str) -> list[Session]:
        """The tenant's live sessions, most recently used first."""
        rows = self._db.execute(
            "SELECT id, tenant, kind, conversation_id, last_used FROM sessions "
            "WHERE tenant = ? AND last_used >= ? ORDER BY last_used DESC",
            (tenant, self._clock() - self.idle_ttl_s),
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
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
