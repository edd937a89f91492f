"""OpenAI's Containers API over the execution contract: a container is an execution session.

| route | execution RPC |
|---|---|
| POST /v1/containers (name, expires_after, memory_limit) | CreateSession |
| GET /v1/containers (after, limit, order, name) | ListSessions |
| GET, DELETE /v1/containers/{id} | GetSession, DeleteSession |
| POST /v1/containers/{id}/files (multipart ``file``, or JSON ``file_id``) | UploadFile |
| GET /v1/containers/{id}/files (after, limit, order) | ListFiles |
| GET, DELETE /v1/containers/{id}/files/{file_id} | GetFile, DeleteFile |
| GET /v1/containers/{id}/files/{file_id}/content | DownloadFile |

Everything is scoped to the caller's tenant: another tenant's container is a 404. The containers
the bootstrap service made for conversations and chains (``{"type": "auto"}``) are listed too, as
at OpenAI. A ``file_id`` names a file of another of the tenant's containers (there is no Files
API here): it is copied. Without an execution service (``--bootstrap-address``) that has
sessions and files, these routes answer 501 ``containers_unavailable``.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from router_svc import errors, execution
from router_svc.http import (
    JSONResponse,
    idempotency_key,
    list_page,
    query_limit,
    query_order,
    read_json,
    services,
    tenant,
)
from router_svc.ids import new_id

MEMORY_LIMITS = {"1g": 1 << 30, "4g": 4 << 30, "16g": 16 << 30, "64g": 64 << 30}
_CONTAINER_KEYS = frozenset(
    {"name", "expires_after", "file_ids", "memory_limit", "network_policy", "skills"}
)
# A file name as a path under /mnt/data: no folders, nothing a shell would stumble on.
_UNSAFE = re.compile(r"[^A-Za-z0-9._ @+=,-]")


async def _executor(request: Request, *, files: bool = False) -> execution.GrpcExecutor:
    executor = services(request).executor
    caps = await executor.capabilities() if executor is not None else None
    if (
        executor is None
        or caps is None
        or not (caps.supports_files if files else caps.supports_sessions)
    ):
        raise errors.ApiError(
            "The Containers API is not available on this server: it needs an execution service "
            "with sessions and files (the bootstrap service's address, --bootstrap-address).",
            status=501,
            code="containers_unavailable",
            headers={"x-should-retry": "false"},
        )
    return executor


def _memory_name(size: int) -> str | None:
    for name, value in MEMORY_LIMITS.items():
        if value == size:
            return name
    return None


def container_json(session: execution.SessionInfo) -> dict[str, Any]:
    return {
        "id": session.session_id,
        "object": "container",
        "created_at": session.created_at,
        "status": "running",
        "expires_after": {
            "anchor": "last_active_at",
            "minutes": max(1, round(session.idle_ttl_s / 60)),
        },
        "last_active_at": session.last_active_at,
        "name": session.name,
        "memory_limit": _memory_name(session.memory_limit_bytes),
    }


def file_json(container_id: str, f: execution.FileInfo) -> dict[str, Any]:
    return {
        "id": f.file_id,
        "object": "container.file",
        "created_at": f.created_at,
        "bytes": f.size_bytes,
        "container_id": container_id,
        "path": f.path,
        "source": f.source,
    }


def _page(items: list[dict[str, Any]], request: Request, kind: str) -> dict[str, Any]:
    """One page of ``items`` (oldest first) by the query's after, limit and order."""
    limit = query_limit(request)
    if query_order(request) == "desc":
        items = items[::-1]
    after = request.query_params.get("after")
    if after:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise errors.NotFound(f"No {kind} found with id '{after}'.", param="after")
        items = items[ids.index(after) + 1 :]
    return list_page(items[:limit], len(items) > limit)


def _invalid(message: str, param: str, code: str = "invalid_value") -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param, code=code)


def _container_body(body: dict[str, Any]) -> tuple[str, float | None, int]:
    """(name, idle TTL in seconds, memory in bytes) of a container to create."""
    unknown = sorted(set(body) - _CONTAINER_KEYS)
    if unknown:
        raise _invalid(
            f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter"
        )
    name = body.get("name")
    if not isinstance(name, str):
        raise _invalid(
            "Missing required parameter: 'name'."
            if name is None
            else "Invalid type for 'name': expected a string.",
            "name",
            "missing_required_parameter" if name is None else "invalid_type",
        )
    ttl: float | None = None
    expires = body.get("expires_after")
    if expires is not None:
        if not isinstance(expires, dict) or expires.get("anchor") != "last_active_at":
            raise _invalid(
                'Invalid \'expires_after\': expected {"anchor": "last_active_at", "minutes": n}.',
                "expires_after",
            )
        minutes = expires.get("minutes")
        if not isinstance(minutes, int) or isinstance(minutes, bool) or minutes < 1:
            raise _invalid(
                "Invalid 'expires_after.minutes': expected a positive integer.",
                "expires_after.minutes",
            )
        ttl = minutes * 60.0
    memory = 0
    limit = body.get("memory_limit")
    if limit is not None:
        if limit not in MEMORY_LIMITS:
            raise _invalid(
                f"Invalid value for 'memory_limit': expected one of {', '.join(MEMORY_LIMITS)}.",
                "memory_limit",
            )
        memory = MEMORY_LIMITS[limit]
    if body.get("file_ids"):
        raise _invalid(
            "file_ids is not supported by this server (it has no Files API): upload the files "
            "with POST /v1/containers/{container_id}/files instead.",
            "file_ids",
            "unsupported_parameter",
        )
    policy = body.get("network_policy")
    if policy is not None and (not isinstance(policy, dict) or policy.get("type") != "disabled"):
        raise _invalid(
            'Only network_policy {"type": "disabled"} is supported: containers here have no '
            "network access.",
            "network_policy",
            "unsupported_value",
        )
    if body.get("skills"):
        raise _invalid(
            "skills are not supported by this server.", "skills", "unsupported_parameter"
        )
    return name, ttl, memory


