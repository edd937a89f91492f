"""google.rpc rich errors for the gateway's gRPC services.

Servers raise :class:`ServiceError`; the servicer boundary turns it into a status whose
``grpc-status-details-bin`` trailer carries a ``google.rpc.ErrorInfo`` with a stable reason.
Clients read the reason back with :func:`error_info`. Each proto package lists its reasons as an
``ErrorReason`` enum (``error_reason.proto``); :func:`reason` spells a value as the string sent.
Each service draws its tree of ServiceError classes in its own ``errors.py``; :func:`servicer` is
the one boundary, a class decorator that maps them to statuses for every RPC of a service.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from google.protobuf.descriptor import ServiceDescriptor
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

STATE_DOMAIN = "state.respgw.dev"
BOOTSTRAP_DOMAIN = "bootstrap.respgw.dev"
# An ErrorReason value's name is this prefix (buf's enum value rule) and the reason string.
REASON_PREFIX = "ERROR_REASON_"

V = TypeVar("V", bound=int)
S = TypeVar("S", bound=type)
Context = grpc.aio.ServicerContext[Any, Any]


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


# --- the servicer boundary ----------------------------------------------------------------------

# The attribute an RPC method wrapped by :func:`servicer` carries: the service's full name.
MAPPED = "__respgw_errors__"


def servicer(
    service: ServiceDescriptor,
    *,
    log: logging.Logger,
    internal: Callable[[], ServiceError] | None = None,
    warn: Collection[grpc.StatusCode] = (),
) -> Callable[[S], S]:
    """A class decorator that puts every RPC of ``service`` behind one error boundary.

    A :class:`ServiceError` raised by an RPC (before or between the messages of a streaming
    reply) ends the call with its status and ErrorInfo, logged as a warning when its code is in
    ``warn``. Any other exception is logged with its traceback and ends the call with
    ``internal()`` when given; without it, it propagates (gRPC logs it and answers UNKNOWN). An abort the
    RPC made itself (``context.abort``) and cancellation pass through untouched.

    The class must define every RPC of the descriptor itself (a servicer that inherits the
    generated UNIMPLEMENTED stub fails here, at import). The cost is one coroutine frame per
    call (one generator step per message of a streaming reply); nothing else is allocated
    unless an error is raised."""

    def wrap(cls: S) -> S:
        for method in service.methods:
            handler = cls.__dict__.get(method.name)
            if handler is None:
                raise TypeError(f"{cls.__name__} does not serve {service.full_name}/{method.name}")
            setattr(cls, method.name, _boundary(handler, service.full_name, log, internal, warn))
        return cls

    return wrap


def _boundary(
    handler: Callable[..., Any],
    service: str,
    log: logging.Logger,
    internal: Callable[[], ServiceError] | None,
    warn: Collection[grpc.StatusCode],
) -> Callable[..., Any]:
    rpc = f"/{service}/{handler.__name__}"

    async def fail(context: Context, exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            if exc.code in warn:
                log.warning(
                    "gRPC call refused",
                    extra={"rpc": rpc, "reason": exc.reason, "error": exc.message},
                )
            await abort(context, exc)
            return
        if internal is None:
            raise exc  # gRPC logs it and answers UNKNOWN
        log.exception("gRPC call failed", extra={"rpc": rpc})
        await abort(context, internal())

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async with contextlib.aclosing(handler(self, request, context)) as replies:
                    async for reply in replies:
                        yield reply
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc)

        setattr(stream, MAPPED, service)
        return stream

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: Context) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await fail(context, exc)
            raise AssertionError("abort returned") from exc

    setattr(unary, MAPPED, service)
    return unary
