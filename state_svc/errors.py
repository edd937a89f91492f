"""The state service's errors: every refusal it sends, one class per gRPC status code.

Exception tree::

    gateway.grpcerrors.ServiceError  a gRPC status with ErrorInfo (code, reason, message, metadata)
    └── StateError                   domain "state.respgw.dev"; the reason is an ErrorReason value
        ├── InvalidArgument          INVALID_ARGUMENT     TENANT_REQUIRED, INVALID_ARGUMENT
        ├── NotFound                 NOT_FOUND            RESPONSE_NOT_FOUND, ITEM_NOT_FOUND,
        │                                                 PREVIOUS_RESPONSE_NOT_FOUND,
        │                                                 CONVERSATION_NOT_FOUND
        ├── AlreadyExists            ALREADY_EXISTS       RESPONSE_ID_CONFLICT, ITEM_ID_CONFLICT,
        │                                                 REQUEST_ID_CONFLICT, EVENT_CONFLICT
        ├── Aborted                  ABORTED              VERSION_MISMATCH
        ├── FailedPrecondition       FAILED_PRECONDITION  HISTORY_BROKEN, RESPONSE_IN_PROGRESS,
        │                                                 LEASE_LOST, NOT_BACKGROUND
        ├── ResourceExhausted        RESOURCE_EXHAUSTED   BACKGROUND_QUEUE_FULL
        ├── Unavailable              UNAVAILABLE          BACKEND_UNAVAILABLE
        └── Internal                 INTERNAL             INTERNAL (any other exception)

The servicer and the backends raise them through the constructors below, so every backend words
an error the same way; the reasons are the generated ``ErrorReason`` constants
(``protos/respgw/state/v1/error_reason.proto``), never spelled as strings. The servicer's one
boundary (:func:`gateway.grpcerrors.servicer`) turns them into statuses for every RPC, and any
other exception into :func:`internal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, TypeAlias

import grpc

from gateway.grpcerrors import STATE_DOMAIN, ServiceError, reason
from respgw.state.v1 import error_reason_pb2 as reasons
from respgw.state.v1.error_reason_pb2 import ErrorReason

Reason: TypeAlias = ErrorReason.ValueType


class StateError(ServiceError):
    """A refusal of the state service; each subclass fixes the status code."""

    status: ClassVar[grpc.StatusCode]

    def __init__(
        self, why: Reason, message: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(
            self.status, reason(ErrorReason, why), message, dict(metadata or {}), STATE_DOMAIN
        )


class InvalidArgument(StateError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StateError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StateError):
    status = grpc.StatusCode.ALREADY_EXISTS


class Aborted(StateError):
    status = grpc.StatusCode.ABORTED


class FailedPrecondition(StateError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(StateError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StateError):
    status = grpc.StatusCode.UNAVAILABLE


class Internal(StateError):
    status = grpc.StatusCode.INTERNAL


# --- constructors -------------------------------------------------------------------------


def invalid(field: str, message: str, **metadata: str) -> InvalidArgument:
    """INVALID_ARGUMENT naming ``field`` (and any more metadata)."""
    return InvalidArgument(
        reasons.ERROR_REASON_INVALID_ARGUMENT, message, {"field": field, **metadata}
    )


def tenant_required() -> InvalidArgument:
    return InvalidArgument(
        reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", {"field": "tenant"}
    )


def internal() -> Internal:
    """What a caller learns of an exception the service did not foresee (it logs the cause)."""
    return Internal(reasons.ERROR_REASON_INTERNAL, "internal error")


def response_not_found(response_id: str) -> NotFound:
    return NotFound(
        reasons.ERROR_REASON_RESPONSE_NOT_FOUND,
        f"response {response_id} not found",
        {"response_id": response_id},
    )


def idempotency_key_not_found(key: str) -> NotFound:
    return NotFound(
        reasons.ERROR_REASON_RESPONSE_NOT_FOUND,
        "no response stored with this idempotency key",
        {"idempotency_key": key},
    )


def previous_response_not_found(response_id: str) -> NotFound:
    return NotFound(
        reasons.ERROR_REASON_PREVIOUS_RESPONSE_NOT_FOUND,
        f"previous response {response_id} not found",
        {"previous_response_id": response_id},
    )


def conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(
        reasons.ERROR_REASON_CONVERSATION_NOT_FOUND,
        f"conversation {conversation_id} not found",
        {"conversation_id": conversation_id},
    )


def request_not_found(request_id: str) -> NotFound:
    """No live conversation was created with ``request_id``."""
    return NotFound(
        reasons.ERROR_REASON_CONVERSATION_NOT_FOUND,
        f"no conversation was created with request_id {request_id}",
        {"request_id": request_id},
    )


def item_not_found(conversation_id: str, item_id: str) -> NotFound:
    return NotFound(
        reasons.ERROR_REASON_ITEM_NOT_FOUND,
        f"item {item_id} not found in conversation {conversation_id}",
        {"conversation_id": conversation_id, "item_id": item_id},
    )


def compaction_not_found(compaction_id: str) -> NotFound:
    return NotFound(
        reasons.ERROR_REASON_ITEM_NOT_FOUND,
        f"compaction {compaction_id} not found",
        {"item_id": compaction_id},
    )


def compaction_conflict(compaction_id: str) -> AlreadyExists:
    return AlreadyExists(
        reasons.ERROR_REASON_ITEM_ID_CONFLICT,
        f"compaction {compaction_id} is already stored with another summary",
        {"item_id": compaction_id},
    )


def response_id_conflict(response_id: str) -> AlreadyExists:
    return AlreadyExists(
        reasons.ERROR_REASON_RESPONSE_ID_CONFLICT,
        f"response {response_id} is already stored with different content",
        {"response_id": response_id},
    )


def item_id_conflict(conversation_id: str, item_id: str) -> AlreadyExists:
    return AlreadyExists(
        reasons.ERROR_REASON_ITEM_ID_CONFLICT,
        f"item {item_id} is already in conversation {conversation_id}",
        {"conversation_id": conversation_id, "item_id": item_id},
    )


def request_id_conflict(request_id: str) -> AlreadyExists:
    return AlreadyExists(
        reasons.ERROR_REASON_REQUEST_ID_CONFLICT,
        "request_id was already used with different content",
        {"request_id": request_id},
    )


def event_conflict(response_id: str, sequence: int) -> AlreadyExists:
    return AlreadyExists(
        reasons.ERROR_REASON_EVENT_CONFLICT,
        f"event {sequence} of {response_id} is stored with other content",
        {"response_id": response_id, "sequence_number": str(sequence)},
    )


def version_mismatch(conversation_id: str, expected: int, actual: int) -> Aborted:
    return Aborted(
        reasons.ERROR_REASON_VERSION_MISMATCH,
        f"conversation {conversation_id} is at version {actual}, not {expected}",
        {
            "conversation_id": conversation_id,
            "expected_version": str(expected),
            "actual_version": str(actual),
        },
    )


def response_in_progress(response_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        reasons.ERROR_REASON_RESPONSE_IN_PROGRESS,
        f"response {response_id} is still running: nothing can build on it until it is final",
        {"response_id": response_id},
    )


def previous_response_in_progress(response_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        reasons.ERROR_REASON_RESPONSE_IN_PROGRESS,
        f"previous response {response_id} is still running: a turn cannot build on it yet",
        {"previous_response_id": response_id},
    )


def history_broken(response_id: str, missing_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        reasons.ERROR_REASON_HISTORY_BROKEN,
        f"the history of {response_id} is broken: {missing_id} was deleted or has expired",
        {"response_id": response_id, "missing_response_id": missing_id},
    )


def lease_lost(
    response_id: str, lease_token: int, *, current: int, done: bool, cancelled: bool
) -> FailedPrecondition:
    """``lease_token`` is not the job's ``current`` one: it is ``done``, or claimed again."""
    why = "was finished" if done else f"was claimed again (token {current})"
    return FailedPrecondition(
        reasons.ERROR_REASON_LEASE_LOST,
        f"lease {lease_token} of background response {response_id} is no longer current: the "
        f"job {why}",
        {
            "response_id": response_id,
            "lease_token": str(lease_token),
            "current_lease_token": str(current),
            "cancelled": "true" if cancelled else "false",
        },
    )


def not_background(response_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        reasons.ERROR_REASON_NOT_BACKGROUND,
        f"response {response_id} is running but has no background job",
        {"response_id": response_id},
    )


def queue_full(scope: str, pending: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        reasons.ERROR_REASON_BACKGROUND_QUEUE_FULL,
        f"{pending} background responses are queued or running ({scope} cap {limit})",
        {"scope": scope, "limit": str(limit)},
    )


def backend_unavailable(detail: str) -> Unavailable:
    return Unavailable(
        reasons.ERROR_REASON_BACKEND_UNAVAILABLE,
        f"the storage backend cannot be reached: {detail}",
    )