async def create_container(request: Request) -> Response:
    who = tenant(request)
    body = await read_json(request)
    executor = await _executor(request)
    name, ttl, memory = _container_body(body)
    key = idempotency_key(request)
    session = await executor.create_session(
        tenant=who,
        request_id=f"idem:{key}" if key else new_id("req"),
        name=name,
        idle_ttl_s=ttl,
        memory_limit_bytes=memory,
    )
    return JSONResponse(container_json(session))


async def list_containers(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request)
    sessions = await executor.list_sessions(who)
    name = request.query_params.get("name")
    found = [container_json(s) for s in sessions if name is None or s.name == name]
    return JSONResponse(_page(found, request, "container"))


def _container_id(request: Request) -> str:
    container_id: str = request.path_params["container_id"]
    return container_id


async def get_container(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request)
    return JSONResponse(container_json(await executor.get_session(who, _container_id(request))))


async def delete_container(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request)
    container_id = _container_id(request)
    await executor.delete_session(who, container_id)
    return JSONResponse({"id": container_id, "object": "container.deleted", "deleted": True})


# --- files ---------------------------------------------------------------------------------------


async def _raw_body(request: Request) -> bytes:
    """The body, refused (413) beyond --max-body-bytes whatever its content type."""
    limit = services(request).settings.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise errors.RequestTooLarge(
                    f"The request body is larger than the limit of {limit} bytes.",
                    headers={"connection": "close"},
                )
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise errors.InvalidRequest(
            "The connection was closed before the request body was complete.",
            code="incomplete_body",
        ) from exc
    return b"".join(chunks)


def _multipart_file(content_type: str, raw: bytes) -> tuple[str, bytes]:
    """(file name, content) of the ``file`` field of a multipart/form-data body."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
    )
    if not message.is_multipart():
        raise _invalid("The multipart body could not be parsed.", "file")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") != "file":
            continue
        filename = part.get_filename() or "upload"
        payload = part.get_payload(decode=True)
        return filename, payload if isinstance(payload, bytes) else b""
    raise _invalid("Missing required parameter: 'file'.", "file", "missing_required_parameter")


def _safe_name(filename: str) -> str:
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = _UNSAFE.sub("_", name).lstrip(".") or "upload"
    return name[:200]


async def _copied(executor: execution.GrpcExecutor, who: str, file_id: str) -> tuple[str, bytes]:
    """(file name, content) of a file of another of the tenant's containers."""
    for session in await executor.list_sessions(who):
        for f in await executor.list_files(who, session.session_id):
            if f.file_id == file_id:
                _, content = await executor.download_file(who, session.session_id, file_id)
                return f.filename, b"".join([chunk async for chunk in content])
    raise errors.NotFound(f"No file found with id '{file_id}'.", param="file_id")


async def create_file(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request, files=True)
    container_id = _container_id(request)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        filename, data = _multipart_file(content_type, await _raw_body(request))
    else:
        body = await read_json(request)
        file_id = body.get("file_id")
        if not isinstance(file_id, str) or not file_id:
            raise _invalid(
                "Send the file as multipart/form-data ('file'), or JSON with a 'file_id'.",
                "file",
                "missing_required_parameter",
            )
        await executor.get_session(who, container_id)  # a 404 before anything is read
        filename, data = await _copied(executor, who, file_id)
    uploaded = await executor.upload_file(who, container_id, _safe_name(filename), data)
    return JSONResponse(file_json(container_id, uploaded))


async def list_files(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request, files=True)
    container_id = _container_id(request)
    found = [file_json(container_id, f) for f in await executor.list_files(who, container_id)]
    return JSONResponse(_page(found, request, "file"))


def _file_id(request: Request) -> str:
    file_id: str = request.path_params["file_id"]
    return file_id


async def get_file(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request, files=True)
    container_id = _container_id(request)
    found = await executor.get_file(who, container_id, _file_id(request))
    return JSONResponse(file_json(container_id, found))


async def file_content(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request, files=True)
    info, content = await executor.download_file(who, _container_id(request), _file_id(request))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in content:
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await content.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(
        body(),
        media_type=info.media_type or "application/octet-stream",
        headers={
            "content-length": str(info.size_bytes),
            "content-disposition": f'attachment; filename="{_safe_name(info.filename)}"',
        },
    )


async def delete_file(request: Request) -> Response:
    who = tenant(request)
    executor = await _executor(request, files=True)
    file_id = _file_id(request)
    await executor.delete_file(who, _container_id(request), file_id)
    return JSONResponse({"id": file_id, "object": "container.file.deleted", "deleted": True})


routes = [
    Route("/v1/containers", create_container, methods=["POST"]),
    Route("/v1/containers", list_containers, methods=["GET"]),
    Route("/v1/containers/{container_id}", get_container, methods=["GET"]),
    Route("/v1/containers/{container_id}", delete_container, methods=["DELETE"]),
    Route("/v1/containers/{container_id}/files", create_file, methods=["POST"]),
    Route("/v1/containers/{container_id}/files", list_files, methods=["GET"]),
    Route("/v1/containers/{container_id}/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/containers/{container_id}/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/containers/{container_id}/files/{file_id}/content", file_content, methods=["GET"]),
]
