"""Which bootstrap service the conformance suite checks (its BootstrapService, and the
ExecutionService served on the same address when it has one).

    pytest tests/bootstrap_conformance                              reference and Node.js, both started here
    pytest tests/bootstrap_conformance --bootstrap-impl node        only the Node.js example
    pytest tests/bootstrap_conformance --bootstrap-address H:P      an implementation already running

pytest reads these options from this file when the suite's folder (or a file in it) is named on the
command line; a run of the whole tests/ folder checks both bundled implementations (and accepts the
options only if tests/conftest.py imports ``pytest_addoption`` from here).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from respgw.bootstrap.v1 import bootstrap_service_pb2 as pb
from respgw.bootstrap.v1 import (
    bootstrap_service_pb2_grpc,
    execution_service_pb2,
    execution_service_pb2_grpc,
)
from tests.bootstrap_conformance import launch

IMPLEMENTATIONS = ("reference", "node")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Registers the suite's options. tests/conftest.py may import this hook too, so that the
    options also work on a run of the whole tests/ folder; the second registration is a no-op."""
    group = parser.getgroup("bootstrap conformance")
    try:
        group.addoption(
            "--bootstrap-address",
            default="",
            help="HOST:PORT of a running BootstrapService to check instead of starting one.",
        )
        group.addoption(
            "--bootstrap-impl",
            default="",
            choices=("", *IMPLEMENTATIONS),
            help="Start and check only this bundled implementation (default: all of them).",
        )
    except ValueError:
        pass  # already registered by the other conftest


def _targets(config: pytest.Config) -> list[str]:
    # getoption with a default: the options exist only when this conftest was loaded at start-up.
    address = config.getoption("bootstrap_address", default="")
    if address:
        return [f"address={address}"]
    impl = config.getoption("bootstrap_impl", default="")
    return [impl] if impl else list(IMPLEMENTATIONS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "service" in metafunc.fixturenames:
        metafunc.parametrize("service", _targets(metafunc.config), indirect=True, scope="session")


@dataclass
class Service:
    """A BootstrapService under test, with stubs on one channel."""

    name: str
    address: str
    channel: grpc.Channel
    stub: bootstrap_service_pb2_grpc.BootstrapServiceStub
    health: Any  # the typing stubs of HealthStub declare no methods
    capabilities: pb.GetCapabilitiesResponse


@pytest.fixture(scope="session")
def service(request: pytest.FixtureRequest) -> Iterator[Service]:
    target: str = request.param
    proc: launch.Process | None = None
    if target.startswith("address="):
        address = target.removeprefix("address=")
    elif target == "node":
        proc = launch.start_node()
        address = proc.address
    else:
        proc = launch.start_reference()
        address = proc.address
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=15)
        stub = bootstrap_service_pb2_grpc.BootstrapServiceStub(channel)
        caps = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
        yield Service(
            name=target,
            address=address,
            channel=channel,
            stub=stub,
            health=health_pb2_grpc.HealthStub(channel),
            capabilities=caps,
        )
    finally:
        channel.close()
        if proc is not None:
            proc.stop()


@dataclass
class Execution:
    """The ExecutionService served beside a BootstrapService (same address), with its
    capabilities; ``capabilities`` is None when the implementation does not serve it."""

    service: Service
    stub: execution_service_pb2_grpc.ExecutionServiceStub
    capabilities: execution_service_pb2.GetExecutionCapabilitiesResponse | None


@pytest.fixture(scope="session")
def execution(service: Service) -> Execution:
    stub = execution_service_pb2_grpc.ExecutionServiceStub(service.channel)
    try:
        caps = stub.GetExecutionCapabilities(
            execution_service_pb2.GetExecutionCapabilitiesRequest(), timeout=10
        )
    except grpc.RpcError as exc:
        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED):
            raise
        return Execution(service=service, stub=stub, capabilities=None)
    return Execution(service=service, stub=stub, capabilities=caps)
