"""The bootstrap service's error tree (``bootstrap_svc/errors.py``): every class maps to a status
with ErrorInfo, the docstring draws every class, and every RPC of both services goes through the
one boundary: a refusal of the registry keeps its status, and the one RPC that words it otherwise
(a replayed CreateSession whose session is gone) does so."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from bootstrap_svc import errors, server
from bootstrap_svc.execution import ExecutionServicer
from bootstrap_svc.service import BootstrapServicer
from gateway import grpcerrors
from respgw.bootstrap.v1 import (
    bootstrap_service_pb2,
    execution_service_pb2,
    execution_service_pb2_grpc,
)
from respgw.bootstrap.v1 import error_reason_pb2 as reasons
from respgw.bootstrap.v1 import execution_service_pb2 as pb

TENANT = "tenant-a"
SERVICERS = [
    (BootstrapServicer, bootstrap_service_pb2.DESCRIPTOR.services_by_name["BootstrapService"]),
    (ExecutionServicer, execution_service_pb2.DESCRIPTOR.services_by_name["ExecutionService"]),
]


def _tree() -> list[type[errors.BootstrapError]]:
    found: list[type[errors.BootstrapError]] = []
    todo: list[type[errors.BootstrapError]] = [errors.BootstrapError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found[1:]


def _build(cls: type[errors.BootstrapError]) -> errors.BootstrapError:
    """An instance of ``cls``: the registry's leaves take a message only."""
    if list(inspect.signature(cls.__init__).parameters) == ["self", "message"]:
        leaf: Any = cls
        built: errors.BootstrapError = leaf("m")
        return built
    return cls(reasons.ERROR_REASON_SESSION_REQUIRED, "m", "session_id")


def test_every_class_of_the_tree_maps_to_a_status_with_error_info() -> None:
    classes = _tree()
    assert len(classes) == 10
    for cls in classes:
        assert cls.status not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), cls
        error = _build(cls)
        assert isinstance(error, grpcerrors.ServiceError)
        status = error.to_status()
        assert status.code == cls.status
        raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
        info = error_details_pb2.ErrorInfo()
        assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
        assert info.domain == grpcerrors.BOOTSTRAP_DOMAIN
        assert info.reason in {
            grpcerrors.reason(reasons.ErrorReason, v) for v in reasons.ErrorReason.values()
        }
    # One class per status code, the registry's leaves under the class of their code.
    direct = [cls.status for cls in errors.BootstrapError.__subclasses__()]
    assert len(set(direct)) == len(direct)
    assert _build(errors.SessionLimit).reason == "SESSION_LIMIT"
    assert _build(errors.SessionGone).reason == "SESSION_GONE"
    assert _build(errors.RequestConflict).reason == "REQUEST_ID_CONFLICT"


def test_the_docstring_draws_every_class_of_the_tree() -> None:
    doc = errors.__doc__ or ""
    classes: list[type[errors.BootstrapError]] = [errors.BootstrapError, *_tree()]
    for cls in classes:
        assert f"── {cls.__name__} " in doc, cls.__name__
    for cls in errors.BootstrapError.__subclasses__():
        line = next(line for line in doc.splitlines() if f"── {cls.__name__} " in line)
        assert f" {cls.status.name} " in line, line


@pytest.mark.parametrize(("servicer", "service"), SERVICERS, ids=lambda v: getattr(v, "name", ""))
def test_every_rpc_of_the_descriptor_goes_through_the_boundary(
    servicer: type, service: Any
) -> None:
    for method in service.methods:
        handler = getattr(servicer, method.name)
        assert getattr(handler, grpcerrors.MAPPED, None) == service.full_name, method.name
        generator = inspect.isasyncgenfunction(handler)
        assert generator == (method.server_streaming and not method.client_streaming)


def test_a_servicer_that_misses_an_rpc_is_refused_at_import() -> None:
    class Partial:
        async def GetCapabilities(self, request: Any, context: Any) -> None: ...

    with pytest.raises(TypeError, match="PrepareTools"):
        grpcerrors.servicer(SERVICERS[0][1], log=logging.getLogger(__name__))(Partial)


async def test_a_replayed_create_session_whose_session_is_gone_is_not_found(
    running: server.Running,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        request = pb.CreateSessionRequest(request_id="create_gone", tenant=TENANT)
        made = await stub.CreateSession(request)
        await stub.DeleteSession(
            pb.DeleteSessionRequest(tenant=TENANT, session_id=made.session.session_id)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSession(request)
        err = grpcerrors.error_info(info.value)
        assert (err.code, err.reason, err.domain) == (
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
            grpcerrors.BOOTSTRAP_DOMAIN,
        )
        assert "is gone" in err.message and err.metadata == {}
