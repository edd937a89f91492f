"""Fixtures of the observability suites: the gateway in-process (router, state service and the
reference bootstrap service, for tracing through an in-memory span exporter) and as separate
processes with JSON logs and real metrics ports (for request ids and metrics)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bootstrap_svc import server as bootstrap_server
from bootstrap_svc.config import BootstrapSettings
from gateway import tracing
from tests.fakehub import FakeHub
from tests.support import ROUTER_READY, STATE_READY, Process, Stack, ThreadLoop

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}


def free_port() -> int:
    """A port nothing listens on right now (for a service that cannot bind port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for one test, every finished span of this process kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


@dataclass
class InProcess:
    """The router, the state service and the reference bootstrap service in this process."""

    stack: Stack
    bootstrap: bootstrap_server.Running
    loop: ThreadLoop

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.stack.port}"


@pytest.fixture(scope="module")
def inprocess(
    _hub_server: FakeHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcess]:
    loop = ThreadLoop()
    settings = replace(
        BootstrapSettings(),
        listen="127.0.0.1:0",
        workdir=str(tmp_path_factory.mktemp("sessions")),
        metrics_port=0,
    )
    bootstrap = loop.run(bootstrap_server.start(settings))
    stack = Stack(
        _hub_server.url,
        router={
            "default_model": "fake-model",
            "bootstrap_address": f"127.0.0.1:{bootstrap.port}",
        },
    ).start()
    try:
        yield InProcess(stack, bootstrap, loop)
    finally:
        stack.stop()
        loop.run(bootstrap.stop(0.5))
        loop.close()


@dataclass
class Processes:
    """The gateway as Kubernetes runs it, one process per service, logging JSON at debug level."""

    router: Process
    state: Process
    bootstrap: Process
    base: str
    state_address: str
    bootstrap_address: str
    state_metrics: str
    bootstrap_metrics: str


def _json_debug_env() -> dict[str, str]:
    return {"RESPGW_LOG_FORMAT": "json", "RESPGW_LOG_LEVEL": "debug"}


@pytest.fixture(scope="package")
def processes(
    _hub_server: FakeHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Processes]:
    state_metrics, bootstrap_metrics = free_port(), free_port()
    state = Process(
        ["state", "--backend", "memory", "--listen", "127.0.0.1:0"],
        env={**_json_debug_env(), "RESPGW_STATE_METRICS_PORT": str(state_metrics)},
    )
    bootstrap = Process(
        ["bootstrap", "--listen", "127.0.0.1:0"],
        env={
            **_json_debug_env(),
            "RESPGW_BOOTSTRAP_METRICS_PORT": str(bootstrap_metrics),
            "RESPGW_BOOTSTRAP_WORKDIR": str(tmp_path_factory.mktemp("sessions")),
        },
    )
    router = Process(["router", "--port", "0"], env=_json_debug_env())
    started: list[Process] = []
    try:
        state_port = state.start(STATE_READY)
        started.append(state)
        bootstrap_port = bootstrap.start(STATE_READY)
        started.append(bootstrap)
        router.env.update(
            RESPGW_HUB_URL=_hub_server.url,
            RESPGW_DEFAULT_MODEL="fake-model",
            RESPGW_STATE_ADDRESS=f"127.0.0.1:{state_port}",
            RESPGW_BOOTSTRAP_ADDRESS=f"127.0.0.1:{bootstrap_port}",
        )
        router_port = router.start(ROUTER_READY)
        started.append(router)
        yield Processes(
            router=router,
            state=state,
            bootstrap=bootstrap,
            base=f"http://127.0.0.1:{router_port}",
            state_address=f"127.0.0.1:{state_port}",
            bootstrap_address=f"127.0.0.1:{bootstrap_port}",
            state_metrics=f"http://127.0.0.1:{state_metrics}/metrics",
            bootstrap_metrics=f"http://127.0.0.1:{bootstrap_metrics}/metrics",
        )
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20) as client:
        yield client
