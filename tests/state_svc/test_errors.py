"""The state service's error tree (``state_svc/errors.py``): every class maps to a status with
ErrorInfo, the docstring draws every class, and every RPC of the descriptor goes through the one
boundary (an unexpected failure of the store surfaces as INTERNAL with ErrorInfo in each)."""

from __future__ import annotations

import inspect
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway import grpcerrors
from respgw.state.v1 import error_reason_pb2 as reasons
from respgw.state.v1 import resources_pb2
from respgw.state.v1 import state_service_pb2 as pb
from state_svc import errors, server
from state_svc.service import StateServicer
from tests.state_svc.conftest import (
    TENANT,
    Client,
    assert_error,
    chunked,
    fails,
    item,
    simple_turn,
)

SERVICE = pb.DESCRIPTOR.services_by_name["StateService"]
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _tree() -> list[type[errors.StateError]]:
    found: list[type[errors.StateError]] = []
    todo: list[type[errors.StateError]] = [errors.StateError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found[1:]


def test_every_class_of_the_tree_maps_to_its_own_status_with_error_info() -> None:
    classes = _tree()
    assert len(classes) == 8
    codes = [cls.status for cls in classes]
    assert len(set(codes)) == len(codes), "one class per status code"
    for cls in classes:
        assert cls.status not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), cls
        error = cls(reasons.ERROR_REASON_INTERNAL, "m", {"k": "v"})
        assert isinstance(error, grpcerrors.ServiceError)
        status = error.to_status()
        assert status.code == cls.status
        info = _error_info(status)
        assert (info.reason, info.domain, dict(info.metadata)) == (
            "INTERNAL",
            grpcerrors.STATE_DOMAIN,
            {"k": "v"},
        )


def _error_info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo the status's trailer carries."""
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    detail = status_pb2.Status.FromString(raw).details[0]
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


def test_the_docstring_draws_every_class_of_the_tree() -> None:
    doc = errors.__doc__ or ""
    classes: list[type[errors.StateError]] = [errors.StateError, *_tree()]
    for cls in classes:
        assert f"── {cls.__name__} " in doc, cls.__name__
    for cls in _tree():
        line = next(line for line in doc.splitlines() if f"── {cls.__name__} " in line)
        assert f" {cls.status.name} " in line, line


def test_every_constructor_builds_a_class_of_the_tree() -> None:
    for name, function in inspect.getmembers(errors, inspect.isfunction):
        if function.__module__ != errors.__name__:
            continue
        hints = inspect.signature(function).return_annotation
        assert hints in {c.__name__ for c in _tree()}, name


def test_every_rpc_of_the_descriptor_goes_through_the_boundary() -> None:
    for method in SERVICE.methods:
        handler = getattr(StateServicer, method.name)
        assert getattr(handler, grpcerrors.MAPPED, None) == SERVICE.full_name, method.name
        # Streaming RPCs keep their shape (grpc.aio tells an async generator by inspection).
        generator = inspect.isasyncgenfunction(handler)
        assert generator == (method.server_streaming and not method.client_streaming)


def test_a_servicer_that_misses_an_rpc_is_refused_at_import() -> None:
    class Partial:
        async def PutTurn(self, request: Any, context: Any) -> None: ...

        async def PutTurnChunked(self, request: Any, context: Any) -> None: ...

    with pytest.raises(TypeError, match="GetResponse"):
        grpcerrors.servicer(SERVICE, log=logging.getLogger(__name__))(Partial)


def _lease() -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=30)


def _running() -> resources_pb2.StoredResponse:
    response = simple_turn("resp_bg")
    response.in_progress = True
    return response


