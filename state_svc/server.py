"""Runs the state service: the backend, the gRPC server around the servicer, and the sweeper
that deletes expired rows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any, cast

import grpc

from gateway import gctune, metrics, tracing
from gateway.grpcserver import GrpcServer
from respgw.state.v1 import state_service_pb2_grpc
from state_svc import backends, service, wire
from state_svc.backends import Backend
from state_svc.config import StateSettings

log = logging.getLogger(__name__)


@dataclass
class Running:
    """A started state service."""

    settings: StateSettings
    backend: Backend
    server: GrpcServer
    sweeper: asyncio.Task[None] | None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, in-flight calls get ``grace`` seconds, then the backend
        closes."""
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        await self.server.stop(self.settings.shutdown_grace_s if grace is None else grace)
        await self.backend.close()


async def start(settings: StateSettings) -> Running:
    """Opens the backend and starts serving on ``settings.listen``."""
    backend = await backends.open_backend(settings)
    servicer = service.StateServicer(backend, settings)
    server = GrpcServer(
        settings.listen,
        lambda s: state_service_pb2_grpc.add_StateServiceServicer_to_server(
            servicer, cast(grpc.aio.Server, _LargeRequests(s))
        ),
        [service.SERVICE_NAME],
        max_message_bytes=settings.max_message_bytes,
        max_connection_age_s=settings.max_connection_age_s,
        interceptors=[metrics.ServerInterceptor()],
    )
    try:
        await server.start()
    except BaseException:
        await backend.close()
        raise
    sweeper = None
    if settings.sweep_interval_s > 0:
        sweeper = asyncio.create_task(_sweep_forever(backend, settings.sweep_interval_s))
    return Running(settings, backend, server, sweeper)


class _LargeRequests:
    """The server as the generated ``add_StateServiceServicer_to_server`` sees it: PutTurn's
    handler reads a large request without copying its large fields, PutTurnChunked's each piece
    without copying it (state_svc.wire); every other handler is registered as generated."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Skipped: the generic handler is made again from the handlers registered below."""

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        handlers = dict(handlers)
        handlers["PutTurn"] = handlers["PutTurn"]._replace(
            request_deserializer=wire.put_turn_request
        )
        if "PutTurnChunked" in handlers:  # (a test serves an older service without it)
            handlers["PutTurnChunked"] = handlers["PutTurnChunked"]._replace(
                request_deserializer=wire.put_turn_chunk
            )
        generic = grpc.method_handlers_generic_handler(service_name, handlers)
        self._server.add_generic_rpc_handlers((generic,))
        self._server.add_registered_method_handlers(service_name, handlers)


async def _sweep_forever(backend: Backend, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            gone = await backend.sweep()
        except Exception:
            # Expired rows are invisible anyway; the next sweep tries again.
            log.exception("sweeping expired rows failed")
        else:
            if gone:
                log.info("swept expired rows", extra={"rows": gone})


async def run(settings: StateSettings) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully and closes the backend."""
    tracing.setup("respgw-state", settings.otel_endpoint)
    running = await start(settings)
    gctune.tune()
    try:
        metrics.serve_service_metrics(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("state service ready", extra={"port": running.port, "backend": settings.backend})
        await stop.wait()
        log.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    finally:
        await running.stop()
