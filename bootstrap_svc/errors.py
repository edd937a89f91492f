"""The reference bootstrap service's errors: every refusal of BootstrapService and
ExecutionService, one class per gRPC status code.

Exception tree::

    gateway.grpcerrors.ServiceError  a gRPC status with ErrorInfo (code, reason, message, metadata)
    └── BootstrapError               domain "bootstrap.respgw.dev"; the reason is an ErrorReason value
        ├── InvalidArgument          INVALID_ARGUMENT     *_REQUIRED, *_INVALID, KIND_UNSPECIFIED,
        │                                                 KIND_DUPLICATED, SCOPE_CONFLICT
        ├── Unimplemented            UNIMPLEMENTED        KIND_UNSUPPORTED
        ├── NotFound                 NOT_FOUND            SESSION_NOT_FOUND, FILE_NOT_FOUND
        ├── AlreadyExists            ALREADY_EXISTS       REQUEST_ID_CONFLICT
        │   └── RequestConflict                           the registry: a request_id reused
        ├── ResourceExhausted        RESOURCE_EXHAUSTED   SESSION_LIMIT, FILE_TOO_LARGE, DISK_FULL
        │   └── SessionLimit                              the registry: the tenant's sessions
        ├── FailedPrecondition       FAILED_PRECONDITION  SESSION_GONE, SANDBOX_UNAVAILABLE
        │   └── SessionGone                               the registry: a named session is gone
        └── Internal                 INTERNAL             WORKDIR_UNAVAILABLE, EXECUTION_FAILED

The session registry (``sessions.py``) raises the three leaves with a message only; everything
else is built with :func:`invalid` or a class and a generated ``ErrorReason`` constant
(``protos/respgw/bootstrap/v1/error_reason.proto``), never a spelled reason. Both servicers put
every RPC behind one boundary (:func:`gateway.grpcerrors.servicer`) that turns these into
statuses; an exception outside the tree propagates (gRPC answers UNKNOWN).
"""

from __future__ import annotations

from typing import ClassVar, TypeAlias

import grpc

from gateway.grpcerrors import BOOTSTRAP_DOMAIN, ServiceError, reason
from respgw.bootstrap.v1 import error_reason_pb2 as reasons
from respgw.bootstrap.v1.error_reason_pb2 import ErrorReason

Reason: TypeAlias = ErrorReason.ValueType


class BootstrapError(ServiceError):
    """A refusal of the bootstrap service; each subclass fixes the status code. ``field`` names
    the request field at fault (ErrorInfo metadata "field") when there is one."""

    status: ClassVar[grpc.StatusCode]

    def __init__(self, why: Reason, message: str, field: str = "") -> None:
        super().__init__(
            self.status,
            reason(ErrorReason, why),
            message,
            {"field": field} if field else {},
            BOOTSTRAP_DOMAIN,
        )


class InvalidArgument(BootstrapError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class Unimplemented(BootstrapError):
    status = grpc.StatusCode.UNIMPLEMENTED


class NotFound(BootstrapError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BootstrapError):
    status = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(BootstrapError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(BootstrapError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Internal(BootstrapError):
    status = grpc.StatusCode.INTERNAL


# --- what the session registry refuses ------------------------------------------------------


class RequestConflict(AlreadyExists):
    """The request_id was used before with different content."""

    def __init__(self, message: str) -> None:
        super().__init__(reasons.ERROR_REASON_REQUEST_ID_CONFLICT, message)


class SessionLimit(ResourceExhausted):
    """The tenant already holds its maximum of live sessions."""

    def __init__(self, message: str) -> None:
        super().__init__(reasons.ERROR_REASON_SESSION_LIMIT, message)


class SessionGone(FailedPrecondition):
    """A session the request names explicitly expired, was released or never existed."""

    def __init__(self, message: str) -> None:
        super().__init__(reasons.ERROR_REASON_SESSION_GONE, message)


def invalid(why: Reason, message: str, field: str) -> InvalidArgument:
    """INVALID_ARGUMENT with reason ``why``, naming ``field``."""
    return InvalidArgument(why, message, field)


# The codes whose refusals a servicer logs as warnings: the service is full or failed.
WARN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED})
