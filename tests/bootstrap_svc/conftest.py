"""Fixtures for the reference bootstrap service: a real server on 127.0.0.1:0 over a work folder
in tmp_path, and a grpc.aio client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from bootstrap_svc import server
from bootstrap_svc.config import BootstrapSettings
from respgw.bootstrap.v1 import bootstrap_service_pb2_grpc

Start = Callable[..., Awaitable[server.Running]]


@pytest.fixture
def settings(tmp_path: Path) -> BootstrapSettings:
    return BootstrapSettings(
        listen="127.0.0.1:0",
        workdir=str(tmp_path / "sessions"),
        metrics_port=0,
        max_connection_age_s=0,
    )


@pytest.fixture
async def start(settings: BootstrapSettings) -> AsyncIterator[Start]:
    """Starts the service (settings overridden by keyword); everything started is stopped."""
    started: list[server.Running] = []

    async def starter(**overrides: object) -> server.Running:
        running = await server.start(replace(settings, **overrides))  # type: ignore[arg-type]
        started.append(running)
        return running

    yield starter
    for running in started:
        await running.stop()


@pytest.fixture
async def running(start: Start) -> server.Running:
    return await start()


@pytest.fixture
async def stub(
    running: server.Running,
) -> AsyncIterator[bootstrap_service_pb2_grpc.BootstrapServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield bootstrap_service_pb2_grpc.BootstrapServiceStub(channel)
