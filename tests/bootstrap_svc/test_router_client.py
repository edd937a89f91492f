"""router_svc/bootstrap.py against real gRPC servers: the reference service, and a small scripted
servicer standing in for a third-party implementation that fails, stalls or answers nonsense."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
import pytest
from prometheus_client import REGISTRY

from bootstrap_svc import server
from gateway.logs import request_id_var
from respgw.bootstrap.v1 import bootstrap_service_pb2 as pb
from respgw.bootstrap.v1 import bootstrap_service_pb2_grpc, resources_pb2
from router_svc import bootstrap, errors
from router_svc.config import RouterSettings

CODE_INTERPRETER: dict[str, Any] = {"type": "code_interpreter", "container": {"type": "auto"}}
SHELL: dict[str, Any] = {"type": "shell", "environment": {"type": "container_auto"}}
FUNCTION: dict[str, Any] = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}

# The HTTP status the client sees for each code the bootstrap service may end a call with:
# the caller's fault 4xx, a quota 429, the service's fault 5xx.
EXPECTED_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.UNKNOWN: 502,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 400,
    grpc.StatusCode.INTERNAL: 502,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 502,
    grpc.StatusCode.UNAUTHENTICATED: 502,
}
RETRIED: set[grpc.StatusCode] = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Scripted(bootstrap_service_pb2_grpc.BootstrapServiceServicer):
    """A third-party BootstrapService whose answers the test scripts."""

    def __init__(self) -> None:
        self.failures: list[grpc.StatusCode] = []
        self.delay_s = 0.0
        self.reply = pb.PrepareToolsResponse()
        self.calls: list[tuple[pb.PrepareToolsRequest, dict[str, str]]] = []
        self.releases: list[pb.ReleaseToolsRequest] = []

    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetCapabilitiesResponse:
        return pb.GetCapabilitiesResponse(tool_kinds=list(bootstrap.STATEFUL_TOOL_TYPES.values()))

    async def PrepareTools(
        self, request: pb.PrepareToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PrepareToolsResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append((request, metadata))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failures:
            await context.abort(self.failures.pop(0), "scripted failure")
        return self.reply

    async def ReleaseTools(
        self, request: pb.ReleaseToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseToolsResponse:
        self.releases.append(request)
        if self.failures:
            await context.abort(self.failures.pop(0), "scripted failure")
        return pb.ReleaseToolsResponse()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    # As every server of ours (gateway.grpcserver): without SO_REUSEPORT, port 0 never hands
    # this server a port that another test's server still holds.
    srv = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    bootstrap_service_pb2_grpc.add_BootstrapServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield servicer, f"127.0.0.1:{port}"
    await srv.stop(0)


def _ok_reply(*kinds: resources_pb2.ToolKind.ValueType) -> pb.PrepareToolsResponse:
    return pb.PrepareToolsResponse(
        injected_items=[orjson.dumps({"type": "message", "role": "developer", "content": "hi"})],
        prepared=[resources_pb2.PreparedTool(kind=k, state=b"s", resource_id="r") for k in kinds],
    )


async def _prepare(client: bootstrap.Bootstrapper, **fields: Any) -> bootstrap.Prepared:
    args: dict[str, Any] = {
        "request_id": "resp_1",
        "tenant": "acme",
        "tools": [CODE_INTERPRETER],
        "response_id": "resp_1",
        "conversation_id": "",
        "previous_response_id": "",
        "headers": {},
        "metadata": {},
    }
    args.update(fields)
    return await client.prepare(**args)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- stateful_tools --------------------------------------------------------------------------


def test_stateful_tools_keeps_declared_order_and_drops_the_rest() -> None:
    tools = [SHELL, FUNCTION, CODE_INTERPRETER, {"type": "web_search"}]
    assert bootstrap.stateful_tools(tools) == [SHELL, CODE_INTERPRETER]
    assert bootstrap.stateful_tools([FUNCTION]) == []


def test_a_local_shell_is_never_prepared() -> None:
    """A shell whose environment is local or absent (OpenAI's default) runs on the client's
    machine: nothing to prepare. It still counts as the request's one shell."""
    for local in ({"type": "shell"}, {"type": "shell", "environment": {"type": "local"}}):
        assert bootstrap.is_local_shell(local)
        assert bootstrap.stateful_tools([local, CODE_INTERPRETER]) == [CODE_INTERPRETER]
        with pytest.raises(errors.InvalidRequest):
            bootstrap.stateful_tools([local, SHELL])
    reference = {
        "type": "shell",
        "environment": {"type": "container_reference", "container_id": "c"},
    }
    assert not bootstrap.is_local_shell(SHELL) and not bootstrap.is_local_shell(reference)
    assert not bootstrap.is_local_shell(CODE_INTERPRETER)


def test_a_stateful_tool_declared_twice_is_the_callers_error() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        bootstrap.stateful_tools([CODE_INTERPRETER, FUNCTION, {"type": "code_interpreter"}])
    assert info.value.param == "tools" and info.value.status == 400


def test_make_bootstrapper_follows_the_settings() -> None:
    assert isinstance(bootstrap.make_bootstrapper(RouterSettings()), bootstrap.NoopBootstrapper)
    made = bootstrap.make_bootstrapper(
        RouterSettings(bootstrap_address="127.0.0.1:1", bootstrap_timeout_s=3)
    )
    assert isinstance(made, bootstrap.GrpcBootstrapper)
    assert (made.target, made.timeout_s) == ("127.0.0.1:1", 3)


async def test_the_noop_prepares_nothing() -> None:
    noop = bootstrap.NoopBootstrapper()
    assert await _prepare(noop) is bootstrap.Prepared.EMPTY
    await noop.release(tenant="acme", conversation_id="conv_1")
    await noop.close()


# -- against the reference service -----------------------------------------------------------


async def test_prepare_against_the_reference_service(running: server.Running) -> None:
    client = bootstrap.GrpcBootstrapper(f"127.0.0.1:{running.port}", timeout_s=5)
    try:
        prepared = await _prepare(
            client,
            tools=[SHELL, FUNCTION, CODE_INTERPRETER],
            conversation_id="conv_1",
            headers={"X-Team": "data", "Authorization": "Bearer sk-secret"},
            metadata={"purpose": "test"},
        )
        assert set(prepared.tools) == {"shell", "code_interpreter"}
        container = prepared.tools["code_interpreter"]
        assert container.resource_id.startswith("cntr_")
        assert orjson.loads(container.state)["session_id"] == container.resource_id
        assert container.expire_time is not None
        assert container.expire_time > datetime.now(UTC)
        assert [i["role"] for i in prepared.injected_items] == ["developer", "developer"]
        # A retry of the same request is a replay; the next turn reuses the container.
        again = await _prepare(
            client,
            tools=[SHELL, FUNCTION, CODE_INTERPRETER],
            conversation_id="conv_1",
            headers={"X-Team": "data", "Authorization": "Bearer sk-secret"},
            metadata={"purpose": "test"},
        )
        assert again == prepared
        turn2 = await _prepare(
            client, request_id="resp_2", response_id="resp_2", conversation_id="conv_1"
        )
        assert turn2.tools["code_interpreter"].resource_id == container.resource_id
        assert running.store.live_sessions("acme") != []
        await client.release(tenant="acme", conversation_id="conv_1")
        assert running.store.live_sessions("acme") == []
    finally:
        await client.close()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


LATENCY = "respgw_router_bootstrap_call_latency_seconds_count"
FAILED = "respgw_router_bootstrap_call_errors_total"


async def test_each_call_records_its_latency_and_failures(running: server.Running) -> None:
    client = bootstrap.GrpcBootstrapper(f"127.0.0.1:{running.port}", timeout_s=5)
    prepares, releases = (
        _sample(LATENCY, method="PrepareTools"),
        _sample(LATENCY, method="ReleaseTools"),
    )
    invalid = _sample(FAILED, method="PrepareTools", code="INVALID_ARGUMENT")
    try:
        await _prepare(client, request_id="resp_m1", response_id="resp_m1")
        await client.release(tenant="acme", response_id="resp_m1")
        with pytest.raises(errors.BootstrapFailed):
            await _prepare(client, request_id="", response_id="resp_m2")  # no request id
    finally:
        await client.close()
    assert _sample(LATENCY, method="PrepareTools") == prepares + 2
    assert _sample(LATENCY, method="ReleaseTools") == releases + 1
    assert _sample(FAILED, method="PrepareTools", code="INVALID_ARGUMENT") == invalid + 1
    assert _sample(FAILED, method="PrepareTools", code="OK") == 0
    assert _sample(FAILED, method="ReleaseTools", code="OK") == 0


async def test_a_request_without_stateful_tools_makes_no_call(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, address = scripted
    client = bootstrap.GrpcBootstrapper(address, timeout_s=5)
    try:
        assert await _prepare(client, tools=[FUNCTION]) is bootstrap.Prepared.EMPTY
        assert servicer.calls == []
    finally:
        await client.close()


# -- against a scripted third-party service --------------------------------------------------


async def test_what_is_sent(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.reply = _ok_reply(
        resources_pb2.TOOL_KIND_SHELL, resources_pb2.TOOL_KIND_CODE_INTERPRETER
    )
    client = bootstrap.GrpcBootstrapper(address, timeout_s=5)
    token = request_id_var.set("req-abc")
    try:
        await _prepare(
            client,
            request_id="idem_1",
            tools=[SHELL, CODE_INTERPRETER],
            previous_response_id="resp_0",
            headers={"X-Team": "data", "authorization": "Bearer sk", "X-Api-Key": "k"},
            metadata={"a": "b"},
        )
    finally:
        request_id_var.reset(token)
        await client.close()
    ((request, metadata),) = servicer.calls
    assert metadata["x-request-id"] == "req-abc"
    assert request.request_id == "idem_1" and request.tenant == "acme"
    assert request.response_id == "resp_1" and request.previous_response_id == "resp_0"
    assert [(t.kind, orjson.loads(t.json)) for t in request.tools] == [
        (resources_pb2.TOOL_KIND_SHELL, SHELL),
        (resources_pb2.TOOL_KIND_CODE_INTERPRETER, CODE_INTERPRETER),
    ]
    assert dict(request.headers) == {"x-team": "data"}
    assert dict(request.metadata) == {"a": "b"}


@pytest.mark.parametrize("code", sorted(RETRIED, key=str))
async def test_transient_failures_are_retried_with_the_same_request_id(
    scripted: tuple[Scripted, str], code: grpc.StatusCode
) -> None:
    servicer, address = scripted
    servicer.failures = [code, code]
    servicer.reply = _ok_reply(resources_pb2.TOOL_KIND_CODE_INTERPRETER)
    client = bootstrap.GrpcBootstrapper(address, timeout_s=5)
    try:
        prepared = await _prepare(client, request_id="idem_7")
    finally:
        await client.close()
    assert prepared.tools["code_interpreter"].state == b"s"
    assert [r.request_id for r, _ in servicer.calls] == ["idem_7"] * 3
    assert len({r.SerializeToString(deterministic=True) for r, _ in servicer.calls}) == 1


@pytest.mark.parametrize("code", list(EXPECTED_STATUS), ids=lambda c: c.name)
async def test_every_status_code_becomes_stateful_tool_bootstrap_failed(
    scripted: tuple[Scripted, str], code: grpc.StatusCode
) -> None:
    servicer, address = scripted
    servicer.failures = [code] * 5
    client = bootstrap.GrpcBootstrapper(address, timeout_s=5)
    try:
        with pytest.raises(errors.BootstrapFailed) as info:
            await _prepare(client)
    finally:
        await client.close()
    error = info.value
    assert error.code == "stateful_tool_bootstrap_failed"
    assert error.status == EXPECTED_STATUS[code]
    assert error.param == "tools"
    assert code.name in error.message
    assert error.type == (
        "invalid_request_error" if error.status < 500 and error.status != 429 else "server_error"
    )
    assert isinstance(error.__cause__, grpc.RpcError)
    # Only the codes the proto's table calls transient are retried, at most twice.
    assert len(servicer.calls) == (1 + bootstrap.MAX_RETRIES if code in RETRIED else 1)


def test_every_status_code_has_an_expected_status() -> None:
    assert set(EXPECTED_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


async def test_an_unreachable_service_fails_fast() -> None:
    client = bootstrap.GrpcBootstrapper(f"127.0.0.1:{_free_port()}", timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(errors.BootstrapFailed) as info:
            await _prepare(client)
    finally:
        await client.close()
    assert info.value.code == "stateful_tool_bootstrap_failed"
    assert info.value.status == 503
    assert time.monotonic() - started < client.budget_s


async def test_a_stalled_service_hits_the_deadline_within_the_budget(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, address = scripted
    servicer.delay_s = 5
    client = bootstrap.GrpcBootstrapper(address, timeout_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(errors.BootstrapFailed) as info:
            await _prepare(client)
    finally:
        await client.close()
    elapsed = time.monotonic() - started
    assert info.value.status == 504
    assert elapsed < client.budget_s + 1.0
    # The retry after DEADLINE_EXCEEDED carries the same request_id, so the replay finds the state.
    assert len(servicer.calls) >= 2
    assert {r.request_id for r, _ in servicer.calls} == {"resp_1"}


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (pb.PrepareToolsResponse(injected_items=[b"[1, 2]"]), "not a JSON object"),
        (pb.PrepareToolsResponse(injected_items=[b"{"]), "not a JSON object"),
        (pb.PrepareToolsResponse(), "no state"),
        (_ok_reply(resources_pb2.TOOL_KIND_SHELL), "did not declare"),
        (_ok_reply(resources_pb2.TOOL_KIND_UNSPECIFIED), "did not declare"),
        (
            _ok_reply(
                resources_pb2.TOOL_KIND_CODE_INTERPRETER, resources_pb2.TOOL_KIND_CODE_INTERPRETER
            ),
            "twice",
        ),
    ],
)
async def test_a_reply_that_breaks_the_contract_is_a_failure(
    scripted: tuple[Scripted, str], reply: pb.PrepareToolsResponse, what: str
) -> None:
    servicer, address = scripted
    servicer.reply = reply
    client = bootstrap.GrpcBootstrapper(address, timeout_s=5)
    try:
        with pytest.raises(errors.BootstrapFailed) as info:
            await _prepare(client)
    finally:
        await client.close()
    assert info.value.code == "stateful_tool_bootstrap_failed"
    assert info.value.status == 502
    assert what in info.value.message


async def test_release_is_best_effort(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    client = bootstrap.GrpcBootstrapper(address, timeout_s=1)
    try:
        await client.release(tenant="acme")  # no scope: nothing to ask
        assert servicer.releases == []
        await client.release(tenant="acme", response_id="resp_1")
        servicer.failures = [grpc.StatusCode.UNIMPLEMENTED]
        await client.release(tenant="acme", conversation_id="conv_1")
        servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 5
        await client.release(tenant="acme", conversation_id="conv_1")
    finally:
        await client.close()
    assert [(r.conversation_id, r.response_id) for r in servicer.releases[:2]] == [
        ("", "resp_1"),
        ("conv_1", ""),
    ]
    unreachable = bootstrap.GrpcBootstrapper(f"127.0.0.1:{_free_port()}", timeout_s=1)
    try:
        await unreachable.release(tenant="acme", conversation_id="conv_1")
    finally:
        await unreachable.close()
