"""Runs the reference bootstrap service: both servicers (BootstrapService, ExecutionService) on one
GrpcServer, plus the session sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc

from bootstrap_svc import execution, executor, service, sessions
from bootstrap_svc.config import BootstrapSettings
from bootstrap_svc.sandbox import Sandbox
from gateway import logs, metrics, tracing
from gateway.grpcserver import GrpcServer
from respgw.bootstrap.v1 import (
    bootstrap_service_pb2,
    bootstrap_service_pb2_grpc,
    execution_service_pb2,
    execution_service_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAME = bootstrap_service_pb2.DESCRIPTOR.services_by_name["BootstrapService"].full_name
EXECUTION_SERVICE_NAME = execution_service_pb2.DESCRIPTOR.services_by_name[
    "ExecutionService"
].full_name


@dataclass
class Running:
    """A started service: its bound port, and how to stop it."""

    port: int
    server: GrpcServer
    store: sessions.SessionStore
    sweeper: asyncio.Task[None]
    executor: executor.Executor
    stopped: bool = field(default=False)

    async def stop(self, grace: float = 0.0) -> None:
        """Stops serving (in-flight calls get ``grace`` seconds), then closes the registry.
        Stopping twice is harmless."""
        if self.stopped:
            return
        self.stopped = True
        try:
            await self.server.stop(grace)
        finally:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
            await self.executor.close()
            self.store.close()


async def start(settings: BootstrapSettings) -> Running:
    """Opens the session registry in settings.workdir and starts serving on settings.listen."""
    store = sessions.SessionStore(
        settings.workdir,
        idle_ttl_s=settings.idle_ttl_s,
        max_sessions_per_tenant=settings.max_sessions_per_tenant,
        replay_ttl_s=settings.replay_ttl_s,
    )
    servicer = service.BootstrapServicer(store, max_memory_bytes=settings.max_memory_mb * MIB)
    sandbox = Sandbox(
        bwrap=settings.sandbox_bwrap,
        python=settings.sandbox_python,
        uid_base=settings.sandbox_uid_base,
    )
    await sandbox.check()
    runner = executor.Executor(
        store,
        sandbox,
        limits(settings),
        max_concurrent_calls=settings.max_concurrent_calls,
        memory_check_s=max(settings.memory_check_ms, 10) / 1000,
    )
    executing = execution.ExecutionServicer(
        store,
        runner,
        max_timeout_s=settings.max_call_timeout_s,
        max_memory_bytes=settings.max_memory_mb * MIB,
        max_idle_ttl_s=settings.max_idle_ttl_s,
    )

    def register(server: grpc.aio.Server) -> None:
        bootstrap_service_pb2_grpc.add_BootstrapServiceServicer_to_server(servicer, server)
        execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(executing, server)

    server = GrpcServer(
        settings.listen,
        register,
        [SERVICE_NAME, EXECUTION_SERVICE_NAME],
        max_message_bytes=settings.max_message_bytes,
        max_connection_age_s=settings.max_connection_age_s,
        interceptors=[metrics.ServerInterceptor()],
    )
    try:
        port = await server.start()
    except BaseException:
        store.close()
        raise
    sweeper = asyncio.create_task(store.run_sweeper(), name="bootstrap-session-sweeper")
    return Running(port=port, server=server, store=store, sweeper=sweeper, executor=runner)


MIB = 1024 * 1024


def limits(settings: BootstrapSettings) -> executor.CallLimits:
    """The default limits of a call, from the settings."""
    return executor.CallLimits(
        timeout_s=settings.call_timeout_s,
        cpu_s=settings.call_cpu_s,
        memory_bytes=settings.memory_mb * MIB,
        processes=settings.max_processes,
        file_bytes=settings.max_file_mb * MIB,
        output_bytes=settings.max_output_kb * 1024,
        disk_bytes=settings.disk_mb * MIB,
        session_memory_bytes=settings.session_memory_mb * MIB,
    )


async def run(settings: BootstrapSettings) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully."""
    logs.setup(settings.log_level, settings.log_format)
    tracing.setup("respgw-bootstrap", settings.otel_endpoint)
    metrics.serve_service_metrics(settings)
    running = await start(settings)
    try:
        await running.server.serve_until_signal(settings.shutdown_grace_s)
    finally:
        await running.stop(0)
