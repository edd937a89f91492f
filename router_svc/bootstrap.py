"""The router's side of the bootstrap contract (respgw.bootstrap.v1.BootstrapService).

When a request declares stateful tools (code_interpreter, a hosted shell), the router calls
:meth:`Bootstrapper.prepare` once, after the history was loaded and the request validated and
before the first hub call. The result's ``injected_items`` go ahead of the caller's input in what
the hub sees (never in what is stored); ``tools`` holds the opaque prepared state per tool type for
the request's whole life. A failure is a :class:`router_svc.errors.BootstrapFailed` (code
``stateful_tool_bootstrap_failed``), raised before the hub is called.

:class:`GrpcBootstrapper` follows the proto's status table: it retries UNAVAILABLE, ABORTED and
DEADLINE_EXCEEDED with the same request_id (at most twice, with a short back-off, within an overall
budget) and maps every other failure at once. Each call's latency and failures are metrics
(``BOOTSTRAP_CALL_*``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, TypeVar

import grpc
import orjson
from prometheus_client import Counter, Histogram

from gateway import grpcclient, grpcerrors
from gateway.grpcserver import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from gateway.logs import request_id_var
from gateway.metrics import LATENCY_BUCKETS
from respgw.bootstrap.v1 import bootstrap_service_pb2 as pb
from respgw.bootstrap.v1 import bootstrap_service_pb2_grpc, resources_pb2
from router_svc import errors
from router_svc.config import RouterSettings
from router_svc.shapes import Item

log = logging.getLogger(__name__)

STATEFUL_TOOL_TYPES: dict[str, resources_pb2.ToolKind.ValueType] = {
    "code_interpreter": resources_pb2.TOOL_KIND_CODE_INTERPRETER,
    "shell": resources_pb2.TOOL_KIND_SHELL,
}
_TOOL_TYPES = {kind: name for name, kind in STATEFUL_TOOL_TYPES.items()}

# The codes after which the proto tells a caller to try again with the same request_id.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
MAX_RETRIES = 2
BACKOFF_S = (0.05, 0.2)
RETRY = grpcclient.RetryPolicy(RETRYABLE, BACKOFF_S[:MAX_RETRIES], jitter=True)

# Headers that carry credentials: never forwarded, whatever the configuration says.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)

T = TypeVar("T")


def is_local_shell(tool: Mapping[str, Any]) -> bool:
    """True for a ``shell`` tool whose commands the client runs, as in OpenAI's API: its
    ``environment`` is ``{"type": "local"}`` or absent (the model's ``shell_call`` items are
    returned to the client, which sends back ``shell_call_output`` items). Only a hosted shell
    (``container_auto``, ``container_reference``) runs in a session here."""
    if tool.get("type") != "shell":
        return False
    environment = tool.get("environment")
    return environment is None or (
        isinstance(environment, Mapping) and environment.get("type") == "local"
    )


def stateful_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stateful tool objects a request declares that need a prepared session, in order: a
    local shell (:func:`is_local_shell`) needs none. A type declared twice is the caller's
    error."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str) or kind not in STATEFUL_TOOL_TYPES:
            continue
        if kind in seen:
            raise errors.InvalidRequest(
                f"The tool type '{kind}' is declared more than once; declare it once.",
                param="tools",
                code="invalid_value",
            )
        seen.add(kind)
        if not is_local_shell(tool):
            found.append(tool)
    return found


@dataclass(frozen=True)
class PreparedToolState:
    """What the bootstrap service prepared for one tool: opaque state for whatever runs the tool
    (never stored, never shown to the client), the id the client may see, and its expiry."""

    state: bytes
    resource_id: str
    expire_time: datetime | None


@dataclass(frozen=True)
class Prepared:
    """The result of one bootstrap: items to put ahead of the caller's input (for the hub only)
    and the prepared state keyed by tool type ("code_interpreter", "shell")."""

    injected_items: list[Item]
    tools: dict[str, PreparedToolState]

    EMPTY: ClassVar[Prepared]


Prepared.EMPTY = Prepared(injected_items=[], tools={})


class Bootstrapper(Protocol):
    """Prepares and releases the state of stateful tools."""

    async def prepare(
        self,
        *,
        request_id: str,
        tenant: str,
        tools: list[dict[str, Any]],
        response_id: str,
        conversation_id: str,
        previous_response_id: str,
        headers: dict[str, str],
        metadata: dict[str, str],
    ) -> Prepared:
        """Prepares the stateful ``tools`` of one request; raises errors.BootstrapFailed."""
        ...

    async def release(
        self, *, tenant: str, conversation_id: str = "", response_id: str = ""
    ) -> None:
        """Releases what is held for a conversation or a chain; best effort, never raises."""
        ...

    async def close(self) -> None: ...


class NoopBootstrapper:
    """The built-in bootstrapper when no service is configured: prepares nothing."""

    async def prepare(
        self,
        *,
        request_id: str,
        tenant: str,
        tools: list[dict[str, Any]],
        response_id: str,
        conversation_id: str,
        previous_response_id: str,
        headers: dict[str, str],
        metadata: dict[str, str],
    ) -> Prepared:
        return Prepared.EMPTY

    async def release(
        self, *, tenant: str, conversation_id: str = "", response_id: str = ""
    ) -> None:
        return None

    async def close(self) -> None:
        return None


class GrpcBootstrapper:
    """Calls a BootstrapService over one long-lived channel, with a deadline on every call.

    ``timeout_s`` is the deadline of one attempt; all attempts of one call share ``budget_s``
    (twice ``timeout_s`` by default, so a retry after DEADLINE_EXCEEDED still gets a full try).
    """

    def __init__(
        self,
        target: str,
        timeout_s: float,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        budget_s: float | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.budget_s = budget_s if budget_s is not None else 2 * timeout_s
        self._max_message_bytes = max_message_bytes
        self._channel: grpc.aio.Channel | None = None
        self._stub: bootstrap_service_pb2_grpc.BootstrapServiceAsyncStub | None = None

    def _client(self) -> bootstrap_service_pb2_grpc.BootstrapServiceAsyncStub:
        # Made on first use, inside the event loop that will use it.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=channel_options(self._max_message_bytes)
            )
            self._stub = bootstrap_service_pb2_grpc.BootstrapServiceStub(self._channel)
        assert self._stub is not None
        return self._stub

    async def prepare(
        self,
        *,
        request_id: str,
        tenant: str,
        tools: list[dict[str, Any]],
        response_id: str,
        conversation_id: str,
        previous_response_id: str,
        headers: dict[str, str],
        metadata: dict[str, str],
    ) -> Prepared:
        declared = stateful_tools(tools)
        if not declared:
            return Prepared.EMPTY
        request = pb.PrepareToolsRequest(
            request_id=request_id,
            tenant=tenant,
            tools=[
                resources_pb2.ToolDeclaration(
                    kind=STATEFUL_TOOL_TYPES[tool["type"]], json=orjson.dumps(tool)
                )
                for tool in declared
            ],
            response_id=response_id,
            conversation_id=conversation_id,
            previous_response_id=previous_response_id,
            headers=_forwardable(headers),
            metadata=metadata,
        )
        stub = self._client()
        out = grpcclient.Outgoing(_SERVICE, "PrepareTools", request_id_var.get() or request_id)
        call_metadata = out.metadata
        code = "OK"
        failed = False
        try:
            reply = await self._with_retries(
                lambda timeout: stub.PrepareTools(request, timeout=timeout, metadata=call_metadata),
            )
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.RpcError as exc:
            err = grpcerrors.error_info(exc)
            code, failed = err.code.name, True
            log.warning(
                "bootstrap failed",
                extra={"code": err.code.name, "reason": err.reason, "detail": err.message},
            )
            raise errors.from_bootstrap_error(err) from exc
        finally:
            out.end(
                code,
                latency=BOOTSTRAP_CALL_LATENCY,
                failures=BOOTSTRAP_CALL_ERRORS if failed else None,
            )
        return _prepared(reply, [STATEFUL_TOOL_TYPES[t["type"]] for t in declared])

    async def release(
        self, *, tenant: str, conversation_id: str = "", response_id: str = ""
    ) -> None:
        if not conversation_id and not response_id:
            return
        request = pb.ReleaseToolsRequest(
            tenant=tenant, conversation_id=conversation_id, response_id=response_id
        )
        out = grpcclient.Outgoing(_SERVICE, "ReleaseTools")
        call_metadata = out.metadata
        code = "OK"
        failed = False
        try:
            stub = self._client()
            await self._with_retries(
                lambda timeout: stub.ReleaseTools(request, timeout=timeout, metadata=call_metadata)
            )
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.RpcError as exc:
            err = grpcerrors.error_info(exc)
            code = err.code.name
            # A service that keeps nothing says so with UNIMPLEMENTED: nothing to release.
            failed = err.code != grpc.StatusCode.UNIMPLEMENTED
            level = logging.WARNING if failed else logging.DEBUG
            log.log(
                level,
                "releasing stateful tools failed",
                extra={"code": err.code.name, "reason": err.reason, "detail": err.message},
            )
        except Exception:
            code, failed = "UNKNOWN", True
            log.exception("releasing stateful tools failed")
        finally:
            out.end(
                code,
                latency=BOOTSTRAP_CALL_LATENCY,
                failures=BOOTSTRAP_CALL_ERRORS if failed else None,
            )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def _with_retries(self, call: Callable[[float], Awaitable[T]]) -> T:
        """Runs ``call(timeout)`` and retries it as the proto's status table allows, within the
        overall budget."""
        return await grpcclient.retrying(
            call, RETRY, timeout_s=self.timeout_s, budget_s=self.budget_s, on_retry=_log_retry
        )


def _log_retry(code: grpc.StatusCode, attempt: int) -> None:
    log.info("retrying bootstrap call", extra={"code": code.name, "attempt": attempt})


_SERVICE = pb.DESCRIPTOR.services_by_name["BootstrapService"].full_name

BOOTSTRAP_CALL_LATENCY = Histogram(
    "respgw_router_bootstrap_call_latency_seconds",
    "Time of one bootstrap service call (PrepareTools, ReleaseTools) as the router sees it, "
    "retries included.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
BOOTSTRAP_CALL_ERRORS = Counter(
    "respgw_router_bootstrap_call_errors_total",
    "Failed bootstrap service calls, by method and status code (not a call the router "
    "cancelled, nor the UNIMPLEMENTED ReleaseTools of a service that keeps nothing).",
    ["method", "code"],
)


def _forwardable(headers: Mapping[str, str]) -> dict[str, str]:
    lowered = {name.lower(): value for name, value in headers.items()}
    return {name: value for name, value in lowered.items() if name not in _SECRET_HEADERS}


def _broken(message: str) -> errors.BootstrapFailed:
    return errors.BootstrapFailed(
        f"Preparing the stateful tools failed: the bootstrap service answered {message}.",
        param="tools",
        status=502,
    )


def _prepared(
    reply: pb.PrepareToolsResponse, declared: list[resources_pb2.ToolKind.ValueType]
) -> Prepared:
    """Checks a reply against the contract and converts it; a reply that breaks it is a failure
    of the service, like any other."""
    items: list[dict[str, Any]] = []
    for raw in reply.injected_items:
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            item = None
        if not isinstance(item, dict):
            raise _broken("an injected item that is not a JSON object")
        items.append(item)
    tools: dict[str, PreparedToolState] = {}
    for prepared in reply.prepared:
        name = _TOOL_TYPES.get(prepared.kind)
        if name is None or prepared.kind not in declared:
            raise _broken(f"state for a tool kind the request did not declare ({prepared.kind})")
        if name in tools:
            raise _broken(f"state for the tool '{name}' twice")
        expire = (
            prepared.expire_time.ToDatetime(tzinfo=UTC)
            if prepared.HasField("expire_time")
            else None
        )
        tools[name] = PreparedToolState(
            state=prepared.state, resource_id=prepared.resource_id, expire_time=expire
        )
    missing = [_TOOL_TYPES[k] for k in declared if _TOOL_TYPES[k] not in tools]
    if missing:
        raise _broken(f"no state for the tool '{missing[0]}'")
    return Prepared(injected_items=items, tools=tools)


def make_bootstrapper(settings: RouterSettings) -> Bootstrapper:
    """The bootstrapper the settings ask for: gRPC when an address is set, else the no-op."""
    if not settings.bootstrap_address:
        return NoopBootstrapper()
    return GrpcBootstrapper(settings.bootstrap_address, settings.bootstrap_timeout_s)