# A request of each unary and server-streaming RPC that passes validation and reaches the store.
REQUESTS: dict[str, Callable[[], Any]] = {
    "PutTurn": lambda: pb.PutTurnRequest(tenant=TENANT, response=simple_turn("resp_1")),
    "PutTurnChunked": lambda: iter(
        chunked(pb.PutTurnRequest(tenant=TENANT, response=simple_turn("resp_1")))
    ),
    "GetResponse": lambda: pb.GetResponseRequest(tenant=TENANT, response_id="resp_1"),
    "GetResponseChunked": lambda: pb.GetResponseChunkedRequest(tenant=TENANT, response_id="resp_1"),
    "GetHistory": lambda: pb.GetHistoryRequest(tenant=TENANT, response_id="resp_1"),
    "DeleteResponse": lambda: pb.DeleteResponseRequest(tenant=TENANT, response_id="resp_1"),
    "CreateConversation": lambda: pb.CreateConversationRequest(tenant=TENANT),
    "GetConversation": lambda: pb.GetConversationRequest(tenant=TENANT, conversation_id="c"),
    "UpdateConversation": lambda: pb.UpdateConversationRequest(tenant=TENANT, conversation_id="c"),
    "DeleteConversation": lambda: pb.DeleteConversationRequest(tenant=TENANT, conversation_id="c"),
    "CreateConversationItems": lambda: pb.CreateConversationItemsRequest(
        tenant=TENANT, conversation_id="c", items=[item("a")]
    ),
    "ListConversationItems": lambda: pb.ListConversationItemsRequest(
        tenant=TENANT, conversation_id="c", order=pb.ORDER_ASC
    ),
    "GetConversationItem": lambda: pb.GetConversationItemRequest(
        tenant=TENANT, conversation_id="c", item_id="a"
    ),
    "DeleteConversationItem": lambda: pb.DeleteConversationItemRequest(
        tenant=TENANT, conversation_id="c", item_id="a"
    ),
    "GetItems": lambda: pb.GetItemsRequest(tenant=TENANT, item_ids=["a"]),
    "PutCompaction": lambda: pb.PutCompactionRequest(
        tenant=TENANT, compaction=resources_pb2.Compaction(id="cmp_1", summary=b"s")
    ),
    "GetCompaction": lambda: pb.GetCompactionRequest(tenant=TENANT, compaction_id="cmp_1"),
    "EnqueueBackgroundResponse": lambda: pb.EnqueueBackgroundResponseRequest(
        tenant=TENANT, response=_running()
    ),
    "ClaimBackgroundResponse": lambda: pb.ClaimBackgroundResponseRequest(
        tenant=TENANT, owner="w", request_id="r", lease_duration=_lease()
    ),
    "RenewBackgroundLease": lambda: pb.RenewBackgroundLeaseRequest(
        tenant=TENANT, response_id="resp_bg", lease_token=1, lease_duration=_lease()
    ),
    "AppendResponseEvents": lambda: pb.AppendResponseEventsRequest(
        tenant=TENANT,
        response_id="resp_bg",
        lease_token=1,
        events=[resources_pb2.ResponseEvent(sequence_number=0, json=b"{}")],
    ),
    "FinishBackgroundResponse": lambda: pb.FinishBackgroundResponseRequest(
        tenant=TENANT, response=simple_turn("resp_bg"), lease_token=1
    ),
    "CancelBackgroundResponse": lambda: pb.CancelBackgroundResponseRequest(
        tenant=TENANT, response=simple_turn("resp_bg")
    ),
    "WatchResponseEvents": lambda: pb.WatchResponseEventsRequest(
        tenant=TENANT, response_id="resp_bg"
    ),
}


@sqlite_only
async def test_an_unexpected_failure_is_internal_with_error_info_in_every_rpc(
    running: server.Running, client: Client
) -> None:
    assert set(REQUESTS) | {"Exchange"} == {m.name for m in SERVICE.methods}
    # Break the store behind the service's back: every statement fails, none as "unavailable".
    with sqlite3.connect(running.settings.sqlite_path) as db:
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            db.execute(f'DROP TABLE "{table}"')
    for name, request in REQUESTS.items():
        call = getattr(client.stub, name)(request(), timeout=30)
        if SERVICE.methods_by_name[name].server_streaming:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            err = grpcerrors.error_info(info.value)
        else:
            err = await fails(call)
        assert_error(err, grpc.StatusCode.INTERNAL, "INTERNAL")
        assert err.message == "internal error", name
    # Exchange answers each call with its status instead of ending the stream.
    stream = client.stub.Exchange(timeout=30)
    await stream.write(
        pb.ExchangeRequest(calls=[pb.ExchangeCall(call_id=1, put_turn=REQUESTS["PutTurn"]())])
    )
    reply = await stream.read()
    await stream.done_writing()
    assert isinstance(reply, pb.ExchangeResponse)
    status = reply.results[0].status
    assert (grpc.StatusCode.INTERNAL.value[0], status.reason, status.domain) == (
        status.code,
        "INTERNAL",
        grpcerrors.STATE_DOMAIN,
    )
