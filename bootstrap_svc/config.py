"""Settings of the reference bootstrap service (flags and RESPGW_BOOTSTRAP_* variables)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import option


@dataclass(frozen=True)
class BootstrapSettings:
    listen: str = option(
        "127.0.0.1:50052",
        "Address the gRPC server binds (host:port; port 0 picks a free one).",
        env="RESPGW_BOOTSTRAP_LISTEN",
    )
    workdir: str = option(
        "respgw-sessions",
        "Folder under which each execution session gets its own working directory.",
        env="RESPGW_BOOTSTRAP_WORKDIR",
    )
    idle_ttl_s: float = option(
        1200.0,
        "Seconds an unused execution session lives before it is released.",
        env="RESPGW_BOOTSTRAP_IDLE_TTL_S",
    )
    max_sessions_per_tenant: int = option(
        16,
        "Most live execution sessions one tenant may hold; more is RESOURCE_EXHAUSTED.",
        env="RESPGW_BOOTSTRAP_MAX_SESSIONS_PER_TENANT",
    )
    replay_ttl_s: float = option(
        900.0,
        "Seconds a PrepareTools result is kept for replays of its request_id (the contract asks "
        "for at least 600).",
        env="RESPGW_BOOTSTRAP_REPLAY_TTL_S",
    )
    max_message_bytes: int = option(
        16 * 1024 * 1024,
        "Largest gRPC message the server sends or accepts, in bytes.",
        env="RESPGW_BOOTSTRAP_MAX_MESSAGE_BYTES",
    )
    max_connection_age_s: float = option(
        300.0,
        "Seconds after which the server asks a client to reconnect; 0 disables.",
        env="RESPGW_BOOTSTRAP_MAX_CONNECTION_AGE_S",
    )
    shutdown_grace_s: float = option(
        10.0,
        "Seconds in-flight calls get to finish on SIGTERM.",
        env="RESPGW_BOOTSTRAP_SHUTDOWN_GRACE_S",
    )
    metrics_port: int = option(
        9091,
        "Port of the Prometheus /metrics HTTP endpoint; 0 disables it.",
        env="RESPGW_BOOTSTRAP_METRICS_PORT",
    )
    metrics_host: str = option(
        "",
        "Address the /metrics endpoint binds; empty means the host of --listen, so metrics are "
        "reachable exactly where the gRPC server is.",
        env="RESPGW_BOOTSTRAP_METRICS_HOST",
    )
    otel_endpoint: str = option(
        "",
        "OTLP/gRPC endpoint that receives OpenTelemetry traces (e.g. http://otel-collector:4317); "
        "empty turns tracing off. Needs the 'tracing' extra installed; without it the service "
        "logs an error and runs untraced.",
        env="RESPGW_OTEL_ENDPOINT",
    )
    log_level: str = option("info", "Log level.", env="RESPGW_LOG_LEVEL")
    log_format: str = option("json", "Log format: json or text.", env="RESPGW_LOG_FORMAT")
