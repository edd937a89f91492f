"""The reference BootstrapService servicer: validates calls as bootstrap_service.proto says, keeps
PrepareTools idempotent on (tenant, request_id), and prepares one execution session per tool.

Every refusal is a gRPC status with a google.rpc.ErrorInfo in the domain ``bootstrap.respgw.dev``
whose reason is one of these ``ErrorReason`` values (``error_reason.proto``, built from the
generated constants): REQUEST_ID_REQUIRED, TENANT_REQUIRED, TOOLS_REQUIRED, KIND_UNSPECIFIED,
KIND_DUPLICATED, TOOL_JSON_INVALID, SCOPE_CONFLICT, SCOPE_REQUIRED (INVALID_ARGUMENT);
KIND_UNSUPPORTED (UNIMPLEMENTED); REQUEST_ID_CONFLICT (ALREADY_EXISTS); SESSION_LIMIT
(RESOURCE_EXHAUSTED); SESSION_GONE (FAILED_PRECONDITION); WORKDIR_UNAVAILABLE (INTERNAL). They
are the classes of ``bootstrap_svc.errors``, mapped to statuses by one boundary for every RPC.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import grpc
import orjson
from google.protobuf import timestamp_pb2

from bootstrap_svc import errors, sessions
from bootstrap_svc.errors import invalid as _invalid
from gateway import grpcerrors
from respgw.bootstrap.v1 import bootstrap_service_pb2 as pb
from respgw.bootstrap.v1 import bootstrap_service_pb2_grpc, resources_pb2
from respgw.bootstrap.v1 import error_reason_pb2 as reasons

log = logging.getLogger(__name__)

IMPLEMENTATION = "respgw-reference/0.1"

# The kinds this service prepares, by their Responses API tool type.
KINDS: dict[resources_pb2.ToolKind.ValueType, str] = {
    resources_pb2.TOOL_KIND_CODE_INTERPRETER: "code_interpreter",
    resources_pb2.TOOL_KIND_SHELL: "shell",
}

Ctx = grpc.aio.ServicerContext[Any, Any]


# An automatic container's memory_limit (OpenAI's values), in bytes.
MEMORY_LIMITS = {"1g": 1 << 30, "4g": 4 << 30, "16g": 16 << 30, "64g": 64 << 30}


def _memory(options: object, field: str, max_memory_bytes: int) -> int:
    """The memory an automatic container's ``memory_limit`` asks for; 0 when it names none."""
    limit = options.get("memory_limit") if isinstance(options, dict) else None
    if limit is None:
        return 0
    size = MEMORY_LIMITS.get(limit) if isinstance(limit, str) else None
    if size is None:
        raise _invalid(
            reasons.ERROR_REASON_TOOL_JSON_INVALID,
            f"{field}.json memory_limit must be one of {', '.join(MEMORY_LIMITS)}",
            f"{field}.json",
        )
    if max_memory_bytes and size > max_memory_bytes:
        raise _invalid(
            reasons.ERROR_REASON_TOOL_JSON_INVALID,
            f"{field}.json memory_limit {limit} is more than this service gives a session "
            f"({max_memory_bytes >> 20} MiB)",
            f"{field}.json",
        )
    return size


