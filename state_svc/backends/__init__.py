"""Storage backends of the state service, chosen by ``settings.backend``.

Drivers are imported lazily, so a SQLite deployment needs no PostgreSQL driver installed.
"""

from __future__ import annotations

from state_svc.backends.base import Backend
from state_svc.config import StateSettings

__all__ = ["BACKENDS", "Backend", "open_backend"]

BACKENDS = ("sqlite", "postgres", "memory")


async def open_backend(settings: StateSettings) -> Backend:
    """Opens (and creates or migrates) the backend ``settings`` name."""
    if settings.backend == "sqlite":
        from state_svc.backends.sqlite import SqliteBackend

        return await SqliteBackend(
            settings.sqlite_path,
            retention_s=settings.retention_s,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_s=settings.sqlite_busy_timeout_s,
        ).open()
    if settings.backend == "postgres":
        if not settings.postgres_dsn:
            raise ValueError("backend postgres needs a DSN (--postgres-dsn)")
        from state_svc.backends.postgres import PostgresBackend

        return await PostgresBackend(
            settings.postgres_dsn,
            schema=settings.postgres_schema,
            pool_size=settings.postgres_pool_size,
            retention_s=settings.retention_s,
        ).open()
    if settings.backend == "memory":
        from state_svc.backends.memory import MemoryBackend

        return MemoryBackend(retention_s=settings.retention_s)
    raise ValueError(f"unknown backend {settings.backend!r}: choose one of {', '.join(BACKENDS)}")
