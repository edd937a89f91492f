"""Conformance of a BootstrapService to respgw/bootstrap/v1/bootstrap_service.proto.

Only what the proto promises is checked, so any implementation may be run against it. Each test
uses its own tenant, so tests never see one another's state.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2

from respgw.bootstrap.v1 import bootstrap_service_pb2 as pb
from respgw.bootstrap.v1 import resources_pb2
from tests.bootstrap_conformance.conftest import Service

TIMEOUT = 10.0
SERVICE_NAME = "respgw.bootstrap.v1.BootstrapService"
KNOWN_KINDS = [
    v.number
    for v in resources_pb2.ToolKind.DESCRIPTOR.values
    if v.number != resources_pb2.TOOL_KIND_UNSPECIFIED
]
# A typical tool object per kind, as a client declares it.
TOOL_JSON: dict[int, dict[str, Any]] = {
    resources_pb2.TOOL_KIND_CODE_INTERPRETER: {
        "type": "code_interpreter",
        "container": {"type": "auto"},
    },
    resources_pb2.TOOL_KIND_SHELL: {"type": "shell"},
}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _tool(kind: int, obj: object | None = None) -> resources_pb2.ToolDeclaration:
    body = obj if obj is not None else TOOL_JSON.get(kind, {"type": "unknown"})
    return resources_pb2.ToolDeclaration(kind=kind, json=orjson.dumps(body))  # type: ignore[arg-type]


def _request(service: Service, **fields: object) -> pb.PrepareToolsRequest:
    """A valid PrepareToolsRequest for the first supported kind, with ``fields`` replaced."""
    base: dict[str, object] = {
        "request_id": _id("req"),
        "tenant": _id("tenant"),
        "tools": [_tool(service.capabilities.tool_kinds[0])],
        "response_id": _id("resp"),
    }
    base.update(fields)
    return pb.PrepareToolsRequest(**base)  # type: ignore[arg-type]


def _code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError) and isinstance(call, grpc.Call)
    code: grpc.StatusCode = call.code()
    return code


def _fails(
    method: object, request: object, expected: grpc.StatusCode, timeout: float = TIMEOUT
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=timeout)  # type: ignore[operator]
    assert _code(info.value) == expected, info.value


def _without_replayed(response: pb.PrepareToolsResponse) -> pb.PrepareToolsResponse:
    copy = pb.PrepareToolsResponse()
    copy.CopyFrom(response)
    copy.replayed = False
    return copy


def _check_result(request: pb.PrepareToolsRequest, response: pb.PrepareToolsResponse) -> None:
    """What every OK PrepareTools result must look like."""
    assert [p.kind for p in response.prepared] == [t.kind for t in request.tools]
    for raw in response.injected_items:
        assert isinstance(orjson.loads(raw), dict)
    for prepared in response.prepared:
        if prepared.HasField("expire_time"):
            assert prepared.expire_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC)


def _needs_release(service: Service) -> bool:
    """True when ReleaseTools is supported; otherwise checks that it says UNIMPLEMENTED."""
    if service.capabilities.supports_release:
        return True
    req = pb.ReleaseToolsRequest(tenant=_id("tenant"), conversation_id=_id("conv"))
    _fails(service.stub.ReleaseTools, req, grpc.StatusCode.UNIMPLEMENTED)
    return False


# -- capabilities and the service surface -------------------------------------------------------


def test_capabilities_list_known_kinds_and_never_unspecified(service: Service) -> None:
    kinds = list(service.capabilities.tool_kinds)
    assert kinds, "a bootstrap service prepares at least one kind"
    assert resources_pb2.TOOL_KIND_UNSPECIFIED not in kinds
    assert len(set(kinds)) == len(kinds)
    assert set(kinds) <= set(KNOWN_KINDS)
    again = service.stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=TIMEOUT)
    assert again == service.capabilities


def test_every_rpc_is_served(service: Service) -> None:
    methods = pb.DESCRIPTOR.services_by_name["BootstrapService"].methods
    assert {m.name for m in methods} == {"GetCapabilities", "PrepareTools", "ReleaseTools"}
    service.stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=TIMEOUT)
    service.stub.PrepareTools(_request(service), timeout=TIMEOUT)
    if service.capabilities.supports_release:
        req = pb.ReleaseToolsRequest(tenant=_id("tenant"), conversation_id=_id("conv"))
        service.stub.ReleaseTools(req, timeout=TIMEOUT)


@pytest.mark.parametrize("name", ["", SERVICE_NAME])
def test_health_check_is_served(service: Service, name: str) -> None:
    reply = service.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- PrepareTools --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    KNOWN_KINDS,
    ids=[resources_pb2.ToolKind.Name(resources_pb2.ToolKind.ValueType(k)) for k in KNOWN_KINDS],
)
def test_prepare_each_kind(service: Service, kind: int) -> None:
    request = _request(service, tools=[_tool(kind)])
    if kind not in service.capabilities.tool_kinds:
        _fails(service.stub.PrepareTools, request, grpc.StatusCode.UNIMPLEMENTED)
        return
    response = service.stub.PrepareTools(request, timeout=TIMEOUT)
    assert not response.replayed
    _check_result(request, response)


def test_prepare_all_kinds_in_declared_order(service: Service) -> None:
    kinds = list(reversed(service.capabilities.tool_kinds))
    request = _request(service, tools=[_tool(k) for k in kinds], conversation_id=_id("conv"))
    response = service.stub.PrepareTools(request, timeout=TIMEOUT)
    _check_result(request, response)


def test_prepare_in_a_conversation_and_a_chain(service: Service) -> None:
    tenant = _id("tenant")
    conv = _id("conv")
    first = _request(service, tenant=tenant, conversation_id=conv)
    _check_result(first, service.stub.PrepareTools(first, timeout=TIMEOUT))
    second = _request(service, tenant=tenant, conversation_id=conv)
    _check_result(second, service.stub.PrepareTools(second, timeout=TIMEOUT))
    chained = _request(service, tenant=tenant, previous_response_id=first.response_id)
    _check_result(chained, service.stub.PrepareTools(chained, timeout=TIMEOUT))


def test_replay_returns_the_first_result(service: Service) -> None:
    request = _request(
        service,
        tools=[_tool(k) for k in service.capabilities.tool_kinds],
        conversation_id=_id("conv"),
        headers={"x-team": "a", "x-env": "test"},
        metadata={"purpose": "conformance"},
    )
    first = service.stub.PrepareTools(request, timeout=TIMEOUT)
    assert not first.replayed
    for _ in range(2):
        again = service.stub.PrepareTools(request, timeout=TIMEOUT)
        assert again.replayed
        assert _without_replayed(again) == first


def test_replay_prepares_nothing_twice(service: Service) -> None:
    # The same content under a new request_id is a new request; under the old one it is a replay.
    # Where the service shows resource ids, a new request without a conversation or chain gets its
    # own, and a replay gets the first one back.
    tenant = _id("tenant")
    first_req = _request(service, tenant=tenant)
    first = service.stub.PrepareTools(first_req, timeout=TIMEOUT)
    replay = service.stub.PrepareTools(first_req, timeout=TIMEOUT)
    assert replay.replayed
    assert [p.resource_id for p in replay.prepared] == [p.resource_id for p in first.prepared]
    assert [p.state for p in replay.prepared] == [p.state for p in first.prepared]
    other_req = _request(service, tenant=tenant, tools=first_req.tools)
    other = service.stub.PrepareTools(other_req, timeout=TIMEOUT)
    assert not other.replayed


def test_concurrent_identical_calls_prepare_once(service: Service) -> None:
    request = _request(service, tools=[_tool(k) for k in service.capabilities.tool_kinds])
    futures = [service.stub.PrepareTools.future(request, timeout=TIMEOUT) for _ in range(8)]
    results: list[pb.PrepareToolsResponse] = []
    for future in futures:
        try:
            results.append(future.result())
        except grpc.RpcError as exc:
            # The proto allows ABORTED while a call with the same request_id is in progress.
            assert _code(exc) == grpc.StatusCode.ABORTED
    assert [r.replayed for r in results].count(False) == 1
    assert len({_without_replayed(r).SerializeToString(deterministic=True) for r in results}) == 1


@pytest.mark.parametrize(
    "change",
    ["tools", "tool_json", "conversation_id", "response_id", "metadata", "headers"],
)
def test_request_id_reused_with_other_content_is_already_exists(
    service: Service, change: str
) -> None:
    request = _request(service, metadata={"a": "1"}, headers={"x-team": "a"})
    first = service.stub.PrepareTools(request, timeout=TIMEOUT)
    changed = pb.PrepareToolsRequest()
    changed.CopyFrom(request)
    if change == "tools":
        kinds = [k for k in KNOWN_KINDS if k != request.tools[0].kind]
        changed.tools.append(_tool(kinds[0]))
    elif change == "tool_json":
        obj = orjson.loads(request.tools[0].json)
        obj["extra"] = True
        changed.tools[0].json = orjson.dumps(obj)
    elif change == "conversation_id":
        changed.conversation_id = _id("conv")
    elif change == "response_id":
        changed.response_id = _id("resp")
    elif change == "metadata":
        changed.metadata["a"] = "2"
    else:
        changed.headers["x-team"] = "b"
    _fails(service.stub.PrepareTools, changed, grpc.StatusCode.ALREADY_EXISTS)
    # The first result is untouched by the refused call.
    again = service.stub.PrepareTools(request, timeout=TIMEOUT)
    assert again.replayed and _without_replayed(again) == first


def test_request_id_is_scoped_by_tenant(service: Service) -> None:
    request_id = _id("req")
    a = _request(service, request_id=request_id)
    b = _request(service, request_id=request_id, conversation_id=_id("conv"))
    assert a.tenant != b.tenant
    assert not service.stub.PrepareTools(a, timeout=TIMEOUT).replayed
    assert not service.stub.PrepareTools(b, timeout=TIMEOUT).replayed


_NOT_OBJECTS = [b"", b"[]", b"42", b'"code_interpreter"', b"null", b"true", b"{", b"\xff\xfe{}"]


def _invalid_cases(service: Service) -> dict[str, pb.PrepareToolsRequest]:
    kind = service.capabilities.tool_kinds[0]
    cases = {
        "no request_id": _request(service, request_id=""),
        "no tenant": _request(service, tenant=""),
        "no tools": _request(service, tools=[]),
        "unspecified kind": _request(
            service, tools=[_tool(resources_pb2.TOOL_KIND_UNSPECIFIED, {"type": "x"})]
        ),
        "unspecified kind after a valid one": _request(
            service, tools=[_tool(kind), _tool(resources_pb2.TOOL_KIND_UNSPECIFIED, {})]
        ),
        "kind declared twice": _request(service, tools=[_tool(kind), _tool(kind)]),
    }
    for raw in _NOT_OBJECTS:
        decl = resources_pb2.ToolDeclaration(kind=kind, json=raw)
        cases[f"tool json {raw!r}"] = _request(service, tools=[decl])
    return cases


def test_every_documented_invalid_argument(service: Service) -> None:
    for name, request in _invalid_cases(service).items():
        with pytest.raises(grpc.RpcError) as info:
            service.stub.PrepareTools(request, timeout=TIMEOUT)
        assert _code(info.value) == grpc.StatusCode.INVALID_ARGUMENT, name


def test_a_refused_request_is_not_remembered(service: Service) -> None:
    request = _request(service)
    bad = pb.PrepareToolsRequest()
    bad.CopyFrom(request)
    bad.tools[0].json = b"[]"
    _fails(service.stub.PrepareTools, bad, grpc.StatusCode.INVALID_ARGUMENT)
    response = service.stub.PrepareTools(request, timeout=TIMEOUT)
    assert not response.replayed


def test_a_kind_not_in_capabilities_is_unimplemented(service: Service) -> None:
    unknown = max(KNOWN_KINDS) + 40
    assert unknown not in service.capabilities.tool_kinds
    request = _request(service, tools=[_tool(unknown, {"type": "future_tool"})])
    _fails(service.stub.PrepareTools, request, grpc.StatusCode.UNIMPLEMENTED)
    alongside = _request(
        service,
        tools=[_tool(service.capabilities.tool_kinds[0]), _tool(unknown, {"type": "future_tool"})],
    )
    _fails(service.stub.PrepareTools, alongside, grpc.StatusCode.UNIMPLEMENTED)


def test_a_tiny_deadline_never_hangs(service: Service) -> None:
    request = _request(service, conversation_id=_id("conv"))
    started = time.monotonic()
    first: pb.PrepareToolsResponse | None = None
    try:
        first = service.stub.PrepareTools(request, timeout=0.001)
    except grpc.RpcError as exc:
        assert _code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    # The retry the proto asks for: same request_id, and the result is whole either way.
    retry = service.stub.PrepareTools(request, timeout=TIMEOUT)
    _check_result(request, retry)
    if first is not None:
        assert retry.replayed and _without_replayed(retry) == first


# -- ReleaseTools --------------------------------------------------------------------------------


def test_release_needs_a_tenant_and_a_scope(service: Service) -> None:
    if not _needs_release(service):
        return
    for request in (
        pb.ReleaseToolsRequest(conversation_id=_id("conv")),
        pb.ReleaseToolsRequest(tenant=_id("tenant")),
    ):
        _fails(service.stub.ReleaseTools, request, grpc.StatusCode.INVALID_ARGUMENT)


def test_release_of_nothing_is_zero(service: Service) -> None:
    if not _needs_release(service):
        return
    tenant = _id("tenant")
    for request in (
        pb.ReleaseToolsRequest(tenant=tenant, conversation_id=_id("conv")),
        pb.ReleaseToolsRequest(tenant=tenant, response_id=_id("resp")),
    ):
        assert service.stub.ReleaseTools(request, timeout=TIMEOUT).released_count == 0


@pytest.mark.parametrize("scope", ["conversation", "chain"])
def test_release_then_replay_is_harmless(service: Service, scope: str) -> None:
    if not _needs_release(service):
        return
    tenant = _id("tenant")
    if scope == "conversation":
        prepare = _request(service, tenant=tenant, conversation_id=_id("conv"))
        release = pb.ReleaseToolsRequest(tenant=tenant, conversation_id=prepare.conversation_id)
    else:
        prepare = _request(service, tenant=tenant)
        release = pb.ReleaseToolsRequest(tenant=tenant, response_id=prepare.response_id)
    prepared = service.stub.PrepareTools(prepare, timeout=TIMEOUT)
    # Another tenant's release of the same ids releases nothing of this tenant's.
    foreign = pb.ReleaseToolsRequest()
    foreign.CopyFrom(release)
    foreign.tenant = _id("tenant")
    assert service.stub.ReleaseTools(foreign, timeout=TIMEOUT).released_count == 0
    first = service.stub.ReleaseTools(release, timeout=TIMEOUT).released_count
    # A service that shows a resource for the tools holds it until released.
    if any(p.resource_id for p in prepared.prepared):
        assert first >= 1
    assert service.stub.ReleaseTools(release, timeout=TIMEOUT).released_count == 0
    # The conversation or chain can be used again afterwards.
    if scope == "conversation":
        later = _request(service, tenant=tenant, conversation_id=prepare.conversation_id)
    else:
        later = _request(service, tenant=tenant, previous_response_id=prepare.response_id)
    _check_result(later, service.stub.PrepareTools(later, timeout=TIMEOUT))
