"""google.rpc rich errors for the gateway's gRPC services.

Servers raise :class:`ServiceError`; the servicer boundary turns it into a status whose
``grpc-status-details-bin`` trailer carries a ``google.rpc.ErrorInfo`` with a stable reason.
Clients read the reason back with :func:`error_info`. Each proto package lists its reasons as an
``ErrorReason`` enum (``error_reason.proto``); :func:`reason` spells a value as the string sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

STATE_DOMAIN = "state.respgw.dev"
BOOTSTRAP_DOMAIN = "bootstrap.respgw.dev"
# An ErrorReason value's name is this prefix (buf's enum value rule) and the reason string.
REASON_PREFIX = "ERROR_REASON_"

V = TypeVar("V", bound=int)


def reason(enum: _EnumTypeWrapper[V], value: V) -> str:
    """The ErrorInfo reason an ``ErrorReason`` value stands for: ``reason(ErrorReason,
    ERROR_REASON_SESSION_LIMIT)`` is ``"SESSION_LIMIT"``."""
    return enum.Name(value).removeprefix(REASON_PREFIX)


@dataclass
class ServiceError(Exception):
    """An error a servicer returns to its caller as a gRPC status with ErrorInfo."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    domain: str = STATE_DOMAIN

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_status(self) -> grpc.Status:
        # A caller's id echoed whole could push the trailers past gRPC's metadata limit, which
        # turns the status into RESOURCE_EXHAUSTED: echoes are cut.
        info = error_details_pb2.ErrorInfo(
            reason=self.reason,
            domain=self.domain,
            metadata={k: clip(v) for k, v in self.metadata.items()},
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(
            code=self.code.value[0], message=clip(self.message, 1024), details=[detail]
        )
        result: grpc.Status = rpc_status.to_status(status)
        return result


def clip(text: str, limit: int = 256) -> str:
    """``text`` cut to ``limit`` characters (marked with an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


async def abort(context: grpc.aio.ServicerContext[object, object], error: ServiceError) -> None:
    """Ends the call with ``error``'s status and ErrorInfo; never returns."""
    await context.abort_with_status(error.to_status())


@dataclass(frozen=True)
class RemoteError:
    """What a client learns from a failed call: the code, the reason and the message."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str]
    domain: str


def error_info(exc: grpc.RpcError) -> RemoteError:
    """Reads the status code and the ErrorInfo (if any) from a failed call."""
    code = grpc.StatusCode.UNKNOWN
    message = ""
    trailers: Any = None
    if isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        code = exc.code()
        message = exc.details() or ""
        trailers = exc.trailing_metadata()
    reason, domain, meta = "", "", {}
    for key, value in trailers or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, meta = info.reason, info.domain, dict(info.metadata)
    return RemoteError(code=code, reason=reason, message=message, metadata=meta, domain=domain)
