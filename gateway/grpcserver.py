"""A grpc.aio server with what every gateway service needs: health checking, reflection,
message size limits, a maximum connection age (so clients behind a headless Service re-resolve)
and a graceful stop (health turns NOT_SERVING, in-flight calls finish, new calls get UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A client channel retries a lost connection after 100 ms, then at most every second (plus gRPC's
# 20% jitter): a service that comes back is used again within about 1.2 s.
RECONNECT_BACKOFF_MIN_MS = 100
RECONNECT_BACKOFF_MAX_MS = 1_000


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[tuple[str, int | str]]:
    """Options for a client channel to a gateway service: matching size limits, keepalive,
    client-side round robin over every address the target resolves to, and a reconnect back-off
    capped at one second (gRPC's default grows to two minutes, so after a long outage a channel
    would stay down for up to that long after the service came back; a gateway service is on the
    same network, and one connection attempt a second costs nothing)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MIN_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MIN_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


def server_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_connection_age_s: float = 300.0
) -> list[tuple[str, int]]:
    opts: list[tuple[str, int]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]
    if max_connection_age_s > 0:
        opts.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
        opts.append(("grpc.max_connection_age_grace_ms", 30_000))
    return opts


class GrpcServer:
    """Owns one grpc.aio server and its health service.

    ``register`` adds the service's servicers; ``service_names`` are the full names reported by
    health checking (and reflection), for example ``respgw.state.v1.StateService``.
    """

    def __init__(
        self,
        listen: str,
        register: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_connection_age_s: float = 300.0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._listen = listen
        self._service_names = list(service_names)
        self._server = grpc.aio.server(
            options=server_options(max_message_bytes, max_connection_age_s),
            interceptors=list(interceptors),
        )
        register(self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port = 0

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port (useful with ``:0``)."""
        self.port = self._server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {self._listen}")
        await self._server.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC server listening", extra={"listen": self._listen, "port": self.port})
        return self.port

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful stop: NOT_SERVING first, then in-flight calls get ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def serve_until_signal(self, grace: float = 10.0) -> None:
        """Serves until SIGTERM or SIGINT, then stops gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"grace_s": grace})
        await self.stop(grace)
