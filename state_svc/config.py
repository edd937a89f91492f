"""Settings of the state service (flags and RESPGW_STATE_* environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import ServerSettings, option


@dataclass(frozen=True)
class StateSettings(ServerSettings):
    listen: str = option(
        "127.0.0.1:50051",
        "Address the gRPC server binds (host:port; port 0 picks a free one).",
        env="RESPGW_STATE_LISTEN",
    )
    backend: str = option(
        "sqlite",
        "Storage backend: sqlite (one file, the default), postgres, or memory "
        "(tests and development; loses everything on exit).",
        env="RESPGW_STATE_BACKEND",
    )
    sqlite_path: str = option(
        "respgw-state.db", "SQLite database file (backend sqlite).", env="RESPGW_STATE_SQLITE_PATH"
    )
    sqlite_synchronous: str = option(
        "full",
        "SQLite synchronous mode: full (an acknowledged write survives a power loss) or normal "
        "(faster; survives a process crash, may lose the last writes on a power loss).",
        env="RESPGW_STATE_SQLITE_SYNCHRONOUS",
    )
    sqlite_busy_timeout_s: float = option(
        30.0,
        "Seconds a SQLite write waits for another process's write lock before the call fails "
        "with UNAVAILABLE (safe to retry).",
        env="RESPGW_STATE_SQLITE_BUSY_TIMEOUT_S",
    )
    postgres_dsn: str = option(
        "",
        "PostgreSQL connection string, e.g. postgresql://user@host:5432/db (backend postgres).",
        env="RESPGW_STATE_POSTGRES_DSN",
    )
    postgres_schema: str = option(
        "respgw",
        "PostgreSQL schema the service creates and migrates its tables in.",
        env="RESPGW_STATE_POSTGRES_SCHEMA",
    )
    postgres_pool_size: int = option(
        10,
        "Most PostgreSQL connections per state service process.",
        env="RESPGW_STATE_POSTGRES_POOL_SIZE",
    )
    retention_s: float = option(
        0.0,
        "Seconds a stored response (and a compaction summary) stays retrievable after it was "
        "stored, and a conversation after its last append; 0 keeps them forever.",
        env="RESPGW_STATE_RETENTION_S",
    )
    sweep_interval_s: float = option(
        60.0,
        "Seconds between sweeps that delete expired responses, conversations and compaction "
        "summaries (expired ones are invisible at once either way); 0 disables the sweeper.",
        env="RESPGW_STATE_SWEEP_INTERVAL_S",
    )
    history_max_items: int = option(
        0,
        "Most items one GetHistory returns (the oldest are left out, and the reply says so); "
        "0 means no cap.",
        env="RESPGW_STATE_HISTORY_MAX_ITEMS",
    )
    watch_poll_interval_s: float = option(
        0.25,
        "Seconds between the reads of an idle WatchResponseEvents stream, which sees the events "
        "appended through other replicas this late at most (those appended through its own "
        "replica wake it at once).",
        env="RESPGW_STATE_WATCH_POLL_INTERVAL_S",
    )
    max_message_bytes: int = option(
        64 * 1024 * 1024,
        "Largest gRPC message the server sends or accepts, in bytes.",
        env="RESPGW_STATE_MAX_MESSAGE_BYTES",
    )
    max_connection_age_s: float = option(
        300.0,
        "Seconds after which the server asks a client to reconnect, so clients re-resolve "
        "and spread over new replicas; 0 disables.",
        env="RESPGW_STATE_MAX_CONNECTION_AGE_S",
    )
    shutdown_grace_s: float = option(
        10.0,
        "Seconds in-flight calls get to finish on SIGTERM.",
        env="RESPGW_STATE_SHUTDOWN_GRACE_S",
    )
    metrics_port: int = option(
        9090,
        "Port of the Prometheus /metrics HTTP endpoint; 0 disables it.",
        env="RESPGW_STATE_METRICS_PORT",
    )
    metrics_host: str = option(
        "",
        "Address the /metrics endpoint binds; empty means the host of --listen, so metrics are "
        "reachable exactly where the gRPC server is.",
        env="RESPGW_STATE_METRICS_HOST",
    )
