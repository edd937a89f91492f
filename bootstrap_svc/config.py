"""Settings of the reference bootstrap service (flags and RESPGW_BOOTSTRAP_* variables)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import ServerSettings, option


@dataclass(frozen=True)
class BootstrapSettings(ServerSettings):
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
    sandbox_bwrap: str = option(
        "bwrap",
        "The bubblewrap program that sandboxes every call (Debian package bubblewrap).",
        env="RESPGW_BOOTSTRAP_SANDBOX_BWRAP",
    )
    sandbox_python: str = option(
        "",
        "The Python interpreter code_interpreter calls run in, under /usr; empty picks "
        "/usr/local/bin/python3 or /usr/bin/python3.",
        env="RESPGW_BOOTSTRAP_SANDBOX_PYTHON",
    )
    sandbox_uid_base: int = option(
        200_000,
        "When the service runs as root, each session's processes run as uid base+n (a uid of "
        "their own per session, so one session's process limit counts its processes only).",
        env="RESPGW_BOOTSTRAP_SANDBOX_UID_BASE",
    )
    call_timeout_s: float = option(
        60.0,
        "Wall-clock limit of one Python call or one shell command, unless the call asks for less "
        "(or for more, up to --max-call-timeout-s).",
        env="RESPGW_BOOTSTRAP_CALL_TIMEOUT_S",
    )
    max_call_timeout_s: float = option(
        600.0,
        "The longest wall-clock limit a call may ask for.",
        env="RESPGW_BOOTSTRAP_MAX_CALL_TIMEOUT_S",
    )
    call_cpu_s: int = option(
        60,
        "CPU seconds one Python call or one shell command may use.",
        env="RESPGW_BOOTSTRAP_CALL_CPU_S",
    )
    memory_mb: int = option(
        1024,
        "Memory (address space) of each sandboxed process, in MiB, unless its session was created "
        "with another memory_limit.",
        env="RESPGW_BOOTSTRAP_MEMORY_MB",
    )
    session_memory_mb: int = option(
        1024,
        "Memory of one session's processes together, in MiB (resident and swapped, each shared "
        "page once), unless its session was created with another memory_limit: a call that "
        "passes it is stopped and its processes killed. 0 bounds each process only "
        "(--memory-mb).",
        env="RESPGW_BOOTSTRAP_SESSION_MEMORY_MB",
    )
    memory_check_ms: int = option(
        50,
        "How often a running call's processes are measured against --session-memory-mb, in ms "
        "(at least 10).",
        env="RESPGW_BOOTSTRAP_MEMORY_CHECK_MS",
    )
    max_memory_mb: int = option(
        4096,
        "The largest memory_limit a session may be created with, in MiB.",
        env="RESPGW_BOOTSTRAP_MAX_MEMORY_MB",
    )
    max_processes: int = option(
        64,
        "Processes and threads that may run at once in one session.",
        env="RESPGW_BOOTSTRAP_MAX_PROCESSES",
    )
    max_file_mb: int = option(
        256,
        "Largest file a call may write or a client upload, in MiB.",
        env="RESPGW_BOOTSTRAP_MAX_FILE_MB",
    )
    disk_mb: int = option(
        1024, "Total size of one session's files, in MiB.", env="RESPGW_BOOTSTRAP_DISK_MB"
    )
    max_output_kb: int = option(
        1024,
        "Output kept per stream (stdout, stderr) of one call or command, in KiB; more is dropped.",
        env="RESPGW_BOOTSTRAP_MAX_OUTPUT_KB",
    )
    max_concurrent_calls: int = option(
        8,
        "Calls that run at once in all sessions; more wait their turn.",
        env="RESPGW_BOOTSTRAP_MAX_CONCURRENT_CALLS",
    )
    max_idle_ttl_s: float = option(
        86400.0,
        "The longest idle TTL a session may be created with (Containers API expires_after).",
        env="RESPGW_BOOTSTRAP_MAX_IDLE_TTL_S",
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