def _claims(request: pb.PrepareToolsRequest, max_memory_bytes: int = 0) -> list[sessions.Claim]:
    """Validates the declared tools; returns what each needs from the session store."""
    if not request.tools:
        raise _invalid(
            reasons.ERROR_REASON_TOOLS_REQUIRED, "at least one tool is required", "tools"
        )
    claims: list[sessions.Claim] = []
    seen: set[resources_pb2.ToolKind.ValueType] = set()
    for i, tool in enumerate(request.tools):
        field = f"tools[{i}]"
        if tool.kind == resources_pb2.TOOL_KIND_UNSPECIFIED:
            raise _invalid(
                reasons.ERROR_REASON_KIND_UNSPECIFIED,
                f"{field}.kind is unspecified",
                f"{field}.kind",
            )
        if tool.kind in seen:
            raise _invalid(
                reasons.ERROR_REASON_KIND_DUPLICATED,
                f"{field}.kind is declared more than once",
                f"{field}.kind",
            )
        seen.add(tool.kind)
        try:
            obj = orjson.loads(tool.json)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise _invalid(
                reasons.ERROR_REASON_TOOL_JSON_INVALID,
                f"{field}.json is not a UTF-8 JSON object",
                f"{field}.json",
            )
        kind = KINDS.get(tool.kind)
        if kind is None:
            continue  # UNIMPLEMENTED, reported after every INVALID_ARGUMENT check
        if obj.get("type", kind) != kind:
            raise _invalid(
                reasons.ERROR_REASON_TOOL_JSON_INVALID,
                f"{field}.json has type {obj.get('type')!r}, not {kind!r}",
                f"{field}.json",
            )
        container = obj.get("container")
        if container is not None and not isinstance(container, str | dict):
            raise _invalid(
                reasons.ERROR_REASON_TOOL_JSON_INVALID,
                f"{field}.json container must be a container id or an object",
                f"{field}.json",
            )
        environment = obj.get("environment")
        if (
            kind == "shell"
            and isinstance(environment, dict)
            and environment.get("type") == "container_reference"
        ):
            reference = environment.get("container_id")
            if not isinstance(reference, str) or not reference:
                raise _invalid(
                    reasons.ERROR_REASON_TOOL_JSON_INVALID,
                    f"{field}.json environment.container_id must be a container id",
                    f"{field}.json",
                )
            # OpenAI's shell in a container of the Containers API (or a code_interpreter's).
            claims.append(sessions.Claim(kind, reference, any_kind=True))
            continue
        # A container id asks for that session; an object ({"type": "auto"}) lets us choose, and
        # its memory_limit (or a shell's container_auto environment's) sizes a session we make.
        if isinstance(container, str):
            claims.append(sessions.Claim(kind, container))
            continue
        auto = container if kind == "code_interpreter" else environment
        if kind == "shell" and not (
            isinstance(auto, dict) and auto.get("type") == "container_auto"
        ):
            auto = None
        claims.append(sessions.Claim(kind, "", memory_bytes=_memory(auto, field, max_memory_bytes)))
    for i, tool in enumerate(request.tools):
        if tool.kind not in KINDS:
            raise errors.Unimplemented(
                reasons.ERROR_REASON_KIND_UNSUPPORTED,
                f"tools[{i}].kind {tool.kind} is not supported; see GetCapabilities",
                f"tools[{i}].kind",
            )
    return claims


def _instructions(session: sessions.Session) -> str:
    if session.kind == "code_interpreter":
        return (
            f"The code_interpreter tool runs your code in container {session.id}: Python in a "
            "sandbox without network access, whose working directory is /mnt/data (kept by the "
            f"service in {session.directory}). Variables, imports and the files written to "
            "/mnt/data stay available to later calls and later turns of this conversation until "
            "the container expires after a period without use."
        )
    return (
        f"The shell tool runs your commands in session {session.id}: a sandbox without network "
        "access whose working directory is /mnt/data (kept by the service in "
        f"{session.directory}). Files written there stay available to later turns of this "
        "conversation until the session expires after a period without use."
    )


def _render(
    request: pb.PrepareToolsRequest, found: list[sessions.Session]
) -> pb.PrepareToolsResponse:
    response = pb.PrepareToolsResponse()
    for tool, session in zip(request.tools, found, strict=True):
        item = {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": _instructions(session)}],
        }
        response.injected_items.append(orjson.dumps(item))
        expire = timestamp_pb2.Timestamp()
        expire.FromNanoseconds(int(session.expire_at * 1e9))
        state = {"session_id": session.id, "kind": session.kind, "directory": session.directory}
        response.prepared.append(
            resources_pb2.PreparedTool(
                kind=tool.kind,
                state=orjson.dumps(state),
                resource_id=session.id,
                expire_time=expire,
            )
        )
    return response


