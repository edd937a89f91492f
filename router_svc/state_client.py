"""The router's client of the state service: one long-lived channel, a deadline on every call,
and retries only where the contract allows them.

Which calls may be retried is read from the contract itself: an RPC whose proto declares
``idempotency_level`` NO_SIDE_EFFECTS or IDEMPOTENT is retried on UNAVAILABLE (the server wrote
nothing, or the replay is harmless by contract); any other RPC is never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Histogram

from gateway import grpcerrors, tracing
from gateway.grpcserver import channel_options
from gateway.logs import REQUEST_ID_HEADER, request_id_var
from gateway.metrics import LATENCY_BUCKETS
from respgw.state.v1 import state_service_pb2 as pb
from respgw.state.v1 import state_service_pb2_grpc as pb_grpc
from router_svc import errors

log = logging.getLogger(__name__)

SERVICE_NAME = "respgw.state.v1.StateService"

STATE_CALL_LATENCY = Histogram(
    "respgw_router_state_call_latency_seconds",
    "Time of one state service call as the router sees it, retries included.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
STATE_CALL_ERRORS = Counter(
    "respgw_router_state_call_errors_total",
    "Failed state service calls, by method and status code.",
    ["method", "code"],
)

_SAFE_LEVELS = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
}


def retryable_methods() -> frozenset[str]:
    """The RPCs the contract marks safe to retry (NO_SIDE_EFFECTS or IDEMPOTENT)."""
    service = pb.DESCRIPTOR.services_by_name["StateService"]
    return frozenset(
        m.name for m in service.methods if m.GetOptions().idempotency_level in _SAFE_LEVELS
    )


RETRYABLE = retryable_methods()
_BACKOFF_S = (0.05, 0.2)

Resp = TypeVar("Resp")


class StateClient:
    """Calls the state service; every failure comes out as a :class:`errors.ApiError`."""

    def __init__(
        self, target: str, *, timeout_s: float, max_message_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=channel_options(max_message_bytes)
        )
        self._stub = pb_grpc.StateServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self._timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self) -> bool:
        """True when the state service answers its health check with SERVING."""
        try:
            reply = await self._health_check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self._timeout_s
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def call(
        self,
        method: str,
        request: Any,
        *,
        param: str | None = None,
        not_found: Callable[[grpcerrors.RemoteError], errors.ApiError] | None = None,
    ) -> Any:
        """Calls ``method`` with ``request``; maps a failure with :func:`errors.from_state_error`
        (or ``not_found`` for NOT_FOUND)."""
        rpc = getattr(self._stub, method)
        metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID_HEADER, request_id_var.get()),)
        span = None
        if tracing.enabled:
            full = f"{SERVICE_NAME}/{method}"
            span = tracing.start_client(full, tracing.grpc_attributes(full))
            metadata = tracing.grpc_metadata(span, metadata)
        code = "OK"
        attempts = len(_BACKOFF_S) + 1 if method in RETRYABLE else 1
        start = time.perf_counter()
        try:
            for attempt in range(attempts):
                try:
                    return await rpc(request, timeout=self._timeout_s, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    retry = exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < attempts - 1
                    if retry:
                        log.warning(
                            "state call unavailable, retrying",
                            extra={"method": method, "attempt": attempt + 1},
                        )
                        await asyncio.sleep(_BACKOFF_S[attempt])
                        continue
                    info = grpcerrors.error_info(exc)
                    code = info.code.name
                    STATE_CALL_ERRORS.labels(method, code).inc()
                    if info.code == grpc.StatusCode.NOT_FOUND and not_found is not None:
                        raise not_found(info) from exc
                    mapped = errors.from_state_error(info, param=param)
                    if mapped.status >= 500:
                        log.error(
                            "state call failed",
                            extra={
                                "method": method,
                                "code": info.code.name,
                                "detail": info.message,
                            },
                        )
                    raise mapped from exc
            raise AssertionError("unreachable")
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            STATE_CALL_LATENCY.labels(method).observe(time.perf_counter() - start)
            if span is not None:
                tracing.end_grpc(span, code, server=False)

    async def find(self, method: str, request: Any) -> Any | None:
        """Like :meth:`call`, but NOT_FOUND answers None instead of raising."""
        try:
            return await self.call(method, request, not_found=_Missing.of)
        except _Missing:
            return None


class _Missing(errors.ApiError):
    """NOT_FOUND inside :meth:`StateClient.find`; never leaves this module."""

    @classmethod
    def of(cls, err: grpcerrors.RemoteError) -> errors.ApiError:
        return cls(err.message)