@grpcerrors.servicer(pb.DESCRIPTOR.services_by_name["BootstrapService"], log=log, warn=errors.WARN)
class BootstrapServicer(bootstrap_service_pb2_grpc.BootstrapServiceServicer):
    """Implements respgw.bootstrap.v1.BootstrapService over a :class:`sessions.SessionStore`."""

    def __init__(self, store: sessions.SessionStore, *, max_memory_bytes: int = 0) -> None:
        self._store = store
        # The most memory_limit an automatic container may ask for; 0: any of MEMORY_LIMITS.
        self._max_memory_bytes = max_memory_bytes

    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Ctx
    ) -> pb.GetCapabilitiesResponse:
        return pb.GetCapabilitiesResponse(
            tool_kinds=sorted(KINDS),
            supports_release=True,
            sessions_survive_restart=True,
            implementation=IMPLEMENTATION,
        )

    async def PrepareTools(
        self, request: pb.PrepareToolsRequest, context: Ctx
    ) -> pb.PrepareToolsResponse:
        return await self._prepare(request)

    async def _prepare(self, request: pb.PrepareToolsRequest) -> pb.PrepareToolsResponse:
        if not request.request_id:
            raise _invalid(
                reasons.ERROR_REASON_REQUEST_ID_REQUIRED, "request_id is required", "request_id"
            )
        if not request.tenant:
            raise _invalid(reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", "tenant")
        claims = _claims(request, self._max_memory_bytes)
        if request.conversation_id and request.previous_response_id:
            raise _invalid(
                reasons.ERROR_REASON_SCOPE_CONFLICT,
                "conversation_id and previous_response_id cannot both be set",
                "previous_response_id",
            )
        # Deterministic serialization orders the map fields, so equal content gives equal bytes.
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
        scope = sessions.Scope(
            conversation_id=request.conversation_id,
            previous_response_id=request.previous_response_id,
            response_id=request.response_id,
        )
        try:
            # RequestConflict, SessionLimit and SessionGone are refusals of their own.
            result, replayed = self._store.prepare(
                tenant=request.tenant,
                request_id=request.request_id,
                fingerprint=fingerprint,
                claims=claims,
                scope=scope,
                render=lambda found: _render(request, found).SerializeToString(),
            )
        except OSError as exc:
            log.exception("cannot create a session directory")
            raise errors.Internal(
                reasons.ERROR_REASON_WORKDIR_UNAVAILABLE,
                f"cannot create a session directory: {exc.strerror or exc}",
            ) from exc
        response = pb.PrepareToolsResponse.FromString(result)
        response.replayed = replayed
        log.info(
            "prepared tools",
            extra={
                "tenant": request.tenant,
                "sessions": [p.resource_id for p in response.prepared],
                "replayed": replayed,
            },
        )
        return response

    async def ReleaseTools(
        self, request: pb.ReleaseToolsRequest, context: Ctx
    ) -> pb.ReleaseToolsResponse:
        return await self._release(request)

    async def _release(self, request: pb.ReleaseToolsRequest) -> pb.ReleaseToolsResponse:
        if not request.tenant:
            raise _invalid(reasons.ERROR_REASON_TENANT_REQUIRED, "tenant is required", "tenant")
        if not request.conversation_id and not request.response_id:
            raise _invalid(
                reasons.ERROR_REASON_SCOPE_REQUIRED,
                "conversation_id or response_id is required",
                "conversation_id",
            )
        count = await self._store.release(
            request.tenant,
            conversation_id=request.conversation_id,
            response_id=request.response_id,
        )
        if count:
            log.info("released sessions", extra={"tenant": request.tenant, "count": count})
        return pb.ReleaseToolsResponse(released_count=count)
